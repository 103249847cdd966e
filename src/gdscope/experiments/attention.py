"""The GD map and the adaptive edge of stability on a softmax-attention network (THEORY §3).

One model for both claims: a small vision transformer (:func:`gdscope.zoo.transformer.vit`:
patch embedding, learned positions, a CLS token, pre-LN blocks of softmax self-attention and
a GELU MLP) on real data (scikit-learn's 8×8 digits by default, 4×4 patches), trained on the
mean squared error against one-hot labels. Small enough (890 parameters at the defaults) for a
dense Hessian as the oracle, large enough to have a rich spectrum.

**Claim 1, the GD map is non-singular except at η = 1/h_i** (task ``gd_map``). Full-batch GD at
``gd_lr`` from the initialization; at the iterates ``gd_map_points`` (0 is the initialization)
the measurements of :mod:`gdscope.experiments._attention_parts`: a dense Hessian and its
spectrum, the singular step sizes that :func:`gdscope.gd_map` (Lanczos) finds by walking the lr
range ``η·h_max ∈ grid_range``, ``σ_min(I − ηH)`` on a ``grid_points`` log-spaced grid, and LU
determinants at ``lu_checks`` grid points. Two verdict rows: non-singular away from the
``1/h_i`` (fails if a grid point away from them is singular within round-off), and singular
exactly at them, all found by ``gd_map`` (fails if a reported one is not singular).

**Claim 2, the adaptive edge of stability** (one task per ``adam_lrs`` and one ``control_lr``).
Full-batch ``torch.optim.AdamW`` (``β₁ = beta1``) at fixed ``η``; a
:class:`~gdscope.tracker.Tracker` stores the loss, the preconditioned sharpness
``λ_max(P^{-1/2}HP^{-1/2})`` (:class:`~gdscope.probes.PreconditionedSharpnessProbe`, every
``sharpness_every`` steps) and the threshold ``(2 + 2β₁)/((1 − β₁)η)``
(:class:`~gdscope.probes.ThresholdProbe`), so the report's run pages draw the pair. Each
edge-of-stability run must rise to the threshold and hover in ``eos_band`` (the rule of the GD
edge of stability, after a ``burn_in``); the control stays below.

Why MSE: with cross-entropy the network memorizes the 256 samples, its Hessian vanishes as the
loss does (the minimum lies at infinity, §4), and the preconditioned sharpness falls far below
the threshold after a short hover (measured: 0.02× by step 1000 at η = 0.01). The squared loss
keeps its curvature, the regime Cohen et al. study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from gdscope.errors import ConfigError
from gdscope.experiments._attention_parts import (
    adamw_figure,
    control_verdict,
    eos_verdict,
    gd_map_figure,
    measure_point,
    nonsingular_verdict,
    singular_verdict,
)
from gdscope.experiments.base import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Judgement,
    TaskContext,
    register,
)
from gdscope.probes import (
    At,
    Every,
    LossProbe,
    PreconditionedSharpnessProbe,
    Probe,
    ProbeState,
    SharpnessProbe,
    ThresholdProbe,
)
from gdscope.problem import Params, Problem
from gdscope.tracker import Tracker
from gdscope.train import GD, fit

__all__ = ["AttentionConfig", "AttentionExperiment"]


@dataclass(frozen=True)
class AttentionConfig(ExperimentConfig):
    """The attention experiment (defaults: a few minutes on 2 CPU cores).

    Attributes:
        data: an image classification set of square ``image_size × image_size`` single-channel
            images (digits: 8×8), one-hot MSE targets.
        image_size, patch_size, d_model, n_heads, n_layers, mlp_ratio, pool, init_std: the ViT
            (:func:`gdscope.zoo.transformer.vit`).
        gd_lr, gd_map_points: full-batch GD at ``gd_lr``; the GD map is examined at these
            iterates (``0``: the initialization; GD runs to the largest).
        grid_range, grid_points: the lr grid at each point, ``η·h_max`` from ``grid_range[0]``
            to ``grid_range[1]``, log-spaced.
        gd_map_tol, gd_map_max_count, walk_step, walk_max_calls: :func:`gdscope.gd_map`'s
            Lanczos tolerance and largest count; each call of the walk sits ``walk_step``
            (relative) past the last singular step size; at most ``walk_max_calls`` calls.
        resolution_factor: the round-off and Lanczos resolutions are multiplied by this.
        oracle_limit: largest parameter count for the dense Hessian (the oracle).
        lu_checks: grid points per point where ``slogdet`` by LU is compared.
        adam_lrs, control_lr, adam_steps: AdamW runs (one task each), ``adam_steps`` full-batch
            steps; the control at ``control_lr``.
        beta1, beta2, adam_eps, weight_decay: AdamW's settings (decoupled decay: not part of
            the threshold, see :mod:`gdscope.theory.optim`).
        sharpness_every, sharpness_tol: the preconditioned sharpness every so many steps, to
            this relative Lanczos residual.
        burn_in: measurements before this step are left out of the rules (default
            ``round(2/(1 − β₁))``: the bias correction ``1 − β₁ᵗ`` still moves ``P``).
        onset_fraction, eos_band, min_post_onset: the edge-of-stability rule (as ``stability``).
    """

    data: DataConfig = field(default_factory=lambda: DataConfig("digits", 256))
    image_size: int = 8
    patch_size: int = 4
    d_model: int = 8
    n_heads: int = 2
    n_layers: int = 1
    mlp_ratio: int = 2
    pool: Literal["cls", "mean"] = "cls"
    init_std: float = 0.02
    gd_lr: float = 0.05
    gd_map_points: tuple[int, ...] = (0, 100, 200)
    grid_range: tuple[float, float] = (0.5, 5.0)
    grid_points: int = 2000
    gd_map_tol: float = 1e-8
    gd_map_max_count: int = 64
    walk_step: float = 1e-6
    walk_max_calls: int = 100
    resolution_factor: float = 10.0
    oracle_limit: int = 3000
    lu_checks: int = 8
    adam_lrs: tuple[float, ...] = (1e-4, 3e-4)
    control_lr: float | None = 3e-5
    adam_steps: int = 600
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    sharpness_every: int = 10
    sharpness_tol: float = 1e-3
    burn_in: int | None = None
    onset_fraction: float = 0.95
    eos_band: tuple[float, float] = (0.8, 1.25)
    min_post_onset: int = 5

    def __post_init__(self) -> None:
        checks = [
            ("image_size", self.image_size >= 1, "an integer >= 1 (digits: 8)"),
            ("gd_lr", 0 < self.gd_lr < math.inf, "a positive step size"),
            (
                "gd_map_points",
                len(self.gd_map_points) >= 1 and all(t >= 0 for t in self.gd_map_points),
                "one or more GD iterates >= 0, e.g. [0, 100, 200]",
            ),
            (
                "grid_range",
                0 < self.grid_range[0] < self.grid_range[1] < math.inf,
                "[low, high] with 0 < low < high (multiples of 1/h_max), e.g. [0.5, 5]",
            ),
            ("grid_points", self.grid_points >= 10, "an integer >= 10"),
            ("gd_map_tol", 0 < self.gd_map_tol < 1, "a relative tolerance in (0, 1)"),
            ("gd_map_max_count", self.gd_map_max_count >= 1, "an integer >= 1"),
            ("walk_step", 0 < self.walk_step < 1e-2, "a relative step in (0, 0.01)"),
            ("walk_max_calls", self.walk_max_calls >= 1, "an integer >= 1"),
            ("resolution_factor", self.resolution_factor >= 1, "a number >= 1"),
            ("oracle_limit", self.oracle_limit >= 1, "an integer >= 1"),
            ("lu_checks", self.lu_checks >= 0, "an integer >= 0"),
            ("adam_lrs", all(0 < v < math.inf for v in self.adam_lrs), "positive step sizes"),
            (
                "control_lr",
                self.control_lr is None or 0 < self.control_lr < math.inf,
                "a positive step size, or none",
            ),
            ("adam_steps", self.adam_steps >= 1, "an integer >= 1"),
            ("beta1", 0 <= self.beta1 < 1, "a number in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "a number in [0, 1)"),
            ("adam_eps", self.adam_eps > 0, "a positive number"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("sharpness_every", self.sharpness_every >= 1, "an integer >= 1"),
            ("sharpness_tol", 0 < self.sharpness_tol < 1, "a relative tolerance in (0, 1)"),
            ("burn_in", self.burn_in is None or self.burn_in >= 0, "an integer >= 0, or none"),
            ("onset_fraction", 0 < self.onset_fraction <= 1, "a number in (0, 1]"),
            (
                "eos_band",
                0 < self.eos_band[0] < 1 < self.eos_band[1],
                "[low, high], low < 1 < high",
            ),
            ("min_post_onset", self.min_post_onset >= 1, "an integer >= 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be {what}.")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"patch_size={self.patch_size!r}: must divide image_size={self.image_size} "
                "(the patches tile the image)."
            )

    @property
    def burn(self) -> int:
        """The burn-in in steps (``burn_in``, else ``round(2/(1 − β₁))``)."""
        return self.burn_in if self.burn_in is not None else round(2 / (1 - self.beta1))


class _Checkpoints(Probe):
    """Copies of the parameters at GD iterates ``t >= 1`` (the probe at step ``t − 1`` sees
    ``θ_t``, the iterate after that update); stores no metric."""

    name = "checkpoints"
    iterate = "after"

    def __init__(self, iterates: list[int]) -> None:
        super().__init__(At([t - 1 for t in iterates if t >= 1]))
        self.saved: dict[int, Params] = {}

    def compute(self, state: ProbeState) -> dict[str, float]:
        self.saved[state.step + 1] = {k: v.clone() for k, v in state.problem.params.items()}
        return {}


@register
class AttentionExperiment(Experiment):
    """GD map non-singular except at η = 1/h_i; AdamW at the adaptive edge of stability."""

    name = "attention"
    summary = (
        "Softmax attention: the GD map's Jacobian I − η∇²L is singular only at η = 1/h_i (found by "
        "gd_map, checked on a fine lr grid against a dense Hessian), and full-batch AdamW's "
        "preconditioned sharpness rises to (2 + 2β₁)/((1 − β₁)η) and hovers there."
    )
    Config = AttentionConfig
    paper_scale: ClassVar[dict[str, Any]] = {
        "data.n": 1797,
        "d_model": 16,
        "n_layers": 2,
        "oracle_limit": 8000,
        "gd_map_points": [0, 250, 500, 1000],
        "grid_points": 20000,
        "adam_lrs": [1e-4, 3e-4, 1e-3],
        "control_lr": 3e-6,  # at the default size 3e-5 reaches its threshold at ~1,200 steps
        "adam_steps": 3000,
        "device": "cuda",
    }

    def tasks(self, cfg: AttentionConfig) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"kind": "gd_map"}]
        out += [{"kind": "adamw", "lr": lr, "control": False} for lr in cfg.adam_lrs]
        if cfg.control_lr is not None:
            out.append({"kind": "adamw", "lr": cfg.control_lr, "control": True})
        return out

    def run_task(
        self, cfg: AttentionConfig, task: dict[str, Any], ctx: TaskContext
    ) -> dict[str, Any]:
        prob, describe = _problem(cfg, ctx)
        if task["kind"] == "gd_map":
            return _gd_map_task(cfg, prob, describe, ctx)
        if task["kind"] == "adamw":
            return _adamw_task(cfg, prob, describe, float(task["lr"]), bool(task["control"]), ctx)
        raise ConfigError(f"task kind {task['kind']!r} is unknown: expected gd_map or adamw.")

    def judge(self, cfg: AttentionConfig, results: list[dict[str, Any]]) -> Judgement:
        points = [p for r in results if r["kind"] == "gd_map" for p in r["points"]]
        runs = [r for r in results if r["kind"] == "adamw"]
        eos = [r for r in runs if not r["control"]]
        verdicts = [nonsingular_verdict(points), singular_verdict(points)]
        verdicts += [
            eos_verdict(
                r,
                burn_in=cfg.burn,
                onset_fraction=cfg.onset_fraction,
                band=cfg.eos_band,
                min_post_onset=cfg.min_post_onset,
            )
            for r in eos
        ]
        verdicts += [
            control_verdict(r, burn_in=cfg.burn, eos_lrs=[e["lr"] for e in eos])
            for r in runs
            if r["control"]
        ]
        figures = []
        if points:
            figures.append(gd_map_figure(points))
        if runs:
            figures.append(adamw_figure(runs, cfg.burn, cfg.eos_band))
        return Judgement(verdicts, figures)


# ---------------------------------------------------------------------- tasks
def _problem(cfg: AttentionConfig, ctx: TaskContext) -> tuple[Problem, dict[str, Any]]:
    """A fresh ViT (seeded by ``cfg.seed``) on the data, MSE on one-hot labels."""
    from gdscope.zoo.transformer import vit

    X, Y = cfg.data.load(seed=cfg.seed, dtype=ctx.dtype, one_hot=True, flatten=True)
    if X.ndim != 2 or X.shape[1] != cfg.image_size**2 or Y.ndim != 2:
        raise ConfigError(
            f"data.name={cfg.data.name!r} gives inputs of shape {tuple(X.shape)}: the ViT takes "
            f"single-channel {cfg.image_size}×{cfg.image_size} images with class labels; use "
            "digits (image_size=8) or mnist (image_size=28)."
        )
    model = vit(
        cfg.image_size,
        cfg.patch_size,
        1,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_layers,
        Y.shape[1],
        pool=cfg.pool,
        mlp_ratio=cfg.mlp_ratio,
        init_std=cfg.init_std,
        seed=cfg.seed,
        dtype=ctx.dtype,
    ).to(ctx.device)
    prob = Problem(model, "mse", (X.to(ctx.device), Y.to(ctx.device)))
    describe = {
        "experiment": "attention",
        "model": (
            f"vit {cfg.image_size}×{cfg.image_size}, patches {cfg.patch_size}, d {cfg.d_model}, "
            f"{cfg.n_heads} heads, {cfg.n_layers} block(s), mlp ×{cfg.mlp_ratio}, pool "
            f"{cfg.pool} ({prob.num_params} parameters)"
        ),
        "data": f"{cfg.data.name} n={X.shape[0]}",
        "loss": "mse (mean) on one-hot labels",
    }
    return prob, describe


def _gd_map_task(
    cfg: AttentionConfig, prob: Problem, describe: dict[str, Any], ctx: TaskContext
) -> dict[str, Any]:
    if prob.num_params > cfg.oracle_limit:
        raise ConfigError(
            f"the model has {prob.num_params} parameters, above oracle_limit={cfg.oracle_limit}: "
            "the dense Hessian oracle would not fit; raise oracle_limit or shrink the model "
            "(d_model, n_layers)."
        )
    iterates = sorted(set(cfg.gd_map_points))
    steps = iterates[-1]
    saved: dict[int, Params] = {0: {k: v.clone() for k, v in prob.params.items()}}
    losses: list[float] = []
    if steps > 0:
        keep = _Checkpoints(iterates)
        probes = [LossProbe(), ThresholdProbe(), SharpnessProbe(Every(10)), keep]
        tracker = Tracker(
            prob,
            probes,
            store=ctx.store,
            run_name=f"attention/gd/lr{cfg.gd_lr:g}",
            config={**describe, "lr": cfg.gd_lr, "optimizer": "GD (full batch)"},
        )
        result = fit(
            prob, GD(prob.model.parameters(), lr=cfg.gd_lr), steps, tracker, on_nonfinite="stop"
        )
        losses = [float(v) for v in result.losses]
        saved.update(keep.saved)
    points = []
    for t in iterates:
        if t not in saved:
            continue  # GD diverged before t
        ctx.log(f"GD map at iterate {t}")
        points.append(
            measure_point(
                prob,
                saved[t],
                t,
                grid_range=cfg.grid_range,
                grid_points=cfg.grid_points,
                tol=cfg.gd_map_tol,
                max_count=cfg.gd_map_max_count,
                walk_step=cfg.walk_step,
                max_calls=cfg.walk_max_calls,
                factor=cfg.resolution_factor,
                oracle_limit=cfg.oracle_limit,
                lu_checks=cfg.lu_checks,
                seed=cfg.seed + t,
            )
        )
    return {"kind": "gd_map", "gd_lr": cfg.gd_lr, "losses": losses, "points": points}


def _adamw_task(
    cfg: AttentionConfig,
    prob: Problem,
    describe: dict[str, Any],
    lr: float,
    control: bool,
    ctx: TaskContext,
) -> dict[str, Any]:
    opt = torch.optim.AdamW(
        prob.model.parameters(),
        lr=lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    probes = [
        LossProbe(),
        ThresholdProbe(),
        PreconditionedSharpnessProbe(Every(cfg.sharpness_every), tol=cfg.sharpness_tol),
    ]
    tracker = Tracker(
        prob,
        probes,
        store=ctx.store,
        run_name=f"attention/adamw{'-control' if control else ''}/lr{lr:g}",
        config={**describe, "lr": lr, "role": "control" if control else "edge of stability"},
    )
    result = fit(prob, opt, cfg.adam_steps, tracker, on_nonfinite="stop")
    steps, psharp = tracker.series("preconditioned_sharpness")
    _, conv = tracker.series("preconditioned_sharpness_converged")
    _, thr = tracker.series("preconditioned_threshold")
    threshold = (2 + 2 * cfg.beta1) / ((1 - cfg.beta1) * lr)
    return {
        "kind": "adamw",
        "lr": lr,
        "control": control,
        "threshold": float(thr[0]) if thr else threshold,
        "threshold_formula": threshold,
        "steps": [int(s) for s in steps],
        "psharp": [float(v) for v in psharp],
        "converged": [bool(c) for c in conv],
        "losses": [float(v) for v in result.losses],
        "diverged": bool(result.diverged),
        "diverged_at": result.diverged_at,
    }
