"""The report of :func:`gdscope.stability`: :class:`StabilityReport` and its JSON form."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np

from gdscope.theory.sgd_stability import (
    LyapunovEstimate,
)

__all__ = ["StabilityReport"]


# ---------------------------------------------------------------------- the report
@dataclass(frozen=True)
class StabilityReport:
    """What :func:`stability` found. ``None`` everywhere means "undetermined / not computed".

    Full batch: ``sharpness`` (``λ_max(∇²L)``; a Lanczos lower bound when not converged) with
    ``sharpness_residual``; ``threshold`` (the optimizer's; ``None`` for an optimizer without
    one); ``gd_stable``; ``mu_top`` (per-step log rate of the top mode: ``log|1 − ηh_max|``
    without momentum); ``count_above`` (eigenvalues above ``threshold``; of
    ``P^{-1/2}HP^{-1/2}`` for adaptive optimizers);
    ``smallest`` and ``is_saddle``; ``gradient_norm`` and ``gradient_ratio``;
    ``preconditioned_sharpness`` (Adam/AdamW, RMSprop, Adagrad).

    SGD: ``noise_factor`` ``p``; ``sgd_mean_square_stable``; ``mean_square_rho`` (exact ``ρ(T)`` on
    the normal space) and its residual; ``mean_square_threshold`` (the ``lr`` where ``ρ(T) = 1``;
    exact path without momentum); ``mean_square_lower`` (Rayleigh–Ritz lower bound on ``ρ(T)``,
    bounds path); ``wu_ma_e`` (``λ_max[(I − ηH)² + η²pΣ]``: on the normal space in the exact path,
    on all of parameter space in the bounds path, where tangent directions contribute exactly 1),
    ``wu_ma_e_holds`` (the sufficient condition ``≤ 1``; ``False`` only says it fails) and
    ``wu_ma_e_threshold`` (largest ``lr`` where it holds; exact path); ``nonuniformity``
    (``√λ_max(Σ)``); ``normal_dim``; ``sgd_lyapunov`` / ``sgd_lyapunov_stiff`` with
    ``sgd_lyapunov_stable`` (from the first's interval) and ``stiff_cutoff``.

    ``method``, ``matvecs`` and ``seconds`` are per part ("spectrum", "smallest", "gradient",
    "normal_space", "mean_square", "bounds", "lyapunov", ...); ``matvecs`` counts
    Hessian-vector products of the operator that part uses (full batch, per sample or mini
    batch): a key ``<part>`` counts full-batch products, ``<part>_per_sample`` per-sample ones
    and ``lyapunov_mini_batch`` mini-batch ones (dense normal-space work counts none).
    """

    lr: float
    momentum: float
    nesterov: bool
    batch_size: int | None
    optimizer: str
    n: int
    num_params: int
    sharpness: float
    sharpness_residual: float
    threshold: float | None
    gd_stable: bool | None
    mu_top: float | None
    count_above: int | None
    smallest: float | None
    smallest_residual: float | None
    is_saddle: bool | None
    gradient_norm: float
    gradient_ratio: float
    preconditioned_sharpness: float | None = None
    noise_factor: float | None = None
    sgd_mean_square_stable: bool | None = None
    mean_square_rho: float | None = None
    mean_square_rho_residual: float | None = None
    mean_square_threshold: float | None = None
    mean_square_lower: float | None = None
    wu_ma_e: float | None = None
    wu_ma_e_holds: bool | None = None
    wu_ma_e_threshold: float | None = None
    nonuniformity: float | None = None
    normal_dim: int | None = None
    sgd_lyapunov: LyapunovEstimate | None = None
    sgd_lyapunov_stiff: LyapunovEstimate | None = None
    sgd_lyapunov_stable: bool | None = None
    stiff_cutoff: float = 0.1
    method: Mapping[str, str] = field(default_factory=dict)
    matvecs: Mapping[str, int] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready data (Lyapunov estimates as dicts, non-finite floats None)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def __str__(self) -> str:
        def v(x: Any) -> str:
            if x is None:
                return "undetermined"
            if isinstance(x, float):
                return f"{x:.6g}"
            return str(x)

        lines = [
            f"stability at lr={self.lr:g} ({self.optimizer}, momentum={self.momentum:g}"
            f"{', nesterov' if self.nesterov else ''}, batch_size={self.batch_size}), "
            f"n={self.n}, P={self.num_params}",
            f"  sharpness {v(self.sharpness)} ± {self.sharpness_residual:.2g}, threshold "
            f"{v(self.threshold)}, GD-stable {v(self.gd_stable)}, mu_top {v(self.mu_top)}, "
            f"above threshold {v(self.count_above)}, saddle {v(self.is_saddle)}",
        ]
        if self.batch_size is not None:
            lines.append(
                f"  SGD (p={v(self.noise_factor)}): mean-square stable "
                f"{v(self.sgd_mean_square_stable)}, rho(T) {v(self.mean_square_rho)}, "
                f"threshold lr {v(self.mean_square_threshold)}, Wu-Ma-E {v(self.wu_ma_e)} "
                f"(holds {v(self.wu_ma_e_holds)}), nonuniformity {v(self.nonuniformity)}"
            )
            for name, est in (("", self.sgd_lyapunov), (" stiff", self.sgd_lyapunov_stiff)):
                if est is not None:
                    lines.append(
                        f"  Lyapunov{name}: {est.value:.4g} "
                        f"[{est.ci[0]:.4g}, {est.ci[1]:.4g}] ({est.chains} chains × {est.steps})"
                    )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value
