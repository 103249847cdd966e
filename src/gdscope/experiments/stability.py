"""Edge of stability and stability of minima (THEORY §3, §5).

Full-batch GD at several learning rates ``η`` and mini-batch SGD at several batch sizes ``B``
(one ``η``) train the same MLP (``d-m-m-k``, tanh, PyTorch's ``mse_loss`` with mean reduction on
one-hot labels, like ``gdscope demo``) from one initialization. Per run:

* the sharpness series ``λ_max(∇²L)`` (Lanczos, :class:`~gdscope.probes.SharpnessProbe`, full
  data; at ``θ₀`` and every ``sharpness_every`` steps) against the threshold ``2/η``;
* GD: onset = the first iterate with sharpness ``≥ onset_fraction·2/η`` and the *post-onset
  median* sharpness ``/(2/η)`` (Cohen et al.: it hovers at ``2/η``); SGD: the *plateau*, the
  median (and interquartile range) of the last third of the series ``/(2/η)``;
* :func:`gdscope.stability` at the final iterate (GD verdicts; with ``batch_size`` the
  mean-square verdicts, Wu–Ma–E bound and Lyapunov exponents), kept as plain data;
* GD: :func:`gdscope.theory.detect_orbit` on the last ``orbit_window`` parameter iterates
  (amplitude along the top Hessian eigenvector) and on the loss series;
* GD: :func:`gdscope.theory.singular_step_sizes` at ``gd_map_points`` checkpoints: the count of
  Hessian eigenvalues above ``1/η`` (``sign det(I − η∇²L) = (−1)^count``), where it changes, and
  the singular step sizes ``1/h`` nearest to ``η``.

A learning rate that diverges is kept (run status ``"diverged"``) and reported as such; a run
whose final loss is not below its initial loss is ``"unstable"``. Only runs that trained
(``outcome == "trained"``) are analysed at their final iterate.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import deque
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from gdscope.curvature import hessian_eigs
from gdscope.errors import ConfigError
from gdscope.experiments._stability_parts import exact_orbit, perturbation_run, polish_minimum
from gdscope.experiments.base import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Figure,
    Judgement,
    TaskContext,
    register,
)
from gdscope.probes import Every, LossProbe, Probe, ProbeState, SharpnessProbe, ThresholdProbe
from gdscope.problem import Problem
from gdscope.theory import detect_orbit, orbit_from_store, singular_step_sizes, stability
from gdscope.tracker import Tracker
from gdscope.train import GD, fit, stability_threshold
from gdscope.verdict import Hover, Verdict, hover, hover_rule
from gdscope.zoo import mlp

__all__ = ["StabilityConfig", "StabilityExperiment"]

#: StabilityReport fields kept in the task result (plain data; Lyapunov estimates as dicts).
_REPORT_FIELDS = (
    "sharpness",
    "sharpness_residual",
    "threshold",
    "gd_stable",
    "mu_top",
    "count_above",
    "smallest",
    "is_saddle",
    "gradient_norm",
    "gradient_ratio",
    "noise_factor",
    "sgd_mean_square_stable",
    "mean_square_rho",
    "mean_square_threshold",
    "mean_square_lower",
    "wu_ma_e",
    "wu_ma_e_holds",
    "wu_ma_e_threshold",
    "nonuniformity",
    "normal_dim",
    "sgd_lyapunov",
    "sgd_lyapunov_stiff",
    "sgd_lyapunov_stable",
    "notes",
    "seconds",
)


#: What the GD and SGD stability rows report per run.
_GD_KEYS = (
    "sharpness",
    "threshold",
    "gd_stable",
    "is_saddle",
    "smallest",
    "gradient_ratio",
    "at_minimum",
    "count_above",
    "mu_top",
)
_SGD_KEYS = (
    "sgd_mean_square_stable",
    "mean_square_rho",
    "wu_ma_e",
    "wu_ma_e_holds",
    "noise_factor",
    "nonuniformity",
    "sgd_lyapunov_stable",
    "at_minimum",
)


@dataclass(frozen=True)
class StabilityConfig(ExperimentConfig):
    """The stability experiment (defaults: about a minute on 2 CPU cores).

    Attributes:
        data: a classification set (inputs flattened, one-hot MSE targets).
        width, activation: the MLP ``d-m-m-k``.
        lrs: full-batch GD runs, one task each.
        steps: steps of every run.
        sgd_lr, batch_sizes: SGD runs at ``sgd_lr``, one per batch size (fresh batches drawn
            without replacement at every step, THEORY §3).
        sharpness_every, sharpness_tol: sharpness measured every so many steps, to this
            relative Lanczos residual.
        onset_fraction: onset = the first sharpness ``≥ onset_fraction·2/η``.
        eos_band: accepted range of the post-onset median sharpness, in units of ``2/η``.
        min_post_onset: fewer sharpness values after the onset leave the EoS row undetermined.
        orbit_window, orbit_rtol: trailing iterates examined for a periodic orbit, and the
            cycle tolerance relative to the mean step (:func:`gdscope.theory.detect_orbit`).
        gd_map_points, gd_map_tol, gd_map_max_count: checkpoints along each GD run where
            :func:`gdscope.gd_map` counts the Hessian eigenvalues above ``1/η`` (Lanczos
            tolerance, most eigenvalues counted).
        stability_tol, grad_tol, exact_limit, lyapunov_chains, lyapunov_steps: passed to
            :func:`gdscope.stability` (``tol``, ``grad_tol``, ...). A final iterate with
            ``‖∇L‖/(h_max‖θ‖) > grad_tol`` or a negative curvature is not a minimum: the claims
            about minima are then not tested there. The default ``exact_limit`` sends the MLP
            to the Wu–Ma–E bounds (seconds) instead of the exact ``ρ(T)`` (minutes).
        eos_newton_periods, eos_newton_iter, eos_lsmr_iter, eos_newton_hvps: Newton's method
            for a periodic orbit from the last iterate of every GD run that reached ``2/η``
            (:func:`gdscope.theory.orbit_solver.solve_orbit`): periods tried, Newton steps,
            LSMR iterations per step, Hessian-vector products at most per period.
        orbit_factors, orbit_steps, orbit_tol: the exact-orbit task: GD on ``v·tanh(w x)`` on two
            points at ``η = factor·2/S*`` (``S*`` the sharpness of its minimum) for
            ``orbit_steps`` steps, then Newton on ``G²(θ) = θ`` to ``orbit_tol``.
        minimum: run the minimum task: an MLP ``d-m-m-k`` (``m = minimum_width``) on the first
            ``minimum_n`` samples, trained by GD at ``minimum_gd_lr`` for ``minimum_gd_steps``
            steps, then polished by Gauss–Newton until the gradient is at its round-off floor
            (``‖∇L‖/(h_max‖θ‖) ≤ minimum_grad_floor``); eigenvalues below ``minimum_flat_tol·h_max``
            are tangent. At that minimum ``θ*``: GD at ``η = f·2/S*`` (``minimum_gd_factors``) and
            SGD with batches of ``minimum_batch_size`` at ``η = f·η_ms`` (``minimum_sgd_factors``,
            ``η_ms`` the exact mean-square threshold) run from ``θ* + δ``,
            ``‖δ‖ = perturb_rel·‖θ*‖``, for ``perturb_steps`` steps (``perturb_gd_runs`` /
            ``perturb_sgd_runs`` runs), each stopped once its residual has grown or shrunk by
            ``perturb_bound``. ``minimum_lyapunov_chains`` / ``_steps`` for the Lyapunov exponent
            there.
    """

    data: DataConfig = field(default_factory=DataConfig)
    width: int = 64
    activation: str = "tanh"
    lrs: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    steps: int = 600
    sgd_lr: float = 2.0
    batch_sizes: tuple[int, ...] = (4, 8, 16, 32)
    sharpness_every: int = 10
    sharpness_tol: float = 1e-4
    onset_fraction: float = 0.95
    eos_band: tuple[float, float] = (0.9, 1.1)
    min_post_onset: int = 5
    orbit_window: int = 64
    orbit_rtol: float = 1e-3
    gd_map_points: int = 5
    gd_map_tol: float = 1e-6
    gd_map_max_count: int = 32
    stability_tol: float = 1e-4
    grad_tol: float = 1e-3
    exact_limit: int = 2000
    lyapunov_chains: int = 4
    lyapunov_steps: int = 100
    eos_newton_periods: tuple[int, ...] = (2,)
    eos_newton_iter: int = 4
    eos_lsmr_iter: int = 20
    eos_newton_hvps: int = 600
    orbit_factors: tuple[float, ...] = (1.1, 1.2)
    orbit_steps: int = 400
    orbit_tol: float = 1e-10
    minimum: bool = True
    minimum_n: int = 16
    minimum_width: int = 8
    minimum_gd_lr: float = 0.5
    minimum_gd_steps: int = 200
    minimum_flat_tol: float = 1e-10
    minimum_grad_floor: float = 1e-12
    minimum_gd_factors: tuple[float, ...] = (0.9, 1.1)
    minimum_batch_size: int = 4
    minimum_sgd_factors: tuple[float, ...] = (0.8, 1.25)
    perturb_rel: float = 1e-7
    perturb_bound: float = 1e4
    perturb_steps: int = 300
    perturb_gd_runs: int = 2
    perturb_sgd_runs: int = 16
    minimum_lyapunov_chains: int = 8
    minimum_lyapunov_steps: int = 200

    def __post_init__(self) -> None:
        n = self.data.n
        checks = [
            ("width", self.width >= 1, "an integer >= 1"),
            ("steps", self.steps >= 1, "an integer >= 1"),
            (
                "lrs",
                len(self.lrs) >= 1 and all(0 < v < math.inf for v in self.lrs),
                "one or more positive learning rates, e.g. [1.0, 2.0]",
            ),
            ("sgd_lr", 0 < self.sgd_lr < math.inf, "a positive number"),
            (
                "batch_sizes",
                all(1 <= b <= (n or b) for b in self.batch_sizes),
                f"batch sizes between 1 and data.n = {n}",
            ),
            ("sharpness_every", self.sharpness_every >= 1, "an integer >= 1"),
            ("onset_fraction", 0 < self.onset_fraction <= 1, "a number in (0, 1]"),
            ("eos_band", 0 < self.eos_band[0] < self.eos_band[1], "[low, high], 0 < low < high"),
            ("min_post_onset", self.min_post_onset >= 1, "an integer >= 1"),
            ("orbit_window", self.orbit_window >= 4, "an integer >= 4"),
            ("gd_map_points", self.gd_map_points >= 2, "an integer >= 2"),
            ("gd_map_max_count", self.gd_map_max_count >= 1, "an integer >= 1"),
            ("exact_limit", self.exact_limit >= 1, "an integer >= 1"),
            ("lyapunov_chains", self.lyapunov_chains >= 2, "an integer >= 2"),
            ("lyapunov_steps", self.lyapunov_steps >= 1, "an integer >= 1"),
            (
                "eos_newton_periods",
                all(isinstance(p, int) and p >= 1 for p in self.eos_newton_periods),
                "periods >= 1, e.g. [2, 4]",
            ),
            ("eos_newton_iter", self.eos_newton_iter >= 1, "an integer >= 1"),
            ("eos_lsmr_iter", self.eos_lsmr_iter >= 1, "an integer >= 1"),
            ("eos_newton_hvps", self.eos_newton_hvps >= 1, "an integer >= 1"),
            (
                "orbit_factors",
                all(0 < f < math.inf for f in self.orbit_factors),
                "positive multiples of the minimum's threshold 2/S*, e.g. [1.1, 1.2]",
            ),
            ("orbit_steps", self.orbit_steps >= 3, "an integer >= 3"),
            ("minimum_n", self.minimum_n >= 2, "an integer >= 2"),
            ("minimum_width", self.minimum_width >= 1, "an integer >= 1"),
            ("minimum_gd_lr", 0 < self.minimum_gd_lr < math.inf, "a positive number"),
            ("minimum_gd_steps", self.minimum_gd_steps >= 0, "an integer >= 0"),
            (
                "minimum_gd_factors",
                all(0 < f < math.inf for f in self.minimum_gd_factors),
                "positive multiples of 2/S*, e.g. [0.9, 1.1]",
            ),
            (
                "minimum_batch_size",
                1 <= self.minimum_batch_size < self.minimum_n,
                f"a batch size in [1, minimum_n = {self.minimum_n})",
            ),
            (
                "minimum_sgd_factors",
                all(0 < f < math.inf for f in self.minimum_sgd_factors),
                "positive multiples of the mean-square threshold, e.g. [0.8, 1.25]",
            ),
            ("perturb_bound", self.perturb_bound > 1, "a growth factor > 1, e.g. 1e4"),
            ("perturb_steps", self.perturb_steps >= 3, "an integer >= 3"),
            ("perturb_gd_runs", self.perturb_gd_runs >= 1, "an integer >= 1"),
            ("perturb_sgd_runs", self.perturb_sgd_runs >= 2, "an integer >= 2"),
            ("minimum_lyapunov_chains", self.minimum_lyapunov_chains >= 2, "an integer >= 2"),
            ("minimum_lyapunov_steps", self.minimum_lyapunov_steps >= 1, "an integer >= 1"),
        ]
        checks += [
            (name, 0 < getattr(self, name) < 1, "a number in (0, 1)")
            for name in (
                "sharpness_tol",
                "orbit_rtol",
                "gd_map_tol",
                "stability_tol",
                "grad_tol",
                "orbit_tol",
                "minimum_flat_tol",
                "minimum_grad_floor",
                "perturb_rel",
            )
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be {what}.")


class _Trajectory(Probe):
    """Flat parameter snapshots: at ``checkpoints`` (iterate indices) and the last ``window``."""

    name = "trajectory"
    iterate = "after"

    def __init__(self, checkpoints: set[int], window: int) -> None:
        super().__init__(Every(1))
        self.checkpoints = checkpoints
        self.saved: dict[int, Tensor] = {}
        self.tail: deque[tuple[int, Tensor]] = deque(maxlen=window)

    def _keep(self, x: int, prob: Problem) -> None:
        theta = prob.flatten(prob.params).detach().clone()
        if x in self.checkpoints:
            self.saved[x] = theta
        self.tail.append((x, theta))

    def start(self, problem: Problem) -> None:
        self._keep(0, problem)

    def compute(self, state: ProbeState) -> dict[str, float]:
        self._keep(state.step + 1, state.problem)  # the model holds θ_{t+1}
        return {}


def _problem(cfg: StabilityConfig, ctx: TaskContext) -> tuple[Problem, list[int]]:
    """The MLP ``d-m-m-k`` on the data set (flattened inputs, one-hot targets), its sizes."""
    X, Y = cfg.data.load(seed=cfg.seed, dtype=ctx.dtype, one_hot=True, flatten=True)
    if Y.ndim != 2:
        raise ConfigError(
            f"data.name={cfg.data.name!r} gives targets of shape {tuple(Y.shape)}: use a "
            "classification set (digits, mnist1d, mnist, cifar10) for one-hot MSE targets."
        )
    X, Y = X.to(ctx.device), Y.to(ctx.device)
    sizes = [X.shape[1], cfg.width, cfg.width, Y.shape[1]]
    model = mlp(sizes, cfg.activation, seed=cfg.seed, dtype=ctx.dtype).to(ctx.device)
    return Problem(model, "mse", (X, Y)), sizes


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses and mappings as dicts, non-finite floats as ``None``."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _checkpoints(cfg: StabilityConfig) -> list[int]:
    """``gd_map_points`` iterate indices among those the sharpness probe measures."""
    measured = [0, *range(1, cfg.steps + 1, cfg.sharpness_every)]
    idx = np.linspace(0, len(measured) - 1, min(cfg.gd_map_points, len(measured)))
    return sorted({measured[round(i)] for i in idx})


def _eos(xs: list[int], ss: list[float], thr: float, cfg: StabilityConfig) -> dict[str, Any]:
    """Onset (first sharpness ≥ onset_fraction·thr) and post-onset median / thr
    (:func:`gdscope.verdict.hover`)."""
    h = hover(xs, np.asarray(ss, dtype=np.float64) / thr, cfg.onset_fraction)
    return {
        "max_ratio": h.max,
        "onset": h.onset_step,
        "post_onset_ratio": h.median,
        "post_onset_q25": h.q25,
        "post_onset_q75": h.q75,
        "post_onset_count": h.count,
    }


def _plateau(ss: list[float], thr: float) -> dict[str, Any]:
    """Median and interquartile range of the last third of the sharpness series, / thr."""
    s = np.asarray(ss[len(ss) - max(1, len(ss) // 3) :], dtype=np.float64) / thr
    return {
        "plateau_ratio": float(np.median(s)),
        "plateau_q25": float(np.quantile(s, 0.25)),
        "plateau_q75": float(np.quantile(s, 0.75)),
        "plateau_count": int(s.size),
    }


def _orbits(
    cfg: StabilityConfig, prob: Problem, traj: _Trajectory, ctx: TaskContext, run_id: int
) -> dict[str, Any]:
    """Period of the last ``orbit_window`` iterates (parameters; loss), its amplitude along the
    top Hessian eigenvector ``v``, and ``top_alignment``: the mean ``|cos(θ_{t+1} − θ_t, v)|``
    over the window (near 1: the iterates oscillate along ``v``, as at the edge of stability).
    """
    top = hessian_eigs(prob, 1, "largest", cfg.sharpness_tol, return_vectors=True)
    assert top.vectors is not None
    v = top.vectors[:, 0]
    thetas = torch.stack([t for _, t in traj.tail])
    rep = detect_orbit(thetas, steps=[x for x, _ in traj.tail], direction=v, rtol=cfg.orbit_rtol)
    loss = orbit_from_store(ctx.store, run_id, "loss", rtol=cfg.orbit_rtol, window=cfg.orbit_window)
    moves = thetas.diff(dim=0)
    norms = torch.linalg.vector_norm(moves, dim=1)
    cos = (moves @ v).abs() / norms.clamp_min(torch.finfo(norms.dtype).tiny)

    def summary(r: Any) -> dict[str, Any]:
        return _plain(
            {
                "period": r.period,
                "kind": r.kind,
                "window": list(r.window),
                "onset": r.onset,
                "amplitude": r.amplitude,
                "residual_2": r.residuals.get(2),
                "drift": r.drift,
                "note": r.note,
            }
        )

    return {
        "params": {**summary(rep), "top_alignment": cos.mean().item()},
        "loss": summary(loss),
    }


def _gd_map(cfg: StabilityConfig, prob: Problem, traj: _Trajectory, lr: float) -> dict[str, Any]:
    """Singular step sizes and ``sign det(I − η∇²L)`` at the checkpoints the run reached."""
    labels = sorted(traj.saved)
    trace = singular_step_sizes(
        prob,
        [traj.saved[x] for x in labels],
        lr,
        steps=labels,
        tol=cfg.gd_map_tol,
        max_count=cfg.gd_map_max_count,
        slq_vectors=2,
        slq_steps=16,
        seed=cfg.seed,
    )
    return _plain(
        {
            "steps": labels,
            "count_above": trace.count_above,
            "sign": trace.sign,
            "singular_lr_below": trace.singular_lr_below.tolist(),
            "singular_lr_above": trace.singular_lr_above.tolist(),
            "min_factor": trace.min_factor.tolist(),
            "sign_changes": [list(c) for c in trace.sign_changes],
            "crossings": [list(c) for c in trace.crossings],
            "undetermined": trace.undetermined,
            "seconds": trace.seconds,
        }
    )


def _stability(
    cfg: StabilityConfig, prob: Problem, lr: float, batch_size: int | None
) -> dict[str, Any]:
    with warnings.catch_warnings():  # "not a minimum" is kept in the report's notes
        warnings.simplefilter("ignore", RuntimeWarning)
        rep = stability(
            prob,
            lr,
            batch_size=batch_size,
            exact_limit=cfg.exact_limit,
            chains=cfg.lyapunov_chains,
            lyapunov_steps=cfg.lyapunov_steps,
            tol=cfg.stability_tol,
            grad_tol=cfg.grad_tol,
            seed=cfg.seed,
        )
    plain = rep.to_dict()
    out = {name: plain[name] for name in _REPORT_FIELDS}
    out["at_minimum"] = rep.is_saddle is False and rep.gradient_ratio <= cfg.grad_tol
    return out


def _eos_newton(
    cfg: StabilityConfig, prob: Problem, traj: _Trajectory, lr: float
) -> list[dict[str, Any]]:
    """Newton on ``G^p(θ) = θ`` from the run's last iterate, for each period tried.

    Also the run's own drift over the trailing window: ``‖θ_T − θ_{T−p}‖`` relative to the mean
    step (a GD run that settled on a period-``p`` orbit has it at round-off), and, when Newton
    converged, the distance from the last iterate to the solved orbit.
    """
    from gdscope.theory.orbit_solver import solve_orbit

    thetas = [t.double().cpu() for _, t in traj.tail]
    last = thetas[-1]
    mean_step = float(
        np.mean([torch.linalg.vector_norm(b - a) for a, b in itertools.pairwise(thetas)])
    )
    out = []
    for p in cfg.eos_newton_periods:
        if len(thetas) <= p:
            continue
        drift = float(torch.linalg.vector_norm(last - thetas[-1 - p])) / max(mean_step, 1e-300)
        sol = solve_orbit(
            prob,
            lr,
            p,
            start=last,
            max_iter=cfg.eos_newton_iter,
            lsmr_iter=cfg.eos_lsmr_iter,
            max_hvps=cfg.eos_newton_hvps,
            multipliers=4,
        )
        entry: dict[str, Any] = {
            "period": p,
            "drift": drift,
            "mean_step": mean_step,
            "converged": sol.converged,
            "kind": sol.kind,
            "residual": sol.residual,
            "history": list(sol.history),
            "iterations": sol.iterations,
            "hvps": sol.hvps,
            "seconds": sol.seconds,
            "stable": sol.stable,
            "spectral_radius": None if math.isnan(sol.spectral_radius) else sol.spectral_radius,
            "multipliers_abs": np.abs(sol.multipliers).tolist(),
            "notes": list(sol.notes),
        }
        if sol.converged:
            pts = torch.as_tensor(sol.points)
            entry["distance_last"] = float(torch.cdist(last.reshape(1, -1), pts).min())
            entry["distance_window_start"] = float(torch.cdist(thetas[0].reshape(1, -1), pts).min())
        out.append(_plain(entry))
    return out


def _minimum_task(cfg: StabilityConfig, ctx: TaskContext) -> dict[str, Any]:
    """A minimum ``θ*`` at the round-off floor; the criteria there and perturbed runs from it."""
    from dataclasses import replace

    X, Y = replace(cfg.data, n=cfg.minimum_n).load(
        seed=cfg.seed, dtype=ctx.dtype, one_hot=True, flatten=True
    )
    X, Y = X.to(ctx.device), Y.to(ctx.device)
    sizes = [X.shape[1], cfg.minimum_width, cfg.minimum_width, Y.shape[1]]
    model = mlp(sizes, cfg.activation, seed=cfg.seed, dtype=ctx.dtype).to(ctx.device)
    prob = Problem(model, "mse", (X, Y))
    ctx.log(f"minimum: GD + Gauss–Newton polish, mlp {sizes} on {X.shape[0]} samples")
    pol = polish_minimum(
        prob,
        prob.flatten(prob.params),
        gd_lr=cfg.minimum_gd_lr,
        gd_steps=cfg.minimum_gd_steps,
    )
    theta = pol.pop("theta")
    with torch.no_grad():
        for param, value in zip(
            prob.model.parameters(), prob.unflatten(theta).values(), strict=True
        ):
            param.copy_(value)
    B = cfg.minimum_batch_size

    def report(lr: float, batch: int | None) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rep = stability(
                prob,
                lr,
                batch_size=batch,
                exact_limit=max(cfg.exact_limit, prob.num_params + 1),
                chains=cfg.minimum_lyapunov_chains,
                lyapunov_steps=cfg.minimum_lyapunov_steps,
                tol=1e-10,
                flat_tol=cfg.minimum_flat_tol,
                seed=cfg.seed,
            )
        return rep.to_dict()

    base = report(1.0, B)
    sharp = base["sharpness"]
    out: dict[str, Any] = {
        "sizes": sizes,
        "n": X.shape[0],
        "num_params": prob.num_params,
        "batch_size": B,
        "polish": _plain(pol),
        "sharpness": sharp,
        "smallest": base["smallest"],
        "is_saddle": base["is_saddle"],
        "gradient_norm": base["gradient_norm"],
        "gradient_ratio": base["gradient_ratio"],
        "normal_dim": base["normal_dim"],
        "mean_square_threshold": base["mean_square_threshold"],
        "loss": float(prob.loss()),
    }
    out["at_minimum"] = bool(
        base["is_saddle"] is False and base["gradient_ratio"] <= cfg.minimum_grad_floor
    )
    if not out["at_minimum"]:
        return out
    gd_tests = []
    for f in cfg.minimum_gd_factors:
        lr = f * 2 / sharp
        ctx.log(f"minimum: GD perturbation at {f:g}·2/S*")
        run = perturbation_run(
            prob,
            theta,
            lr,
            batch_size=None,
            runs=cfg.perturb_gd_runs,
            steps=cfg.perturb_steps,
            rel=cfg.perturb_rel,
            bound=cfg.perturb_bound,
            seed=cfg.seed,
        )
        gd_tests.append(
            {
                "factor": f,
                "lr": lr,
                "threshold": 2 / lr,
                "gd_stable": sharp < 2 / lr,
                "mu_top": math.log(abs(1 - lr * sharp)),
                **run,
            }
        )
    out["gd_tests"] = _plain(gd_tests)
    eta_ms = base["mean_square_threshold"]
    out["sgd_reference"] = "mean-square threshold" if eta_ms else "2/S*"
    eta_ref = eta_ms if eta_ms else 2 / sharp
    sgd_tests = []
    for f in cfg.minimum_sgd_factors:
        lr = f * eta_ref
        ctx.log(f"minimum: SGD criteria and perturbation at {f:g}·η_ms")
        rep = report(lr, B)
        run = perturbation_run(
            prob,
            theta,
            lr,
            batch_size=B,
            runs=cfg.perturb_sgd_runs,
            steps=cfg.perturb_steps,
            rel=cfg.perturb_rel,
            bound=cfg.perturb_bound,
            seed=cfg.seed,
        )
        sgd_tests.append(
            {
                "factor": f,
                "lr": lr,
                **{
                    k: rep[k]
                    for k in (
                        "sgd_mean_square_stable",
                        "mean_square_rho",
                        "wu_ma_e",
                        "wu_ma_e_holds",
                        "sgd_lyapunov",
                        "sgd_lyapunov_stable",
                        "gd_stable",
                        "notes",
                    )
                },
                **run,
            }
        )
    out["sgd_tests"] = _plain(sgd_tests)
    return out


# ---------------------------------------------------------------------- judging helpers
def _combine(values: list[bool | None]) -> bool | None:
    """False if any is False; True if all are True (and there is one); else None."""
    if any(v is False for v in values):
        return False
    if values and all(v is True for v in values):
        return True
    return None


def _interval_below(lo: float, hi: float, bound: float = 1.0) -> bool | None:
    """``[lo, hi]`` entirely below ``bound``: True; entirely at or above: False; else None."""
    if hi < bound:
        return True
    if lo >= bound:
        return False
    return None


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def _yn(x: bool | None) -> str:
    return {True: "yes", False: "no", None: "undetermined"}[x]


@register
class StabilityExperiment(Experiment):
    """Edge of stability under GD, sharpness under SGD, and stability of the points reached."""

    name = "stability"
    summary = (
        "Edge of stability: GD sharpness rises to 2/η and hovers there, SGD plateaus below; "
        "stability of the minima reached, period-2 orbits, singular step sizes (THEORY §3)."
    )
    Config = StabilityConfig
    paper_scale: ClassVar[dict[str, Any]] = {
        "data.n": 1797,
        "width": 200,
        "steps": 5000,
        "sharpness_every": 20,
        "lrs": [0.5, 1.0, 2.0, 4.0],
        "batch_sizes": [8, 32, 128],
        "device": "cuda",
    }

    def tasks(self, cfg: StabilityConfig) -> list[dict[str, Any]]:
        gd = [{"kind": "gd", "lr": lr, "batch_size": None} for lr in cfg.lrs]
        sgd = [{"kind": "sgd", "lr": cfg.sgd_lr, "batch_size": b} for b in cfg.batch_sizes]
        extra: list[dict[str, Any]] = [
            {"kind": "orbit", "factor": f, "batch_size": None} for f in cfg.orbit_factors
        ]
        if cfg.minimum:
            extra.append({"kind": "minimum", "batch_size": cfg.minimum_batch_size})
        return gd + sgd + extra

    def run_task(self, cfg: StabilityConfig, task: dict[str, Any], ctx: TaskContext) -> dict:
        if task["kind"] == "orbit":
            ctx.log(f"exact orbit at {task['factor']:g}·2/S*")
            return {
                "kind": "orbit",
                **exact_orbit(
                    float(task["factor"]), cfg.orbit_steps, tol=cfg.orbit_tol, dtype=ctx.dtype
                ),
            }
        if task["kind"] == "minimum":
            return {"kind": "minimum", **_minimum_task(cfg, ctx)}
        lr, batch_size, kind = float(task["lr"]), task["batch_size"], task["kind"]
        prob, sizes = _problem(cfg, ctx)
        init = hessian_eigs(prob, 1, "largest", cfg.sharpness_tol)
        loss_init = prob.loss().item()
        traj = _Trajectory(set(_checkpoints(cfg)), cfg.orbit_window) if kind == "gd" else None
        probes: list[Probe] = [
            LossProbe(),
            ThresholdProbe(cfg.sharpness_every),
            SharpnessProbe(cfg.sharpness_every, tol=cfg.sharpness_tol),
        ]
        if traj is not None:
            probes.append(traj)
        name = f"stability-{kind}-lr{lr:g}" + ("" if batch_size is None else f"-B{batch_size}")
        run_config = {
            "experiment": self.name,
            "model": f"mlp {sizes} {cfg.activation}",
            "loss": "mse (mean)",
            "data": f"{cfg.data.name} n={prob.n}",
            "lr": lr,
        }
        tracker = Tracker(prob, probes, store=ctx.store, run_name=name, config=run_config)
        optimizer = GD(prob.model.parameters(), lr=lr)
        thr = stability_threshold(optimizer)
        assert thr is not None  # GD always has one: 2/η
        ctx.log(f"{name}: training {cfg.steps} steps")
        res = fit(
            prob,
            optimizer,
            cfg.steps,
            tracker,
            batch_size=batch_size,
            seed=cfg.seed,
            on_nonfinite="stop",
        )
        if not res.diverged:
            tracker.close("completed")
        xs, ss = tracker.series("sharpness")
        xs = [0, *(x + 1 for x in xs)]  # the probe measures θ_{t+1} after step t
        ss = [init.values[0].item(), *ss]
        _, losses = tracker.series("loss")
        loss_final = math.inf if res.diverged else prob.loss().item()
        outcome = (
            "diverged" if res.diverged else "trained" if loss_final < loss_init else "unstable"
        )
        out: dict[str, Any] = {
            "kind": kind,
            "lr": lr,
            "batch_size": batch_size,
            "threshold": thr,
            "status": "diverged" if res.diverged else "completed",
            "diverged_at": res.diverged_at,
            "outcome": outcome,
            "loss_init": loss_init,
            "loss_final": _plain(loss_final),
            "steps": res.steps,
            "sharpness_init": ss[0],
            "sharpness_init_residual": init.residuals[0].item(),
            "sharpness_steps": xs,
            "sharpness": _plain(ss),
            "loss": _plain(losses),
            "seconds_fit": res.seconds,
        }
        if kind == "gd":
            out.update(_eos(xs, ss, thr, cfg))
        else:
            out.update(_plateau(ss, thr))
        if outcome != "trained":  # nothing near a minimum or an orbit to analyse
            return out
        ctx.log(f"{name}: stability analysis")
        out["stability"] = _stability(cfg, prob, lr, batch_size)
        if traj is not None:
            assert tracker.run_id is not None
            out["orbit"] = _orbits(cfg, prob, traj, ctx, tracker.run_id)
            out["gd_map"] = _gd_map(cfg, prob, traj, lr)
            if out["onset"] is not None:
                ctx.log(f"{name}: Newton for periodic orbits")
                out["newton"] = _eos_newton(cfg, prob, traj, lr)
        return out

    # ------------------------------------------------------------------ judge
    def judge(self, cfg: StabilityConfig, results: list[dict[str, Any]]) -> Judgement:
        gd = [r for r in results if r["kind"] == "gd"]
        sgd = sorted((r for r in results if r["kind"] == "sgd"), key=lambda r: r["batch_size"])
        orbits = [r for r in results if r["kind"] == "orbit"]
        minimum = next((r for r in results if r["kind"] == "minimum"), None)
        verdicts = [self._eos_verdict(cfg, r) for r in gd]
        if sgd:
            verdicts += [self._plateau_verdict(cfg, sgd), self._trend_verdict(sgd)]
        verdicts.append(self._gd_stability_verdict(cfg, gd, minimum))
        verdicts.append(self._sgd_stability_verdict(cfg, sgd, minimum))
        verdicts.append(self._lyapunov_verdict(cfg, sgd, minimum))
        if orbits:
            verdicts.append(self._exact_orbit_verdict(cfg, orbits))
        if gd:
            verdicts += [self._orbit_verdict(cfg, gd), self._gd_map_verdict(cfg, gd)]
        figures = [_sharpness_figure(cfg, gd)] if gd else []
        if sgd:
            figures.append(_sgd_figure(cfg, sgd, gd))
        if gd or sgd:
            figures.append(_verdict_table(gd + sgd))
        if orbits or (minimum and minimum.get("gd_tests")):
            figures.append(_dynamics_figure(orbits, minimum))
        return Judgement(verdicts, figures)

    @staticmethod
    def _eos_verdict(cfg: StabilityConfig, r: dict[str, Any]) -> Verdict:
        lo, hi = cfg.eos_band
        lr, thr = r["lr"], r["threshold"]
        details = {
            k: r.get(k)
            for k in (
                "lr",
                "threshold",
                "sharpness_init",
                "onset",
                "post_onset_ratio",
                "post_onset_q25",
                "post_onset_q75",
                "post_onset_count",
                "max_ratio",
                "status",
                "diverged_at",
                "outcome",
                "loss_init",
                "loss_final",
            )
        }
        predicted = (
            f"post-onset median sharpness in [{lo:g}, {hi:g}]·2/η (onset: first sharpness ≥ "
            f"{cfg.onset_fraction:g}·2/η), for a run that starts below 2/η and reaches it"
        )
        init_ratio = r["sharpness_init"] / thr
        init = f"sharpness at init {r['sharpness_init']:.3g} = {init_ratio:.3g}·2/η"
        holds: bool | None = None
        assumption = reason = ""
        if r["outcome"] != "trained":
            measured = f"{_outcome(r)} ({init})"
            if init_ratio >= 1:
                assumption = f"the run starts above the threshold ({init}) and does not train"
            else:
                holds, reason = False, "a run that started below 2/η did not train"
        else:
            post = (
                {}
                if r["onset"] is None
                else {
                    "onset_step": r["onset"],
                    "median": r["post_onset_ratio"],
                    "q25": r["post_onset_q25"],
                    "q75": r["post_onset_q75"],
                    "count": r["post_onset_count"],
                }
            )
            h = Hover(init_ratio, r["max_ratio"], cfg.onset_fraction, **post)
            holds, reason, assumption = hover_rule(h, cfg.eos_band, cfg.min_post_onset)
            if r["onset"] is None:
                measured = (
                    f"threshold not reached in {r['steps']} steps: max sharpness "
                    f"{r['max_ratio']:.3f}·2/η ({init})"
                )
            else:
                measured = (
                    f"onset at step {r['onset']}; median {r['post_onset_ratio']:.3f}·2/η (IQR "
                    f"{r['post_onset_q25']:.3f}–{r['post_onset_q75']:.3f}) over "
                    f"{r['post_onset_count']} measurements ({init})"
                )
        return Verdict(
            f"Edge of stability at η = {lr:g}: GD sharpness rises to 2/η = {thr:.3g} and hovers",
            predicted,
            measured,
            holds,
            details,
            reason=reason or assumption,
            theorem=_EOS_THEOREM,
            section=_SEC_EOS,
            assumption=assumption,
        )

    @staticmethod
    def _plateau_verdict(cfg: StabilityConfig, sgd: list[dict[str, Any]]) -> Verdict:
        parts, per = [], []
        for r in sgd:
            b = r["batch_size"]
            if r["outcome"] != "trained":
                parts.append(f"B={b}: {_outcome(r)}")
                per.append("outside")
                continue
            parts.append(
                f"B={b}: {r['plateau_ratio']:.3f}·2/η (IQR {r['plateau_q25']:.3f}–"
                f"{r['plateau_q75']:.3f})"
            )
            per.append(_status(_interval_below(r["plateau_q25"], r["plateau_q75"])))
        holds, assumption = _combine_status(per, "no SGD run trained")
        return Verdict(
            f"SGD at η = {cfg.sgd_lr:g}: sharpness plateaus below 2/η = {2 / cfg.sgd_lr:.3g}",
            "plateau (median of the last third of the run; its interquartile range decides) "
            "< 2/η for every batch size that trained",
            "; ".join(parts),
            holds,
            {
                "batch_sizes": [r["batch_size"] for r in sgd],
                "plateau_ratio": [r.get("plateau_ratio") for r in sgd],
                "plateau_q25": [r.get("plateau_q25") for r in sgd],
                "plateau_q75": [r.get("plateau_q75") for r in sgd],
                "per_batch": per,
            },
            reason=assumption
            or {
                True: "every plateau's IQR below 2/η",
                False: "a plateau's IQR at or above 2/η",
            }.get(holds, "an IQR straddles 2/η"),
            theorem=_PLATEAU_THEOREM,
            section=_SEC_EOS,
            assumption=assumption,
        )

    @staticmethod
    def _trend_verdict(sgd: list[dict[str, Any]]) -> Verdict:
        ok = [r for r in sgd if r["outcome"] == "trained"]
        per: list[bool | None] = []
        for a, b in itertools.pairwise(ok):
            if b["plateau_ratio"] > a["plateau_ratio"]:
                per.append(True)
            elif b["plateau_q75"] < a["plateau_q25"]:  # lower, with disjoint IQRs
                per.append(False)
            else:
                per.append(None)
        measured = ", ".join(f"B={r['batch_size']}: {r['plateau_ratio']:.3f}" for r in ok)
        assumption = ""
        if len(ok) < 2:
            measured = f"{len(ok)} SGD run(s) trained: no trend to test"
            assumption = f"two trained SGD runs are needed; {len(ok)} trained"
        holds = _combine(per) if len(ok) >= 2 else None
        return Verdict(
            "SGD sharpness plateau is lower for smaller batches",
            "plateau/(2/η) increases with the batch size B (toward full-batch GD's 1); a pair "
            "fails only when the larger batch is lower with disjoint interquartile ranges",
            measured + " (·2/η)" if len(ok) >= 2 else measured,
            holds,
            {"batch_sizes": [r["batch_size"] for r in ok], "pairs_increasing": per},
            reason=assumption
            or {
                True: "plateaus increase with B",
                False: "a larger batch plateaus clearly lower",
            }.get(holds, "overlapping interquartile ranges"),
            theorem=_TREND_THEOREM,
            section=_SEC_EOS,
            assumption=assumption,
        )

    @staticmethod
    def _gd_stability_verdict(
        cfg: StabilityConfig, gd: list[dict[str, Any]], m: dict[str, Any] | None
    ) -> Verdict:
        claim = "GD only converges to minima that are GD-stable at its step size"
        predicted = (
            "at a minimum θ* (gradient at the round-off floor) with sharpness S*: a perturbation "
            "δ shrinks under GD at η iff S* < 2/η; tested at η = "
            + ", ".join(f"{f:g}" for f in cfg.minimum_gd_factors)
            + "·2/S* (growth rate of ‖r(θ_t)‖ per step, interval over the runs)"
        )
        ends = _end_points(gd)
        blocked = _minimum_blocked(m)
        if blocked:
            return _blocked_verdict(claim, predicted, blocked, ends, _GD_MIN_THEOREM)
        assert m is not None
        parts, per = [], []
        for t in m["gd_tests"]:
            rates = t["single_rates"]
            lo_, hi_ = min(rates), max(rates)
            grows = _interval_below(-hi_, -lo_, 0.0)  # True: rate > 0
            st = _match(t["gd_stable"], grows)
            per.append(st)
            parts.append(
                f"η = {t['factor']:g}·2/S*: predicted {'stable' if t['gd_stable'] else 'unstable'} "
                f"(log|1 − ηS*| = {t['mu_top']:+.3f}); measured rate {_span(lo_, hi_)}/step "
                f"over {max(t['steps_run'])} steps → {st}"
            )
        holds, _ = _combine_status(per, "")
        return Verdict(
            claim,
            predicted,
            f"S* = {m['sharpness']:.4g} at ‖∇L‖/(h_max‖θ‖) = {m['gradient_ratio']:.1e}: "
            + "; ".join(parts)
            + f". ({ends})",
            holds,
            {"minimum": _minimum_summary(m), "tests": m["gd_tests"], "end_points": ends},
            reason=_reason(holds, per),
            theorem=_GD_MIN_THEOREM,
            section=_SEC_MIN,
        )

    @staticmethod
    def _sgd_stability_verdict(
        cfg: StabilityConfig, sgd: list[dict[str, Any]], m: dict[str, Any] | None
    ) -> Verdict:
        claim = "SGD only converges to minima that are mean-square stable for its η and B"
        predicted = (
            f"at a minimum θ*, SGD with fresh batches of B = {cfg.minimum_batch_size}: "
            "E‖δ_t‖² stays bounded iff ρ(T) ≤ 1 (exact, or Wu–Ma–E / sharpness bounds); tested "
            "at η = " + ", ".join(f"{f:g}" for f in cfg.minimum_sgd_factors) + "·η_ms "
            "(mean-square growth rate of ‖r(θ_t)‖ over the runs, bootstrap interval)"
        )
        ends = _end_points(sgd)
        blocked = _minimum_blocked(m)
        if blocked:
            return _blocked_verdict(claim, predicted, blocked, ends, _SGD_MIN_THEOREM)
        assert m is not None
        parts, per = [], []
        for t in m["sgd_tests"]:
            pred = t["sgd_mean_square_stable"]
            lo_, hi_ = t["mean_square_ci"]
            st = _match(pred, _interval_below(-hi_, -lo_, 0.0))
            per.append(st)
            rho = t["mean_square_rho"]
            parts.append(
                f"η = {t['factor']:g}·η_ms: ρ(T) = {_fmt(rho, '.4f')} → predicted "
                f"{_yn(pred) if pred is None else ('bounded' if pred else 'growing')}; measured "
                f"mean-square rate {t['mean_square_rate']:+.4f} [{lo_:+.4f}, {hi_:+.4f}]/step "
                f"(half log ρ: {_fmt(None if not rho else math.log(rho) / 2, '+.4f')}) → {st}"
            )
        holds, _ = _combine_status(per, "")
        return Verdict(
            claim,
            predicted,
            f"η_ms = {_fmt(m['mean_square_threshold'], '.4g')} ({m['sgd_reference']}): "
            + "; ".join(parts)
            + f". ({ends})",
            holds,
            {"minimum": _minimum_summary(m), "tests": m["sgd_tests"], "end_points": ends},
            reason=_reason(holds, per),
            theorem=_SGD_MIN_THEOREM,
            section=_SEC_MIN,
        )

    @staticmethod
    def _lyapunov_verdict(
        cfg: StabilityConfig, sgd: list[dict[str, Any]], m: dict[str, Any] | None
    ) -> Verdict:
        claim = "A single SGD run leaves a minimum iff its Lyapunov exponent is positive"
        predicted = (
            "Lyapunov exponent λ < 0 (its interval below 0) predicts ‖δ_t‖ → 0 along a single "
            "run; λ > 0 predicts growth; tested at the SGD step sizes of the previous row "
            "(per-run growth rates of ‖r(θ_t)‖, mean and 95% interval)"
        )
        blocked = _minimum_blocked(m)
        if blocked:
            return Verdict(
                claim,
                predicted,
                blocked,
                None,
                {},
                reason=blocked,
                theorem=_LYAP_THEOREM,
                section=_SEC_MIN,
                assumption=blocked,
            )
        assert m is not None
        parts, per = [], []
        for t in m["sgd_tests"]:
            ly = t["sgd_lyapunov"] or {}
            pred = t["sgd_lyapunov_stable"]
            lo_, hi_ = t["single_ci"]
            st = _match(pred, _interval_below(-hi_, -lo_, 0.0))
            per.append(st)
            ci = ly.get("ci") or [None, None]
            parts.append(
                f"η = {t['factor']:g}·η_ms: λ = {_fmt(ly.get('value'), '+.4f')} "
                f"[{_fmt(ci[0], '+.4f')}, {_fmt(ci[1], '+.4f')}]; measured single-run rate "
                f"{t['single_rate']:+.4f} [{lo_:+.4f}, {hi_:+.4f}] → {st}"
            )
        holds, _ = _combine_status(per, "")
        return Verdict(
            claim,
            predicted,
            "; ".join(parts),
            holds,
            {"tests": m["sgd_tests"]},
            reason=_reason(holds, per),
            theorem=_LYAP_THEOREM,
            section=_SEC_MIN,
        )

    @staticmethod
    def _exact_orbit_verdict(cfg: StabilityConfig, orbits: list[dict[str, Any]]) -> Verdict:
        parts, per, notes = [], [], []
        for o in orbits:
            label = f"η = {o['factor']:g}·2/S*"
            above = o["minimum_sharpness"] * o["lr"] / 2
            if o["diverged"]:
                parts.append(f"{label}: GD diverged")
                per.append("outside")
                notes.append(f"{label}: GD diverged")
                continue
            if above <= 1:
                parts.append(f"{label}: below the threshold (ηS*/2 = {above:.3f})")
                per.append("outside")
                notes.append(f"{label}: ηS*/2 = {above:.3f} ≤ 1")
                continue
            if not (o["converged"] and o["orbit_kind"] == "cycle"):
                settled = o["near_cycle"] <= 1e-6
                parts.append(
                    f"{label}: Newton {o['orbit_kind'] if o['converged'] else 'did not converge'} "
                    f"(residual {o['residual']:.1e}); GD ‖θ_T − θ_T−2‖/‖θ_T − θ_T−1‖ = "
                    f"{o['near_cycle']:.1e}"
                )
                per.append("undetermined" if settled else "outside")
                if not settled:
                    notes.append(f"{label}: GD did not settle (near-cycle {o['near_cycle']:.1e})")
                continue
            settled = o["distance_final"] <= 1e-8 * o["diameter"]
            rho = o["spectral_radius"]
            desc = (
                f"{label} (ηS*/2 = {above:.2f}): Newton residual {o['residual']:.1e} after "
                f"{o['iterations']} steps, diameter {o['diameter']:.3g}, max |μ| = "
                f"{_fmt(rho, '.4f')}; GD's distance to it {o['distance'][0]:.1e} → "
                f"{o['distance_final']:.1e}, rate {_fmt(o['rate'], '+.4f')}/step (multipliers "
                f"predict {_fmt(o['rate_predicted'], '+.4f')})"
            )
            if not settled:
                per.append("outside")
                notes.append(f"{label}: GD ends {o['distance_final']:.1e} from the orbit")
            else:
                per.append(_status(o["stable"]))
            parts.append(desc)
        holds, assumption = _combine_status(per, "; ".join(notes))
        return Verdict(
            "Above its threshold GD can settle on a periodic orbit, and an orbit GD settles on "
            "is linearly stable",
            "v·tanh(w x) on two points, GD at η above 2/S* (S*: sharpness of its only minimum): "
            "GD settles (distance to the Newton-solved 2-cycle at round-off) and every Floquet "
            "multiplier has |μ| < 1",
            "; ".join(parts),
            holds,
            {"orbits": [{k: v for k, v in o.items() if k != "distance"} for o in orbits]},
            reason=assumption or _reason(holds, per),
            theorem=_ORBIT_THEOREM,
            section=_SEC_ORBIT,
            assumption=assumption,
        )

    @staticmethod
    def _orbit_verdict(cfg: StabilityConfig, gd: list[dict[str, Any]]) -> Verdict:
        above = [r for r in gd if r["outcome"] == "trained" and r["onset"] is not None]
        parts, per, notes = [], [], []
        for r in above:
            o = r["orbit"]["params"]
            tries = r.get("newton") or []
            run_st: list[str] = []
            descs = []
            for t in tries:
                p = t["period"]
                hist = ", ".join(f"{h:.1e}" for h in t["history"])
                if t["converged"] and t["kind"] == "cycle":
                    settled = t["distance_last"] <= 1e-6 * t["mean_step"]
                    st = _status(t["stable"]) if settled else "outside"
                    descs.append(
                        f"period {p}: Newton converged (residuals {hist}), max |μ| "
                        f"{_fmt(t['spectral_radius'], '.4f')}, last iterate "
                        f"{t['distance_last']:.1e} from it"
                    )
                else:
                    st = "outside"
                    descs.append(
                        f"period {p}: ‖θ_T − θ_T−{p}‖ = {t['drift']:.3g}·mean step; Newton "
                        f"{t['kind'] + ' ' if t['converged'] else 'not converged'}(residuals "
                        f"{hist}; {t['hvps']} HVPs, {t['seconds']:.1f} s)"
                    )
                run_st.append(st)
            if not tries:
                drift = o["residual_2"]
                descs.append(f"no Newton attempt; ‖θ_t+2 − θ_t‖ ≤ {_fmt(drift)}·mean step")
                run_st.append("outside")
            st_run = (
                "fails"
                if "fails" in run_st
                else "holds"
                if "holds" in run_st
                else "undetermined"
                if "undetermined" in run_st
                else "outside"
            )
            per.append(st_run)
            if st_run == "outside":
                drift2 = next((t["drift"] for t in tries if t["period"] == 2), o["residual_2"])
                notes.append(
                    f"η={r['lr']:g}: GD drifts (‖θ_T − θ_T−2‖ = {_fmt(drift2)}·mean step), no "
                    "orbit it settles on"
                )
            parts.append(f"η={r['lr']:g}: " + "; ".join(descs))
        if not above:
            notes.append("no GD run reached its threshold")
        holds, assumption = _combine_status(per, "; ".join(notes))
        return Verdict(
            "At the edge of stability GD settles on a periodic orbit, and it is linearly stable",
            "Newton on G^p(θ) = θ from the last iterate of every run that reached 2/η (periods "
            + ", ".join(str(p) for p in cfg.eos_newton_periods)
            + "): a converged orbit that GD sits on has every normal |μ| < 1; a run that drifts "
            "is outside the claim",
            "; ".join(parts) if above else "no run reached its threshold",
            holds,
            {"runs": [{"lr": r["lr"], **r["orbit"], "newton": r.get("newton")} for r in above]},
            reason=assumption or _reason(holds, per),
            theorem=_EOS_ORBIT_THEOREM,
            section=_SEC_ORBIT,
            assumption=assumption,
        )

    @staticmethod
    def _gd_map_verdict(cfg: StabilityConfig, gd: list[dict[str, Any]]) -> Verdict:
        parts, per, details = [], [], []
        for r in gd:
            g = r.get("gd_map")
            if g is None:
                continue
            sharp = dict(zip(r["sharpness_steps"], r["sharpness"], strict=True))
            inv = 1 / r["lr"]
            ok: list[bool | None] = []
            for x, c in zip(g["steps"], g["count_above"], strict=True):
                s = sharp.get(x)
                if c is None or s is None or abs(s - inv) <= 10 * cfg.sharpness_tol * max(s, inv):
                    ok.append(None)  # undetermined count, or sharpness within its error of 1/η
                else:
                    ok.append((c >= 1) == (s > inv))
            tested = [v for v in ok if v is not None]
            per.append(all(tested) if tested else None)
            where = ", ".join(f"{a}→{b} ({d:+d})" for a, b, d in g["crossings"]) or "none"
            end = g["singular_lr_below"][-1], g["singular_lr_above"][-1]
            parts.append(
                f"η={r['lr']:g}: count above 1/η {g['count_above']} at steps {g['steps']}; "
                f"crossings {where}; {len(g['sign_changes'])} sign change(s); nearest singular "
                f"step sizes at the end {_fmt(end[0])} (below η), {_fmt(end[1])} (above)"
            )
            details.append({"lr": r["lr"], **g, "consistent": ok})
        holds = _combine(per)
        assumption = "" if parts else "no GD run trained: no checkpoint to examine"
        return Verdict(
            "The GD map G_η is singular at η = 1/h; an eigenvalue crossing 1/η flips sign det",
            "count of Hessian eigenvalues above 1/η ≥ 1 exactly at the checkpoints whose "
            "sharpness exceeds 1/η; crossings of 1/η located between checkpoints",
            "; ".join(parts) if parts else "no run to examine",
            holds,
            {"runs": details},
            reason=assumption
            or {
                True: "counts agree with the sharpness at every checkpoint",
                False: "a count disagrees with the sharpness",
            }.get(holds, "counts undetermined"),
            theorem=_GD_MAP_THEOREM,
            section=_SEC_MIN,
            assumption=assumption,
        )


_SEC_EOS = "5-reference-measurements"
_SEC_MIN = "3-curvature-stability-of-minima-and-the-gd-map"
_SEC_ORBIT = "6-periodic-orbits-as-solutions"

_EOS_THEOREM = (
    "Edge of stability (Cohen et al. 2021, docs/theory.md §3, §5): under full-batch GD from a "
    "point below the threshold the sharpness rises to about 2/η and hovers there. An empirical "
    "law, not a theorem with a bound: gdscope takes the median sharpness after the first "
    "measurement at onset_fraction·2/η and asks it to lie in eos_band·2/η. Runs that never "
    "reach the threshold in the steps run, or start above it, are outside the claim."
)
_PLATEAU_THEOREM = (
    "Mini-batch SGD is stable only where the mean-square criterion holds, which is stricter "
    "than GD's sharpness < 2/η (§3), so its sharpness settles below 2/η. Judged on the "
    "interquartile range of the last third of the sharpness series (an interval, §8)."
)
_TREND_THEOREM = (
    "The SGD noise factor p = (n − B)/(B(n − 1)) falls with B, so the mean-square threshold, "
    "and with it the sharpness SGD tolerates, rises toward GD's 2/η (§3). Judged pairwise on "
    "successive batch sizes; a pair contradicts only with disjoint interquartile ranges."
)
_GD_MIN_THEOREM = (
    "Linear stability of GD at a minimum (§3): near θ* the GD map is δ ↦ (I − ηH)δ, so a "
    "perturbation's normal component shrinks iff every normal eigenvalue h of H satisfies "
    "0 < h < 2/η, i.e. S* < 2/η; GD cannot converge to a minimum where this fails. A statement "
    "about minima is judged at a minimum (§8): the polished θ* has its gradient at the round-off "
    "floor. At MSE interpolating minima r(θ* + δ) ≈ Jδ is exactly the normal component, so the "
    "growth rate of ‖r(θ_t)‖ along GD from θ* + δ (‖δ‖ = perturb_rel·‖θ*‖, stopped before the "
    "linear regime ends) is the measured quantity; η just below and above 2/S* gives one case "
    "each way. A rate whose interval over the runs straddles 0 is undetermined."
)
_SGD_MIN_THEOREM = (
    "Mean-square stability of SGD at a minimum (§3): E[δδᵀ] evolves by T, so E‖δ_t‖² stays "
    "bounded iff ρ(T) ≤ 1 (exact where P² numbers fit, else Wu–Ma–E sufficient and sharpness "
    "necessary). Measured dynamically at a polished minimum: SGD with fresh batches from θ* + δ, "
    "the growth rate of the mean over runs of ‖r(θ_t)‖² (halved, per step) with a bootstrap "
    "interval over the runs; step sizes below and above the exact threshold η_ms give one case "
    "each way. The sample mean under-weights rare large runs, so near the threshold the interval "
    "may straddle 0 (undetermined)."
)
_LYAP_THEOREM = (
    "Almost-sure stability of SGD at a minimum (§3, gdscope's reconstruction): a single run's "
    "‖δ_t‖ grows like exp(λt) with the top Lyapunov exponent λ of the random products "
    "(I − ηH_ξ). gs.stability estimates λ over chains with an interval; the measurement is the "
    "mean per-run growth rate of ‖r(θ_t)‖ from θ* + δ with its 95% interval. A step size whose "
    "predicted λ straddles 0 cannot test the rule (undetermined)."
)
_ORBIT_THEOREM = (
    "Periodic orbits (§3, §6): above its threshold (η > 2/S* at the only minimum) GD cannot "
    "converge to the minimum but can settle on a cycle θ_{t+2} = θ_t; the cycle is a zero of "
    "G²(θ) − θ, solved by Newton's method from GD's last iterate, and it attracts GD iff every "
    "Floquet multiplier (eigenvalue of the monodromy ∏(I − ηH(θ_i))) has |μ| < 1. Judged where "
    "exact orbits exist: a two-parameter network on two points. 'Settled' means GD's distance to "
    "the solved orbit fell to round-off; the measured contraction rate is compared with "
    "log max|μ| / 2 per step."
)
_EOS_ORBIT_THEOREM = (
    "The same Floquet criterion (§6) applied to the edge-of-stability runs of the MLP: Newton "
    "(LSMR steps with 2p Hessian-vector products per iteration, capped) from the last iterate. "
    "Those runs usually drift rather than cycle (‖θ_T − θ_{T−2}‖ is a sizeable fraction of a "
    "step): a finding about them, outside the claim's assumption that GD settles on an orbit; "
    "only a converged orbit that GD sits on but whose multipliers say unstable would contradict."
)
_GD_MAP_THEOREM = (
    "The GD map G_η(θ) = θ − η∇L(θ) has Jacobian I − η∇²L(θ), singular exactly at η = 1/h for "
    "the Hessian eigenvalues h, with sign det = (−1)^{#{h > 1/η}} (§3). The Lanczos count of "
    "eigenvalues above 1/η at each checkpoint must be ≥ 1 exactly where the measured sharpness "
    "exceeds 1/η; checkpoints whose sharpness is within its error of 1/η are not tested."
)


def _status(holds: bool | None) -> str:
    return {True: "holds", False: "fails", None: "undetermined"}[holds]


def _combine_status(per: list[str], why: str) -> tuple[bool | None, str]:
    """Combine per-case statuses: any fails → False; else any undetermined → None; else any
    holds → True; else (all outside, or nothing) None with ``why`` as the unmet assumption."""
    if "fails" in per:
        return False, ""
    if "undetermined" in per:
        return None, ""
    if "holds" in per:
        return True, ""
    return None, why or "no case meets the claim's assumptions"


def _match(predicted_stable: bool | None, grows: bool | None) -> str:
    """A prediction (stable: shrinks) against a measured rate (grows: interval above 0)."""
    if predicted_stable is None or grows is None:
        return "undetermined"
    return "holds" if predicted_stable is (not grows) else "fails"


def _reason(holds: bool | None, per: list[str]) -> str:
    counts = ", ".join(
        f"{per.count(s)} {s}" for s in ("holds", "fails", "undetermined") if s in per
    )
    lead = {True: "every tested case agrees", False: "a case contradicts the rule"}.get(
        holds, "a case is undetermined"
    )
    return f"{lead} ({counts})"


def _span(lo: float, hi: float) -> str:
    return f"{lo:+.4f}" if lo == hi else f"[{lo:+.4f}, {hi:+.4f}]"


def _blocked_verdict(claim: str, predicted: str, blocked: str, ends: Any, theorem: str) -> Verdict:
    """The claim about minima when no minimum was reached: outside its assumptions."""
    return Verdict(
        claim,
        predicted,
        f"{blocked}; {ends}",
        None,
        {"end_points": ends},
        reason=blocked,
        theorem=theorem,
        section=_SEC_MIN,
        assumption=blocked,
    )


def _minimum_blocked(m: dict[str, Any] | None) -> str:
    """Why the claims about minima cannot be tested at the minimum task (empty if they can)."""
    if m is None:
        return "no minimum task was run (minimum = false)"
    if not m["at_minimum"]:
        return (
            f"the polished point is not a minimum at the round-off floor: ‖∇L‖/(h_max‖θ‖) = "
            f"{_fmt(m['gradient_ratio'], '.2e')}, λ_min = {_fmt(m['smallest'], '.2e')}"
        )
    return ""


def _minimum_summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "sizes",
        "n",
        "num_params",
        "sharpness",
        "smallest",
        "gradient_norm",
        "gradient_ratio",
        "normal_dim",
        "mean_square_threshold",
        "loss",
        "polish",
    )
    return {k: m.get(k) for k in keys}


def _end_points(runs: list[dict[str, Any]]) -> str:
    """The runs' end points: minima or not (they are not where the claims are tested)."""
    parts = []
    for r in runs:
        st = r.get("stability")
        if st is None:
            parts.append(f"{_label(r)}: {r['outcome']}")
        else:
            where = "a minimum" if st["at_minimum"] else "not a minimum"
            parts.append(
                f"{_label(r)} ends at {where} (‖∇L‖/(h_max‖θ‖) {_fmt(st['gradient_ratio'], '.2g')})"
            )
    return "run end points: " + ("; ".join(parts) if parts else "none")


