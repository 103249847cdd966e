"""Tracker and built-in probes against independent recomputation."""

from __future__ import annotations

import gc
import math
import sqlite3

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError, NonFiniteError
from gdscope.probes import (
    AccuracyProbe,
    At,
    DistanceProbe,
    Every,
    GradNormProbe,
    LogSpaced,
    LossProbe,
    Probe,
    ProbeState,
    SharpnessProbe,
    ThresholdProbe,
)
from gdscope.store import Store
from gdscope.train import GD, HeavyBall, Nesterov


def _problem(seed: int = 0, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).double()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return gs.Problem(model, "mse", (X, Y)), X, Y


def _dense_top(prob: gs.Problem) -> float:
    theta = prob.flatten(prob.params)
    H = torch.autograd.functional.hessian(lambda t: prob.loss(prob.unflatten(t)), theta)
    return torch.linalg.eigvalsh(H)[-1].item()


def _loop(prob, X, Y, opt, tracker, steps):
    model = prob.model
    for t in range(steps):
        opt.zero_grad()
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, Y)
        loss.backward()
        opt.step()
        tracker.step(t, opt, loss=loss, outputs=out, targets=Y)


def test_cheap_probes_match_recomputation():
    prob, X, Y = _problem()
    model = prob.model
    theta0 = prob.flatten(prob.params).clone()
    opt = GD(model.parameters(), lr=0.3)
    tracker = gs.Tracker(prob, [LossProbe(), GradNormProbe(), DistanceProbe(), AccuracyProbe()])
    for t in range(5):
        before = prob.flatten(prob.params).clone()
        loss_before = prob.loss().item()
        grad_before = torch.linalg.vector_norm(prob.gradient()).item()
        opt.zero_grad()
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, Y)
        loss.backward()
        opt.step()
        vals = tracker.step(t, opt, loss=loss, outputs=out, targets=Y)
        after = prob.flatten(prob.params)
        assert vals["loss"] == pytest.approx(loss_before, rel=1e-12)
        assert vals["grad_norm"] == pytest.approx(grad_before, rel=1e-10)
        assert vals["dist_init"] == pytest.approx((after - theta0).norm().item(), rel=1e-12)
        assert vals["dist_init_rel"] == pytest.approx(
            ((after - theta0).norm() / theta0.norm()).item(), rel=1e-12
        )
        assert not torch.equal(before, after)
        assert "dist_init/0" in vals and "dist_init_rel/2" in vals
        acc = (out.argmax(1) == Y.argmax(1)).double().mean().item()
        assert vals["accuracy"] == pytest.approx(acc)


def test_probe_without_step_data_measures_current_parameters():
    prob, X, _Y = _problem()
    opt = GD(prob.model.parameters(), lr=0.1)
    tracker = gs.Tracker(prob, [LossProbe(), AccuracyProbe(), GradNormProbe()], store=":memory:")
    opt.zero_grad()
    prob.model(X).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    vals = tracker.step(0, opt)
    assert vals["loss"] == pytest.approx(prob.loss().item())
    assert vals["grad_norm"] == pytest.approx(torch.linalg.vector_norm(prob.gradient()).item())
    iterates = {r[1]: r[4] for r in tracker.store.metrics(tracker.run_id)}
    assert iterates["loss"] == "after" and iterates["accuracy"] == "after"


def test_sharpness_probe_matches_dense_and_warm_start_is_cheaper():
    prob, X, Y = _problem()
    opt = GD(prob.model.parameters(), lr=0.2)
    probe = SharpnessProbe(Every(1), tol=1e-10, max_matvecs=2000)
    tracker = gs.Tracker(prob, [probe, ThresholdProbe()])
    matvecs = []
    for t in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(prob.model(X), Y).backward()
        opt.step()
        vals = tracker.step(t, opt)
        assert vals["sharpness"] == pytest.approx(_dense_top(prob), rel=1e-8)
        assert vals["threshold"] == pytest.approx(2 / 0.2)
        matvecs.append(vals["sharpness_matvecs"])
    assert min(matvecs[1:]) < matvecs[0]


