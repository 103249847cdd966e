"""The Lightning callback trains tiny models with the real ``lightning.pytorch.Trainer``: stored
metrics against independent computations (dense float64 Hessian, the optimizer's threshold
formula, the training losses), mirrored TensorBoard/MLflow/trainer-logger values, and weights
bit-identical to the same run without the callback."""

from __future__ import annotations

import copy
import csv
from unittest import mock

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from gdscope.errors import InvalidArgumentError  # noqa: E402
from gdscope.integrations.lightning import GdscopeCallback  # noqa: E402
from gdscope.integrations.sinks import MLflowSink, TensorBoardSink  # noqa: E402
from gdscope.probes import Probe, SharpnessProbe, ThresholdProbe  # noqa: E402
from gdscope.store import Store  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*LeafSpec.*", "ignore:The number of training batches"
)


class Net(pl.LightningModule):
    """A tanh MLP classifier with dropout (so the RNG matters for the weights)."""

    def __init__(self, opt: str = "adam", lr: float = 1e-2, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt, self.lr = opt, lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _fit(callbacks=(), *, seed=0, steps=5, logger=False, module_kw=None, make=None, **trainer_kw):
    """Train for ``steps`` optimizer steps; ``make()`` may return another (module, loader)."""
    pl.seed_everything(seed, verbose=False)
    if make is None:
        X, Y = _data()
        loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
        module = Net(**(module_kw or {}))
    else:
        module, loader = make()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **trainer_kw,
    )
    trainer.fit(module, loader)
    return module


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _metric(path, name):
    with Store(path, readonly=True) as s:
        run = s.runs()[-1]
        return {st: v for st, n, v, _p, _i in s.metrics(run.id) if n == name}, run


def _dense_top_eig(module: Net, X, Y) -> float:
    """λ_max of the Hessian of mean cross-entropy at the module's weights (float64, eval mode)."""
    net = copy.deepcopy(module.net).double().eval()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def loss(v):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(net, out, (X.double(),)), Y)

    H = torch.autograd.functional.hessian(loss, flat)
    return torch.linalg.eigvalsh(H)[-1].item()


def test_weights_bit_identical_and_values_mirrored(tmp_path, monkeypatch):
    """Default probes, TensorBoard, MLflow and the trainer's CSVLogger: same weights as without."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import CSVLogger
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    plain = _fit(steps=6)
    cb = GdscopeCallback(
        tmp_path / "runs.db",
        curvature_every=2,
        run_name="lit",
        sinks=[TensorBoardSink(tmp_path / "tb"), MLflowSink(uri)],
    )
    tracked = _fit([cb], steps=6, logger=CSVLogger(tmp_path / "csv", name="", version=0))
    assert _same_weights(plain, tracked)

    loss, run = _metric(tmp_path / "runs.db", "loss")
    assert run.status == "completed" and run.name == "lit"
    assert run.config["integration"] == "lightning" and run.config["optimizer"] == "Adam"
    assert run.config["curvature_dtype"] == "float32" and run.config["precision"] == "32-true"
    assert sorted(loss) == list(range(6))
    assert [loss[t] for t in range(6)] == pytest.approx(tracked.losses, rel=1e-6)
    thr, _ = _metric(tmp_path / "runs.db", "preconditioned_threshold")
    assert thr[0] == pytest.approx((2 + 2 * 0.9) / ((1 - 0.9) * 1e-2))  # Adam: 38/η
    sharp, _ = _metric(tmp_path / "runs.db", "sharpness")
    assert sorted(sharp) == [0, 2, 4]

    with Store(tmp_path / "runs.db", readonly=True) as s:
        names = set(s.metric_names(run.id))
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {f"gdscope/{n}" for n in names}
    tb = {e.step: e.value for e in ea.Scalars("gdscope/sharpness")}
    assert tb == pytest.approx(sharp, rel=1e-6)
    client = MlflowClient(tracking_uri=uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("gdscope").experiment_id])
    assert mrun.info.run_name == "lit" and mrun.info.status == "FINISHED"
    hist = {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "gdscope/loss")}
    assert hist == pytest.approx(loss, rel=1e-12)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["gdscope/sharpness"]) for r in rows if r["gdscope/sharpness"]}
    assert logged == pytest.approx(sharp, rel=1e-6)


def test_the_bit_identity_check_can_fail():
    """Dropout makes the weights depend on the RNG: a callback that draws random numbers without
    restoring the state, or another seed, changes them (so equality above means something)."""

    class Draws(pl.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            torch.rand(1)

    plain = _fit(steps=4)
    assert not _same_weights(plain, _fit([Draws()], steps=4))
    assert not _same_weights(plain, _fit(seed=1, steps=4))


class _RandomProbe(Probe):
    """Consumes the global RNG inside the tracked step (the callback must restore it)."""

    name = "random"

    def compute(self, state):
        return {"random": torch.rand(()).item()}


def test_rng_consuming_probe_and_mode_restored(tmp_path):
    plain = _fit(steps=4)
    modes: list[bool] = []

    class Mode(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            modes.append(module.training and module.net[2].training)

    cb = GdscopeCallback(tmp_path / "r.db", [_RandomProbe()])
    tracked = _fit([cb, Mode()], steps=4)
    assert _same_weights(plain, tracked)
    assert modes == [True] * 4
    values, _ = _metric(tmp_path / "r.db", "random")
    assert sorted(values) == [0, 1, 2, 3]


def test_sharpness_and_threshold_against_dense_oracle(tmp_path):
    """SGD with momentum: sharpness on the fixed subset vs a dense float64 Hessian at the final
    weights on the subset gdscope's generator draws, and the threshold 2(1+μ)/η."""
    X, Y = _data()
    cb = GdscopeCallback(
        tmp_path / "o.db",
        [SharpnessProbe(1, tol=1e-6), ThresholdProbe()],
        eval_samples=24,
        seed=7,
    )
    module = _fit([cb], steps=3, module_kw={"opt": "sgd", "lr": 0.05, "dropout": 0.0})
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(7))[:24].sort().values
    sharp, run = _metric(tmp_path / "o.db", "sharpness")
    assert run.config["eval_samples"] == 24
    assert sharp[2] == pytest.approx(_dense_top_eig(module, X[idx], Y[idx]), rel=2e-4)
    thr, _ = _metric(tmp_path / "o.db", "threshold")
    assert thr == pytest.approx({t: 2 * 1.9 / 0.05 for t in range(3)})


