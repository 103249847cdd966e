"""Sinks mirror each tracked value: TensorBoard event files (read back with TensorBoard's own
event reader), MLflow runs (a local file store), callables; replay of a stored run."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.integrations.sinks import (
    CallableSink,
    MLflowSink,
    Sink,
    TensorBoardSink,
    check_sinks,
    replay,
)
from gdscope.probes import LossProbe, SharpnessProbe, ThresholdProbe
from gdscope.store import Store

torch.set_num_threads(1)


def _tracked(tmp_path, sinks, steps=4):
    """Full-batch GD on a tiny MLP with a Tracker; every step's values go to ``sinks``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, Y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    prob = gs.Problem(model, "mse", (X, Y))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = [LossProbe(), ThresholdProbe(), SharpnessProbe(2, tol=1e-8)]
    tracker = gs.Tracker(prob, probes, store=tmp_path / "runs.db", run_name="sinks")
    for s in sinks:
        s.open("sinks", tracker.config)
    for t in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        values = tracker.step(t, opt, loss=loss)
        for s in sinks:
            s.write(t, values)
    for s in sinks:
        s.close("completed")
    run_id = tracker.run_id
    tracker.close()
    return run_id


def _stored(path, run_id):
    with Store(path, readonly=True) as s:
        out: dict[str, dict[int, float]] = {}
        for step, name, value, _p, _it in s.metrics(run_id):
            out.setdefault(name, {})[step] = value
    return out