def test_threshold_moves_with_scheduler_and_is_absent_for_adam():
    prob, _X, _Y = _problem()
    opt = torch.optim.SGD(prob.model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    tracker = gs.Tracker(prob, [ThresholdProbe()])
    thresholds = []
    for t in range(4):
        opt.step()
        sched.step()
        thresholds.append(tracker.step(t, opt)["threshold"])
    assert thresholds == pytest.approx([20, 40, 40, 80])
    adam = torch.optim.Adam(prob.model.parameters(), lr=0.1)
    vals = gs.Tracker(prob, [ThresholdProbe()]).step(0, adam)
    assert "threshold" not in vals and vals["lr"] == 0.1
    hb = HeavyBall(prob.model.parameters(), lr=0.1, beta=0.5)
    assert gs.Tracker(prob, [ThresholdProbe()]).step(0, hb)["threshold"] == pytest.approx(30)
    nag = Nesterov(prob.model.parameters(), lr=0.1, beta=0.5)
    assert gs.Tracker(prob, [ThresholdProbe()]).step(0, nag)["threshold"] == pytest.approx(
        2 * 1.5 / (2 * 0.1)
    )


class CountingProbe(Probe):
    name = "counting"
    iterate = "before"

    def __init__(self, schedule):
        super().__init__(schedule)
        self.calls: list[int] = []

    def compute(self, state: ProbeState) -> dict[str, float]:
        self.calls.append(state.step)
        return {"counting": float(state.step)}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (Every(3), [0, 3, 6, 9]),
        (Every(4, start=2), [2, 6, 10]),
        (At([1, 5, 7]), [1, 5, 7]),
        (LogSpaced(3), [0, 1, 3, 5, 10]),
    ],
)
def test_schedules_control_which_steps_pay(schedule, expected):
    prob, _, _ = _problem()
    probe = CountingProbe(schedule)
    tracker = gs.Tracker(prob, [probe])
    for t in range(12):
        tracker.step(t)
    assert probe.calls == expected
    steps, values = tracker.series("counting")
    assert steps == expected and values == [float(s) for s in expected]


def test_store_rows_iterates_timing_and_status(tmp_path):
    prob, X, Y = _problem()
    path = tmp_path / "runs.db"
    opt = GD(prob.model.parameters(), lr=0.1)
    with gs.Tracker(
        prob,
        [LossProbe(), DistanceProbe(per_layer=False)],
        store=path,
        run_name="t",
        config={"lr": 0.1},
    ) as tracker:
        _loop(prob, X, Y, opt, tracker, 3)
    con = sqlite3.connect(path)
    rows = con.execute(
        "SELECT step, name, iterate FROM metrics WHERE name IN ('loss', 'dist_init') "
        "ORDER BY step, name"
    ).fetchall()
    assert rows == [
        (s, n, it) for s in range(3) for n, it in (("dist_init", "after"), ("loss", "before"))
    ]
    names = {r[0] for r in con.execute("SELECT DISTINCT name FROM metrics")}
    assert {"time/loss", "time/dist_init", "step_time"} <= names
    status, config = con.execute("SELECT status, config FROM runs").fetchone()
    assert status == "completed" and '"lr": 0.1' in config
    with Store(path) as s:
        x, _ = s.series(s.run("t").id, "dist_init")
        assert list(x) == [1, 2, 3]  # 'after' values describe the iterate one step later


def test_non_finite_loss_names_step_and_keeps_run(tmp_path):
    prob, _X, _Y = _problem()
    path = tmp_path / "runs.db"
    tracker = gs.Tracker(prob, [LossProbe()], store=path)
    tracker.step(0, loss=torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match=r"step 1, probe 'loss'"), tracker:
        tracker.step(1, loss=torch.tensor(math.nan))
    with Store(path) as s:
        run = s.runs()[0]
        assert run.status == "diverged"
        _, v = s.series(run.id, "loss")
        assert v[0] == 1.0 and math.isnan(v[1])


def test_non_finite_parameters_in_curvature_probe_name_step_and_probe():
    prob, _, _ = _problem()
    with torch.no_grad():
        prob.model[0].weight[0, 0] = math.nan
    tracker = gs.Tracker(prob, [SharpnessProbe(1)])
    with pytest.raises(NonFiniteError, match=r"step 7, probe 'sharpness'"):
        tracker.step(7)


def test_subset_probe_uses_fixed_subset():
    prob, _X, _Y = _problem(n=40)
    tracker = gs.Tracker(prob, [SharpnessProbe(1, tol=1e-10, max_matvecs=2000)], subset=10, seed=3)
    sub = tracker.subset
    assert sub.n == 10
    vals = tracker.step(0)
    assert vals["sharpness"] == pytest.approx(_dense_top(sub), rel=1e-8)
    assert vals["sharpness"] != pytest.approx(_dense_top(prob), rel=1e-3)


