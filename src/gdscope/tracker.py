"""The Tracker: probes on a schedule inside any PyTorch training loop, results in the store.

    tracker = gs.Tracker(prob, probes=[...], store="runs.db")
    for t in range(steps):
        opt.zero_grad(); out = model(X); loss = crit(out, Y); loss.backward(); opt.step()
        tracker.step(t, opt, loss=loss, outputs=out, targets=Y)
    tracker.close()

``step`` is called *after* ``optimizer.step()``. Probes that reuse the loss and outputs passed in
measure the iterate before the update; probes that evaluate the model measure the one after
(each row in the store says which). Only scheduled probes run; each probe's wall time is logged
as ``time/<probe>`` and the loop's own time between two calls as ``step_time``, so the overhead
is visible. All of a step's values commit together. Steps are integers ``>= 0`` that increase
from call to call (gaps are fine; a repeated or earlier step is refused, since each step's values
are stored once).

**Batched writes.** Steps are buffered and written in one transaction
(:meth:`Store.log_blocks <gdscope.store.Store.log_blocks>`) at most once per ``commit_seconds``
(default 0.5 s) or every ``commit_steps`` steps (default 100), whichever comes first; the first
step is written at once. The buffer is flushed by :meth:`Tracker.finish`, :meth:`Tracker.close`,
the context manager's exit, any exception inside :meth:`Tracker.step`, before a
:class:`~gdscope.errors.NonFiniteError` is raised (the diverged step is stored), whenever the
store is read through :attr:`Tracker.store`, by :meth:`Tracker.flush`, and when the tracker is
garbage-collected or the interpreter exits. The bound: a crash (``kill -9``) loses at most the
last unflushed batch, i.e. the steps of the last ``commit_seconds`` (at most ``commit_steps``
steps); the run stays ``running`` (incomplete), as before. ``commit_seconds=0`` writes every
step in its own commit.

**Background writes** (``background=True``; off by default: on a loaded 2-core machine they
measured 3-5% slower than writing in the loop, ``bench/bench_tracker.py``, since the writer
then competes with training for the CPU and the GIL; they can pay where a core is free): a due
batch is handed to a writer thread and ``step`` returns at once; batches are then half size
(``commit_steps/2`` steps or ``commit_seconds/2``), so the batch being written and the one being
filled together stay within the bound above. One write is in flight at a time (the next waits
for it), so the stored steps are always a prefix; a write that fails keeps its steps and raises
in the loop at the next batch or flush. Every flush listed above waits for the write in flight.

**The hot path.** Probes may return scalar tensors; the tracker reads a step's values together
(on an accelerator one host sync per step, on the CPU ``float`` per value, which is cheaper
there). A step's names are checked against the store's rules once per distinct list of names.

:func:`gdscope.fit` records its settings with :meth:`Tracker.record_config` and, when training
ends, marks the run finished with :meth:`Tracker.finish`: the stored run is complete when ``fit``
returns, and :meth:`Tracker.record_prediction` and :meth:`Tracker.close` (with a summary) still
work. A prediction may be recorded before training too; it is stored when the run starts.

With an adapter (dict batches, Hugging Face style models) the loop may pass what it has:
``outputs`` the model's output object (its logits are taken by the adapter) and ``targets`` the
dict batch (its labels are taken); probes compare logits and labels as the loss does (shifted,
ignored labels left out). A tracker used as a context manager (``with gs.Tracker(...) as
tr:``) closes the run on exit: ``"completed"``, ``"diverged"`` (a
:class:`~gdscope.errors.NonFiniteError`) or ``"failed"`` with ``summary={"error":
"<ExcType>: <message>"}``, which the report's "why it stopped" shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gdscope.errors import GdscopeError, InvalidArgumentError, NonFiniteError
from gdscope.probes.base import Probe, ProbeState
from gdscope.probes.builtin import default_probes
from gdscope.problem import Problem
from gdscope.store import MetricRow, Store, _metric_values, check_name
from gdscope.theory import Prediction

__all__ = ["PREDICTION_POINTS", "Tracker"]

logger = logging.getLogger(__name__)

#: Points of a recorded prediction's loss curve (log-spaced steps, plus step 0).
PREDICTION_POINTS = 400


class Tracker:
    """Runs probes on their schedules and writes one store row per value.

    Args:
        prob: the problem being trained (its model is the one the loop updates).
        probes: probes to run (default :func:`gdscope.probes.default_probes`).
        store: a path to an SQLite store, a :class:`~gdscope.store.Store`, or ``None`` to keep
            results in memory only (``history``).
        run_name, config: recorded with the run.
        subset: evaluate curvature probes on a fixed random subset of this many samples
            (needs tensor data), or on these indices.
        seed: for the subset draw.
        commit_seconds: write buffered steps to the store at most this often (seconds; ``0``:
            every step in its own commit). See the module docstring for the crash bound.
        commit_steps: ... or once this many steps are buffered, whichever comes first.
        background: write batches in a writer thread while training goes on, in half-size
            batches so that the batch in flight and the one buffered together stay within the
            bound above; ``False`` (default): written in the loop. ``commit_seconds=0`` always
            writes in the loop.
        guard: a context-manager factory entered once in a step, before the first probe that
            may run the model or draw random numbers (:meth:`Probe.evaluates
            <gdscope.probes.Probe.evaluates>`), and left after the step's last probe; steps
            whose probes only read the step's values, the optimizer and the parameters skip
            it. The trainer callbacks pass one that saves and restores the RNG states and
            train/eval flags (``gdscope.integrations``).
    """

    def __init__(
        self,
        prob: Problem,
        probes: Sequence[Probe] | None = None,
        store: str | PathLike[str] | Store | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        subset: int | Sequence[int] | Tensor | None = None,
        seed: int = 0,
        commit_seconds: float = 0.5,
        commit_steps: int = 100,
        background: bool = False,
        guard: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        if guard is not None and not callable(guard):
            raise InvalidArgumentError(
                f"guard={_short(guard)} ({type(guard).__name__}) must be None or a callable "
                "returning a context manager, e.g. guard=lambda: torch.no_grad()."
            )
        self.guard = guard
        if (
            isinstance(commit_seconds, bool)
            or not isinstance(commit_seconds, (int, float, np.integer, np.floating))
            or not math.isfinite(commit_seconds)
            or commit_seconds < 0
        ):
            raise InvalidArgumentError(
                f"commit_seconds={commit_seconds!r} must be a finite number of seconds >= 0 "
                "(0: one commit per step), e.g. commit_seconds=0.5."
            )
        if isinstance(commit_steps, bool) or not isinstance(commit_steps, (int, np.integer)):
            raise InvalidArgumentError(
                f"commit_steps={commit_steps!r} must be an integer >= 1, e.g. commit_steps=100."
            )
        if commit_steps < 1:
            raise InvalidArgumentError(
                f"commit_steps={commit_steps!r} must be an integer >= 1, e.g. commit_steps=100."
            )
        if not isinstance(prob, Problem):
            raise InvalidArgumentError(
                f"prob must be a gdscope.Problem, got {type(prob).__name__}: build one with "
                "gs.Problem(model, loss, (X, Y))."
            )
        self.prob = prob
        self.probes = check_probes(probes)
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(
                f"probes: names must be unique, got {names}: pass each probe once."
            )
        check_store_arg(store)
        check_run_name(run_name)  # refused now, not at the first step
        if config is not None and not isinstance(config, Mapping):
            raise InvalidArgumentError(
                f"config={config!r} ({type(config).__name__}) must be a dict of settings or None."
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InvalidArgumentError(
                f"seed={seed!r} ({type(seed).__name__}) must be an integer, e.g. seed=0."
            )
        self._owns_store = store is not None and not isinstance(store, Store)
        self._store: Store | None = Store(store) if self._owns_store else store  # type: ignore[assignment]
        self.commit_seconds = float(commit_seconds)
        self.commit_steps = int(commit_steps)
        if not isinstance(background, (bool, np.bool_)):
            raise InvalidArgumentError(
                f"background={background!r} ({type(background).__name__}) must be True (batches "
                "written by a writer thread) or False (written in the training loop)."
            )
        self.background = bool(background)
        self._half_steps = max(1, (self.commit_steps + 1) // 2)
        self._pending_steps = _PendingSteps(self._store)
        self._last_flush = -math.inf  # the first step is written at once
        # buffered steps reach the store even if the tracker is dropped without close()
        self._finalizer = weakref.finalize(self, self._pending_steps.flush_quietly)
        self.run_name = run_name
        self.config: dict[str, Any] = dict(config or {})
        self.config.setdefault("probes", [repr(p) for p in self.probes])
        self.subset = _subset(prob, subset, seed)
        self.initial_params = {n: p.detach().clone() for n, p in prob.params.items()}
        for probe in self.probes:
            probe.start(prob)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.run_id: int | None = None
        #: ``None`` while open; the status :meth:`close` gave.
        self.status: str | None = None
        #: ``None`` while training may go on; the status :meth:`finish` (or ``close``) gave.
        self.finished: str | None = None
        #: The last step passed to :meth:`step` (``None`` before the first).
        self.last_step: int | None = None
        self._last_return: float | None = None
        self._pending: list[tuple[str, str, str]] = []  # artifacts recorded before the run
        self._checked: dict[_Keys, _Keys] = {}  # name lists checked (each kept once)
        self._time_keys: dict[str, str] = {}

    # ------------------------------------------------------------------ the store
    @property
    def store(self) -> Store | None:
        """The run's store; buffered steps are written first, so a read sees every step."""
        self.flush()
        return self._store

    def flush(self) -> None:
        """Write the buffered steps to the store now (one transaction)."""
        self._pending_steps.flush()
        self._last_flush = time.perf_counter()

    # ------------------------------------------------------------------ lifecycle
    def record_config(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the run's config (before the first step)."""
        if not isinstance(values, Mapping):
            raise InvalidArgumentError(
                f"record_config(values={values!r}): values must be a dict of settings, got "
                f"{type(values).__name__}."
            )
        if self.run_id is not None:
            raise GdscopeError(
                "record_config must be called before the first tracked step: this run already "
                f"has steps (last step {self.last_step}) and its config is stored. Create a new "
                "Tracker for a new run (gs.fit records its config on a fresh one)."
            )
        self.config.update(values)

    def record_prediction(self, prediction: Prediction, label: str = "linearized model") -> None:
        """Store a :class:`~gdscope.theory.Prediction` of this run (artifact ``prediction``).

        The report overlays its loss curve (at most :data:`PREDICTION_POINTS` log-spaced steps)
        on the measured one and sets its asymptotic rate beside the fitted rate.

        The artifact is JSON with ``label`` (``label``), ``kind`` (``"linearized"``, or
        ``"central flow"`` for a :class:`~gdscope.theory.CentralFlowPrediction`), ``steps`` and
        ``loss`` at those steps, and the prediction's rates, stability and eigenvalue range. A
        central flow adds ``sharpness`` (``λ_1(w(t))``) and ``oscillation`` (``tr Σ``) at the
        same ``steps``, ``threshold`` (``2/η``) and ``onset_step`` (``null`` when the flow never
        reaches the edge). Older artifacts lack ``kind`` and these keys (read them as linearized).
        """
        if not isinstance(prediction, Prediction):
            raise InvalidArgumentError(
                f"prediction must be a gdscope Prediction (from gs.predict), got "
                f"{type(prediction).__name__}."
            )
        if not isinstance(label, str):
            raise InvalidArgumentError(
                f"label={label!r} ({type(label).__name__}) must be a string, e.g. 'linearized "
                "model'."
            )
        if self._store is None:
            raise GdscopeError("record_prediction needs a store: pass store= to the Tracker.")
        if self.status is not None:
            raise GdscopeError(
                f"the tracker was closed ({self.status}): record the prediction before close()."
            )
        loss = np.asarray(prediction.loss, dtype=np.float64)
        steps = np.unique(np.geomspace(1, max(loss.size, 1), PREDICTION_POINTS).astype(int) - 1)
        at = np.union1d([0], steps)
        record: dict[str, Any] = {
            "label": label,
            "kind": "linearized",
            "steps": [int(s) for s in at],
            "loss": [float(loss[s]) for s in at],
            "loss_rate": prediction.loss_rate,
            "asymptotic_rate": prediction.asymptotic_rate,
            "stable": prediction.stable,
            "optimizer": prediction.optimizer,
            "min_eigenvalue": float(np.min(prediction.eigenvalues)),
            "max_eigenvalue": float(np.max(prediction.eigenvalues)),
            "q": prediction.q,
            "notes": list(prediction.notes),
        }
        record.update(_central_flow_curves(prediction, at))
        artifact = ("prediction", json.dumps(record, default=str), "application/json")
        if self.run_id is None:
            # The run is created at the first step, so that a config recorded in between (as
            # gs.fit does) is part of it: keep the artifact until then.
            self._pending = [a for a in self._pending if a[0] != artifact[0]] + [artifact]
        else:
            self._store.add_artifact(self.run_id, *artifact)

    def _ensure_run(self) -> None:
        if self.run_id is None and self._store is not None:
            self.run_id = self._store.create_run(self.run_name, self.config)
            self._pending_steps.run_id = self.run_id
            for name, data, mime in self._pending:
                self._store.add_artifact(self.run_id, name, data, mime)
            self._pending = []

    def finish(self, status: str = "completed", summary: dict[str, Any] | None = None) -> None:
        """Mark the run finished in the store, keeping the tracker open for the results.

        :func:`gdscope.fit` calls this when training ends, so the stored run is complete when
        ``fit`` returns. Afterwards :meth:`step` refuses further steps, while
        :meth:`record_prediction` and :meth:`close` (e.g. with a summary) still work.
        """
        _check_status(status)
        if self.status is not None:
            return
        self.finished = status
        if self._store is not None:
            self._ensure_run()
            assert self.run_id is not None
            self.flush()
            self._store.finish_run(self.run_id, status, summary)

    def close(self, status: str = "completed", summary: dict[str, Any] | None = None) -> None:
        """Mark the run finished with ``status`` (completed, failed, diverged). Idempotent.

        After :meth:`finish`, this still writes ``status`` and ``summary``; a second ``close``
        does nothing.
        """
        _check_status(status)
        if summary is not None and not isinstance(summary, Mapping):
            raise InvalidArgumentError(
                f"summary={summary!r} ({type(summary).__name__}) must be a dict or None."
            )
        if self.status is not None:
            return
        self.status = status
        self.finished = self.finished or status
        if self._store is not None:
            self._ensure_run()
            assert self.run_id is not None
            self.flush()
            self._store.finish_run(self.run_id, status, summary)
            if self._owns_store:
                self._store.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("completed")
            return
        from gdscope.train.fit import error_summary

        error = exc if isinstance(exc, BaseException) else exc_type()
        summary = error_summary(error)
        if self.finished is not None:
            # training already ended (gs.fit finished the run): keep its outcome, record the error
            self.close(self.finished, summary)  # type: ignore[arg-type]
        elif issubclass(exc_type, NonFiniteError):
            self.close("diverged", summary)
        else:
            self.close("failed", summary)

    # ------------------------------------------------------------------ the hot path
    def step(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        loss: Tensor | float | None = None,
        outputs: Tensor | Any | None = None,
        targets: Tensor | Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """Run the probes scheduled at ``step``; return their values.

        ``outputs``/``targets``: the step's outputs and targets as given to the loss; with an
        adapter also the model's output object and the dict batch.

        Raises :class:`~gdscope.errors.NonFiniteError` naming the step and the probe when a
        loss is not finite (after committing the step, so nothing is lost).
        """
        now = time.perf_counter()
        if self.status is not None:
            raise GdscopeError(f"the tracker was closed ({self.status}); create a new one.")
        if self.finished is not None:
            raise GdscopeError(
                f"the tracker's run is finished ({self.finished}, e.g. by gs.fit); create a new "
                "Tracker to track more steps."
            )
        step = self._check_step(step)
        loss_t = _check_loss(loss)
        outputs, targets = self._adapt(outputs, targets)
        for name, value in (("outputs", outputs), ("targets", targets)):
            if value is not None and not isinstance(value, Tensor):
                raise InvalidArgumentError(
                    f"{name}={_short(value)} ({type(value).__name__}) must be a tensor or None: "
                    f"pass the step's {name} as given to the loss."
                )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(
                f"optimizer={_short(optimizer)} ({type(optimizer).__name__}) must be a "
                "torch.optim.Optimizer or None."
            )
        due = [p for p in self.probes if p.schedule(step)]
        keys: list[tuple[str, str, str]] = []  # (name, probe, iterate) of each value
        raw: list[Any] = []  # floats, or scalar tensors read in one batch below
        if self._last_return is not None:
            keys.append(_STEP_TIME)
            raw.append(now - self._last_return)
        if due:
            state = ProbeState(
                step=step,
                problem=self.prob,
                subset=self.subset,
                optimizer=optimizer,
                initial_params=self.initial_params,
                loss=loss_t,
                outputs=outputs.detach() if outputs is not None else None,
                targets=targets,
            )
            with contextlib.ExitStack() as guarded:
                guard = self.guard  # entered at the first probe that evaluates, once a step
                for probe in due:
                    t0 = time.perf_counter()
                    try:
                        if guard is not None and probe.evaluates(state):
                            guarded.enter_context(guard())
                            guard = None
                        out = probe.compute(state)
                    except NonFiniteError as e:
                        self._commit(step, keys, _floats(raw))
                        self.flush()  # the diverged step is stored before the error leaves
                        raise NonFiniteError(f"step {step}, probe {probe.name!r}: {e}") from e
                    except BaseException:
                        self.flush()  # the steps before this one reach the store
                        raise
                    spent = time.perf_counter() - t0
                    it = probe.measures(state)
                    name = probe.name
                    for k, v in out.items():
                        keys.append((k, name, it))
                        raw.append(v)
                    keys.append((self._time_key(name), name, it))
                    raw.append(spent)
        floats = _floats(raw)
        values = dict(zip([k[0] for k in keys], floats, strict=True))
        self._commit(step, keys, floats)
        lossv = values.get("loss")
        if lossv is not None and not math.isfinite(lossv):
            self.flush()  # the diverged step is stored before the error leaves
            raise NonFiniteError(
                f"step {step}, probe 'loss': the loss is {lossv}. Training diverged: lower the "
                "learning rate (the run is kept in the store as diverged)."
            )
        self._last_return = time.perf_counter()
        return values

    def _time_key(self, probe: str) -> str:
        key = self._time_keys.get(probe)
        if key is None:
            key = self._time_keys[probe] = f"time/{probe}"
        return key

    def _adapt(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        """With an adapter: logits of an output object, labels of a dict batch."""
        adapter = self.prob.adapter
        if adapter is None:
            return outputs, targets
        if outputs is not None and not isinstance(outputs, Tensor):
            outputs = adapter.logits(outputs)
        if isinstance(targets, Mapping):
            _, targets = adapter.split(targets, "targets (a dict batch)")
        return outputs, targets

    def _check_step(self, step: Any) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise InvalidArgumentError(
                f"step={step!r} ({type(step).__name__}) must be an integer >= 0: pass the "
                "training step t = 0, 1, 2, ... of the loop."
            )
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise InvalidArgumentError(
                f"step={step} does not come after the last tracked step {self.last_step}: steps "
                "must increase (each step's values are stored once). Pass the loop's step "
                "counter, or create a new Tracker for a new run."
            )
        return step

    def _commit(self, step: int, keys: list[tuple[str, str, str]], values: list[float]) -> None:
        """Buffer one step's values (written by :meth:`flush` when the batch is due).

        Names are checked now, as the store will check them, so a bad value fails at its own
        step and never poisons a batch. A step with the same ``(name, probe, iterate)`` list as
        an earlier one (every step of a steady loop) was checked then: the values are floats.
        """
        if self._store is not None and keys:
            sig = tuple(keys)
            known = self._checked.get(sig)
            if known is None:
                for (n, pr, it), v in zip(keys, values, strict=True):
                    _metric_values(MetricRow(n, v, pr, it))
                names = [k[0] for k in keys]
                if len(set(names)) != len(names):
                    twice = sorted({n for n in names if names.count(n) > 1})
                    raise InvalidArgumentError(
                        f"step {step}: metric(s) {twice} are logged twice in one step (two "
                        "probes return the same name): give the probes distinct value names."
                    )
                if len(self._checked) >= _CHECKED_MAX:
                    self._checked.clear()
                known = self._checked[sig] = sig
            sig = known  # one object per name list: the writer groups steps by identity
            self._ensure_run()
            assert self.run_id is not None
            pending = self._pending_steps
            pending.rows.append((step, sig, values))
        history = self.history
        for (n, _, _), v in zip(keys, values, strict=True):
            pts = history.get(n)
            if pts is None:
                history[n] = [(step, v)]
            else:
                pts.append((step, v))
        self.last_step = step  # buffered: a failed write below keeps it for a retry
        if self._store is None or not keys:
            return
        if self.commit_seconds == 0 or not self.background:
            if (
                self.commit_seconds == 0
                or len(pending.rows) >= self.commit_steps
                or time.perf_counter() - self._last_flush >= self.commit_seconds
            ):
                self.flush()
        elif (
            len(pending.rows) >= self._half_steps
            or time.perf_counter() - self._last_flush >= 0.5 * self.commit_seconds
        ):
            # half batches: the one in flight and the one buffered together stay within
            # commit_steps steps and about commit_seconds, the bound a crash may lose
            self._last_flush = time.perf_counter()
            pending.submit()

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """In-memory ``(steps, values)`` of one metric."""
        pts = self.history.get(name, [])
        return [s for s, _ in pts], [v for _, v in pts]


_STATUSES = ("completed", "failed", "diverged")
_STEP_TIME = ("step_time", "tracker", "before")
#: Distinct per-step name lists remembered as checked (a steady loop has one or a few).
_CHECKED_MAX = 256


def _floats(raw: list[Any]) -> list[float]:
    """The values as floats; scalar tensors off the CPU are read in one batch (one host sync).

    On the CPU ``float`` per tensor is cheaper than stacking (and most values are floats
    already); a batch that cannot be stacked (mixed devices, a dtype the device lacks) falls
    back to ``float`` per value, which also raises the usual error for a value that is not a
    number.
    """
    tensors = [v for v in raw if type(v) is not float]
    if len(tensors) > 1 and any(isinstance(t, Tensor) and not t.is_cpu for t in tensors):
        try:
            read = iter(
                torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors]).tolist()
            )
            return [v if type(v) is float else next(read) for v in raw]
        except (RuntimeError, TypeError, ValueError, AttributeError):
            pass
    return [v if type(v) is float else float(v) for v in raw]


def _central_flow_curves(prediction: Prediction, at: np.ndarray) -> dict[str, Any]:
    """A central flow prediction's sharpness and oscillation at the steps ``at``, its threshold
    and onset step, and ``kind``; nothing for other predictions (read by attribute, so that
    the tracker does not import the central flow module)."""
    sharp = getattr(prediction, "sharpness", None)
    osc = getattr(prediction, "oscillation", None)
    if sharp is None or osc is None:
        return {}
    sharp = np.asarray(sharp, dtype=np.float64).reshape(-1)
    osc = np.asarray(osc, dtype=np.float64).reshape(-1)
    if sharp.size <= at[-1] or osc.size <= at[-1]:
        return {}  # not curves over the loss's steps
    threshold = getattr(prediction, "threshold", None)
    onset = getattr(prediction, "onset_step", None)
    return {
        "kind": "central flow",
        "sharpness": [float(sharp[s]) for s in at],
        "oscillation": [float(osc[s]) for s in at],
        "threshold": None if threshold is None else float(threshold),
        "onset_step": None if onset is None else int(onset),
    }


#: A buffered step: ``(step, ((name, probe, iterate), ...), values)``.
_Keys = tuple[tuple[str, str, str], ...]  # (name, probe, iterate) of each of a step's values
_Buffered = tuple[int, _Keys, list[float]]


class _PendingSteps:
    """Steps buffered for one batched write (shared with the tracker's finalizer, which must not
    hold the tracker itself).

    :meth:`submit` hands the buffer to a writer thread and returns at once (the training loop
    goes on while SQLite writes); it first waits for the previous write, so at most one batch is
    in flight and the stored steps stay a prefix. :meth:`flush` waits for the write in flight and
    writes the rest before returning. A failed write keeps its steps for a retry and raises at
    the next :meth:`submit` or :meth:`flush`.
    """

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.run_id: int | None = None
        #: ``(step, ((name, probe, iterate), ...), values)`` per buffered step
        self.rows: list[_Buffered] = []
        self._writer: threading.Thread | None = None
        self._inflight: list[_Buffered] = []
        self._error: BaseException | None = None

    def _write(self, batch: list[_Buffered]) -> None:
        """One transaction; consecutive steps with the same names go as one block."""
        assert self.store is not None and self.run_id is not None
        blocks: list[tuple[_Keys, list[int], list[list[float]]]] = []
        for step, keys, vals in batch:
            if blocks and blocks[-1][0] is keys:
                blocks[-1][1].append(step)
                blocks[-1][2].append(vals)
            else:
                blocks.append((keys, [step], [vals]))
        self.store.log_blocks(self.run_id, blocks)

    def _background(self) -> None:
        try:
            self._write(self._inflight)
        except BaseException as e:  # raised in the training thread at the next submit/flush
            self._error = e

    def wait(self) -> None:
        """Wait for the write in flight; on its failure put its steps back and raise."""
        writer = self._writer
        if writer is None:
            return
        writer.join()
        self._writer = None
        error, self._error = self._error, None
        if error is not None:
            self.rows = self._inflight + self.rows
            self._inflight = []
            raise error
        self._inflight = []

    def submit(self) -> None:
        """Write the buffered steps in a writer thread (after the previous write finished)."""
        self.wait()
        if not self.rows or self.store is None or self.run_id is None:
            return
        self._inflight, self.rows = self.rows, []
        self._writer = threading.Thread(
            target=self._background, name="gdscope-tracker-writer", daemon=False
        )
        self._writer.start()

    def flush(self) -> None:
        """Write every buffered step now (the one in flight first); kept for a retry if the
        write fails."""
        self.wait()
        if not self.rows or self.store is None or self.run_id is None:
            return
        self._write(self.rows)
        self.rows = []

    def flush_quietly(self) -> None:
        """:meth:`flush` at garbage collection or interpreter exit (errors are logged)."""
        try:
            self.flush()
        except Exception as e:  # nothing to raise to at exit
            logger.warning("gdscope Tracker: %d buffered step(s) not stored: %s", len(self.rows), e)


def _check_status(status: Any) -> None:
    if status not in _STATUSES:
        raise InvalidArgumentError(
            f"status={status!r} must be one of {_STATUSES} (the run's outcome)."
        )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_store_arg(store: Any) -> None:
    """Refuse a ``store=`` that is not a path, a :class:`~gdscope.store.Store` or ``None``."""
    if store is not None and not isinstance(store, (str, PathLike, Store)):
        raise InvalidArgumentError(
            f"store={store!r} ({type(store).__name__}) must be a path to an SQLite file, a "
            "gdscope.store.Store or None (in memory only), e.g. store='runs.db'."
        )


def check_run_name(run_name: Any) -> None:
    """Refuse a ``run_name=`` the store would refuse at the first step."""
    if run_name is not None and (not isinstance(run_name, str) or not run_name.strip()):
        raise InvalidArgumentError(
            f"run_name={run_name!r} ({type(run_name).__name__}) must be a non-empty string "
            "or None (the store names the run run-<id>)."
        )
    if run_name is not None:
        check_name(run_name, "run_name", run=True)


def check_probes(probes: Any) -> list[Probe]:
    """``probes`` as a list of Probe instances (``None``: the default probes), or a clear error."""
    if probes is None:
        return list(default_probes())
    if isinstance(probes, Probe):
        raise InvalidArgumentError(
            f"probes={probes!r} is one probe: pass a list of probes, probes=[{probes!r}]."
        )
    if isinstance(probes, (str, bytes, Mapping)) or not isinstance(probes, Iterable):
        raise InvalidArgumentError(
            f"probes={_short(probes)} ({type(probes).__name__}) must be a list of Probe "
            "instances (e.g. [gs.probes.LossProbe()]) or None for the default probes."
        )
    out = list(probes)
    for i, p in enumerate(out):
        if not isinstance(p, Probe):
            hint = " (a class: instantiate it)" if isinstance(p, type) else ""
            raise InvalidArgumentError(
                f"probes[{i}]={_short(p)} ({type(p).__name__}) is not a Probe{hint}: pass "
                "probe instances such as gs.probes.LossProbe() or SharpnessProbe(10)."
            )
    return out


def _check_loss(loss: Any) -> Tensor | None:
    """The step's loss as a detached scalar tensor (a number or a one-element tensor)."""
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1 or not (loss.is_floating_point() or loss.dtype == torch.long):
            raise InvalidArgumentError(
                f"loss must be a scalar, got a {loss.dtype} tensor of shape {tuple(loss.shape)}: "
                "pass the step's loss value (e.g. loss=loss, the criterion's scalar output)."
            )
        loss = loss.detach()
        return loss if loss.dim() == 0 else loss.reshape(())
    if isinstance(loss, (bool, np.bool_)) or not isinstance(loss, (int, float, np.number)):
        raise InvalidArgumentError(
            f"loss={_short(loss)} ({type(loss).__name__}) must be a number or a scalar tensor: "
            "pass the step's loss value."
        )
    if isinstance(loss, np.complexfloating):
        raise InvalidArgumentError(f"loss={loss!r} is complex: pass the real loss value.")
    return torch.as_tensor(float(loss), dtype=torch.float64)


def _subset(prob: Problem, subset: int | Sequence[int] | Tensor | None, seed: int) -> Problem:
    if subset is None:
        return prob
    if isinstance(subset, (bool, np.bool_)):
        raise InvalidArgumentError(
            f"subset={subset!r} must be a number of samples, indices or None, not a bool."
        )
    if isinstance(subset, (int, np.integer)):
        n = prob.n
        if not 1 <= subset <= n:
            raise InvalidArgumentError(
                f"subset={subset} must be between 1 and n={n}: pass a smaller count or None."
            )
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: int(subset)]
    if isinstance(subset, (str, bytes, float)) or not isinstance(subset, (Tensor, Iterable)):
        raise InvalidArgumentError(
            f"subset={_short(subset)} ({type(subset).__name__}) must be a number of samples, a "
            "sequence or tensor of sample indices, or None."
        )
    try:
        idx = torch.as_tensor(subset)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(
            f"subset={_short(subset)} must hold integer sample indices: {e}"
        ) from None
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise InvalidArgumentError(
            f"subset indices must be integers, got a {idx.dtype} tensor: pass e.g. "
            "subset=[0, 3, 7] or a count subset=10."
        )
    if idx.ndim != 1 or idx.numel() == 0 or idx.unique().numel() != idx.numel():
        raise InvalidArgumentError(
            f"subset indices must be a non-empty 1-D list without repeats, got shape "
            f"{tuple(idx.shape)}: pass e.g. subset=[0, 3, 7] or a count subset=10."
        )
    full = prob.full_batch
    if full is not None and isinstance(full[0], Mapping) and prob.adapter is not None:
        # dict inputs (an adapter's): the same problem on those samples, adapter kept
        n = prob.n
        if idx.ndim != 1 or idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise InvalidArgumentError(
                f"subset indices must lie in [0, {n}), got {_short(subset)}."
            )
        x, y = full
        idx = idx.to(y.device)
        data = {k: v[idx] if isinstance(v, Tensor) and v.ndim else v for k, v in x.items()}
        data[prob.adapter.labels] = y[idx]
        return prob.with_data(data)
    return prob.subset(idx)
