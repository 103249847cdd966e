"""Periodic orbits of gradient descent (THEORY §3): detect them in a trajectory or a stored run.

Above its stability threshold GD need not diverge: it can settle on a cycle,
``θ_{t+p} = θ_t`` while ``θ_{t+1} ≠ θ_t``. :func:`detect_orbit` finds the smallest period ``p``
among ``periods`` for which a trajectory (parameters, or any scalar series such as the loss) is
periodic over a trailing window, and says when the cycle appeared and how large it is.

**Semantics.** Let the window be the last ``W`` iterates ``θ_{T−W}, …, θ_{T−1}``, ``s̄`` the mean
step ``‖θ_{t+1} − θ_t‖`` over it, ``S = max_t ‖θ_t‖`` over the *whole* history (the trajectory's
scale) and ``floor = 8·eps·S`` the round-off of the input's dtype (plus ``atol``).

* *Fixed point* (period 1): every step in the window is at most ``ftol·S + atol + floor``. A
  trajectory still converging (steps above that) is **not** a fixed point: it is reported with
  ``period=None`` and ``kind="decaying"`` until its steps fall below the tolerance, so GD on a
  quadratic at ``η`` just below ``2/h`` (the top mode flipping sign with factor
  ``|1 − ηh| ≈ 1``) is ``"decaying"`` over a short run and a fixed point after a long one.
* *Cycle* of period ``p > 1``: not a fixed point, and both
  ``max_t ‖θ_{t+p} − θ_t‖ ≤ tol`` (``residual``) and ``max ‖θ_t − θ_{t'}‖ ≤ tol`` over pairs a
  multiple of ``p`` apart, measured from each phase's first iterate in the window (``drift``:
  catches a slow decay or growth that is small per period but accumulates), with
  ``tol = rtol·s̄ + atol + floor``. ``residual`` and ``drift`` are reported divided by ``s̄``. A
  decaying oscillation whose total change over the window is below ``rtol`` of a step is
  indistinguishable from a cycle at that tolerance: lengthen the window or tighten ``rtol``.
* The smallest listed period that passes wins: with ``periods=(4,)`` a 2-cycle reports 4, and a
  3-cycle is found only if 3 (or a multiple) is listed.
* Otherwise ``period=None`` and ``kind`` is ``"diverged"`` (a non-finite value anywhere),
  ``"growing"`` or ``"decaying"`` (every step in the window's last quarter larger, resp.
  smaller, than every step in its first quarter), or ``"none"`` (aperiodic at this tolerance:
  chaotic, a period not listed, or a window too short).

``onset`` is the first step from which the criterion (steps below the fixed-point tolerance, or
``‖θ_{t+p} − θ_t‖ ≤ tol``) holds at every later iterate. ``amplitude`` is half the
peak-to-peak of the projection of the orbit on ``direction`` (e.g. the top Hessian eigenvector)
when given, else half the orbit's diameter ``max ‖θ_t − θ_{t'}‖`` over one period (for a
2-cycle ``θ = c ± a``: ``‖a‖``); for a scalar series, half its peak-to-peak over one period.

**Loss-based detection** sees the orbit only through ``L``: a parameter cycle of period ``p``
gives a loss period dividing ``p``, and a symmetric parameter cycle can leave the loss constant
(reported as a "fixed point" of the loss). Use parameters where the period itself matters.

>>> import math
>>> import numpy as np
>>> eta, x, xs = 1.1, 1.05, []                       # GD on L = (x² − 1)²/4
>>> for _ in range(400):
...     xs.append(x); x = x - eta * x * (x * x - 1)
>>> rep = detect_orbit(np.array(xs), lr=eta)
>>> rep.period, rep.kind, abs(rep.amplitude - math.sqrt(1 - 1 / eta) / 2) < 1e-12
(2, 'cycle', True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gdscope.curvature import hessian_eigs
from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.problem import Params, Problem

__all__ = [
    "OrbitReport",
    "detect_orbit",
    "gd_orbit",
    "gd_trajectory",
    "orbit_from_store",
]

KINDS = ("fixed_point", "cycle", "diverged", "growing", "decaying", "none")
_CHUNK = 256  # rows per chunk when differencing long histories


@dataclass(frozen=True)
class OrbitReport:
    """What :func:`detect_orbit` found (see the module docstring for the exact criteria).

    Attributes:
        period: the smallest listed period that passed (1 for a fixed point), else ``None``.
        kind: one of ``"fixed_point"``, ``"cycle"``, ``"diverged"``, ``"growing"``,
            ``"decaying"``, ``"none"``.
        window: ``(first, last)`` step of the window examined (inclusive).
        onset: step from which the detected periodicity holds to the end (``None`` if none).
        amplitude: half peak-to-peak along ``direction`` (or half the orbit's diameter);
            ``0.0`` for a fixed point, ``None`` without a period.
        residual: for the detected period ``max ‖θ_{t+p} − θ_t‖ / s̄`` over the window (for a
            fixed point: ``max step / S``); without a period, the smallest over the periods
            tried (``nan`` if none could be tried).
        drift: for a cycle, ``max ‖θ_t − θ_{t'}‖ / s̄`` over pairs a multiple of ``p`` apart;
            ``nan`` otherwise.
        residuals: ``max ‖θ_{t+p} − θ_t‖ / s̄`` for every period tried (``p = 1``:
            ``max step / S``).
        mean_step: ``s̄``, the mean ``‖θ_{t+1} − θ_t‖`` over the window.
        scale: ``S``, the largest ``‖θ_t‖`` over the history.
        lr: the step size, when given.
        source: ``"params"`` (vectors) or ``"series"`` (one scalar per step, e.g. the loss).
        direction_used: whether ``amplitude`` is along a given direction.
        note: caveats (window too short for some periods, where the history became non-finite).
    """

    period: int | None
    kind: str
    window: tuple[int, int]
    onset: int | None
    amplitude: float | None
    residual: float
    drift: float
    residuals: dict[int, float] = field(default_factory=dict)
    mean_step: float = 0.0
    scale: float = 0.0
    lr: float | None = None
    source: str = "params"
    direction_used: bool = False
    note: str = ""

    @property
    def is_cycle(self) -> bool:
        """A cycle of period at least 2 was found."""
        return self.period is not None and self.period > 1


# ---------------------------------------------------------------------- input handling
def _as_matrix(history: Any) -> tuple[Tensor, str]:
    """History as a ``(T, P)`` tensor (no copy where possible) and its source kind."""
    if isinstance(history, np.ndarray):
        history = torch.from_numpy(history)
    if isinstance(history, Tensor):
        if history.ndim == 1:
            X, source = history.reshape(-1, 1), "series"
        elif history.ndim >= 2:
            X, source = history.reshape(history.shape[0], -1), "params"
        else:
            raise ShapeMismatchError("history is a scalar: pass one value or vector per step.")
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        if len(history) == 0:
            raise InvalidArgumentError("history is empty: pass at least two iterates.")
        first = history[0]
        if isinstance(first, Mapping):
            keys = list(first.keys())
            rows = []
            for i, h in enumerate(history):
                if not isinstance(h, Mapping) or list(h.keys()) != keys:
                    raise ShapeMismatchError(
                        f"history[{i}] does not have the parameter names of history[0] "
                        f"({keys}): pass dicts with the same keys in the same order."
                    )
                rows.append(torch.cat([torch.as_tensor(h[k]).detach().reshape(-1) for k in keys]))
            X, source = torch.stack(rows), "params"
        elif isinstance(first, Tensor) and first.numel() > 1:
            X = torch.stack([torch.as_tensor(h).detach().reshape(-1) for h in history])
            source = "params"
        else:
            try:
                items = [
                    h.detach().cpu().double().numpy() if isinstance(h, Tensor) else h
                    for h in history
                ]
                arr = np.asarray(items, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise InvalidArgumentError(
                    f"history must hold numbers, or vectors of one length, per step; got "
                    f"{type(first).__name__} items ({e})."
                ) from None
            if arr.ndim == 1:
                X, source = torch.from_numpy(arr).reshape(-1, 1), "series"
            else:
                X, source = torch.from_numpy(arr).reshape(arr.shape[0], -1), "params"
    else:
        raise InvalidArgumentError(
            f"history must be an array, a tensor or a sequence of parameter dicts, vectors or "
            f"numbers; got {type(history).__name__}."
        )
    if not X.is_floating_point():
        X = X.double()
    return X.detach(), source


def _check_tol(name: str, value: float) -> float:
    if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise InvalidArgumentError(f"{name}={value!r} must be a finite number >= 0.")
    return float(value)


def _lag_norms(X: Tensor, lag: int, start: int = 0) -> Tensor:
    """``‖X[t+lag] − X[t]‖`` for ``t = start .. T−lag−1``, float64, in chunks."""
    T = X.shape[0]
    out = []
    for s in range(start, T - lag, _CHUNK):
        e = min(s + _CHUNK, T - lag)
        d = X[s + lag : e + lag].double() - X[s:e].double()
        out.append(torch.linalg.vector_norm(d, dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(out)


def _onset_index(ok: Tensor) -> int | None:
    """First index from which ``ok`` holds to the end (``None`` if the last entry fails)."""
    if ok.numel() == 0 or not bool(ok[-1]):
        return None
    bad = torch.nonzero(~ok).reshape(-1)
    return 0 if bad.numel() == 0 else int(bad[-1]) + 1


# ---------------------------------------------------------------------- the detector
def detect_orbit(
    history: Any,
    *,
    periods: Sequence[int] = (1, 2, 4, 8, 16),
    rtol: float = 1e-3,
    ftol: float = 1e-6,
    atol: float = 0.0,
    window: int | None = None,
    direction: Tensor | np.ndarray | Params | None = None,
    lr: float | None = None,
    steps: Sequence[int] | np.ndarray | None = None,
    start: int = 0,
) -> OrbitReport:
    """Smallest period ``p`` in ``periods`` with ``θ_{t+p} ≈ θ_t`` over the trailing window.

    Args:
        history: ``T`` iterates: a ``(T, P)`` array or tensor, a list of flat vectors or of
            parameter dicts (flattened in their key order), or a ``(T,)`` scalar series (the
            loss, or a one-parameter trajectory).
        periods: candidate periods, tried in increasing order; ``1`` tests for a fixed point.
        rtol: a cycle's mismatch tolerance relative to the mean step ``s̄``.
        ftol: a fixed point's step tolerance relative to the trajectory's scale ``S``.
        atol: absolute tolerance added to both (e.g. the noise of a float32 loss).
        window: trailing iterates examined (default ``min(T, max(8·max(periods), 64))``); at
            least ``2p`` are needed to test period ``p``.
        direction: the amplitude is measured along this vector (flat, or a parameter dict
            flattened like ``history``), e.g. the top Hessian eigenvector.
        lr: recorded in the report.
        steps: the step label of each iterate (consecutive integers; default
            ``start, start+1, …``).
        start: the first step label when ``steps`` is not given.

    Returns:
        An :class:`OrbitReport`.
    """
    X, source = _as_matrix(history)
    T = X.shape[0]
    if T < 2:
        raise InvalidArgumentError(f"history has {T} iterate(s): pass at least two.")
    rtol, ftol, atol = _check_tol("rtol", rtol), _check_tol("ftol", ftol), _check_tol("atol", atol)
    plist = sorted({int(p) for p in periods})
    if not plist or plist[0] < 1 or any(float(p) != int(p) for p in periods):
        raise InvalidArgumentError(f"periods={tuple(periods)!r} must be positive integers.")
    labels = _labels(steps, start, T)
    if window is None:
        W = min(T, max(8 * plist[-1], 64))
    else:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise InvalidArgumentError(f"window={window!r} must be an integer >= 2.")
        W = min(T, window)
    w0 = T - W
    win = (int(labels[w0]), int(labels[-1]))
    lr = None if lr is None else float(lr)

    finite_rows = torch.isfinite(X).all(dim=1)
    if not bool(finite_rows.all()):
        bad = int(torch.nonzero(~finite_rows)[0])
        return OrbitReport(
            period=None,
            kind="diverged",
            window=win,
            onset=None,
            amplitude=None,
            residual=math.nan,
            drift=math.nan,
            mean_step=math.nan,
            scale=math.nan,
            lr=lr,
            source=source,
            note=f"the history is not finite from step {int(labels[bad])} on",
        )

    norms = torch.linalg.vector_norm(X.double(), dim=1)
    S = float(norms.max())
    eps = torch.finfo(X.dtype).eps
    floor = 8 * eps * S + atol
    steps_w = _lag_norms(X, 1, w0)
    mean_step = float(steps_w.mean())
    max_step = float(steps_w.max())
    fixed_tol = ftol * S + floor
    residuals: dict[int, float] = {}
    notes: list[str] = []
    vdir = _direction(direction, X.shape[1])
    fixed = max_step <= fixed_tol
    if 1 in plist:
        residuals[1] = max_step / S if S > 0 else 0.0

    def report(period, kind, onset_idx, amplitude, residual, drift) -> OrbitReport:
        onset = None if onset_idx is None else int(labels[onset_idx])
        return OrbitReport(
            period=period,
            kind=kind,
            window=win,
            onset=onset,
            amplitude=amplitude,
            residual=residual,
            drift=drift,
            residuals=residuals,
            mean_step=mean_step,
            scale=S,
            lr=lr,
            source=source,
            direction_used=vdir is not None and amplitude is not None,
            note="; ".join(notes),
        )

    if fixed:
        if 1 in plist:
            onset = _onset_index(_lag_norms(X, 1) <= fixed_tol)
            return report(1, "fixed_point", onset, 0.0, residuals[1], math.nan)
        notes.append("the window is a fixed point, but 1 is not among the periods")
        return report(None, "fixed_point", None, None, math.nan, math.nan)

    found = None
    tol = rtol * mean_step + floor
    for p in plist:
        if p == 1:
            continue
        if 2 * p > W:
            notes.append(f"period {p} needs a window of at least {2 * p} iterates (have {W})")
            continue
        mism = _lag_norms(X, p, w0)
        residuals[p] = float(mism.max()) / mean_step
        if float(mism.max()) > tol:
            continue
        drift = float(_phase_drift(X, p, w0).max()) / mean_step
        if drift * mean_step > tol:
            continue
        found = (p, residuals[p], drift)
        break

    if found is not None:
        p, residual, drift = found
        onset = _onset_index(_lag_norms(X, p) <= tol)
        amp = _amplitude(X[T - p :], vdir)
        return report(p, "cycle", onset, amp, residual, drift)

    q = max(1, (W - 1) // 4)
    first, last = steps_w[:q], steps_w[-q:]
    if float(last.min()) > float(first.max()):
        kind = "growing"
    elif float(last.max()) < float(first.min()):
        kind = "decaying"
    else:
        kind = "none"
    tried = [v for k, v in residuals.items() if k > 1]
    best = min(tried) if tried else math.nan
    return report(None, kind, None, None, best, math.nan)


def _labels(steps: Sequence[int] | np.ndarray | None, start: int, T: int) -> np.ndarray:
    if steps is None:
        return np.arange(int(start), int(start) + T, dtype=np.int64)
    labels = np.asarray(steps, dtype=np.int64).reshape(-1)
    if labels.size != T:
        raise ShapeMismatchError(f"steps has {labels.size} labels for {T} iterates.")
    if T > 1 and not np.all(np.diff(labels) == 1):
        raise InvalidArgumentError(
            "steps must be consecutive integers: a periodic orbit needs every iterate (a "
            "series recorded every k steps aliases a k-cycle into a fixed point)."
        )
    return labels


def _direction(direction: Any, P: int) -> Tensor | None:
    if direction is None:
        return None
    if isinstance(direction, Mapping):
        v = torch.cat([torch.as_tensor(t).detach().reshape(-1) for t in direction.values()])
    else:
        v = direction if isinstance(direction, Tensor) else torch.as_tensor(np.asarray(direction))
        v = v.detach().reshape(-1)
    if v.numel() != P:
        raise ShapeMismatchError(
            f"direction has {v.numel()} entries but the iterates have {P}: pass a vector "
            "shaped like one iterate (e.g. a Hessian eigenvector of the same parameters)."
        )
    v = v.double()
    nv = torch.linalg.vector_norm(v)
    if not (torch.isfinite(nv) and nv > 0):
        raise InvalidArgumentError("direction must be a finite nonzero vector.")
    return v / nv


def _phase_drift(X: Tensor, p: int, w0: int) -> Tensor:
    """``‖θ_t − θ_{first iterate of t's phase in the window}‖`` for ``t`` in the window."""
    T = X.shape[0]
    out = []
    for s in range(w0 + p, T, _CHUNK):
        e = min(s + _CHUNK, T)
        idx = torch.arange(s, e)
        ref = w0 + (idx - w0) % p
        out.append(torch.linalg.vector_norm(X[s:e].double() - X[ref].double(), dim=1))
    return torch.cat(out)


def _amplitude(orbit: Tensor, v: Tensor | None) -> float:
    """Half the peak-to-peak along ``v``, else half the diameter of the orbit's points."""
    Y = orbit.double()
    if v is not None:
        proj = Y @ v.to(Y.device)
        return 0.5 * float(proj.max() - proj.min())
    return 0.5 * float(torch.cdist(Y, Y).max())


# ---------------------------------------------------------------------- GD on a Problem
def gd_trajectory(
    prob: Problem, lr: float, steps: int, *, params: Params | Tensor | None = None
) -> Tensor:
    """Iterate the GD map ``θ ↦ θ − lr·∇L(θ)`` functionally; the model is not modified.

    Returns the flat iterates ``(steps + 1, P)`` in the problem's dtype, starting at ``params``
    (default: the model's current parameters). Stops after the first non-finite iterate (which
    is kept, so :func:`detect_orbit` reports ``"diverged"``). Memory: ``(steps + 1)·P`` numbers.
    """
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidArgumentError(f"lr={lr!r} must be a positive finite step size.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidArgumentError(f"steps={steps!r} must be an integer >= 0.")
    if params is None:
        theta = prob.flatten(prob.params).clone()
    elif isinstance(params, Tensor):
        theta = params.detach().reshape(-1).to(prob.device, prob.dtype).clone()
    else:
        theta = prob.flatten({n: params[n].detach() for n in prob.names}).to(
            prob.device, prob.dtype
        )
    if theta.numel() != prob.num_params:
        raise ShapeMismatchError(
            f"params has {theta.numel()} entries; the model has {prob.num_params} parameters."
        )
    out = [theta]
    for _ in range(steps):
        g = prob.gradient(prob.unflatten(theta))
        theta = theta - lr * g
        out.append(theta)
        if not bool(torch.isfinite(theta).all()):
            break
    return torch.stack(out)


def gd_orbit(
    prob: Problem,
    lr: float,
    steps: int,
    *,
    params: Params | Tensor | None = None,
    direction: str | Tensor | None = "top",
    **detect_kwargs: Any,
) -> OrbitReport:
    """Run full-batch GD (:func:`gd_trajectory`) and :func:`detect_orbit` on its parameters.

    ``direction="top"`` measures the amplitude along the top Hessian eigenvector at the last
    iterate (Lanczos, float tolerance ``1e-8``; skipped when the run is not finite); a tensor
    is used as given, ``None`` gives half the orbit's diameter.
    """
    traj = gd_trajectory(prob, lr, steps, params=params)
    vdir = None
    if isinstance(direction, str):
        if direction != "top":
            raise InvalidArgumentError(
                f"direction={direction!r}: use 'top' (top Hessian eigenvector), a vector or None."
            )
        last = traj[-1]
        if bool(torch.isfinite(last).all()):
            res = hessian_eigs(
                prob, 1, "largest", 1e-8, params=prob.unflatten(last), return_vectors=True
            )
            assert res.vectors is not None
            vdir = res.vectors[:, 0]
    else:
        vdir = direction
    return detect_orbit(traj, direction=vdir, lr=lr, **detect_kwargs)


# ---------------------------------------------------------------------- stored runs
def orbit_from_store(
    store: Any, run_id: int, metric: str = "loss", **detect_kwargs: Any
) -> OrbitReport:
    """:func:`detect_orbit` on one stored scalar series of a run (default the loss).

    The series must hold every step (a probe scheduled every step). The step labels are the
    store's iterate indices (:meth:`~gdscope.store.Store.series`). ``lr``, unless given, is the
    run's ``lr`` metric at the onset (or at the last step), else the first parameter group's
    ``lr`` in the run's config. See the module docstring for what a loss can and cannot show;
    for a float32 run pass ``atol`` near the loss's round-off (``~1e-7·L``).
    """
    x, v = store.series(run_id, metric)
    rep = detect_orbit(v, steps=x, **detect_kwargs)
    if rep.lr is not None:
        return rep
    lr = _stored_lr(store, run_id, rep.onset if rep.onset is not None else int(x[-1]))
    if lr is None:
        return rep
    return OrbitReport(**{**rep.__dict__, "lr": lr})


def _stored_lr(store: Any, run_id: int, at: int) -> float | None:
    if "lr" in store.metric_names(run_id):
        xs, lrs = store.series(run_id, "lr")
        i = int(np.searchsorted(xs, at, side="right")) - 1
        return float(lrs[max(i, 0)])
    config = store.run(run_id).config or {}
    try:
        return float(config["optimizer"]["param_groups"][0]["lr"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