def test_bad_arguments():
    prob, _, _ = _problem()
    with pytest.raises(InvalidArgumentError):
        gs.Tracker(prob, [LossProbe(), LossProbe()])
    with pytest.raises(InvalidArgumentError):
        gs.Tracker(prob, subset=1000)
    with pytest.raises(InvalidArgumentError):
        Every(0)
    with pytest.raises(InvalidArgumentError):
        gs.Tracker("not a problem")  # type: ignore[arg-type]
    with pytest.raises(gs.GdscopeError):
        gs.Tracker(prob, store="/nonexistent-dir/x/runs.db").step(0)


# ---------------------------------------------------------------------- batched writes
def _stored_steps(path) -> list[int]:
    """Steps of the (only) run as another connection sees them (no flush through the tracker)."""
    with Store(path) as other:
        runs = other.runs()
        if not runs:
            return []
        return sorted({int(r[0]) for r in other.metrics(runs[0].id)})


def _batch_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    return gs.Problem(model, "mse", (X, Y))


def test_batched_commits_every_commit_steps(tmp_path):
    path = tmp_path / "runs.db"
    tracker = gs.Tracker(
        _batch_problem(),
        [LossProbe()],
        store=path,
        commit_seconds=1e9,
        commit_steps=3,
        background=False,
    )
    tracker.step(0, loss=1.0)
    assert _stored_steps(path) == [0]  # the first step is written at once
    tracker.step(1, loss=0.9)
    tracker.step(2, loss=0.8)
    assert _stored_steps(path) == [0]  # buffered: two steps, commit_steps=3
    tracker.step(3, loss=0.7)
    assert _stored_steps(path) == [0, 1, 2, 3]  # the third buffered step flushed the batch
    tracker.step(4, loss=0.6)
    assert _stored_steps(path) == [0, 1, 2, 3]
    assert tracker.store.series(tracker.run_id, "loss")[0].tolist() == [0, 1, 2, 3, 4]
    tracker.step(5, loss=0.5)
    tracker.close()
    assert _stored_steps(path) == [0, 1, 2, 3, 4, 5]


def test_background_writes_half_batches_and_stay_a_prefix(tmp_path):
    path = tmp_path / "runs.db"
    tracker = gs.Tracker(
        _batch_problem(),
        [LossProbe()],
        store=path,
        commit_seconds=1e9,
        commit_steps=4,
        background=True,
    )
    pending = tracker._pending_steps
    tracker.step(0, loss=1.0)
    pending.wait()  # the first step went to the writer at once
    assert _stored_steps(path) == [0]
    tracker.step(1, loss=0.9)
    pending.wait()
    assert _stored_steps(path) == [0]  # one step buffered: half a batch is 2
    tracker.step(2, loss=0.8)
    pending.wait()
    assert _stored_steps(path) == [0, 1, 2]
    # in flight plus buffered never exceed commit_steps (the crash bound)
    for t in range(3, 40):
        tracker.step(t, loss=1.0 / (t + 1))
        assert len(pending.rows) + len(pending._inflight) <= 4
        stored = _stored_steps(path)
        assert stored == list(range(len(stored)))  # a prefix
        assert t + 1 - len(stored) <= 4
    assert tracker.store.series(tracker.run_id, "loss")[0].tolist() == list(range(40))
    tracker.close()
    assert _stored_steps(path) == list(range(40))


def test_background_write_error_keeps_steps_and_raises_in_the_loop(tmp_path, monkeypatch):
    path = tmp_path / "runs.db"
    tracker = gs.Tracker(
        _batch_problem(),
        [LossProbe()],
        store=path,
        commit_seconds=1e9,
        commit_steps=2,
        background=True,
    )
    tracker.step(0, loss=1.0)
    tracker._pending_steps.wait()
    store = tracker._store
    real = store.log_blocks
    calls = []

    def failing(run_id, blocks):
        calls.append(1)
        raise gs.errors.StoreError("disk full (simulated)")

    monkeypatch.setattr(store, "log_blocks", failing)
    tracker.step(1, loss=0.9)  # half a batch (1 step) goes to the writer, which fails
    with pytest.raises(gs.errors.StoreError, match="disk full"):
        tracker.step(2, loss=0.8)  # the next submit reports it
    assert calls
    monkeypatch.setattr(store, "log_blocks", real)
    tracker.close()
    assert _stored_steps(path) == [0, 1, 2]  # the failed batch was kept and written


def test_commit_seconds_zero_commits_every_step(tmp_path):
    path = tmp_path / "runs.db"
    tracker = gs.Tracker(_batch_problem(), [LossProbe()], store=path, commit_seconds=0)
    for t in range(4):
        tracker.step(t, loss=1.0 / (t + 1))
        assert _stored_steps(path) == list(range(t + 1))
    tracker.close()


