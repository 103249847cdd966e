"""The HF callback trains a tiny GPT-2 built from a config (no download) with the real
``transformers.Trainer``: stored metrics against independent computations (the model's own
loss, a dense float64 Hessian through ``torch.func``, the scheduler's learning rates and AdamW's
threshold), mirrored TensorBoard/MLflow values and the Trainer's own log, and weights
bit-identical to the same run without the callback."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.func import functional_call  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from gdscope.integrations.hf import GdscopeCallback, is_causal_lm  # noqa: E402
from gdscope.integrations.sinks import MLflowSink, TensorBoardSink  # noqa: E402
from gdscope.probes import SharpnessProbe, ThresholdProbe  # noqa: E402
from gdscope.store import Store  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LR, STEPS = 1e-2, 5


class Tokens(Dataset):
    """24 random sequences of 8 tokens from a vocabulary of 16; labels are the inputs."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 16, (24, 8), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1,
        n_embd=8,
        n_head=2,
        vocab_size=16,
        n_positions=8,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def _train(tmp_path, callbacks=(), *, dropout=0.1, steps=STEPS, **kw):
    model = _model(dropout)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=LR,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=2,
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))
    trainer.train()
    return model, trainer


def _same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _stored(path):
    with Store(path, readonly=True) as s:
        run = s.runs()[-1]
        out: dict[str, dict[int, float]] = {}
        for step, name, value, _p, _i in s.metrics(run.id):
            out.setdefault(name, {})[step] = value
    return out, run


def test_weights_bit_identical_and_values_mirrored(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    plain, _ = _train(tmp_path / "a")
    cb = GdscopeCallback(
        tmp_path / "runs.db",
        curvature_every=2,
        eval_samples=8,
        run_name="hf",
        sinks=[TensorBoardSink(tmp_path / "tb"), MLflowSink(uri)],
    )
    tracked, trainer = _train(tmp_path / "b", [cb])
    assert _same_weights(plain, tracked)

    values, run = _stored(tmp_path / "runs.db")
    cfg = run.config
    assert run.status == "completed" and run.name == "hf"
    assert cfg["integration"] == "hf" and cfg["shift"] is True and cfg["optimizer"] == "AdamW"
    assert cfg["eval_samples"] == 8 and cfg["curvature_dtype"] == "float32"
    assert sorted(values["loss"]) == list(range(STEPS))
    assert sorted(values["sharpness"]) == [0, 2, 4]
    # the learning rate the linear schedule sets for the next update, and AdamW's 38/η
    assert values["lr"] == pytest.approx({t: LR * (1 - (t + 1) / STEPS) for t in range(STEPS)})
    for t in range(STEPS - 1):
        assert values["preconditioned_threshold"][t] == pytest.approx(38 / values["lr"][t])

    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {f"gdscope/{n}" for n in values}
    tb = {e.step: e.value for e in ea.Scalars("gdscope/sharpness")}
    assert tb == pytest.approx(values["sharpness"], rel=1e-6)
    client = MlflowClient(tracking_uri=uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("gdscope").experiment_id])
    hist = {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "gdscope/lr")}
    assert hist == pytest.approx(values["lr"], rel=1e-12)
    # the Trainer's own log at its logging steps (2 and 4) carries the latest values
    logged = [h for h in trainer.state.log_history if "gdscope/loss" in h and "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        assert h["gdscope/loss"] == values["loss"][h["step"] - 1]
        assert h["gdscope/sharpness"] == values["sharpness"][h["step"] - 2]


def test_the_bit_identity_check_can_fail(tmp_path):
    """Dropout makes the weights depend on the RNG: a callback that draws a random number
    without restoring the state changes them."""

    class Draws(transformers.TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            torch.rand(1)

    plain, _ = _train(tmp_path / "a", steps=3)
    drawn, _ = _train(tmp_path / "b", [Draws()], steps=3)
    assert not _same_weights(plain, drawn)


def _hf_loss_and_top_eig(model, batch) -> tuple[float, float]:
    """The model's own loss (``labels=``, transformers' causal-LM loss) and the top eigenvalue of
    its dense float64 Hessian (torch.func.hessian, eager attention), in eval mode."""
    m = copy.deepcopy(model).double().eval()
    m.set_attn_implementation("eager")
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])

    def loss(v):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return functional_call(m, params, (), dict(batch)).loss

    H = torch.func.hessian(loss)(flat)
    return loss(flat).item(), torch.linalg.eigvalsh(H)[-1].item()


