"""NTK-vector products and the NTK spectrum against dense float64 oracles (``jacrev`` J)."""

from __future__ import annotations

import math

import pytest
import torch

import gdscope as gs
from conftest import image_data, make_cnn, make_mlp, regression_data
from gdscope.curvature import curvature_operator
from gdscope.errors import InvalidArgumentError, NonDeterministicError
from gdscope.kernels.eigs import NTKEigResult, ntk_eigs
from gdscope.kernels.operator import ntk_operator

DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _trace_blocks(K: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return K.reshape(n, k, n, k).diagonal(dim1=1, dim2=3).sum(-1)


# ------------------------------------------------------------------------------ ntk_operator
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_operator_on_identity_is_dense_jjt(arch, oracle):
    model, X = (
        (make_mlp(), regression_data(n=12)[0])
        if arch == "mlp"
        else (make_cnn(), image_data(n=8)[0])
    )
    J = oracle.jacobian(model, X)
    op = ntk_operator(model, X)
    assert op.shape == (J.shape[0], J.shape[0]) and op.dtype == DT
    K = op.matmat(torch.eye(J.shape[0], dtype=DT))
    assert _rel(K, J @ J.T) < 1e-10
    assert op.matvecs == J.shape[0]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_trace_operator_is_sum_of_diagonal_blocks(arch, oracle):
    model, X = (
        (make_mlp(), regression_data(n=12)[0])
        if arch == "mlp"
        else (make_cnn(), image_data(n=8)[0])
    )
    J = oracle.jacobian(model, X)
    n = X.shape[0]
    k = J.shape[0] // n
    op = ntk_operator(model, X, trace_outputs=True)
    assert op.shape == (n, n)
    Ktr = op.matmat(torch.eye(n, dtype=DT))
    assert _rel(Ktr, _trace_blocks(J @ J.T, n, k)) < 1e-10


def test_operator_snapshots_parameters(oracle):
    model = make_mlp()
    X = regression_data(n=6)[0]
    K0 = oracle.jacobian(model, X)
    K0 = K0 @ K0.T
    op = ntk_operator(model, X)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    assert _rel(op.matmat(torch.eye(K0.shape[0], dtype=DT)), K0) < 1e-10


def test_operator_float32_model(oracle):
    model = make_mlp()
    X = regression_data(n=6)[0]
    J = oracle.jacobian(model, X)
    op = ntk_operator(model.float(), X.float())
    assert op.dtype == torch.float32
    K = op.matmat(torch.eye(J.shape[0])).double()
    assert _rel(K, J @ J.T) < 1e-5


# ------------------------------------------------------------------------------ ntk_eigs
@pytest.mark.parametrize("trace", [False, True])
@pytest.mark.parametrize("which", ["smallest", "largest", "both"])
@pytest.mark.parametrize("dense_limit", [2000, 0], ids=["dense", "lanczos"])
def test_ntk_eigs_matches_eigvalsh(which, dense_limit, trace, oracle):
    model = make_mlp()
    X = regression_data(n=8)[0]  # nk = 24 < P = 165: K is positive definite
    J = oracle.jacobian(model, X)
    K = J @ J.T
    if trace:
        K = _trace_blocks(K, 8, 3)
    ref = torch.linalg.eigvalsh(K)
    res = ntk_eigs(model, X, k=2, which=which, trace_outputs=trace, dense_limit=dense_limit)
    assert isinstance(res, NTKEigResult)
    assert res.method == ("dense" if dense_limit else "lanczos")
    assert res.size == K.shape[0] and res.trace_outputs is trace
    assert res.converged and not res.lambda_min_is_upper_bound
    scale = float(ref[-1])
    if which == "smallest":
        expect = ref[:2]
    elif which == "largest":
        expect = ref.flip(0)[:2]
    else:
        expect = torch.cat([ref[:2], ref[-2:]])
    assert res.values.shape == expect.shape
    assert float((res.values.double().cpu() - expect).abs().max()) < 1e-7 * scale
    if res.lambda_min is not None:
        assert res.lambda_min == pytest.approx(float(ref[0]), rel=1e-6)
        assert res.singular is False
    if res.lambda_max is not None:
        assert res.lambda_max == pytest.approx(float(ref[-1]), rel=1e-9)
    if res.condition_number is not None:
        assert res.condition_number == pytest.approx(float(ref[-1] / ref[0]), rel=1e-6)
        assert not res.condition_number_is_lower_bound


def test_lanczos_reports_only_the_requested_end():
    model = make_mlp()
    X = regression_data(n=8)[0]
    small = ntk_eigs(model, X, which="smallest", dense_limit=0)
    large = ntk_eigs(model, X, which="largest", dense_limit=0)
    assert small.lambda_max is None and small.condition_number is None
    assert large.lambda_min is None and large.singular is None


@pytest.mark.parametrize("dense_limit", [2000, 0], ids=["dense", "lanczos"])
def test_singular_kernel_reports_zero(dense_limit, oracle):
    model = make_mlp(sizes=(4, 2, 1))  # P = 13 parameters
    X = regression_data(n=30)[0]  # nk = 30 > P: rank(K) <= 13
    P = sum(p.numel() for p in model.parameters())
    assert X.shape[0] > P
    J = oracle.jacobian(model, X)
    ref = torch.linalg.eigvalsh(J @ J.T)
    assert abs(float(ref[0])) < 1e-12 * float(ref[-1])  # the oracle agrees: singular
    res = ntk_eigs(model, X, which="both", dense_limit=dense_limit)
    assert res.singular is True
    assert res.lambda_min == 0.0  # clipped, not a tiny negative
    assert res.condition_number == math.inf
    assert not res.condition_number_is_lower_bound
    assert res.lambda_max == pytest.approx(float(ref[-1]), rel=1e-8)
    assert "singular" in repr(res)


def test_unconverged_lanczos_flags_bounds(oracle):
    model = make_mlp()
    X = regression_data(n=12)[0]
    J = oracle.jacobian(model, X)
    ref = torch.linalg.eigvalsh(J @ J.T)
    res = ntk_eigs(model, X, which="both", dense_limit=0, max_matvecs=4)
    assert res.method == "lanczos" and not res.converged
    assert res.eig.matvecs <= 4
    assert res.lambda_min_is_upper_bound and res.lambda_max_is_lower_bound
    assert res.condition_number_is_lower_bound
    # Ritz values lie inside the spectrum: the bounds go the stated way
    assert res.lambda_min >= float(ref[0])
    assert res.lambda_max <= float(ref[-1]) * (1 + 1e-12)
    assert res.condition_number <= float(ref[-1] / ref[0])
    text = repr(res)
    assert "upper bound" in text and "lower bound" in text and "not converged" in text
    # the stated bound on K's λ_min is the Ritz value plus the resolution, never below 0
    bound = max(res.lambda_min + res.lambda_min_error, 0.0)
    assert f"λ_min ≤ {bound:.6g}" in text and f"Ritz value {res.lambda_min:.6g}" in text
    assert bound >= float(ref[0])


def test_unconverged_bound_at_round_off_is_not_negative():
    """A Ritz value below 0 (round-off in a singular float32 kernel) is not shown as the bound:
    K's λ_min is in [0, θ + δ]."""
    from dataclasses import replace

    model = make_mlp()
    X = regression_data(n=12)[0]
    res = ntk_eigs(model, X, which="both", dense_limit=0, max_matvecs=4)
    odd = replace(res, lambda_min=-1.4e-7, lambda_min_error=3e-6)
    assert "λ_min ≤ 2.86e-06" in repr(odd) and "Ritz value -1.4e-07" in repr(odd)


def test_ggn_nonzero_spectrum_is_q_times_ntk_spectrum(oracle):
    X, Y = regression_data(n=6)
    model = make_mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    n, k = Y.shape
    assert prob.q == pytest.approx(2.0 / (n * k))
    P = prob.num_params
    G = curvature_operator(prob, "ggn").matmat(torch.eye(P, dtype=DT))
    J = oracle.jacobian(model, X)
    assert _rel(G, prob.q * J.T @ J) < 1e-10  # the GGN is q JᵀJ for PyTorch's mse_loss
    ggn = torch.linalg.eigvalsh(0.5 * (G + G.T)).flip(0)
    res = ntk_eigs(model, X, k=n * k, which="largest")
    assert float((prob.q * res.values - ggn[: n * k]).abs().max()) < 1e-10 * float(ggn[0])
    assert float(ggn[n * k :].abs().max()) < 1e-10 * float(ggn[0])  # the rest is zero


def test_float32_model_raises_tolerance():
    model = make_mlp().float()
    X = regression_data(n=6)[0].float()
    res = ntk_eigs(model, X, which="both", tol=1e-12)
    assert res.tol == pytest.approx(10 * torch.finfo(torch.float32).eps)
    assert res.eig.values.dtype == torch.float64  # dense eigh in float64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"which": "middle"},
        {"k": 0},
        {"k": 100},
        {"tol": 0.0},
        {"tol": float("nan")},
        {"dense_limit": -1},
    ],
)
def test_bad_arguments(kwargs):
    model = make_mlp()
    X = regression_data(n=4)[0]
    with pytest.raises(InvalidArgumentError):
        ntk_eigs(model, X, **kwargs)


def test_empty_inputs():
    with pytest.raises(InvalidArgumentError, match="empty"):
        ntk_operator(make_mlp(), torch.zeros(0, 4, dtype=DT))
    with pytest.raises(InvalidArgumentError, match="empty"):
        ntk_eigs(make_mlp(), torch.zeros(0, 4, dtype=DT))


def test_train_mode_dropout_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    X = regression_data(n=4)[0].float()
    with pytest.raises(NonDeterministicError, match="eval"):
        ntk_operator(model, X)
    with pytest.raises(NonDeterministicError):
        ntk_eigs(model, X, dense_limit=0)
    model.eval()
    assert ntk_eigs(model, X, dense_limit=0).lambda_min > 0