def _outcome(r: dict[str, Any]) -> str:
    """How a run that did not train ended."""
    if r["outcome"] == "diverged":
        return f"diverged at step {r['diverged_at']}"
    return (
        f"unstable: the loss went from {r['loss_init']:.3g} to {_fmt(r['loss_final'])} in "
        f"{r['steps']} steps"
    )


def _label(r: dict[str, Any]) -> str:
    b = r["batch_size"]
    return f"GD η={r['lr']:g}" if b is None else f"SGD η={r['lr']:g} B={b}"


# ---------------------------------------------------------------------- figures
def _sharpness_figure(cfg: StabilityConfig, gd: list[dict[str, Any]]) -> Figure:
    import matplotlib.pyplot as plt

    fig, (ax, axl) = plt.subplots(1, 2, figsize=(11, 4))
    window = None
    for i, r in enumerate(gd):
        color, label = f"C{i}", f"η = {r['lr']:g}"
        orbit = (r.get("orbit") or {}).get("params")
        if orbit is not None and r["onset"] is not None:
            window = orbit["window"]
            found = "period 2" if orbit["period"] == 2 else orbit["kind"]
            label += f" (orbit: {found}, r₂ = {_fmt(orbit['residual_2'], '.2g')})"
        ax.plot(r["sharpness_steps"], r["sharpness"], color=color, label=label)
        ax.axhline(r["threshold"], color=color, ls="--", lw=0.8)
        loss = [np.nan if v is None else v for v in r["loss"]]
        axl.semilogy(range(len(loss)), loss, color=color, label=f"η = {r['lr']:g}")
    if window is not None:
        ax.axvspan(*window, color="0.5", alpha=0.15, label="orbit window")
    ax.set(xlabel="step", ylabel="sharpness λ_max(∇²L)", title="GD: sharpness, 2/η dashed")
    ax.legend(fontsize=7)
    axl.set(xlabel="step", ylabel="training loss", title="GD: loss")
    axl.legend(fontsize=7)
    return Figure.of(
        fig,
        "stability-sharpness",
        "Full-batch GD: sharpness against 2/η (dashed, one per learning rate) and the loss. The "
        "shaded span is the window examined for a periodic orbit; r₂ = max ‖θ_t+2 − θ_t‖ / mean "
        "step there (a 2-cycle needs r₂ ≤ orbit_rtol).",
    )