def test_loss_and_sharpness_against_the_models_own_loss(tmp_path):
    from gdscope.probes import LossProbe

    cb = GdscopeCallback(
        tmp_path / "o.db",
        [LossProbe(), SharpnessProbe(1, tol=1e-6), ThresholdProbe()],
        eval_samples=12,
        seed=5,
    )
    model, _ = _train(tmp_path, [cb], dropout=0.0, steps=2)
    idx = torch.randperm(24, generator=torch.Generator().manual_seed(5))[:12].sort().values
    ids = Tokens().ids[idx]
    ref_loss, ref_top = _hf_loss_and_top_eig(model, {"input_ids": ids, "labels": ids})
    values, _ = _stored(tmp_path / "o.db")
    assert values["loss"][1] == pytest.approx(ref_loss, rel=1e-5)
    assert values["sharpness"][1] == pytest.approx(ref_top, rel=2e-4)


def test_bf16_mixed_measures_in_float32(tmp_path):
    plain, _ = _train(tmp_path / "a", steps=3, bf16=True)
    cb = GdscopeCallback(tmp_path / "b.db", [SharpnessProbe(1)], eval_samples=8)
    tracked, _ = _train(tmp_path / "b", [cb], steps=3, bf16=True)
    assert _same_weights(plain, tracked)
    values, run = _stored(tmp_path / "b.db")
    assert run.config["precision"] == "bf16 mixed"
    assert run.config["curvature_dtype"] == "float32"
    assert run.config["autocast_in_probes"] is False
    assert sorted(values["sharpness"]) == [0, 1, 2]


def test_not_the_main_process_does_nothing(tmp_path):
    plain, _ = _train(tmp_path / "a", steps=2)
    cb = GdscopeCallback(tmp_path / "rank.db")
    with mock.patch.object(Trainer, "is_world_process_zero", return_value=False):
        tracked, _ = _train(tmp_path / "b", [cb], steps=2)
    assert cb.session is None and not (tmp_path / "rank.db").exists()
    assert _same_weights(plain, tracked)


def test_is_causal_lm():
    from transformers import GPT2ForSequenceClassification

    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    assert is_causal_lm(GPT2LMHeadModel(cfg))
    assert not is_causal_lm(GPT2ForSequenceClassification(cfg))
    assert not is_causal_lm(torch.nn.Linear(2, 2))


def test_training_that_raises_is_closed_as_failed(tmp_path):
    class Crash(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise ArithmeticError("user callback failed")

    cb = GdscopeCallback(tmp_path / "x.db", [ThresholdProbe()])
    with pytest.raises(ArithmeticError):
        _train(tmp_path, [cb, Crash()], steps=4)
    values, run = _stored(tmp_path / "x.db")
    assert run.status == "running"  # no hook saw the crash
    assert sorted(values["lr"]) in ([0], [0, 1])  # step 1 may still be in the tracker's batch
    cb.close()
    values, run = _stored(tmp_path / "x.db")
    assert run.status == "failed" and sorted(values["lr"]) == [0, 1]  # close wrote the batch
    _train(tmp_path, [cb], steps=2)  # the same callback again: a new, completed run
    with Store(tmp_path / "x.db", readonly=True) as s:
        assert [r.status for r in s.runs()] == ["failed", "completed"]


def test_gradient_accumulation_tracks_optimizer_steps(tmp_path):
    cb = GdscopeCallback(tmp_path / "a.db", [ThresholdProbe()])
    _train(tmp_path, [cb], steps=2, gradient_accumulation_steps=3)
    values, run = _stored(tmp_path / "a.db")
    assert sorted(values["lr"]) == [0, 1] and run.config["gradient_accumulation_steps"] == 3