def test_gradient_accumulation_tracks_optimizer_steps(tmp_path):
    cb = GdscopeCallback(tmp_path / "a.db", [ThresholdProbe()])
    _fit([cb], steps=3, accumulate_grad_batches=2)
    lr, run = _metric(tmp_path / "a.db", "lr")
    assert sorted(lr) == [0, 1, 2] and run.config["accumulate_grad_batches"] == 2


def test_bf16_mixed_measures_in_float32(tmp_path):
    """Under bf16 autocast the curvature is float32 (matches the float64 oracle to float32
    accuracy, far below bf16's 4e-3), the config says so, and the weights are unchanged."""
    X, Y = _data()
    kw = {"opt": "sgd", "lr": 0.05, "dropout": 0.0}
    plain = _fit(steps=3, module_kw=kw, precision="bf16-mixed")
    cb = GdscopeCallback(tmp_path / "b.db", [SharpnessProbe(1, tol=1e-6)], eval_samples=64)
    tracked = _fit([cb], steps=3, module_kw=kw, precision="bf16-mixed")
    assert _same_weights(plain, tracked)
    sharp, run = _metric(tmp_path / "b.db", "sharpness")
    assert run.config["precision"] == "bf16-mixed"
    assert run.config["curvature_dtype"] == "float32" and run.config["autocast_in_probes"] is False
    assert sharp[2] == pytest.approx(_dense_top_eig(tracked, X, Y), rel=2e-4)


def test_non_zero_rank_does_nothing(tmp_path):
    plain = _fit(steps=3)
    cb = GdscopeCallback(tmp_path / "rank.db")
    with mock.patch.object(
        pl.Trainer, "is_global_zero", new_callable=mock.PropertyMock, return_value=False
    ):
        tracked = _fit([cb], steps=3)
    assert cb.session is None and not (tmp_path / "rank.db").exists()
    assert _same_weights(plain, tracked)


def test_failing_probe_warns_stores_failed_and_training_goes_on(tmp_path):
    class Boom(Probe):
        name = "boom"

        def compute(self, state):
            if state.step == 1:
                raise RuntimeError("probe exploded")
            return {"boom": 1.0}

    plain = _fit(steps=4)
    cb = GdscopeCallback(tmp_path / "f.db", [Boom()])
    with pytest.warns(RuntimeWarning, match="probe exploded"):
        tracked = _fit([cb], steps=4)
    assert _same_weights(plain, tracked)
    values, run = _metric(tmp_path / "f.db", "boom")
    assert run.status == "failed" and sorted(values) == [0]
    cb = GdscopeCallback(tmp_path / "g.db", [Boom()], on_error="raise")
    with pytest.raises(RuntimeError, match="probe exploded"):
        _fit([cb], steps=4)


