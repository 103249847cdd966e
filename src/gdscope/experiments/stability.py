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
from gdscope.verdict import Verdict
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
        ]
        checks += [
            (name, 0 < getattr(self, name) < 1, "a number in (0, 1)")
            for name in ("sharpness_tol", "orbit_rtol", "gd_map_tol", "stability_tol", "grad_tol")
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
    """Onset (first sharpness ≥ onset_fraction·thr) and post-onset median / thr."""
    s = np.asarray(ss, dtype=np.float64)
    hit = np.nonzero(s >= cfg.onset_fraction * thr)[0]
    out: dict[str, Any] = {"max_ratio": float(s.max() / thr)}
    if hit.size == 0:
        return {**out, "onset": None, "post_onset_ratio": None, "post_onset_count": 0}
    post = s[hit[0] :] / thr
    return {
        **out,
        "onset": int(xs[hit[0]]),
        "post_onset_ratio": float(np.median(post)),
        "post_onset_q25": float(np.quantile(post, 0.25)),
        "post_onset_q75": float(np.quantile(post, 0.75)),
        "post_onset_count": int(post.size),
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
        return gd + sgd

    def run_task(self, cfg: StabilityConfig, task: dict[str, Any], ctx: TaskContext) -> dict:
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
        return out

    # ------------------------------------------------------------------ judge
    def judge(self, cfg: StabilityConfig, results: list[dict[str, Any]]) -> Judgement:
        gd = [r for r in results if r["kind"] == "gd"]
        sgd = sorted((r for r in results if r["kind"] == "sgd"), key=lambda r: r["batch_size"])
        verdicts = [self._eos_verdict(cfg, r) for r in gd]
        if sgd:
            verdicts += [self._plateau_verdict(cfg, sgd), self._trend_verdict(sgd)]
        verdicts.append(self._gd_stability_verdict(cfg, gd))
        if sgd:
            verdicts.append(self._sgd_stability_verdict(cfg, sgd))
        if gd:
            verdicts += [self._orbit_verdict(cfg, gd), self._gd_map_verdict(cfg, gd)]
        figures = [_sharpness_figure(cfg, gd)] if gd else []
        if sgd:
            figures.append(_sgd_figure(cfg, sgd, gd))
        figures.append(_verdict_table(results))
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
            f"{cfg.onset_fraction:g}·2/η), for a run that starts below 2/η"
        )
        init = f"sharpness at init {r['sharpness_init']:.3g} = {r['sharpness_init'] / thr:.3g}·2/η"
        holds: bool | None = None
        if r["outcome"] != "trained":
            measured = f"{_outcome(r)} ({init})"
        elif r["onset"] is None:
            measured = (
                f"threshold not reached in {r['steps']} steps: max sharpness "
                f"{r['max_ratio']:.3f}·2/η ({init})"
            )
        elif r["post_onset_count"] < cfg.min_post_onset:
            measured = (
                f"onset at step {r['onset']}, only {r['post_onset_count']} measurements after it "
                f"(need {cfg.min_post_onset}): median {r['post_onset_ratio']:.3f}·2/η"
            )
        else:
            ratio = r["post_onset_ratio"]
            measured = (
                f"onset at step {r['onset']}; median {ratio:.3f}·2/η (IQR "
                f"{r['post_onset_q25']:.3f}–{r['post_onset_q75']:.3f}) over "
                f"{r['post_onset_count']} measurements"
            )
            if r["sharpness_init"] < thr:
                holds = lo <= ratio <= hi
            else:  # a catapult or a run held far above 2/η: not the progressive-sharpening case
                measured += f"; but it started above the threshold ({init})"
        return Verdict(
            f"Edge of stability at η = {lr:g}: GD sharpness rises to 2/η = {thr:.3g} and hovers",
            predicted,
            measured,
            holds,
            details,
        )

    @staticmethod
    def _plateau_verdict(cfg: StabilityConfig, sgd: list[dict[str, Any]]) -> Verdict:
        parts, per = [], []
        for r in sgd:
            b = r["batch_size"]
            if r["outcome"] != "trained":
                parts.append(f"B={b}: {_outcome(r)}")
                per.append(False)
                continue
            parts.append(
                f"B={b}: {r['plateau_ratio']:.3f}·2/η (IQR {r['plateau_q25']:.3f}–"
                f"{r['plateau_q75']:.3f})"
            )
            per.append(_interval_below(r["plateau_q25"], r["plateau_q75"]))
        return Verdict(
            f"SGD at η = {cfg.sgd_lr:g}: sharpness plateaus below 2/η = {2 / cfg.sgd_lr:.3g}",
            "plateau (median of the last third of the run; its interquartile range decides) "
            "< 2/η for every batch size",
            "; ".join(parts),
            _combine(per),
            {
                "batch_sizes": [r["batch_size"] for r in sgd],
                "plateau_ratio": [r.get("plateau_ratio") for r in sgd],
                "plateau_q25": [r.get("plateau_q25") for r in sgd],
                "plateau_q75": [r.get("plateau_q75") for r in sgd],
                "per_batch": per,
            },
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
        if len(ok) < 2:
            measured = f"{len(ok)} SGD run(s) trained: no trend to test"
        return Verdict(
            "SGD sharpness plateau is lower for smaller batches",
            "plateau/(2/η) increases with the batch size B (toward full-batch GD's 1)",
            measured + " (·2/η)" if len(ok) >= 2 else measured,
            _combine(per) if len(ok) >= 2 else None,
            {"batch_sizes": [r["batch_size"] for r in ok], "pairs_increasing": per},
        )

    @staticmethod
    def _gd_stability_verdict(cfg: StabilityConfig, runs: list[dict[str, Any]]) -> Verdict:
        parts, per, details = [], [], []
        for r in runs:
            label = _label(r)
            st = r.get("stability")
            if st is None:
                parts.append(f"{label}: {_outcome(r)}")
                details.append({"run": label, "outcome": r["outcome"]})
                continue
            details.append({"run": label, **{k: st[k] for k in _GD_KEYS}})
            ratio = st["sharpness"] / st["threshold"]
            if st["at_minimum"]:
                parts.append(
                    f"{label}: sharpness {ratio:.3f}·2/η, GD-stable {_yn(st['gd_stable'])}"
                )
                per.append(st["gd_stable"])
            else:
                parts.append(
                    f"{label}: not a minimum (λ_min {_fmt(st['smallest'])}, "
                    f"‖∇L‖/(h_max‖θ‖) {_fmt(st['gradient_ratio'], '.2g')}); sharpness "
                    f"{ratio:.3f}·2/η, GD-stable {_yn(st['gd_stable'])}"
                )
                per.append(None)
        return Verdict(
            "GD only converges to minima that are GD-stable at its step size",
            "gdscope.stability at the final iterate: every normal Hessian eigenvalue in "
            f"(0, 2/η) (tested where the iterate is a minimum: no negative eigenvalue, "
            f"‖∇L‖/(h_max‖θ‖) ≤ {cfg.grad_tol:g})",
            "; ".join(parts),
            _combine(per),
            {"runs": details},
        )

    @staticmethod
    def _sgd_stability_verdict(cfg: StabilityConfig, sgd: list[dict[str, Any]]) -> Verdict:
        parts, per, details = [], [], []
        for r in sgd:
            label = _label(r)
            st = r.get("stability")
            if st is None:
                parts.append(f"{label}: {_outcome(r)}")
                details.append({"run": label, "outcome": r["outcome"]})
                continue
            lyap = st["sgd_lyapunov"] or {}
            details.append(
                {
                    "run": label,
                    **{k: st[k] for k in _SGD_KEYS},
                    "lyapunov": lyap.get("value"),
                    "lyapunov_ci": lyap.get("ci"),
                }
            )
            where = "" if st["at_minimum"] else "not a minimum; "
            parts.append(
                f"{label}: {where}mean-square stable {_yn(st['sgd_mean_square_stable'])} "
                f"(Wu–Ma–E {_fmt(st['wu_ma_e'], '.4g')}), Lyapunov {_fmt(lyap.get('value'), '.3g')}"
            )
            per.append(st["sgd_mean_square_stable"] if st["at_minimum"] else None)
        return Verdict(
            "SGD only converges to minima that are mean-square stable for its η and B",
            "gdscope.stability(batch_size=B) at the final iterate: sgd_mean_square_stable = "
            "True (tested where the iterate is a minimum)",
            "; ".join(parts),
            _combine(per),
            {"runs": details},
        )

    @staticmethod
    def _orbit_verdict(cfg: StabilityConfig, gd: list[dict[str, Any]]) -> Verdict:
        above = [r for r in gd if r["outcome"] == "trained" and r["onset"] is not None]
        parts, per = [], []
        for r in above:
            o, lo = r["orbit"]["params"], r["orbit"]["loss"]
            w = f"steps {o['window'][0]}–{o['window'][1]}"
            if o["period"] == 2:
                parts.append(
                    f"η={r['lr']:g}: period 2 over {w} from step {o['onset']}, amplitude "
                    f"{_fmt(o['amplitude'])} along the top eigenvector"
                )
            else:
                found = o["kind"] if o["period"] is None else f"{o['kind']} (period {o['period']})"
                parts.append(
                    f"η={r['lr']:g}: {found} over {w}, ‖θ_t+2 − θ_t‖ ≤ "
                    f"{_fmt(o['residual_2'])}·mean step, steps along the top eigenvector "
                    f"(mean |cos|) {o['top_alignment']:.2f} (loss: {lo['kind']})"
                )
            per.append(o["period"] == 2)
        return Verdict(
            "Above its threshold GD settles on a period-2 orbit",
            f"detect_orbit on the last {cfg.orbit_window} parameter iterates finds period 2 "
            f"(rtol {cfg.orbit_rtol:g} of the mean step) for every run that reached 2/η",
            "; ".join(parts) if above else "no run reached its threshold",
            _combine(per),
            {"runs": [{"lr": r["lr"], **r["orbit"]} for r in above]},
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
        return Verdict(
            "The GD map G_η is singular at η = 1/h; an eigenvalue crossing 1/η flips sign det",
            "count of Hessian eigenvalues above 1/η ≥ 1 exactly at the checkpoints whose "
            "sharpness exceeds 1/η; crossings of 1/η located between checkpoints",
            "; ".join(parts) if parts else "no run to examine",
            _combine(per),
            {"runs": details},
        )


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
