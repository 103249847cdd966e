"""GD, heavy ball and Nesterov in the kernel regime: measured loss curves against their prediction.

THEORY §2, after Bu, Xu & Chen: a wide two-layer ReLU net ``d → m → 1`` (NTK parameterization,
no biases) fitted full-batch with MSE (PyTorch's mean reduction, ``q = 2/n``) to a scalar
target. Each optimizer is trained from the same initialization and predicted from it with
:func:`gdscope.predict` (the exact linearized recursion on the NTK at initialization).

**Hyperparameters from the measured spectrum.** ``λ_min``, ``λ_max`` of the NTK Gram ``K``
(:func:`gdscope.ntk_eigs`, dense) are widened by ``margin`` to the design interval
``[λ_lo, λ_hi] = [λ_min/(1+margin), (1+margin)·λ_max]``, ``κ' = λ_hi/λ_lo``, so that kernel
drift during training cannot push a mode out of the stable (or, for heavy ball, the
uniform-rate) region. Then, with ``a = η q λ`` per mode:

* GD: ``η = 2/(q(λ_lo + λ_hi))``, worst residual factor ``(κ' − 1)/(κ' + 1)``;
* heavy ball (Polyak's optimal pair): ``η = 4/(q(√λ_lo + √λ_hi)²)``,
  ``β = ((√κ' − 1)/(√κ' + 1))²``: every mode inside the interval has complex roots of modulus
  ``√β``, so the loss decays like ``β^t`` from the first steps;
* Nesterov, constant ``β``: ``η = 1/(q λ_hi)``, ``β = (√κ' − 1)/(√κ' + 1)``;
* Nesterov, scheduled ``β_t = (t−1)/(t+r−1)``: ``η = 1/(q λ_hi)``. A mode's envelope is
  ``≈ (1 − a)^{t/2} t^{−r/2}``: a power law while ``a t ≪ 1`` (THEORY §2).

**Claims** (one verdict each): GD, heavy ball and constant-β Nesterov converge linearly at the
predicted rate; scheduled Nesterov decays as a power law on ``1/√a_min ≤ t ≤ 1/a_min``; heavy
ball's rate beats GD's as ``√κ`` beats ``κ``; the measured curves track the predicted ones.

**Rates** come from :func:`gdscope.theory.fit_rates` on the same window of the measured and the
predicted loss curve: the last ``fit_tail`` of the steps at which both curves are above
``loss_floor·L_0`` (round-off sets in below). The predicted rate is the fit to the predicted
curve (over a finite window a mixture of modes decays a little faster than the slowest one);
the asymptotic rate ``pred.loss_rate`` is reported beside it. A rate holds when the measured
interval contains the predicted rate or the decay exponents agree within ``rate_rtol``:
``|log ρ_meas / log ρ_pred − 1| ≤ rate_rtol``. The power-law window of scheduled Nesterov is
sampled at 60 log-spaced steps so each decade weighs the same.

With ``train = "readout"`` only the last layer is trained: the model is linear in its
parameters, the linearization is exact and the predicted curve must equal the measured one to
rounding (float64): the experiment's own plumbing check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from gdscope.errors import ConfigError, InvalidArgumentError
from gdscope.experiments.base import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Figure,
    Judgement,
    TaskContext,
    register,
)
from gdscope.kernels import ntk_eigs
from gdscope.probes import LossProbe
from gdscope.problem import Problem
from gdscope.theory import RateFit, fit_rates, predict
from gdscope.tracker import Tracker
from gdscope.train import GD, HeavyBall, Nesterov, fit
from gdscope.verdict import Verdict
from gdscope.zoo import mlp

__all__ = ["OptimizersConfig", "OptimizersExperiment", "design"]

OptimizerName = Literal["gd", "heavy_ball", "nesterov", "nesterov_scheduled"]
OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)
_LABELS = {
    "gd": "GD",
    "heavy_ball": "heavy ball",
    "nesterov": "Nesterov (constant β)",
    "nesterov_scheduled": "Nesterov (scheduled β_t)",
}
_POWER_POINTS = 60


@dataclass(frozen=True)
class OptimizersConfig(ExperimentConfig):
    """The optimizers experiment (defaults: about 1.5 minutes on one CPU core).

    Attributes:
        data: the data set; the scalar target is made from its labels (``target``).
        target: ``"value"``: the digit value, standardized (Bu et al.'s MSE on the digit);
            ``"parity"``: ``+1`` for even labels, ``−1`` for odd ones.
        width: hidden width ``m``.
        train: ``"all"`` layers, or ``"readout"`` only (linear in the parameters: exact).
        optimizers: which optimizers to run (one task each per trial).
        trials: initializations; trial ``i`` uses seed ``seed + i`` (the data use ``seed``).
        steps: most steps per run; a run stops early once its predicted loss is below
            ``loss_floor·L_0`` (plus 10%); scheduled Nesterov stops at ``2/a_min``.
        margin: relative widening of the measured NTK spectrum for the design (module doc).
        nesterov_r: ``r`` of the schedule ``β_t = (t−1)/(t+r−1)``.
        loss_floor: rate fits use only steps where both curves exceed ``loss_floor·L_0`` (at
            least ``(1000·eps)²`` of the dtype).
        fit_tail: fraction of those steps (the last ones) fitted for linear rates.
        rate_rtol: tolerance on the decay exponent ``log ρ`` (twice it for the HB/GD speedup).
        track_tol: largest allowed ``max_t |L_t − L̂_t| / L_0`` between measured and predicted.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig("digits", 128))
    target: Literal["value", "parity"] = "value"
    width: int = 4096
    train: Literal["all", "readout"] = "all"
    optimizers: tuple[OptimizerName, ...] = OPTIMIZERS
    trials: int = 1
    steps: int = 3000
    margin: float = 0.25
    nesterov_r: float = 3.0
    loss_floor: float = 1e-20
    fit_tail: float = 0.5
    rate_rtol: float = 0.1
    track_tol: float = 0.05

    def __post_init__(self) -> None:
        checks = [
            ("width", self.width >= 1, "an integer >= 1"),
            ("trials", self.trials >= 1, "an integer >= 1"),
            ("steps", self.steps >= 20, "an integer >= 20 (rates are fitted to the curve)"),
            ("optimizers", len(self.optimizers) >= 1, "a non-empty list of optimizer names"),
            ("margin", self.margin >= 0, "a number >= 0 (e.g. 0.25)"),
            ("nesterov_r", self.nesterov_r > 0, "a number > 0 (3 classically)"),
            ("loss_floor", 0 < self.loss_floor < 1, "a number in (0, 1), e.g. 1e-20"),
            ("fit_tail", 0 < self.fit_tail <= 1, "a fraction in (0, 1]"),
            ("rate_rtol", self.rate_rtol > 0, "a number > 0 (e.g. 0.1)"),
            ("track_tol", self.track_tol > 0, "a number > 0 (e.g. 0.05)"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be {what}.")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"optimizers={list(self.optimizers)!r}: list each one once.")


def design(
    optimizer: str, q: float, lambda_min: float, lambda_max: float, margin: float, r: float = 3.0
) -> dict[str, Any]:
    """Step size (and momentum) for ``optimizer`` from the NTK spectrum (module docstring).

    Returns ``{"lr", "beta", "r", "lambda_lo", "lambda_hi", "kappa"}`` (``beta`` is
    ``"scheduled"`` or a number, ``r`` only for the schedule), ``κ = λ_hi/λ_lo``.
    """
    if not (math.isfinite(lambda_min) and lambda_min > 0 and lambda_max >= lambda_min):
        raise InvalidArgumentError(
            f"the NTK spectrum [{lambda_min!r}, {lambda_max!r}] is singular or invalid: the "
            "design needs λ_min > 0. Use fewer samples than parameters (data.n below width, "
            "or train='all') and distinct inputs."
        )
    lo, hi = lambda_min / (1 + margin), lambda_max * (1 + margin)
    kappa = hi / lo
    sk = math.sqrt(kappa)
    out: dict[str, Any] = {"lambda_lo": lo, "lambda_hi": hi, "kappa": kappa}
    if optimizer == "gd":
        out.update(lr=2 / (q * (lo + hi)), beta=0.0)
    elif optimizer == "heavy_ball":
        out.update(
            lr=4 / (q * (math.sqrt(lo) + math.sqrt(hi)) ** 2), beta=((sk - 1) / (sk + 1)) ** 2
        )
    elif optimizer == "nesterov":
        out.update(lr=1 / (q * hi), beta=(sk - 1) / (sk + 1))
    elif optimizer == "nesterov_scheduled":
        out.update(lr=1 / (q * hi), beta="scheduled", r=r)
    else:
        raise InvalidArgumentError(f"optimizer={optimizer!r} is unknown: use one of {OPTIMIZERS}.")
    return out


def _make_optimizer(name: str, params: Any, hp: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "gd":
        return GD(params, lr=hp["lr"])
    if name == "heavy_ball":
        return HeavyBall(params, lr=hp["lr"], beta=hp["beta"])
    return Nesterov(params, lr=hp["lr"], beta=hp["beta"], r=hp.get("r", 3.0))


def _load(cfg: OptimizersConfig, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Inputs ``(n, d)`` and the scalar target ``(n, 1)`` (see ``target``)."""
    X, labels = cfg.data.load(seed=cfg.seed, dtype=dtype, one_hot=False, flatten=True)
    if labels.is_floating_point() or labels.ndim != 1:
        raise ConfigError(
            f"data.name={cfg.data.name!r} has no class labels to make a target from: use a "
            "labelled set (digits, mnist1d, mnist)."
        )
    y = labels.to(torch.float64)
    if cfg.target == "value":
        std = y.std()
        y = (y - y.mean()) / (std if std > 0 else 1.0)
    else:
        y = 1.0 - 2.0 * torch.remainder(y, 2)
    return X.to(device), y[:, None].to(device=device, dtype=dtype)


def _floor(cfg: OptimizersConfig, dtype: str) -> float:
    eps = torch.finfo(getattr(torch, dtype)).eps
    return max(cfg.loss_floor, (1e3 * eps) ** 2)


@register
class OptimizersExperiment(Experiment):
    """GD, heavy ball and Nesterov on a wide two-layer ReLU net: measured vs predicted."""

    name = "optimizers"
    summary = (
        "GD, heavy ball and Nesterov (constant and scheduled β) on a wide two-layer ReLU net: "
        "measured loss curves against the exact linearized prediction, linear vs power-law rates."
    )
    Config = OptimizersConfig
    paper_scale: ClassVar[dict[str, Any]] = {
        "data.name": "mnist",
        "data.n": 600,
        "data.root": "data/mnist",
        "width": 8192,
        "steps": 5000,
        "device": "cuda",
    }

    def tasks(self, cfg: OptimizersConfig) -> list[dict[str, Any]]:
        return [
            {"optimizer": name, "seed": cfg.seed + i}
            for i in range(cfg.trials)
            for name in cfg.optimizers
        ]

    def run_task(
        self, cfg: OptimizersConfig, task: dict[str, Any], ctx: TaskContext
    ) -> dict[str, Any]:
        name, seed = task["optimizer"], int(task["seed"])
        X, Y = _load(cfg, ctx.dtype, ctx.device)
        d = X.shape[1]

        model = mlp(
            [d, cfg.width, 1],
            "relu",
            bias=False,
            parameterization="ntk",
            seed=seed,
            dtype=ctx.dtype,
        ).to(ctx.device)
        if cfg.train == "readout":
            model[0].weight.requires_grad_(False)
        prob = Problem(model, "mse", (X, Y))
        eig = ntk_eigs(model, X, which="both")
        assert eig.lambda_min is not None and eig.lambda_max is not None
        hp = design(name, prob.q, eig.lambda_min, eig.lambda_max, cfg.margin, cfg.nesterov_r)
        ctx.log(f"{name} seed {seed}: κ(K) = {eig.condition_number:.4g}, lr = {hp['lr']:.4g}")
        pred = predict(prob, _make_optimizer(name, model.parameters(), hp), cfg.steps)
        a = hp["lr"] * prob.q * np.array([eig.lambda_min, eig.lambda_max])
        floor = _floor(cfg, cfg.dtype) * float(pred.loss[0])
        below = np.flatnonzero(pred.loss < floor)
        steps = cfg.steps if below.size == 0 else min(cfg.steps, int(1.1 * below[0]) + 10)
        if name == "nesterov_scheduled":  # twice the end 1/a_min of its power-law window
            steps = min(steps, math.ceil(2 / a[0]))

        optimizer = _make_optimizer(name, model.parameters(), hp)
        run_config = {
            "experiment": self.name,
            "optimizer": name,
            "seed": seed,
            "model": f"mlp [{d}, {cfg.width}, 1] relu, ntk parameterization, no bias",
            "train": cfg.train,
            "data": f"{cfg.data.name} n={X.shape[0]} target={cfg.target}",
            "design": hp,
        }
        tracker = Tracker(
            prob,
            [LossProbe()],
            store=ctx.store,
            run_name=f"optimizers/{name}/seed{seed}",
            config=run_config,
        )
        result = fit(prob, optimizer, steps, tracker, on_nonfinite="stop")
        if not result.diverged:
            tracker.close("completed")
        return {
            "optimizer": name,
            "seed": seed,
            "hyperparameters": hp,
            "q": prob.q,
            "n": int(X.shape[0]),
            "lambda_min": eig.lambda_min,
            "lambda_max": eig.lambda_max,
            "a_min": float(a[0]),
            "a_max": float(a[1]),
            "predicted_asymptotic_loss_rate": pred.loss_rate,
            "predicted_stable": pred.stable,
            "diverged": result.diverged,
            "diverged_at": result.diverged_at,
            "steps": result.steps,
            "measured": [float(v) for v in result.losses],
            "predicted": [float(v) for v in pred.loss[: len(result.losses)]],
        }

    # ------------------------------------------------------------------ judging
    def judge(self, cfg: OptimizersConfig, results: list[dict[str, Any]]) -> Judgement:
        floor = _floor(cfg, cfg.dtype)
        by_opt: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            by_opt.setdefault(r["optimizer"], []).append(r)
        fits = {
            name: [_linear_fits(r, floor, cfg.fit_tail) for r in runs]
            for name, runs in by_opt.items()
        }
        verdicts: list[Verdict] = []
        for name in ("gd", "heavy_ball", "nesterov"):
            if name in by_opt:
                verdicts.append(_linear_verdict(name, by_opt[name], fits[name], cfg.rate_rtol))
        if "nesterov_scheduled" in by_opt:
            verdicts.append(_power_verdict(by_opt["nesterov_scheduled"], floor))
        if "gd" in by_opt and "heavy_ball" in by_opt:
            verdicts.append(
                _speedup_verdict(
                    by_opt["gd"],
                    fits["gd"],
                    by_opt["heavy_ball"],
                    fits["heavy_ball"],
                    cfg.rate_rtol,
                )
            )
        verdicts.append(_track_verdict(results, cfg.track_tol, cfg.width, cfg.train))
        return Judgement(verdicts, [_curves_figure(results)])


# ---------------------------------------------------------------------- helpers for judge
def _combine(values: list[bool | None]) -> bool | None:
    """False if any is False, else None if any is undetermined (or none given), else True."""
    if any(v is False for v in values):
        return False
    if not values or any(v is None for v in values):
        return None
    return True


def _window_end(r: dict[str, Any], floor: float) -> int:
    """First step at which either curve leaves ``(floor·L_0, ∞)`` (or the run's end)."""
    m, p = np.asarray(r["measured"]), np.asarray(r["predicted"])
    if m.size == 0:
        return 0
    ok = np.isfinite(m) & np.isfinite(p) & (m > floor * m[0]) & (p > floor * m[0])
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else int(m.size)


def _linear_fits(r: dict[str, Any], floor: float, tail: float) -> tuple[RateFit, RateFit] | str:
    """(measured fit, predicted fit) on the common window, or why there is none."""
    if r["diverged"]:
        return f"diverged at step {r['diverged_at']}"
    end = _window_end(r, floor)
    try:
        fm = fit_rates(r["measured"][:end], tail=tail)
        fp = fit_rates(r["predicted"][:end], tail=tail)
    except InvalidArgumentError as e:
        return f"no rate fit: {e}"
    return fm, fp


def _rate_ok(fm: RateFit, fp: RateFit, rtol: float) -> tuple[bool, float]:
    lo, hi = fm.exponential_rate_ci
    gap = abs(math.log(fm.exponential_rate) / math.log(fp.exponential_rate) - 1)
    return (lo <= fp.exponential_rate <= hi) or gap <= rtol, gap


def _fit_row(r: dict[str, Any], fit: tuple[RateFit, RateFit] | str) -> dict[str, Any]:
    row: dict[str, Any] = {"optimizer": r["optimizer"], "seed": r["seed"]}
    if isinstance(fit, str):
        row["note"] = fit
        return row
    fm, fp = fit
    row.update(
        window=list(fm.window),
        measured_rate=fm.exponential_rate,
        measured_rate_ci=list(fm.exponential_rate_ci),
        predicted_rate=fp.exponential_rate,
        asymptotic_rate=r["predicted_asymptotic_loss_rate"],
        measured_power=fm.power_exponent,
        measured_power_ci=list(fm.power_exponent_ci),
        preferred=fm.preferred,
        delta_aic=fm.delta_aic,
        predicted_preferred=fp.preferred,
    )
    return row


def _design_text(r: dict[str, Any]) -> str:
    hp = r["hyperparameters"]
    beta = hp.get("beta")
    b = f", β = {beta:.6g}" if isinstance(beta, float) and beta > 0 else ""
    if beta == "scheduled":
        b = f", β_t = (t−1)/(t+{hp['r']:g}−1)"
    return (
        f"η = {hp['lr']:.6g}{b}, from λ(K) ∈ [{r['lambda_min']:.4g}, {r['lambda_max']:.4g}] "
        f"widened to [{hp['lambda_lo']:.4g}, {hp['lambda_hi']:.4g}] (κ' = {hp['kappa']:.4g}), "
        f"q = {r['q']:.4g}"
    )


_SECTION = "2-optimizer-dynamics-in-the-kernel-regime"
_LINEAR_THEOREM = (
    "In the kernel regime the residual evolves by the linear recursion of docs/theory.md §2 "
    "(GD: e_{t+1} = (1 − a)e_t; heavy ball: e_{t+1} = (1 + β − a)e_t − βe_{t−1}; Nesterov with "
    "constant β: e_{t+1} = (1 − a)[(1 + β)e_t − βe_{t−1}], a = ηqλ_i), so the loss decays "
    "linearly at the rate the recursion gives for the kernel's spectrum. The rule fits the "
    "measured curve's tail rate with its interval and compares it with the rate fitted to the "
    "exact linearized prediction on the same window."
)
_POWER_THEOREM = (
    "Bu, Xu & Chen: Nesterov's method with β_t = (t − 1)/(t + r − 1) has per-mode envelope "
    "(1 − a)^{t/2} t^{−r/2}: while a·t ≪ 1 the loss falls as a power law (sublinear), beyond it "
    "linearly. The rule fits both models on log-spaced steps of [1/√a_min, 1/a_min] and asks "
    "which the data decisively prefer (ΔAIC > 10)."
)
_SPEEDUP_THEOREM = (
    "Heavy ball with the optimal (β, η) for condition number κ converges at the rate "
    "(√κ − 1)/(√κ + 1) against GD's (κ − 1)/(κ + 1): its decay exponent is about √κ times "
    "larger. The rule compares the measured ratio of decay exponents with the predicted one."
)
_TRACK_THEOREM = (
    "For a wide network in the kernel regime the whole loss curve follows the linearized "
    "model's (Lee et al. 2019), not only its asymptotic rate. The rule bounds the largest gap "
    "between the measured and predicted curves relative to the initial loss."
)


def _reason(holds: list[bool | None], good: str, bad: str, open_: str) -> str:
    """One line for a verdict combined over runs."""
    if any(h is False for h in holds):
        return bad
    if holds and all(h is True for h in holds):
        return good
    return open_


def _linear_verdict(
    name: str,
    runs: list[dict[str, Any]],
    fits: list[tuple[RateFit, RateFit] | str],
    rtol: float,
) -> Verdict:
    holds: list[bool | None] = []
    measured: list[str] = []
    predicted: list[str] = []
    for r, pair in zip(runs, fits, strict=True):
        if isinstance(pair, str):
            holds.append(False if r["diverged"] else None)
            measured.append(pair)
            continue
        fm, fp = pair
        ok, gap = _rate_ok(fm, fp, rtol)
        holds.append(ok and fm.preferred == "exponential")
        lo, hi = fm.exponential_rate_ci
        measured.append(
            f"ρ = {fm.exponential_rate:.6g} [{lo:.6g}, {hi:.6g}] per step, {fm.preferred} "
            f"preferred (ΔAIC {fm.delta_aic:.3g}); |Δlog ρ|/|log ρ̂| = {gap:.3g}"
        )
        predicted.append(
            f"linear, ρ̂ = {fp.exponential_rate:.6g} per step on steps "
            f"{fm.window[0]:g}–{fm.window[1]:g} (asymptotic "
            f"{r['predicted_asymptotic_loss_rate']:.6g})"
        )
    return Verdict(
        claim=f"{_LABELS[name]} converges linearly at the predicted rate",
        predicted="; ".join(predicted) or "no prediction (see details)",
        measured="; ".join(measured),
        holds=_combine(holds),
        details={
            "design": [_design_text(r) for r in runs],
            "rate_fits": [_fit_row(r, f) for r, f in zip(runs, fits, strict=True)],
            "rate_rtol": rtol,
            "rule": "holds iff exponential is preferred and ρ̂ lies in the measured interval "
            "or |log ρ/log ρ̂ − 1| ≤ rate_rtol",
        },
        reason=_reason(
            holds,
            "every run decays linearly at the predicted rate",
            "a run diverged, or its rate or its shape (power law preferred) contradicts the "
            "prediction",
            "some runs could not be fitted (see measured)",
        ),
        theorem=_LINEAR_THEOREM,
        section=_SECTION,
    )


def _power_window(r: dict[str, Any], floor: float) -> np.ndarray | str:
    """Log-spaced steps in ``[1/√a_min, 1/a_min]`` (inside the common window)."""
    a = r["a_min"]
    lo = max(2, math.ceil(1 / math.sqrt(a)))
    hi = min(_window_end(r, floor) - 1, math.floor(1 / a))
    if hi < 3 * lo:
        return (
            f"the power-law window [1/√a_min, 1/a_min] ∩ run = [{lo}, {hi}] spans less than "
            "half a decade: run longer (steps) or use a worse-conditioned kernel (more samples)"
        )
    return np.unique(np.round(np.geomspace(lo, hi, _POWER_POINTS)).astype(np.int64))


def _power_verdict(runs: list[dict[str, Any]], floor: float) -> Verdict:
    holds: list[bool | None] = []
    measured: list[str] = []
    predicted: list[str] = []
    rows: list[dict[str, Any]] = []
    for r in runs:
        row: dict[str, Any] = {"seed": r["seed"], "a_min": r["a_min"]}
        rows.append(row)
        if r["diverged"]:
            holds.append(False)
            measured.append(f"diverged at step {r['diverged_at']}")
            continue
        t = _power_window(r, floor)
        if isinstance(t, str):
            holds.append(None)
            measured.append(t)
            continue
        try:
            fm = fit_rates(np.asarray(r["measured"])[t], steps=t, tail=1.0)
            fp = fit_rates(np.asarray(r["predicted"])[t], steps=t, tail=1.0)
        except InvalidArgumentError as e:
            holds.append(None)
            measured.append(f"no fit: {e}")
            continue
        if fm.preferred == "power" and fm.decisive:
            holds.append(True)
        elif fm.preferred == "exponential" and fm.decisive:
            holds.append(False)
        else:
            holds.append(None)
        plo, phi = fm.power_exponent_ci
        measured.append(
            f"L ∝ t^(−{fm.power_exponent:.3g}) [{plo:.3g}, {phi:.3g}], {fm.preferred} preferred "
            f"(ΔAIC {fm.delta_aic:.3g}{', decisive' if fm.decisive else ''})"
        )
        predicted.append(
            f"power law on steps {int(t[0])}–{int(t[-1])} (a_min·t ≤ 1); prediction "
            f"L̂ ∝ t^(−{fp.power_exponent:.3g}), {fp.preferred} preferred"
        )
        row.update(
            window=[int(t[0]), int(t[-1])],
            measured_power=fm.power_exponent,
            measured_power_ci=list(fm.power_exponent_ci),
            measured_rate=fm.exponential_rate,
            preferred=fm.preferred,
            delta_aic=fm.delta_aic,
            predicted_power=fp.power_exponent,
            predicted_preferred=fp.preferred,
        )
    return Verdict(
        claim="Nesterov with scheduled β_t decays as a power law while a·t ≪ 1",
        predicted="; ".join(predicted) or "power law (no window, see measured)",
        measured="; ".join(measured),
        holds=_combine(holds),
        details={
            "design": [_design_text(r) for r in runs],
            "power_fits": rows,
            "rule": "holds iff the power law is decisively preferred (ΔAIC > 10) on 60 "
            "log-spaced steps of [1/√a_min, 1/a_min]; fails if the exponential is",
            "theory": "per mode the residual envelope is ≈ (1−a)^{t/2} t^{−r/2}; a spread "
            "spectrum sums to the exponent of the predicted curve",
        },
        reason=_reason(
            holds,
            "the power law is decisively preferred in every run's window",
            "a run diverged or the exponential is decisively preferred in its window",
            "no window or no decisive preference in some run: longer runs decide",
        ),
        theorem=_POWER_THEOREM,
        section=_SECTION,
    )


def _speedup_verdict(
    gd_runs: list[dict[str, Any]],
    gd_fits: list[tuple[RateFit, RateFit] | str],
    hb_runs: list[dict[str, Any]],
    hb_fits: list[tuple[RateFit, RateFit] | str],
    rtol: float,
) -> Verdict:
    gd_by_seed = {r["seed"]: f for r, f in zip(gd_runs, gd_fits, strict=True)}
    holds: list[bool | None] = []
    measured: list[str] = []
    predicted: list[str] = []
    rows: list[dict[str, Any]] = []
    for r, hb in zip(hb_runs, hb_fits, strict=True):
        gd = gd_by_seed.get(r["seed"])
        if gd is None or isinstance(gd, str) or isinstance(hb, str):
            why = [f"{k}: {v}" for k, v in (("GD", gd), ("HB", hb)) if isinstance(v, str)]
            diverged = any(isinstance(v, str) and v.startswith("diverged") for v in (gd, hb))
            holds.append(False if diverged else None)
            measured.append("; ".join(why) or "no GD run with this seed")
            continue
        kappa = r["hyperparameters"]["kappa"]
        sp_pred = math.log(hb[1].exponential_rate) / math.log(gd[1].exponential_rate)
        sp_meas = math.log(hb[0].exponential_rate) / math.log(gd[0].exponential_rate)
        faster = hb[0].exponential_rate_ci[1] < gd[0].exponential_rate_ci[0]
        if hb[0].exponential_rate >= gd[0].exponential_rate:
            holds.append(False)  # heavy ball is not faster at all
        elif not faster:
            holds.append(None)  # faster, but the intervals overlap
        else:
            holds.append(abs(sp_meas / sp_pred - 1) <= 2 * rtol)
        predicted.append(
            f"HB ρ̂ = {hb[1].exponential_rate:.6g} vs GD {gd[1].exponential_rate:.6g}: "
            f"{sp_pred:.3g}× the decay exponent (√κ' = {math.sqrt(kappa):.3g} vs κ' = "
            f"{kappa:.4g})"
        )
        measured.append(
            f"HB ρ = {hb[0].exponential_rate:.6g} vs GD {gd[0].exponential_rate:.6g}: "
            f"{sp_meas:.3g}× the decay exponent"
        )
        rows.append(
            {
                "seed": r["seed"],
                "predicted_speedup": sp_pred,
                "measured_speedup": sp_meas,
                "intervals_disjoint": faster,
            }
        )
    return Verdict(
        claim="Heavy ball's rate beats GD's as theory predicts (√κ vs κ)",
        predicted="; ".join(predicted) or "HB faster than GD",
        measured="; ".join(measured),
        holds=_combine(holds),
        details={
            "speedups": rows,
            "rule": "speedup = log ρ_HB / log ρ_GD; holds iff HB's rate interval lies below "
            "GD's and the measured speedup is within 2·rate_rtol of the predicted one",
        },
        reason=_reason(
            holds,
            "heavy ball is faster by the predicted factor in every seed",
            "heavy ball is not faster, or not by the predicted factor, in some seed",
            "the rate intervals overlap in some seed",
        ),
        theorem=_SPEEDUP_THEOREM,
        section=_SECTION,
    )


def _track_verdict(results: list[dict[str, Any]], tol: float, width: int, train: str) -> Verdict:
    rows: list[dict[str, Any]] = []
    gaps: list[float] = []
    for r in results:
        m, p = np.asarray(r["measured"]), np.asarray(r["predicted"])
        if r["diverged"] or m.size == 0 or not np.all(np.isfinite(m)):
            gap = rel = math.inf
        else:
            gap = float(np.max(np.abs(m - p)) / m[0])
            big = p >= 1e-3 * m[0]
            rel = float(np.max(np.abs(m[big] / p[big] - 1)))
        gaps.append(gap)
        rows.append(
            {
                "optimizer": r["optimizer"],
                "seed": r["seed"],
                "max_gap_over_L0": gap,
                "max_relative_gap_while_L_above_1e-3_L0": rel,
                "steps": r["steps"],
            }
        )
    worst = max(gaps) if gaps else math.nan
    where = _LABELS[rows[int(np.argmax(gaps))]["optimizer"]] if gaps else ""
    return Verdict(
        claim="Measured loss curves track the linearized predictions",
        predicted=f"max_t |L_t − L̂_t| / L_0 ≤ {tol:g} (width {width}, training {train})",
        measured=(f"max_t |L_t − L̂_t| / L_0 = {worst:.3g} (worst: {where})" if gaps else "no runs"),
        holds=None if not gaps else bool(worst <= tol),
        details={"gaps": rows, "track_tol": tol},
        reason="no runs"
        if not gaps
        else f"largest gap {worst:.2g} ≤ {tol:g}·L_0"
        if worst <= tol
        else f"largest gap {worst:.2g} > {tol:g}·L_0 ({where})",
        theorem=_TRACK_THEOREM,
        section=_SECTION,
    )


def _curves_figure(results: list[dict[str, Any]]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    first_seed = min((r["seed"] for r in results), default=0)
    for i, r in enumerate(x for x in results if x["seed"] == first_seed):
        m, p = np.asarray(r["measured"]), np.asarray(r["predicted"])
        t = np.arange(m.size)
        color = f"C{i}"
        for ax, shift in ((axes[0], 0), (axes[1], 1)):
            ax.plot(t + shift, m, color=color, lw=1.2, label=_LABELS[r["optimizer"]])
            ax.plot(t + shift, p, color="k", lw=0.7, ls="--")
    axes[0].set_xlabel("step t")
    axes[1].set_xlabel("step t + 1 (log scale)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].plot([], [], color="k", lw=0.7, ls="--", label="predicted (linearized)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return Figure.of(
        fig,
        "loss_curves",
        f"Measured (solid) and predicted (dashed, gs.predict from initialization) loss curves, "
        f"seed {first_seed}: linear-log (left) and log-log (right, where a power law is a line).",
    )