def test_missing_loss_and_bad_arguments(tmp_path):
    class NoLoss(Net):
        def __init__(self):
            super().__init__()
            del self.loss_fn
            self.crit = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            return self.crit(self(batch[0]), batch[1])

    X, Y = _data()
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[GdscopeCallback(tmp_path / "m.db")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    with pytest.raises(InvalidArgumentError, match="loss="):
        trainer.fit(NoLoss(), DataLoader(TensorDataset(X, Y), batch_size=16))
    with pytest.raises(InvalidArgumentError, match="on_error"):
        GdscopeCallback(on_error="ignore")
    with pytest.raises(InvalidArgumentError, match="curvature_every"):
        GdscopeCallback(curvature_every=0)
    with pytest.raises(InvalidArgumentError, match="model="):
        GdscopeCallback(model=3)  # type: ignore[arg-type]


def test_bf16_true_measures_float32_copies(tmp_path):
    """A model held in bfloat16: curvature on float32 copies of its weights, which the probes
    leave in bfloat16 and bit-identical to the run without the callback."""
    X, Y = _data()
    kw = {"opt": "sgd", "lr": 0.05, "dropout": 0.0}
    plain = _fit(steps=2, module_kw=kw, precision="bf16-true")
    cb = GdscopeCallback(tmp_path / "t.db", [SharpnessProbe(1, tol=1e-6)], eval_samples=64)
    tracked = _fit([cb], steps=2, module_kw=kw, precision="bf16-true")
    assert all(p.dtype == torch.bfloat16 for p in tracked.parameters())
    assert _same_weights(plain, tracked)
    sharp, run = _metric(tmp_path / "t.db", "sharpness")
    assert run.config["param_dtype"] == "bfloat16" and run.config["curvature_dtype"] == "float32"
    # the oracle at the same (bf16) weights in float64, on the float32 data gdscope measures on
    assert sharp[1] == pytest.approx(_dense_top_eig(tracked, X, Y), rel=2e-4)


class TokenNet(pl.LightningModule):
    """Token classifier on dict batches (``input_ids``, ``labels``), with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6, 10)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.emb(input_ids))))

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        return self.loss_fn(logits.reshape(-1, 10), batch["labels"].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 10, (32, 5), generator=torch.Generator().manual_seed(4))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": (self.ids[i] + 1) % 10}


def _tokens():
    return TokenNet(), DataLoader(_Tokens(), batch_size=8, shuffle=True)


def test_dict_batches_get_the_hf_adapter(tmp_path):
    """Dict batches: inputs passed as keywords, labels as targets; eval_loss equals the
    cross-entropy of the final module on the drawn subset, computed directly."""
    plain = _fit(steps=4, make=_tokens)
    cb = GdscopeCallback(tmp_path / "d.db", eval_samples=12, seed=3, curvature_every=1)
    tracked = _fit([cb], steps=4, make=_tokens)
    assert _same_weights(plain, tracked)
    values, run = _metric(tmp_path / "d.db", "eval_loss")
    assert run.config["eval_samples"] == 12 and sorted(values) == [0, 1, 2, 3]
    idx = torch.randperm(32, generator=torch.Generator().manual_seed(3))[:12].sort().values
    ds = _Tokens()
    tracked.eval()
    with torch.no_grad():
        ids = ds.ids[idx]
        ref = nn.functional.cross_entropy(
            tracked(ids).reshape(-1, 10), ((ids + 1) % 10).reshape(-1)
        )
    assert values[3] == pytest.approx(ref.item(), rel=1e-6)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(2)
        for _ in range(64):
            yield torch.randn(4, generator=g), torch.randint(0, 3, (), generator=g)


def test_iterable_dataset_uses_the_first_batches(tmp_path):
    """No __getitem__: the subset is the loader's first batches (iterating a loader draws from
    the global RNG; the callback restores it, so the weights stay bit-identical)."""

    def make():
        return Net(), DataLoader(_Stream(), batch_size=16)

    plain = _fit(steps=3, make=make)
    cb = GdscopeCallback(tmp_path / "i.db", [ThresholdProbe()], eval_samples=20)
    tracked = _fit([cb], steps=3, make=make)
    assert _same_weights(plain, tracked)
    _, run = _metric(tmp_path / "i.db", "lr")
    assert run.config["eval_samples"] == 32  # two batches of 16 cover the 20 asked for


def test_bad_subset_arguments_fail_at_construction():
    with pytest.raises(InvalidArgumentError, match="eval_samples"):
        GdscopeCallback(eval_samples=0)
    with pytest.raises(InvalidArgumentError, match="eval_batch_size"):
        GdscopeCallback(eval_batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="seed"):
        GdscopeCallback(seed="0")  # type: ignore[arg-type]


def test_training_that_raises_stores_the_run_as_failed(tmp_path):
    class Crash(Net):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise ArithmeticError("user code failed")
            return super().training_step(batch, batch_idx)

    def make():
        X, Y = _data()
        return Crash(), DataLoader(TensorDataset(X, Y), batch_size=16)

    cb = GdscopeCallback(tmp_path / "x.db", [ThresholdProbe()])
    with pytest.raises(ArithmeticError):
        _fit([cb], steps=5, make=make)
    lr, run = _metric(tmp_path / "x.db", "lr")
    assert run.status == "failed" and sorted(lr) == [0, 1]