def _sgd_figure(cfg: StabilityConfig, sgd: list[dict[str, Any]], gd: list[dict]) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(sgd):
        ax.plot(r["sharpness_steps"], r["sharpness"], color=f"C{i}", label=f"B = {r['batch_size']}")
    for r in gd:
        if math.isclose(r["lr"], cfg.sgd_lr):
            ax.plot(r["sharpness_steps"], r["sharpness"], color="k", lw=0.8, label="full batch")
    ax.axhline(2 / cfg.sgd_lr, color="k", ls="--", lw=0.8, label="2/η")
    ax.set(xlabel="step", ylabel="sharpness λ_max(∇²L)", title=f"SGD at η = {cfg.sgd_lr:g}")
    ax.legend(fontsize=8)
    return Figure.of(
        fig,
        "stability-sgd",
        "Sharpness of the full-batch loss along SGD runs with fresh batches of size B, against "
        "2/η; smaller batches plateau lower.",
    )


def _verdict_table(results: list[dict[str, Any]]) -> Figure:
    import matplotlib.pyplot as plt

    cols = ["sharpness/(2/η)", "minimum", "GD-stable", "mean-square", "Wu–Ma–E", "Lyapunov"]
    keys = ["at_minimum", "gd_stable", "sgd_mean_square_stable", "wu_ma_e_holds"]
    keys.append("sgd_lyapunov_stable")
    colors = {True: "#c6efce", False: "#ffc7ce", None: "#e0e0e0"}
    rows, cells, shades = [], [], []
    for r in results:
        rows.append(_label(r))
        st = r.get("stability")
        if st is None:
            cells.append([r["outcome"]] + [""] * len(keys))
            shades.append(["#ffc7ce"] + ["white"] * len(keys))
            continue
        shown = keys if r["batch_size"] is not None else keys[:2]  # SGD columns: SGD runs only
        cells.append(
            [f"{st['sharpness'] / st['threshold']:.3f}"]
            + [_yn(st[k]) if k in shown else "–" for k in keys]
        )
        shades.append(["white"] + [colors[st[k]] if k in shown else "white" for k in keys])
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 0.8))
    ax.axis("off")
    ax.table(cellText=cells, rowLabels=rows, colLabels=cols, cellColours=shades, loc="center")
    ax.set_title("gdscope.stability at the final iterate")
    return Figure.of(
        fig,
        "stability-verdicts",
        "Stability verdicts at each run's final iterate (green yes, red no, grey undetermined): "
        "a minimum?, GD-stable at η, SGD mean-square stable, the Wu–Ma–E sufficient condition, "
        "Lyapunov exponent < 0. A point that is not a minimum leaves the claims about minima "
        "untested.",
    )