def _tb_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea, {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def test_tensorboard_mirrors_every_stored_value(tmp_path):
    pytest.importorskip("tensorboard")
    sink = TensorBoardSink(tmp_path / "tb")
    run = _tracked(tmp_path, [sink])
    stored = _stored(tmp_path / "runs.db", run)
    ea, scalars = _tb_scalars(tmp_path / "tb")
    assert set(scalars) == {f"gdscope/{n}" for n in stored}
    for name, by_step in stored.items():
        got = scalars[f"gdscope/{name}"]
        assert sorted(got) == sorted(by_step)
        for step, v in by_step.items():  # event files hold float32
            assert got[step] == pytest.approx(v, rel=1e-6, abs=1e-12)
    # the threshold beside the sharpness, on the same steps, in one custom chart
    assert set(scalars["gdscope/sharpness"]) <= set(scalars["gdscope/threshold"])
    assert scalars["gdscope/threshold"][0] == pytest.approx(2 / 0.1)
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    layout = layout_pb2.Layout()
    proto = ea.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto
    layout.ParseFromString(tensor_util.make_ndarray(proto).item())
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["sharpness and threshold"] == ["gdscope/sharpness", "gdscope/threshold"]


def test_tensorboard_nonfinite_and_own_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    sink = TensorBoardSink(writer=writer, prefix="x/")
    sink.open("r", {})
    sink.write(3, {"a": math.nan, "b": math.inf})
    sink.close()
    writer.add_scalar("after", 1.0, 0)  # the caller's writer stays open
    writer.close()
    _, scalars = _tb_scalars(tmp_path / "tb")
    assert math.isnan(scalars["x/a"][3]) and scalars["x/b"][3] == math.inf


def test_mlflow_run_holds_every_stored_value(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    sink = MLflowSink(tracking_uri=uri, experiment="tests")
    run = _tracked(tmp_path, [sink])
    stored = _stored(tmp_path / "runs.db", run)
    client = MlflowClient(tracking_uri=uri)
    mrun = client.get_run(sink.run_id)
    assert mrun.info.status == "FINISHED"
    assert mrun.info.run_name == "sinks"
    assert mrun.data.tags["gdscope.run_name"] == "sinks"
    assert set(mrun.data.metrics) == {f"gdscope/{n}" for n in stored}
    for name, by_step in stored.items():
        hist = {m.step: m.value for m in client.get_metric_history(sink.run_id, f"gdscope/{name}")}
        assert hist == pytest.approx(by_step, rel=1e-12)


def test_mlflow_logs_into_the_active_run_and_sanitises_names(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as active:
            sink = MLflowSink()
            sink.open("r", {"integration": "test", "lr": 0.1, "nested": {"a": 1}})
            sink.write(0, {"odd name!": 1.0, "nan": math.nan})
            sink.close("completed")
            assert sink.run_id == active.info.run_id
        data = mlflow.get_run(active.info.run_id).data
    finally:
        mlflow.set_tracking_uri(None)
    assert data.metrics["gdscope/odd name_"] == 1.0
    assert math.isnan(data.metrics["gdscope/nan"])
    assert data.params == {"gdscope.integration": "test", "gdscope.lr": "0.1"}
    assert data.tags["gdscope.integration"] == "test"


def test_callable_sink_and_replay_equal_the_store(tmp_path):
    live: list[tuple[dict[str, float], int]] = []
    run = _tracked(tmp_path, [CallableSink(lambda m, s: live.append((m, s)))])
    replayed: list[tuple[dict[str, float], int]] = []
    with Store(tmp_path / "runs.db", readonly=True) as store:
        n = replay(store, run, CallableSink(lambda m, s: replayed.append((m, s))))
    assert n == 4 and [s for _, s in live] == [0, 1, 2, 3]
    assert replayed == live  # the store holds exactly what was mirrored live


def test_bad_sink_arguments(tmp_path):
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        TensorBoardSink()
    with pytest.raises(InvalidArgumentError, match="add_scalar"):
        TensorBoardSink(writer=object())
    with pytest.raises(InvalidArgumentError, match="callable"):
        CallableSink(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"sinks\[1\]"):
        check_sinks([CallableSink(print), "tb/"])
    with pytest.raises(InvalidArgumentError, match="list of sinks"):
        check_sinks("tb/")
    assert check_sinks(None) == []
    with pytest.raises(InvalidArgumentError, match="experiment"):
        MLflowSink(experiment="")
    assert issubclass(CallableSink, Sink)


def test_core_import_needs_no_integration_library():
    """``import gdscope`` (and the CLI, export, the sinks module) load none of the optional
    libraries: the core install stays free of them."""
    import subprocess
    import sys

    code = (
        "import sys, gdscope, gdscope.cli, gdscope.export, gdscope.integrations.sinks\n"
        "heavy = {'lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'tensorboard',"
        " 'mlflow', 'pyarrow', 'pandas'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- the callbacks' session
def _session(tmp_path, sinks, probes=None):
    from gdscope.integrations._common import TrackingSession, preserved

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    X, Y = torch.randn(8, 3), torch.randn(8, 1)
    model.eval()
    prob = gs.Problem(model, "mse", (X, Y))
    model.train()
    tracker = gs.Tracker(
        prob,
        probes or [LossProbe()],
        store=tmp_path / "s.db",
        run_name="s",
        guard=functools.partial(preserved, model),
    )
    return TrackingSession(tracker, sinks), model


def test_session_drops_a_failing_sink_and_keeps_tracking(tmp_path):
    class Broken(Sink):
        def write(self, step, values):
            raise OSError("disk full")

    got: list[int] = []
    session, _ = _session(tmp_path, [Broken(), CallableSink(lambda m, s: got.append(s))])
    with pytest.warns(RuntimeWarning, match="Broken failed to write .*disk full"):
        session.step(0, None, loss=torch.tensor(1.0))
    session.step(1, None, loss=torch.tensor(0.5))
    session.close()
    assert got == [0, 1] and len(session.sinks) == 1
    assert _stored(tmp_path / "s.db", 1)["loss"] == {0: 1.0, 1: 0.5}


def test_session_diverged_loss_is_stored_mirrored_and_ends_tracking(tmp_path):
    got: list[tuple[dict[str, float], int]] = []
    session, _ = _session(tmp_path, [CallableSink(lambda m, s: got.append((m, s)))])
    session.step(0, None, loss=torch.tensor(1.0))
    with pytest.warns(RuntimeWarning, match="diverged"):
        assert session.step(1, None, loss=torch.tensor(float("inf"))) is None
    assert session.closed and session.step(2, None, loss=torch.tensor(1.0)) is None
    metrics, step = got[-1]
    assert step == 1 and metrics["gdscope/loss"] == math.inf
    with Store(tmp_path / "s.db", readonly=True) as s:
        assert s.run(1).status == "diverged"


def test_preserved_restores_rng_and_modes_even_on_error():
    import random

    import numpy as np

    from gdscope.integrations._common import preserved

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[2].eval()  # a mixed-mode model: each flag is restored, not model.train()
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    with (
        pytest.raises(ValueError),
        torch.autocast("cpu", dtype=torch.bfloat16),
        preserved(model),
    ):
        assert not any(m.training for m in model.modules())
        assert not torch.is_autocast_enabled("cpu")  # the trainer's autocast is off inside
        torch.rand(100), random.random(), np.random.rand(5)
        raise ValueError
    assert [m.training for m in model.modules()] == [True, True, True, False]
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