def test_batched_commits_flush_on_divergence_errors_and_garbage_collection(tmp_path):
    # the diverged step is stored before NonFiniteError leaves step()
    path = tmp_path / "a.db"
    tracker = gs.Tracker(_batch_problem(), [LossProbe()], store=path, commit_seconds=1e9)
    tracker.step(0, loss=1.0)
    tracker.step(1, loss=0.5)
    with pytest.raises(NonFiniteError):
        tracker.step(2, loss=float("inf"))
    assert _stored_steps(path) == [0, 1, 2]

    # a probe that raises: the steps before it reach the store
    class Boom(LossProbe):
        name = "boom"

        def compute(self, state):
            if state.step == 2:
                raise RuntimeError("boom")
            return {"boom": 0.0}

    path = tmp_path / "b.db"
    tracker = gs.Tracker(_batch_problem(), [Boom()], store=path, commit_seconds=1e9)
    tracker.step(0)
    tracker.step(1)
    with pytest.raises(RuntimeError):
        tracker.step(2)
    assert _stored_steps(path) == [0, 1]

    # dropped without close(): the finalizer writes the buffer; the run stays incomplete
    path = tmp_path / "c.db"
    tracker = gs.Tracker(_batch_problem(), [LossProbe()], store=path, commit_seconds=1e9)
    for t in range(3):
        tracker.step(t, loss=1.0)
    assert _stored_steps(path) == [0]
    del tracker
    gc.collect()
    assert _stored_steps(path) == [0, 1, 2]
    with Store(path) as other:
        assert other.runs()[0].status_label == "incomplete"


def test_bad_metric_fails_at_its_own_step_not_in_a_batch(tmp_path):
    class Twice(LossProbe):
        name = "twice"

        def compute(self, state):
            return {"loss": 1.0}

    tracker = gs.Tracker(_batch_problem(), [LossProbe(), Twice()], store=tmp_path / "d.db")
    with pytest.raises(InvalidArgumentError, match="logged twice"):
        tracker.step(0, loss=1.0)
    with pytest.raises(InvalidArgumentError, match="commit_seconds"):
        gs.Tracker(_batch_problem(), store=tmp_path / "e.db", commit_seconds=-1)
    with pytest.raises(InvalidArgumentError, match="commit_steps"):
        gs.Tracker(_batch_problem(), store=tmp_path / "e.db", commit_steps=0)


# ---------------------------------------------------------------------- the guard
class _Guard:
    """A guard factory that records each entry and exit (and whether an error left it)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self):  # type: ignore[no-untyped-def]
        import contextlib

        @contextlib.contextmanager
        def cm():  # type: ignore[no-untyped-def]
            self.events.append("enter")
            try:
                yield
            except BaseException:
                self.events.append("error")
                raise
            self.events.append("exit")

        return cm()


def test_guard_is_entered_only_for_probes_that_evaluate():
    prob, X, Y = _problem()
    opt = GD(prob.model.parameters(), lr=0.3)
    guard = _Guard()
    seen: list[int] = []

    class Evaluating(Probe):  # default: may run the model or draw random numbers
        name = "evaluating"

        def compute(self, state):  # type: ignore[no-untyped-def]
            seen.append(len(guard.events))  # the guard is entered when this runs
            return {"evaluating": 1.0}

    cheap = [LossProbe(), AccuracyProbe(), GradNormProbe(), DistanceProbe(), ThresholdProbe()]
    tracker = gs.Tracker(prob, [*cheap, Evaluating(gs.probes.At([2, 4]))], guard=guard)
    _loop(prob, X, Y, opt, tracker, 3)  # loss, outputs and gradients passed: nothing evaluates
    assert guard.events == ["enter", "exit"] and seen == [1]  # only at step 2, once
    # without the step's loss, outputs and gradients the cheap probes evaluate the model
    opt.zero_grad(set_to_none=True)
    tracker.step(3, opt)
    assert guard.events == ["enter", "exit"] * 2
    tracker.step(4, opt)  # entered once for the whole step, not once per probe
    assert guard.events == ["enter", "exit"] * 3 and seen == [1, 5]


def test_guard_is_left_when_a_probe_fails():
    prob, _, _ = _problem()
    guard = _Guard()

    class Failing(Probe):
        name = "failing"

        def compute(self, state):  # type: ignore[no-untyped-def]
            raise RuntimeError("probe broke")

    tracker = gs.Tracker(prob, [Failing()], guard=guard)
    with pytest.raises(RuntimeError, match="probe broke"):
        tracker.step(0)
    assert guard.events == ["enter", "error"]
