"""Spectrum, trace and density of the loss Hessian (or GGN) of a Problem.

All three are matrix-free (:mod:`gdscope.linalg` over :func:`curvature_operator`); the dense
Hessian is offered for small models as the oracle tests compare against.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from gdscope.curvature.products import check_params, check_problem, curvature_operator
from gdscope.errors import InvalidArgumentError
from gdscope.linalg import Density, EigResult, Estimate, hutchinson, hutchpp, lanczos, slq
from gdscope.linalg._validate import (
    check_bool,
    check_choice,
    check_int,
    check_optional_int,
    check_seed,
    check_tol,
    check_vector,
)
from gdscope.linalg.lanczos import WHICH
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
    verify_multiplicity: bool = True,
) -> EigResult:
    """``k`` extreme eigenvalues of ``∇²L`` (or the GGN) by Lanczos.

    ``which`` is ``"largest"`` (sharpness is ``values[0]``), ``"smallest"`` or ``"both"``;
    ``tol`` bounds the relative residual ``‖Hv − λv‖/‖H‖``. ``v0`` warm-starts from a previous
    eigenvector. An unconverged result says so (``converged`` False) and its values are bounds.
    With ``k >= 2`` the multiplicities are confirmed by deflated restarts (a repeated top
    eigenvalue is found as often as it occurs; see :mod:`gdscope.linalg.lanczos`); a result
    whose multiset could not be confirmed has ``multiplicity_resolved=False`` and is not
    ``converged``.

    >>> import torch; from torch import nn; import gdscope as gs
    >>> X = torch.randn(20, 3, dtype=torch.float64); Y = torch.randn(20, 1, dtype=torch.float64)
    >>> prob = gs.Problem(nn.Linear(3, 1).double(), "mse", (X, Y))
    >>> exact = torch.linalg.eigvalsh(2 * torch.cat([X, torch.ones(20, 1)], 1).T
    ...                               @ torch.cat([X, torch.ones(20, 1)], 1) / 20)[-1]
    >>> abs(gs.hessian_eigs(prob, tol=1e-10).values[0] - exact).item() < 1e-8
    True
    """
    check_problem(prob)
    which = check_choice("which", which, WHICH)
    P = prob.num_params
    limit = P // 2 if which == "both" else P
    k = check_int("k", k, 1)
    if k > limit:
        raise InvalidArgumentError(
            f"k={k} exceeds what the model's {P} parameters allow for which={which!r}: ask for "
            f"k <= {limit}."
        )
    check_tol(tol)
    check_bool("return_vectors", return_vectors)
    check_bool("verify_multiplicity", verify_multiplicity)
    check_int("block_size", block_size, 1)
    check_optional_int("max_matvecs", max_matvecs, 1)
    check_seed(seed)
    if v0 is not None:
        check_vector("v0", v0, P, block=True)
    check_params(prob, params)
    op = curvature_operator(prob, curvature, params=params)
    res = lanczos(
        op,
        k,
        which,
        tol,
        v0=v0,
        block_size=block_size,
        max_matvecs=max_matvecs,
        return_vectors=return_vectors,
        seed=seed,
        verify_multiplicity=verify_multiplicity,
    )
    return dataclasses.replace(res, notes=res.notes + tuple(prob.notes)) if prob.notes else res


def hessian_trace(
    prob: Problem,
    samples: int = 64,
    method: str = "hutch++",
    *,
    curvature: str = "hessian",
    params: Params | None = None,
    seed: int = 0,
) -> Estimate:
    """``tr ∇²L`` (or of the GGN) by Hutch++ (``samples >= 6``) or Hutchinson
    (``samples >= 2``), with a standard error and degrees of freedom.

    ``est.interval(0.95)`` is ``value ± t·stderr`` (Student-t on ``est.dof``); the standard
    error is the larger of the sample one and an unbiased estimate of the exact Rademacher
    variance from the same products, so that it holds at a few samples and on spectra with
    outliers (:mod:`gdscope.linalg.trace`).
    """
    check_problem(prob)
    method = check_choice("method", method, TRACE_METHODS)
    minimum = 6 if method == "hutch++" else 2
    if isinstance(samples, int) and not isinstance(samples, bool) and samples < minimum:
        raise InvalidArgumentError(
            f"samples={samples} is too few for method={method!r}: a standard error needs at "
            f"least {minimum}; pass samples={minimum} or more."
        )
    check_int("samples", samples, minimum)
    check_seed(seed)
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
    check_problem(prob)
    check_int("num_vectors", num_vectors, 1)
    check_int("steps", steps, 1)
    check_seed(seed)
    op = curvature_operator(prob, curvature, params=params)
    return slq(op, num_vectors, steps, seed=seed)


def dense_hessian(prob: Problem, params: Params | None = None, max_params: int = 5000) -> Tensor:
    """The dense ``P × P`` Hessian ``∇²L`` (columns by HVPs); refuses ``P > max_params``."""
    check_problem(prob)
    P = prob.num_params
    max_params = check_int("max_params", max_params, 1)
    if max_params < P:
        raise InvalidArgumentError(
            f"the model has {P} parameters; a dense Hessian needs {P}² numbers. Raise "
            f"max_params (now {max_params}) if it fits in memory, or use hessian_eigs."
        )
    op = curvature_operator(prob, "hessian", params=params)
    H = op.matmat(torch.eye(P, dtype=prob.dtype, device=prob.device))
    return 0.5 * (H + H.T)
