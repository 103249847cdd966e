"""Numerical honesty of the curvature and linear-algebra engines.

1. Repeated eigenvalues: Lanczos must find every copy (or say it could not), never return
   ``[2, 2, 1.5]`` as converged for a triple top eigenvalue 2.
2. ``tol`` outside ``(0, 1)`` is refused (at ``tol >= 1`` any vector passes the residual test).
3. Trace intervals cover the trace at the stated 95% at small sample counts.
4. Wrong types and values of every argument of the public entry points: InvalidArgumentError
   (or its ShapeMismatchError subclass) naming the argument, before any product is spent.

Oracles: ``torch.linalg.eigvalsh`` of matrices built from a chosen spectrum, and the dense float64
Hessian from ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import gdscope as gs
from conftest import DT, make_mlp, regression_data
from gdscope.curvature import curvature_operator
from gdscope.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from gdscope.linalg import (
    CallableOperator,
    DenseOperator,
    Density,
    Estimate,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_tridiag,
    slq,
    spectral_sum,
)

NAN, INF = float("nan"), float("inf")


def with_spectrum(eigs, seed: int = 0, dtype=DT) -> torch.Tensor:
    """``Q diag(eigs) Qᵀ`` for a Haar-random orthogonal ``Q`` (exactly symmetric)."""
    eigs = torch.as_tensor(eigs, dtype=DT)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=DT))
    A = (Q * eigs) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def repeated_spectrum(mult: int) -> torch.Tensor:
    """``mult`` copies of 2 on top, of -3 at the bottom, a lone 1.5 and a bulk in [-1, 1]:
    ``P = 2·mult + 101`` > the default basis of 40, so thick restarts happen."""
    return torch.cat(
        [
            torch.full((mult,), 2.0, dtype=DT),
            torch.tensor([1.5], dtype=DT),
            torch.linspace(-1, 1, 100, dtype=DT),
            torch.full((mult,), -3.0, dtype=DT),
        ]
    )


def wanted(exact: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "largest":
        return exact.flip(0)[:k]
    if which == "smallest":
        return exact[:k]
    return torch.cat([exact[:k], exact[-k:]])


# ====================================================================== 1. repeated eigenvalues
@pytest.mark.parametrize("mult", [2, 3, 5])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("extra", [0, 1])
def test_lanczos_finds_every_copy_of_a_repeated_eigenvalue(mult, which, extra):
    """Multiplicity 2, 3, 5 at the top and the bottom, k = multiplicity (+1): every copy."""
    A = with_spectrum(repeated_spectrum(mult), seed=mult)
    exact = torch.linalg.eigvalsh(A)
    k = mult + extra
    res = lanczos(DenseOperator(A), k, which, tol=1e-10, return_vectors=True)
    assert res.converged and res.multiplicity_resolved is True, res
    assert torch.allclose(res.values, wanted(exact, which, k), rtol=0, atol=1e-8)
    V = res.vectors
    # distinct, orthonormal eigenvectors (not one copy found k times)
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1], dtype=DT), atol=1e-8)
    true = torch.linalg.vector_norm(A @ V - V * res.values, dim=0)
    assert torch.allclose(res.residuals, true, rtol=1e-6, atol=1e-12)
    assert bool((true <= 1e-10 * 3.0 * 1.01).all())


@pytest.mark.parametrize("mult", [2, 3, 5])
def test_lanczos_without_the_check_does_not_claim_convergence(mult):
    """The single-vector solve alone returns a wrong multiset ([2, 1.5, ...]): it must not be
    flagged converged."""
    A = with_spectrum(repeated_spectrum(mult), seed=mult)
    res = lanczos(DenseOperator(A), mult, "largest", tol=1e-10, verify_multiplicity=False)
    assert bool(res.converged_mask.all())  # every residual is small ...
    assert res.values[-1].item() < 1.9  # ... yet a copy of 2 is missing
    assert res.multiplicity_resolved is False and not res.converged
    assert "multiplicity" in res.note and "multiplicity not verified" in repr(res)


@pytest.mark.parametrize("block_size", [3, 4])
def test_lanczos_block_at_least_the_multiplicity_is_confirmed(block_size):
    A = with_spectrum(repeated_spectrum(3), seed=7)
    res = lanczos(DenseOperator(A), 3, "largest", tol=1e-10, block_size=block_size)
    assert res.converged and res.multiplicity_resolved is True
    assert torch.allclose(res.values, torch.full((3,), 2.0, dtype=DT), atol=1e-8)


def test_lanczos_budget_spent_on_the_check_is_not_converged():
    A = with_spectrum(repeated_spectrum(3), seed=3)
    first = lanczos(DenseOperator(A), 3, "largest", tol=1e-10, verify_multiplicity=False)
    res = lanczos(DenseOperator(A), 3, "largest", tol=1e-10, max_matvecs=first.matvecs + 5)
    assert res.matvecs <= first.matvecs + 5 + 1
    assert not res.converged and res.multiplicity_resolved is False
    assert res.stop_reason == "max_matvecs" and "budget" in res.note


def test_lanczos_one_value_per_end_needs_no_check():
    """k = 1 (per end): multiplicity cannot change the value; no extra products."""
    A = with_spectrum(repeated_spectrum(3), seed=4)
    a = lanczos(DenseOperator(A), 1, "both", tol=1e-10)
    b = lanczos(DenseOperator(A), 1, "both", tol=1e-10, verify_multiplicity=False)
    assert a.multiplicity_resolved is None and a.converged
    assert a.matvecs == b.matvecs
    assert torch.allclose(a.values, torch.tensor([-3.0, 2.0], dtype=DT), atol=1e-8)


def repeated_hessian_problem(top_mult: int = 3, bottom_mult: int = 3, d: int = 60, n: int = 80):
    """``Linear(d, 1, bias=False)`` with MSE on data whose ``XᵀX`` is built so that the
    Hessian ``2XᵀX/n`` has eigenvalues 2 (``top_mult`` times), 1.5, a bulk in [0.2, 1] and
    0.1 (``bottom_mult`` times)."""
    spec = torch.cat(
        [
            torch.full((top_mult,), 2.0, dtype=DT),
            torch.tensor([1.5], dtype=DT),
            torch.linspace(0.2, 1.0, d - top_mult - bottom_mult - 1, dtype=DT),
            torch.full((bottom_mult,), 0.1, dtype=DT),
        ]
    )
    g = torch.Generator().manual_seed(11)
    U, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=DT))  # orthonormal columns
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    X = U @ torch.diag(torch.sqrt(n * spec / 2)) @ R.T  # 2XᵀX/n = R diag(spec) Rᵀ
    Y = torch.randn(n, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False).to(DT)
    return gs.Problem(model, "mse", (X, Y)), model, X, Y


def autograd_hessian(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Dense float64 Hessian of the MSE loss by ``torch.autograd.functional.hessian``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return torch.nn.functional.mse_loss(functional_call(model, params, (X,)), Y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize(("which", "k"), [("largest", 3), ("smallest", 3), ("both", 3)])
def test_hessian_eigs_repeated_eigenvalue_matches_dense_hessian(which, k):
    prob, model, X, Y = repeated_hessian_problem()
    H = autograd_hessian(model, X, Y)
    exact = torch.linalg.eigvalsh(H)
    assert torch.allclose(exact[-3:], torch.full((3,), 2.0, dtype=DT), atol=1e-10)  # the setup
    res = gs.hessian_eigs(prob, k, which, tol=1e-10, return_vectors=True)
    assert res.converged and res.multiplicity_resolved is True, res
    assert torch.allclose(res.values, wanted(exact, which, k), rtol=0, atol=1e-8)
    r = torch.linalg.vector_norm(H @ res.vectors - res.vectors * res.values, dim=0)
    assert r.max() <= 1e-9 * 2.0
    # the unverified single-vector answer is not presented as converged
    quick = gs.hessian_eigs(prob, k, which, tol=1e-10, verify_multiplicity=False)
    assert not quick.converged and quick.multiplicity_resolved is False


def test_gd_map_lanczos_counts_every_copy_above_one_over_lr():
    """1/lr between 1.5 and 2: three eigenvalues (one triple) exceed it; sign det = −1."""
    prob, model, X, Y = repeated_hessian_problem()
    h = torch.linalg.eigvalsh(autograd_hessian(model, X, Y))
    lr = 1 / 1.75
    dense = gs.gd_map(prob, lr)
    assert dense.count_above == int((h > 1.75).sum()) == 3
    lz = gs.gd_map(prob, lr, dense_limit=0, slq_vectors=2, slq_steps=8)
    assert lz.method == "lanczos" and lz.determined, lz.note
    assert lz.count_above == 3 and lz.sign == -1


# ====================================================================== 2. tol
BAD_TOLS = [1.0, 1.05, 2, 1e6, 0.0, 0, -1e-6, NAN, INF, -INF, "1e-6", True, None, [1e-6]]


@pytest.mark.parametrize("tol", BAD_TOLS)
def test_lanczos_refuses_bad_tol(tol):
    op = DenseOperator(with_spectrum(repeated_spectrum(2)))
    with pytest.raises(InvalidArgumentError, match=r"\btol\b"):
        lanczos(op, 2, tol=tol)
    assert op.matvecs == 0


@pytest.fixture(scope="module")
def small_prob() -> gs.Problem:
    """``Linear(4, 3)``: P = 15."""
    X, Y = regression_data()
    torch.manual_seed(0)
    return gs.Problem(nn.Linear(4, 3).to(DT), "mse", (X, Y))


@pytest.mark.parametrize("tol", BAD_TOLS)
def test_hessian_eigs_refuses_bad_tol(small_prob, tol):
    with pytest.raises(InvalidArgumentError, match=r"\btol\b"):
        gs.hessian_eigs(small_prob, 1, tol=tol)


@pytest.mark.parametrize("tol", [1.0, 1.5, 0.0, -1.0, NAN, "small"])
def test_gd_map_refuses_bad_tol(small_prob, tol):
    with pytest.raises(InvalidArgumentError, match=r"\btol\b"):
        gs.gd_map(small_prob, 0.1, tol=tol)


def test_tol_just_below_one_is_a_valid_but_loose_answer():
    """The boundary: 0.99 is accepted (and honest about its residuals)."""
    A = with_spectrum(repeated_spectrum(2), seed=1)
    res = lanczos(DenseOperator(A), 1, tol=0.99)
    assert bool((res.residuals <= 0.99 * res.norm_estimate).all())


# ====================================================================== 3. trace intervals
def hessian_like(seed: int, P: int = 80, negative: bool = False) -> torch.Tensor:
    """A few outliers over a small bulk (the shape of a network Hessian's spectrum)."""
    g = torch.Generator().manual_seed(seed)
    bulk = 0.05 * torch.randn(P - 6, generator=g, dtype=DT)
    top = [20.0, 9.0, -5.0, -3.0, 2.0, 1.0] if negative else [20.0, 9.0, 5.0, 3.0, 2.0, 1.0]
    return with_spectrum(torch.cat([torch.tensor(top, dtype=DT), bulk]), seed=seed)


@pytest.fixture(scope="module")
def trace_matrices() -> dict[str, torch.Tensor]:
    X, Y = regression_data()
    mlp = gs.Problem(make_mlp(), "mse", (X, Y))
    return {
        "outliers": hessian_like(1),
        "indefinite": hessian_like(2, negative=True),
        "mlp_hessian": gs.dense_hessian(mlp),
    }


SEEDS = 400


def coverage(method, A: torch.Tensor, samples: int, level: float = 0.95) -> float:
    exact = A.trace().item()
    hits = 0
    for seed in range(SEEDS):
        lo, hi = method(DenseOperator(A), samples, seed=seed).interval(level)
        hits += lo <= exact <= hi
    return hits / SEEDS


# 400 seeds at a true 95%: the binomial 0.1% quantile is about 0.925
@pytest.mark.parametrize("name", ["outliers", "indefinite", "mlp_hessian"])
@pytest.mark.parametrize(("method", "samples"), [(hutchinson, 2), (hutchinson, 4), (hutchpp, 6)])
def test_trace_interval_coverage_small_samples(trace_matrices, name, method, samples):
    assert coverage(method, trace_matrices[name], samples) >= 0.93


@pytest.mark.slow
@pytest.mark.parametrize("name", ["outliers", "indefinite", "mlp_hessian"])
@pytest.mark.parametrize(
    ("method", "samples"),
    [(hutchinson, 3), (hutchinson, 6), (hutchinson, 10), (hutchpp, 7), (hutchpp, 9), (hutchpp, 15)],
)
def test_trace_interval_coverage_more_samples(trace_matrices, name, method, samples):
    assert coverage(method, trace_matrices[name], samples) >= 0.93


def test_the_old_normal_interval_undercovers(trace_matrices):
    """What was fixed: sample-variance standard errors with ±1.96 cover far less than 95%."""
    A = trace_matrices["outliers"]
    exact = A.trace().item()
    hits = 0
    for seed in range(SEEDS):
        g = torch.Generator().manual_seed(seed)
        Z = (2 * torch.randint(0, 2, (A.shape[0], 4), generator=g) - 1).to(DT)
        x = (Z * (A @ Z)).sum(0)
        hits += abs(x.mean().item() - exact) <= 1.96 * x.std().item() / 2
    assert hits / SEEDS < 0.9
    assert coverage(hutchinson, A, 4) >= 0.93


def test_hessian_trace_interval_uses_t_quantile(small_prob):
    H = gs.dense_hessian(small_prob)
    for method, samples, dof in (("hutchinson", 3, 2), ("hutch++", 6, 1)):
        est = gs.hessian_trace(small_prob, samples, method, seed=1)
        assert est.dof == dof
        lo, hi = est.interval(0.95)
        assert (hi - est.value) == pytest.approx(
            {1: 12.7062047, 2: 4.30265273}[dof] * est.stderr, rel=1e-6
        )
        assert lo <= H.trace().item() <= hi


def test_trace_exact_cases_have_zero_width():
    """Hutchinson on a diagonal matrix is exact (zero standard error); Hutch++ on a matrix of
    rank below samples/3 too."""
    D = torch.diag(torch.linspace(-1, 5, 40, dtype=DT))
    est = hutchinson(DenseOperator(D), 4, seed=0)
    assert est.value == pytest.approx(D.trace().item(), abs=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    B = torch.randn(50, 2, generator=g, dtype=DT)
    est = hutchpp(DenseOperator(B @ B.T), 9, seed=0)
    assert est.stderr <= 1e-10 and est.value == pytest.approx((B * B).sum().item(), rel=1e-10)


def test_slq_spectral_sum_interval_coverage():
    """SLQ trace (f = identity) with 3 vectors: the t interval on 2 dof covers."""
    A = hessian_like(3, P=60)
    exact = A.trace().item()
    hits = 0
    for seed in range(150):
        est = spectral_sum(slq(DenseOperator(A), 3, 20, seed=seed), lambda x: x)
        assert est.dof == 2
        lo, hi = est.interval()
        hits += lo <= exact <= hi
    assert hits / 150 >= 0.92


def test_one_slq_vector_has_an_infinite_interval():
    est = spectral_sum(slq(DenseOperator(hessian_like(4, P=30)), 1, 10), lambda x: x)
    assert est.stderr == math.inf and est.interval() == (-math.inf, math.inf)


# ====================================================================== 4. wrong types: operators
P_OP = 20


@pytest.fixture
def op() -> DenseOperator:
    return DenseOperator(with_spectrum(torch.linspace(-1, 3, P_OP, dtype=DT), seed=5))


def _vec(n: int = P_OP, **kw) -> torch.Tensor:
    return torch.ones(n, dtype=kw.pop("dtype", DT), **kw)


def _with(t: torch.Tensor, i: int, v: float) -> torch.Tensor:
    t = t.clone()
    t[i] = v
    return t


LANCZOS_BAD = [
    # k
    ("k", {"k": "a"}),
    ("k", {"k": 1.5}),
    ("k", {"k": 2.0}),
    ("k", {"k": True}),
    ("k", {"k": 0}),
    ("k", {"k": -1}),
    ("k", {"k": None}),
    ("k", {"k": [1]}),
    ("k", {"k": P_OP + 1}),
    ("k", {"k": P_OP // 2 + 1, "which": "both"}),
    # which
    ("which", {"which": "middle"}),
    ("which", {"which": "LA"}),
    ("which", {"which": "Largest"}),
    ("which", {"which": ""}),
    ("which", {"which": 1}),
    ("which", {"which": None}),
    # v0
    ("v0", {"v0": _vec(P_OP - 1)}),
    ("v0", {"v0": _vec(P_OP + 1)}),
    ("v0", {"v0": torch.ones(2, P_OP, dtype=DT)}),
    ("v0", {"v0": torch.ones(P_OP, 1, 1, dtype=DT)}),
    ("v0", {"v0": torch.ones(P_OP, dtype=torch.int64)}),
    ("v0", {"v0": torch.ones(P_OP, dtype=torch.complex128)}),
    ("v0", {"v0": torch.ones(P_OP, dtype=torch.bool)}),
    ("v0", {"v0": _with(_vec(), 3, NAN)}),
    ("v0", {"v0": _with(_vec(), 0, INF)}),
    ("v0", {"v0": torch.zeros(P_OP, dtype=DT)}),
    ("v0", {"v0": torch.cat([torch.ones(P_OP, 1), torch.zeros(P_OP, 1)], 1).double()}),
    ("v0", {"v0": [1.0] * P_OP}),
    ("v0", {"v0": np.ones(P_OP)}),
    ("v0", {"v0": "random"}),
    # block size, basis, budget
    ("block_size", {"block_size": 0}),
    ("block_size", {"block_size": -2}),
    ("block_size", {"block_size": 1.5}),
    ("block_size", {"block_size": "2"}),
    ("block_size", {"block_size": True}),
    ("max_basis", {"max_basis": 0}),
    ("max_basis", {"max_basis": 2.5}),
    ("max_basis", {"max_basis": "40"}),
    ("max_basis", {"k": 5, "max_basis": 5}),
    ("max_matvecs", {"max_matvecs": 0}),
    ("max_matvecs", {"max_matvecs": -5}),
    ("max_matvecs", {"max_matvecs": 1.5}),
    ("max_matvecs", {"max_matvecs": "100"}),
    # flags and seed
    ("return_vectors", {"return_vectors": "yes"}),
    ("return_vectors", {"return_vectors": 1}),
    ("return_vectors", {"return_vectors": None}),
    ("verify_multiplicity", {"verify_multiplicity": "no"}),
    ("verify_multiplicity", {"verify_multiplicity": 0}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 1.5}),
    ("seed", {"seed": "0"}),
    ("seed", {"seed": None}),
]


@pytest.mark.parametrize(("arg", "kwargs"), LANCZOS_BAD)
def test_lanczos_bad_arguments(op, arg, kwargs):
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        lanczos(op, **kwargs)
    assert op.matvecs == 0  # refused before any product


@pytest.mark.parametrize("bad_op", ["op", None, torch.eye(3, dtype=DT), np.eye(3), 3])
def test_solvers_refuse_a_non_operator(bad_op):
    for fn in (lanczos, hutchinson, hutchpp, slq):
        with pytest.raises(InvalidArgumentError, match=r"\bop\b"):
            fn(bad_op)


TRACE_BAD = [
    (hutchinson, "samples", {"samples": 1}),
    (hutchinson, "samples", {"samples": 0}),
    (hutchinson, "samples", {"samples": -3}),
    (hutchinson, "samples", {"samples": 2.5}),
    (hutchinson, "samples", {"samples": 64.0}),
    (hutchinson, "samples", {"samples": "64"}),
    (hutchinson, "samples", {"samples": True}),
    (hutchinson, "samples", {"samples": None}),
    (hutchinson, "seed", {"seed": -1}),
    (hutchinson, "seed", {"seed": "0"}),
    (hutchinson, "block", {"block": 0}),
    (hutchinson, "block", {"block": 1.5}),
    (hutchpp, "samples", {"samples": 5}),
    (hutchpp, "samples", {"samples": 0}),
    (hutchpp, "samples", {"samples": 6.0}),
    (hutchpp, "samples", {"samples": "6"}),
    (hutchpp, "samples", {"samples": True}),
    (hutchpp, "seed", {"seed": 1.5}),
    (slq, "num_vectors", {"num_vectors": 0}),
    (slq, "num_vectors", {"num_vectors": 1.5}),
    (slq, "num_vectors", {"num_vectors": "8"}),
    (slq, "num_vectors", {"num_vectors": True}),
    (slq, "steps", {"steps": 0}),
    (slq, "steps", {"steps": -2}),
    (slq, "steps", {"steps": "64"}),
    (slq, "seed", {"seed": None}),
]


@pytest.mark.parametrize(("fn", "arg", "kwargs"), TRACE_BAD)
def test_trace_and_density_bad_arguments(op, fn, arg, kwargs):
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        fn(op, **kwargs)
    assert op.matvecs == 0


@pytest.mark.parametrize(
    ("arg", "v0", "steps"),
    [
        ("v0", _vec(P_OP - 1), 5),
        ("v0", _with(_vec(), 2, NAN), 5),
        ("v0", torch.zeros(P_OP, dtype=DT), 5),
        ("v0", torch.ones(P_OP, dtype=torch.int32), 5),
        ("v0", None, 5),
        ("v0", torch.ones(P_OP, 2, dtype=DT), 5),
        ("steps", _vec(), 0),
        ("steps", _vec(), 1.5),
        ("steps", _vec(), "10"),
    ],
)
def test_lanczos_tridiag_bad_arguments(op, arg, v0, steps):
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        lanczos_tridiag(op, v0, steps)


@pytest.mark.parametrize(
    ("arg", "density", "f"),
    [
        ("density", "d", lambda x: x),
        ("density", None, lambda x: x),
        ("density", {"nodes": []}, lambda x: x),
        ("f", "real", "log"),
        ("f", "real", None),
        ("f", "real", lambda x: 1.0),
        ("f", "real", lambda x: x[:1]),
    ],
)
def test_spectral_sum_bad_arguments(op, arg, density, f):
    if density == "real":
        density = slq(op, 2, 5)
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        spectral_sum(density, f)


@pytest.mark.parametrize(
    ("exc", "matrix"),
    [
        (InvalidArgumentError, "matrix"),
        (InvalidArgumentError, np.eye(3)),
        (InvalidArgumentError, [[1.0, 0.0], [0.0, 1.0]]),
        (InvalidArgumentError, torch.eye(3, dtype=torch.int64)),
        (InvalidArgumentError, torch.eye(3, dtype=torch.complex128)),
        (ShapeMismatchError, torch.zeros(3, 4, dtype=DT)),
        (ShapeMismatchError, torch.zeros(3, dtype=DT)),
        (ShapeMismatchError, torch.zeros(2, 2, 2, dtype=DT)),
        (InvalidArgumentError, _with(torch.eye(3, dtype=DT).reshape(-1), 4, NAN).reshape(3, 3)),
        (InvalidArgumentError, torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=DT)),  # asymmetric
    ],
)
def test_dense_operator_bad_matrix(exc, matrix):
    with pytest.raises(exc, match=r"\bmatrix\b"):
        DenseOperator(matrix)


@pytest.mark.parametrize(
    ("arg", "kwargs"),
    [
        ("fn", {"fn": "f"}),
        ("fn", {"fn": None}),
        ("size", {"size": 0}),
        ("size", {"size": -4}),
        ("size", {"size": 1.5}),
        ("size", {"size": "10"}),
        ("dtype", {"dtype": torch.int64}),
        ("dtype", {"dtype": "float64"}),
        ("dtype", {"dtype": np.float64}),
        ("device", {"device": "no-such-device"}),
        ("device", {"device": 1.5}),
        ("device", {"device": None}),
        ("block_fn", {"block_fn": "vmap"}),
    ],
)
def test_callable_operator_bad_arguments(arg, kwargs):
    args = {"fn": lambda v: v, "size": 10, "dtype": DT, "device": "cpu"} | kwargs
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        CallableOperator(**args)


@pytest.mark.parametrize(
    ("arg", "kwargs"),
    [
        ("level", {"level": 0.0}),
        ("level", {"level": 1.0}),
        ("level", {"level": 95}),
        ("level", {"level": -0.5}),
        ("level", {"level": NAN}),
        ("level", {"level": "0.95"}),
        ("level", {"level": True}),
        ("z", {"z": -1.0}),
        ("z", {"z": "2"}),
        ("z", {"z": NAN}),
    ],
)
def test_estimate_interval_bad_arguments(arg, kwargs):
    est = Estimate(1.0, 0.1, 8, 8, 0.0, "hutchinson", 7)
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        est.interval(**kwargs)


@pytest.mark.parametrize(
    ("arg", "call"),
    [
        ("grid", lambda d: d.pdf([0.0, 1.0])),
        ("grid", lambda d: d.pdf(None)),
        ("sigma", lambda d: d.pdf(torch.linspace(0, 1, 5), 0.0)),
        ("sigma", lambda d: d.pdf(torch.linspace(0, 1, 5), -1.0)),
        ("sigma", lambda d: d.pdf(torch.linspace(0, 1, 5), NAN)),
        ("sigma", lambda d: d.pdf(torch.linspace(0, 1, 5), "0.1")),
        ("lo", lambda d: d.mass("a", 1.0)),
        ("lo", lambda d: d.mass(NAN, 1.0)),
        ("hi", lambda d: d.mass(0.0, None)),
        ("lo", lambda d: d.mass(2.0, 1.0)),
    ],
)
def test_density_bad_arguments(op, arg, call):
    d = slq(op, 2, 5)
    assert isinstance(d, Density)
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        call(d)


# ====================================================================== 4. wrong types: curvature
P_SMALL = 15  # Linear(4, 3)

HESSIAN_EIGS_BAD = [
    ("k", {"k": "a"}),
    ("k", {"k": 1.5}),
    ("k", {"k": 0}),
    ("k", {"k": -2}),
    ("k", {"k": True}),
    ("k", {"k": None}),
    ("k", {"k": P_SMALL + 1}),
    ("k", {"k": P_SMALL // 2 + 1, "which": "both"}),
    ("which", {"which": "top"}),
    ("which", {"which": None}),
    ("which", {"which": 3}),
    ("v0", {"v0": _vec(P_SMALL - 1)}),
    ("v0", {"v0": _with(_vec(P_SMALL), 0, NAN)}),
    ("v0", {"v0": torch.ones(P_SMALL, dtype=torch.int64)}),
    ("v0", {"v0": torch.ones(P_SMALL, dtype=torch.complex64)}),
    ("v0", {"v0": torch.zeros(P_SMALL, dtype=DT)}),
    ("v0", {"v0": [0.0] * P_SMALL}),
    ("block_size", {"block_size": 0}),
    ("max_matvecs", {"max_matvecs": 0}),
    ("seed", {"seed": "s"}),
    ("return_vectors", {"return_vectors": "yes"}),
    ("verify_multiplicity", {"verify_multiplicity": None}),
    ("curvature", {"curvature": "fisher"}),
    ("curvature", {"curvature": 1}),
]


@pytest.mark.parametrize(("arg", "kwargs"), HESSIAN_EIGS_BAD)
def test_hessian_eigs_bad_arguments(small_prob, arg, kwargs):
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        gs.hessian_eigs(small_prob, **kwargs)


def _bad_params(prob: gs.Problem) -> list[tuple[type[Exception], object]]:
    p = prob.params
    w = p["weight"]
    return [
        (InvalidArgumentError, [w, p["bias"]]),
        (InvalidArgumentError, torch.cat([w.reshape(-1), p["bias"]])),
        (InvalidArgumentError, "weight"),
        (InvalidArgumentError, {"weights": w}),
        (InvalidArgumentError, {"weight": w, "extra": w}),
        (InvalidArgumentError, {"weight": "w"}),
        (InvalidArgumentError, {"weight": w.numpy()}),
        (InvalidArgumentError, {"weight": w.long()}),
        (InvalidArgumentError, {"weight": w.to(torch.complex128)}),
        (ShapeMismatchError, {"weight": w.T}),
        (ShapeMismatchError, {"weight": w.reshape(-1)}),
        (NonFiniteError, {"weight": _with(w.reshape(-1), 0, NAN).reshape(w.shape)}),
        (NonFiniteError, {"bias": torch.full_like(p["bias"], INF)}),
    ]


N_BAD_PARAMS = 13


@pytest.mark.parametrize("i", range(N_BAD_PARAMS))
@pytest.mark.parametrize(
    "call",
    [
        lambda prob, params: gs.hessian_eigs(prob, 1, params=params),
        lambda prob, params: gs.hessian_trace(prob, 6, params=params),
        lambda prob, params: gs.hessian_density(prob, 1, 3, params=params),
        lambda prob, params: gs.gd_map(prob, 0.1, params=params),
        lambda prob, params: gs.dense_hessian(prob, params),
        lambda prob, params: curvature_operator(prob, params=params),
    ],
    ids=["hessian_eigs", "hessian_trace", "hessian_density", "gd_map", "dense_hessian", "op"],
)
def test_curvature_bad_params(small_prob, call, i):
    bad = _bad_params(small_prob)
    assert len(bad) == N_BAD_PARAMS
    exc, params = bad[i]
    with pytest.raises(exc, match=r"\bparams\b"):
        call(small_prob, params)


def test_partial_params_keep_the_other_parameters(small_prob):
    """A subset of the parameters is a valid ``params``: the rest keep their values."""
    w = small_prob.params["weight"] + 0.5
    full = dict(small_prob.params, weight=w)
    a = gs.dense_hessian(small_prob, {"weight": w})
    b = gs.dense_hessian(small_prob, full)
    assert torch.equal(a, b)


CURVATURE_BAD = [
    (gs.hessian_trace, "samples", {"samples": 1, "method": "hutchinson"}),
    (gs.hessian_trace, "samples", {"samples": 5}),
    (gs.hessian_trace, "samples", {"samples": 0}),
    (gs.hessian_trace, "samples", {"samples": -3}),
    (gs.hessian_trace, "samples", {"samples": 1.5}),
    (gs.hessian_trace, "samples", {"samples": "64"}),
    (gs.hessian_trace, "samples", {"samples": True}),
    (gs.hessian_trace, "samples", {"samples": None}),
    (gs.hessian_trace, "method", {"method": "exact"}),
    (gs.hessian_trace, "method", {"method": None}),
    (gs.hessian_trace, "method", {"method": "Hutch++"}),
    (gs.hessian_trace, "method", {"method": 2}),
    (gs.hessian_trace, "seed", {"seed": -1}),
    (gs.hessian_trace, "curvature", {"curvature": "fisher"}),
    (gs.hessian_density, "num_vectors", {"num_vectors": 0}),
    (gs.hessian_density, "num_vectors", {"num_vectors": -1}),
    (gs.hessian_density, "num_vectors", {"num_vectors": 2.5}),
    (gs.hessian_density, "num_vectors", {"num_vectors": "8"}),
    (gs.hessian_density, "num_vectors", {"num_vectors": True}),
    (gs.hessian_density, "steps", {"steps": 0}),
    (gs.hessian_density, "steps", {"steps": 1.5}),
    (gs.hessian_density, "steps", {"steps": None}),
    (gs.hessian_density, "seed", {"seed": "0"}),
    (gs.dense_hessian, "max_params", {"max_params": 0}),
    (gs.dense_hessian, "max_params", {"max_params": "5000"}),
    (gs.dense_hessian, "max_params", {"max_params": 1.5}),
    (gs.dense_hessian, "max_params", {"max_params": P_SMALL - 1}),
    (curvature_operator, "curvature", {"curvature": "fisher"}),
    (curvature_operator, "curvature", {"curvature": None}),
    (curvature_operator, "cache_graph", {"cache_graph": "yes"}),
    (curvature_operator, "check", {"check": "no"}),
]


@pytest.mark.parametrize(("fn", "arg", "kwargs"), CURVATURE_BAD)
def test_curvature_bad_arguments(small_prob, fn, arg, kwargs):
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        fn(small_prob, **kwargs)


GD_MAP_BAD = [
    ("lr", {"lr": 0}),
    ("lr", {"lr": 0.0}),
    ("lr", {"lr": -0.1}),
    ("lr", {"lr": NAN}),
    ("lr", {"lr": INF}),
    ("lr", {"lr": "0.1"}),
    ("lr", {"lr": None}),
    ("lr", {"lr": True}),
    ("lr", {"lr": [0.1]}),
    ("lr", {"lr": 1j}),
    ("lr", {"lr": torch.tensor([0.1, 0.2])}),
    ("dense_limit", {"lr": 0.1, "dense_limit": -1}),
    ("dense_limit", {"lr": 0.1, "dense_limit": 1.5}),
    ("dense_limit", {"lr": 0.1, "dense_limit": "10"}),
    ("max_count", {"lr": 0.1, "max_count": 0}),
    ("max_count", {"lr": 0.1, "max_count": 2.5}),
    ("slq_vectors", {"lr": 0.1, "slq_vectors": 0}),
    ("slq_vectors", {"lr": 0.1, "slq_vectors": "16"}),
    ("slq_steps", {"lr": 0.1, "slq_steps": 0}),
    ("slq_steps", {"lr": 0.1, "slq_steps": None}),
    ("seed", {"lr": 0.1, "seed": -3}),
]


@pytest.mark.parametrize(("arg", "kwargs"), GD_MAP_BAD)
def test_gd_map_bad_arguments(small_prob, arg, kwargs):
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        gs.gd_map(small_prob, **kwargs)


def test_gd_map_accepts_numpy_and_int_step_sizes(small_prob):
    a = gs.gd_map(small_prob, np.float32(0.25))
    b = gs.gd_map(small_prob, 1)
    assert a.lr == pytest.approx(0.25) and b.lr == 1.0


@pytest.mark.parametrize("prob", ["prob", None, nn.Linear(2, 1), (torch.ones(2), torch.ones(2))])
@pytest.mark.parametrize(
    "call",
    [
        lambda p: gs.hessian_eigs(p),
        lambda p: gs.hessian_trace(p),
        lambda p: gs.hessian_density(p),
        lambda p: gs.gd_map(p, 0.1),
        lambda p: gs.dense_hessian(p),
        lambda p: curvature_operator(p),
    ],
    ids=["hessian_eigs", "hessian_trace", "hessian_density", "gd_map", "dense_hessian", "op"],
)
def test_curvature_refuses_a_non_problem(prob, call):
    with pytest.raises(InvalidArgumentError, match=r"\bprob\b"):
        call(prob)
