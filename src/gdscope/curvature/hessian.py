"""Spectrum, trace and density of the loss Hessian (or GGN) of a Problem.

All three are matrix-free (:mod:`gdscope.linalg` over :func:`curvature_operator`); the dense
Hessian is offered for small models as the oracle tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gdscope.curvature.products import curvature_operator
from gdscope.errors import InvalidArgumentError
from gdscope.linalg import Density, EigResult, Estimate, hutchinson, hutchpp, lanczos, slq
from gdscope.problem import Params, Problem

__all__ = ["dense_hessian", "hessian_density", "hessian_eigs", "hessian_trace"]

TRACE_METHODS = ("hutch++", "hutchinson")


def hessian_eigs(
    prob: Problem,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-6,
    *,
    return_vectors: bool = False,
    curvature: str = "hessian",
    params: Params | None = None,
    v0: Tensor | None = None,
    block_size: int = 1,
    max_matvecs: int | None = None,
    seed: int = 0,
) -> EigResult:
    """``k`` extreme eigenvalues of ``∇²L`` (or the GGN) by Lanczos.

    ``which`` is ``"largest"`` (sharpness is ``values[0]``), ``"smallest"`` or ``"both"``;
    ``tol`` bounds the relative residual ``‖Hv − λv‖/‖H‖``. ``v0`` warm-starts from a previous
    eigenvector. An unconverged result says so (``converged`` False) and its values are bounds.

    >>> import torch; from torch import nn; import gdscope as gs
    >>> X = torch.randn(20, 3, dtype=torch.float64); Y = torch.randn(20, 1, dtype=torch.float64)
    >>> prob = gs.Problem(nn.Linear(3, 1).double(), "mse", (X, Y))
    >>> exact = torch.linalg.eigvalsh(2 * torch.cat([X, torch.ones(20, 1)], 1).T
    ...                               @ torch.cat([X, torch.ones(20, 1)], 1) / 20)[-1]
    >>> abs(gs.hessian_eigs(prob, tol=1e-10).values[0] - exact).item() < 1e-8
    True
    """
    if k > prob.num_params * (0.5 if which == "both" else 1):
        raise InvalidArgumentError(
            f"k={k} exceeds the model's {prob.num_params} parameters: ask for at most "
            f"{prob.num_params if which != 'both' else prob.num_params // 2} eigenvalues."
        )
    op = curvature_operator(prob, curvature, params=params)
    return lanczos(
        op,
        k,
        which,
        tol,
        v0=v0,
        block_size=block_size,
        max_matvecs=max_matvecs,
        return_vectors=return_vectors,
        seed=seed,
    )


def hessian_trace(
    prob: Problem,
    samples: int = 64,
    method: str = "hutch++",
    *,
    curvature: str = "hessian",
    params: Params | None = None,
    seed: int = 0,
) -> Estimate:
    """``tr ∇²L`` (or of the GGN) by Hutch++ or Hutchinson, with a standard error."""
    if method not in TRACE_METHODS:
        raise InvalidArgumentError(
            f"method={method!r} is not a trace method: use one of {TRACE_METHODS}."
        )
    op = curvature_operator(prob, curvature, params=params)
    if method == "hutch++":
        return hutchpp(op, samples, seed=seed)
    return hutchinson(op, samples, seed=seed)


def hessian_density(
    prob: Problem,
    num_vectors: int = 8,
    steps: int = 64,
    *,
    curvature: str = "hessian",
    params: Params | None = None,
    seed: int = 0,
) -> Density:
    """Spectral density of ``∇²L`` by stochastic Lanczos quadrature (see ``linalg.slq``)."""
    op = curvature_operator(prob, curvature, params=params)
    return slq(op, num_vectors, steps, seed=seed)


def dense_hessian(prob: Problem, params: Params | None = None, max_params: int = 5000) -> Tensor:
    """The dense ``P × P`` Hessian ``∇²L`` (columns by HVPs); refuses ``P > max_params``."""
    P = prob.num_params
    if max_params < P:
        raise InvalidArgumentError(
            f"the model has {P} parameters; a dense Hessian needs {P}² numbers. Raise "
            f"max_params (now {max_params}) if it fits in memory, or use hessian_eigs."
        )
    op = curvature_operator(prob, "hessian", params=params)
    H = op.matmat(torch.eye(P, dtype=prob.dtype, device=prob.device))
    return 0.5 * (H + H.T)