def _dynamics_figure(orbits: list[dict[str, Any]], m: dict[str, Any] | None) -> Figure:
    import matplotlib.pyplot as plt

    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 4))
    for i, o in enumerate(orbits):
        d = o.get("distance")
        if not d:
            continue
        steps = np.arange(len(d))
        ax.semilogy(steps, np.maximum(d, 1e-17), color=f"C{i}", label=f"η = {o['factor']:g}·2/S*")
        a = min(10, len(d) - 1)  # the first steps are the transient toward the orbit
        if o.get("rate_predicted") is not None and d[a] > 0:
            pred = d[a] * np.exp(o["rate_predicted"] * (steps - a))
            ax.semilogy(steps, np.maximum(pred, 1e-17), color=f"C{i}", ls=":")
    ax.set(
        xlabel="step",
        ylabel="distance to the Newton-solved 2-cycle",
        title="v·tanh(wx): GD settles on the orbit",
        ylim=(1e-17, None),
    )
    ax.legend(fontsize=7)
    if m is not None:
        for i, t in enumerate((m.get("gd_tests") or []) + (m.get("sgd_tests") or [])):
            kind = "GD" if t["batch_size"] is None else f"SGD B={t['batch_size']}"
            for j, c in enumerate(t["log_norms"][:2]):
                axp.plot(
                    np.asarray(c) - c[0],
                    color=f"C{i}",
                    lw=0.8,
                    label=f"{kind} η = {t['lr']:.3g}" if j == 0 else None,
                )
        axp.axhline(0, color="k", lw=0.6)
        axp.set(
            xlabel="step from θ* + δ",
            ylabel="log ‖r(θ_t)‖/‖r(θ_0)‖",
            title="perturbed runs at the polished minimum",
        )
        if axp.get_legend_handles_labels()[0]:
            axp.legend(fontsize=7)
    return Figure.of(
        fig,
        "stability-dynamics",
        "Left: distance of GD's iterates to the 2-cycle solved by Newton's method (solid) and the "
        "contraction the Floquet multipliers predict (dotted). Right: growth of the residual (the "
        "perturbation's normal component) along GD and SGD runs from a perturbed minimum.",
    )
