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
is visible. All of a step's values commit together.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gdscope.errors import GdscopeError, InvalidArgumentError, NonFiniteError
from gdscope.probes.base import Probe, ProbeState
from gdscope.probes.builtin import default_probes
from gdscope.problem import Problem
from gdscope.store import MetricRow, Store
from gdscope.theory import Prediction

__all__ = ["PREDICTION_POINTS", "Tracker"]

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
    ) -> None:
        if not isinstance(prob, Problem):
            raise InvalidArgumentError(
                f"prob must be a gdscope.Problem, got {type(prob).__name__}."
            )
        self.prob = prob
        self.probes = list(default_probes() if probes is None else probes)
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"probe names must be unique, got {names}.")
        self._owns_store = store is not None and not isinstance(store, Store)
        self.store = Store(store) if self._owns_store else store  # type: ignore[arg-type]
        self.run_name = run_name
        self.config: dict[str, Any] = dict(config or {})
        self.config.setdefault("probes", [repr(p) for p in self.probes])
        self.subset = _subset(prob, subset, seed)
        self.initial_params = {n: p.detach().clone() for n, p in prob.params.items()}
        for probe in self.probes:
            probe.start(prob)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.run_id: int | None = None
        self.status: str | None = None
        self._last_return: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def record_config(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the run's config (before the first step)."""
        if self.run_id is not None:
            raise GdscopeError("record_config must be called before the first tracked step.")
        self.config.update(values)

    def record_prediction(self, prediction: Prediction, label: str = "linearized model") -> None:
        """Store a :class:`~gdscope.theory.Prediction` of this run (artifact ``prediction``).

        The report overlays its loss curve (at most :data:`PREDICTION_POINTS` log-spaced steps)
        on the measured one and sets its asymptotic rate beside the fitted rate.
        """
        if self.store is None:
            raise GdscopeError("record_prediction needs a store: pass store= to the Tracker.")
        self._ensure_run()
        assert self.run_id is not None
        loss = np.asarray(prediction.loss, dtype=np.float64)
        steps = np.unique(np.geomspace(1, max(loss.size, 1), PREDICTION_POINTS).astype(int) - 1)
        record = {
            "label": label,
            "steps": [int(s) for s in np.union1d([0], steps)],
            "loss": [float(loss[s]) for s in np.union1d([0], steps)],
            "loss_rate": prediction.loss_rate,
            "asymptotic_rate": prediction.asymptotic_rate,
            "stable": prediction.stable,
            "optimizer": prediction.optimizer,
            "min_eigenvalue": float(np.min(prediction.eigenvalues)),
            "max_eigenvalue": float(np.max(prediction.eigenvalues)),
            "q": prediction.q,
            "notes": list(prediction.notes),
        }
        self.store.add_artifact(
            self.run_id, "prediction", json.dumps(record, default=str), "application/json"
        )

    def _ensure_run(self) -> None:
        if self.run_id is None and self.store is not None:
            self.run_id = self.store.create_run(self.run_name, self.config)

    def close(self, status: str = "completed", summary: dict[str, Any] | None = None) -> None:
        """Mark the run finished with ``status`` (completed, failed, diverged). Idempotent."""
        if self.status is not None:
            return
        self.status = status
        if self.store is not None:
            self._ensure_run()
            assert self.run_id is not None
            self.store.finish_run(self.run_id, status, summary)
            if self._owns_store:
                self.store.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("completed")
        elif issubclass(exc_type, NonFiniteError):
            self.close("diverged")
        else:
            self.close("failed")

    # ------------------------------------------------------------------ the hot path
    def step(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        loss: Tensor | float | None = None,
        outputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> dict[str, float]:
        """Run the probes scheduled at ``step``; return their values.

        Raises :class:`~gdscope.errors.NonFiniteError` naming the step and the probe when a
        loss is not finite (after committing the step, so nothing is lost).
        """
        now = time.perf_counter()
        if self.status is not None:
            raise GdscopeError(f"the tracker was closed ({self.status}); create a new one.")
        due = [p for p in self.probes if p.schedule(step)]
        values: dict[str, float] = {}
        rows: list[MetricRow] = []
        if self._last_return is not None:
            values["step_time"] = now - self._last_return
            rows.append(MetricRow("step_time", values["step_time"], "tracker", "before"))
        if due:
            state = ProbeState(
                step=step,
                problem=self.prob,
                subset=self.subset,
                optimizer=optimizer,
                initial_params=self.initial_params,
                loss=torch.as_tensor(loss).detach() if loss is not None else None,
                outputs=outputs.detach() if outputs is not None else None,
                targets=targets,
            )
            for probe in due:
                t0 = time.perf_counter()
                try:
                    out = probe.compute(state)
                except NonFiniteError as e:
                    self._commit(step, rows)
                    raise NonFiniteError(f"step {step}, probe {probe.name!r}: {e}") from e
                spent = time.perf_counter() - t0
                it = probe.measures(state)
                for k, v in out.items():
                    values[k] = float(v)
                    rows.append(MetricRow(k, float(v), probe.name, it))
                rows.append(MetricRow(f"time/{probe.name}", spent, probe.name, it))
                values[f"time/{probe.name}"] = spent
        self._commit(step, rows)
        lossv = values.get("loss")
        if lossv is not None and not math.isfinite(lossv):
            raise NonFiniteError(
                f"step {step}, probe 'loss': the loss is {lossv}. Training diverged: lower the "
                "learning rate (the run is kept in the store as diverged)."
            )
        self._last_return = time.perf_counter()
        return values

    def _commit(self, step: int, rows: list[MetricRow]) -> None:
        for r in rows:
            self.history.setdefault(r.name, []).append((step, r.value))
        if self.store is not None and rows:
            self._ensure_run()
            assert self.run_id is not None
            self.store.log_step(self.run_id, step, rows)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """In-memory ``(steps, values)`` of one metric."""
        pts = self.history.get(name, [])
        return [s for s, _ in pts], [v for _, v in pts]


def _subset(prob: Problem, subset: int | Sequence[int] | Tensor | None, seed: int) -> Problem:
    if subset is None:
        return prob
    if isinstance(subset, int):
        n = prob.n
        if not 1 <= subset <= n:
            raise InvalidArgumentError(f"subset={subset} must be between 1 and n={n}.")
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:subset]
    return prob.subset(torch.as_tensor(subset))
