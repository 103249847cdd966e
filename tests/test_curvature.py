"""gdscope.curvature: Hessian / GGN operators, spectra, trace, density and the GD map.

Oracles (``conftest.Oracle``) are independent of gdscope: the dense float64 Hessian from
``torch.autograd.functional.hessian`` of a flat-parameter loss, Jacobians from ``torch.func.jacrev``
and the closed-form output curvature ``Q``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gdscope as gs
from conftest import DT, K_OUT, N, class_data, make_mlp, regression_data
from gdscope.curvature import CURVATURES, curvature_operator
from gdscope.errors import InvalidArgumentError

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"  # torch's forward-AD import
)


def dense_of(op) -> torch.Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=op.dtype))


def spec_norm(H: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(H).abs().max().item()


@pytest.fixture
def H_ref(any_problem, oracle, oracle_args) -> torch.Tensor:
    return oracle.hessian(*oracle_args(any_problem))


# ---------------------------------------------------------------------- Hessian spectrum
def test_dense_hessian_vs_autograd(any_problem, H_ref):
    H = gs.dense_hessian(any_problem)
    assert H.shape == (any_problem.num_params,) * 2
    assert torch.equal(H, H.T)
    assert torch.allclose(H, H_ref, rtol=0, atol=1e-11 * spec_norm(H_ref))
    # unsymmetrized operator columns too: HVPs themselves are accurate
    raw = dense_of(curvature_operator(any_problem))
    assert torch.allclose(raw, H_ref, rtol=0, atol=1e-11 * spec_norm(H_ref))
    with pytest.raises(InvalidArgumentError):
        gs.dense_hessian(any_problem, max_params=any_problem.num_params - 1)


def test_hessian_eigs_extremes(any_problem, H_ref):
    exact = torch.linalg.eigvalsh(H_ref)
    tol = 1e-8 * exact.abs().max().item()
    top = gs.hessian_eigs(any_problem, 3, "largest", tol=1e-10)
    assert top.converged
    assert torch.allclose(top.values, exact.flip(0)[:3], rtol=0, atol=tol)
    bot = gs.hessian_eigs(any_problem, 2, "smallest", tol=1e-10)
    assert bot.converged
    assert torch.allclose(bot.values, exact[:2], rtol=0, atol=tol)
    both = gs.hessian_eigs(any_problem, 2, "both", tol=1e-10)
    assert torch.allclose(both.values, torch.cat([exact[:2], exact[-2:]]), rtol=0, atol=tol)


def test_hessian_eigs_vectors_are_eigenvectors(any_problem, H_ref):
    res = gs.hessian_eigs(any_problem, 2, "both", tol=1e-10, return_vectors=True)
    V = res.vectors
    assert V.shape == (any_problem.num_params, 4)
    r = torch.linalg.vector_norm(H_ref @ V - V * res.values, dim=0)
    assert r.max() <= 1e-9 * spec_norm(H_ref)
    assert torch.allclose(r, res.residuals, rtol=0, atol=1e-11 * spec_norm(H_ref))


def test_hessian_eigs_warm_start(mlp_mse, oracle, oracle_args):
    H = oracle.hessian(*oracle_args(mlp_mse))
    _, U = torch.linalg.eigh(H)
    cold = gs.hessian_eigs(mlp_mse, 1, tol=1e-10)
    warm = gs.hessian_eigs(mlp_mse, 1, tol=1e-10, v0=U[:, -1])
    assert warm.values[0] == pytest.approx(cold.values[0].item(), abs=1e-8 * spec_norm(H))
    assert warm.matvecs < cold.matvecs


def test_hessian_eigs_budget_bounds(mlp_mse, oracle, oracle_args):
    exact = torch.linalg.eigvalsh(oracle.hessian(*oracle_args(mlp_mse)))
    res = gs.hessian_eigs(mlp_mse, 1, "both", tol=1e-14, max_matvecs=3)
    assert not res.converged and res.matvecs <= 3
    assert res.values[-1] <= exact[-1] + 1e-12
    assert res.values[0] >= exact[0] - 1e-12


def test_hessian_eigs_at_given_params(mlp_mse, oracle, oracle_args):
    """``params=`` measures another point and leaves the model alone."""
    model, X, Y, *_ = oracle_args(mlp_mse)
    theta = oracle.flat(model) + 0.3 * torch.randn(
        mlp_mse.num_params, generator=torch.Generator().manual_seed(0), dtype=DT
    )
    before = oracle.flat(model)
    H = oracle.hessian(model, X, Y, theta=theta)
    res = gs.hessian_eigs(mlp_mse, 1, tol=1e-10, params=mlp_mse.unflatten(theta))
    assert res.values[0] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), abs=1e-8)
    assert torch.allclose(gs.dense_hessian(mlp_mse, mlp_mse.unflatten(theta)), H, atol=1e-11)
    assert torch.equal(oracle.flat(model), before)


def test_unknown_curvature(mlp_mse):
    assert CURVATURES == ("hessian", "ggn")
    with pytest.raises(InvalidArgumentError):
        curvature_operator(mlp_mse, "fisher")
    with pytest.raises(InvalidArgumentError):
        gs.hessian_eigs(mlp_mse, curvature="fisher")


# ---------------------------------------------------------------------- GGN
def test_ggn_equals_JtQJ(any_problem, oracle, oracle_args):
    G_ref = oracle.ggn(*oracle_args(any_problem))
    G = dense_of(curvature_operator(any_problem, "ggn"))
    assert torch.allclose(G, G_ref, rtol=0, atol=1e-12 * spec_norm(G_ref))
    # PSD (Q is PSD for MSE and cross-entropy)
    assert torch.linalg.eigvalsh(0.5 * (G + G.T))[0] >= -1e-12 * spec_norm(G_ref)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_mse_spectrum_is_q_times_ntk(oracle, reduction):
    X, Y = regression_data()
    model = make_mlp()
    prob = gs.Problem(model, "mse", (X, Y), reduction=reduction)
    J = oracle.jacobian(model, X)
    assert J.shape == (N * K_OUT, prob.num_params)
    K = J @ J.T
    lam_K = torch.linalg.eigvalsh(K)  # nk = 60 < P = 165
    G = dense_of(curvature_operator(prob, "ggn"))
    lam_G = torch.linalg.eigvalsh(0.5 * (G + G.T))
    scale = lam_G[-1].item()
    assert torch.allclose(lam_G[-N * K_OUT :], prob.q * lam_K, rtol=0, atol=1e-11 * scale)
    assert lam_G[: -N * K_OUT].abs().max() <= 1e-11 * scale  # the rest is zero
    top = gs.hessian_eigs(prob, 1, tol=1e-10, curvature="ggn")
    assert top.values[0] == pytest.approx(prob.q * lam_K[-1].item(), abs=1e-8 * scale)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_model_hessian_equals_ggn(oracle, loss, reduction):
    X, Y = regression_data() if loss == "mse" else class_data()
    torch.manual_seed(3)
    model = nn.Linear(X.shape[1], K_OUT).to(DT)
    prob = gs.Problem(model, loss, (X, Y), reduction=reduction)
    H = gs.dense_hessian(prob)
    G = dense_of(curvature_operator(prob, "ggn"))
    assert torch.allclose(H, G, rtol=0, atol=1e-13 * spec_norm(H))
    assert torch.allclose(
        H, oracle.hessian(model, X, Y, loss, reduction), atol=1e-13 * spec_norm(H)
    )


def test_linear_mse_hessian_closed_form():
    """Linear(d, k), mse mean: H = (2/(nk)) · I_k ⊗ X̃ᵀX̃ with X̃ = [X, 1], in (W, b) order."""
    X, Y = regression_data()
    n, d = X.shape
    torch.manual_seed(4)
    prob = gs.Problem(nn.Linear(d, K_OUT).to(DT), "mse", (X, Y))
    Xt = torch.cat([X, torch.ones(n, 1, dtype=DT)], dim=1)
    big = 2 / (n * K_OUT) * torch.kron(torch.eye(K_OUT, dtype=DT), Xt.T @ Xt)
    # row (a, j) of big: j < d is W[a, j] (flat index a·d + j); j = d is b[a] (k·d + a)
    perm = [a * d + j if j < d else K_OUT * d + a for a in range(K_OUT) for j in range(d + 1)]
    H = torch.zeros_like(big)
    idx = torch.tensor(perm)
    H[idx[:, None], idx[None, :]] = big
    assert torch.allclose(gs.dense_hessian(prob), H, rtol=0, atol=1e-14 * spec_norm(H))
    top = gs.hessian_eigs(prob, 1, tol=1e-12).values[0].item()
    assert top == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-10)


def test_ggn_dataloader_matches_full_batch():
    X, Y = class_data()
    full = gs.Problem(make_mlp(), "cross_entropy", (X, Y))
    loader = gs.Problem(make_mlp(), "cross_entropy", DataLoader(TensorDataset(X, Y), batch_size=6))
    v = torch.randn(full.num_params, generator=torch.Generator().manual_seed(0), dtype=DT)
    for curv in CURVATURES:
        a = curvature_operator(full, curv).matvec(v)
        b = curvature_operator(loader, curv).matvec(v)
        c = curvature_operator(loader, curv, cache_graph=True).matvec(v)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), curv
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-15), curv


@pytest.mark.parametrize("cache_graph", [False, True])
def test_hessian_sum_reduction_loader_matches_oracle(oracle, cache_graph):
    """Several graphs with weight 1 (reduction="sum": no ``w·L`` node) sum to the Hessian."""
    X, Y = regression_data()
    loader = DataLoader(TensorDataset(X, Y), batch_size=6)
    prob = gs.Problem(make_mlp(), "mse", loader, reduction="sum")
    H = dense_of(curvature_operator(prob, cache_graph=cache_graph))
    ref = oracle.hessian(prob.model, X, Y, "mse", "sum")
    assert torch.allclose(H, ref, rtol=0, atol=1e-11 * spec_norm(ref))


def test_hessian_unused_parameter_and_strided_vectors(oracle):
    """A parameter outside the graph has zero Hessian rows; strided inputs (block columns)
    give the same products as contiguous ones (single-graph fast path)."""

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()
            self.unused = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    X, Y = regression_data()
    model = WithUnused()
    prob = gs.Problem(model, "mse", (X, Y))
    op = curvature_operator(prob)
    H = dense_of(op)
    assert prob.names[0] == "unused"  # a module's own parameters come before its children's
    ref = oracle.hessian(model.net, X, Y)
    assert torch.allclose(H[3:, 3:], ref, rtol=0, atol=1e-11 * spec_norm(ref))
    assert torch.equal(H[:3], torch.zeros_like(H[:3]))
    assert torch.equal(H[:, :3], torch.zeros_like(H[:, :3]))
    block = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert torch.allclose(op.matmat(block), H @ block, rtol=0, atol=1e-11 * spec_norm(ref))
    strided, contiguous = op.matvec(block[:, 1]), op.matvec(block[:, 1].contiguous())
    assert torch.allclose(strided, contiguous, rtol=0, atol=1e-13 * spec_norm(ref))


# ---------------------------------------------------------------------- snapshot
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("source", ["tensors", "loader"])
def test_operator_is_a_snapshot(curvature, source):
    X, Y = regression_data()
    model = make_mlp()
    data = (X, Y) if source == "tensors" else DataLoader(TensorDataset(X, Y), batch_size=7)
    prob = gs.Problem(model, "mse", data)
    v = torch.randn(prob.num_params, generator=torch.Generator().manual_seed(1), dtype=DT)
    op = curvature_operator(prob, curvature)
    before = op.matvec(v)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    after = op.matvec(v)
    assert torch.equal(before, after)
    fresh = curvature_operator(prob, curvature).matvec(v)  # sees the new parameters
    assert not torch.allclose(fresh, before, rtol=1e-3)


# ---------------------------------------------------------------------- trace and density
@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_hessian_trace(any_problem, H_ref, method):
    exact = H_ref.trace().item()
    for seed in range(3):
        est = gs.hessian_trace(any_problem, 60, method, seed=seed)
        assert est.method == method and est.matvecs == 60
        # the stderr is itself estimated (20 deflated probes for hutch++): allow 5 of them
        assert abs(est.value - exact) <= 5 * est.stderr + 1e-10 * spec_norm(H_ref)


def test_ggn_trace_is_q_times_frobenius_jacobian(oracle):
    """tr GGN = q ‖J‖_F² for MSE."""
    X, Y = regression_data()
    model = make_mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    exact = prob.q * (oracle.jacobian(model, X) ** 2).sum().item()
    est = gs.hessian_trace(prob, 60, curvature="ggn", seed=2)
    assert abs(est.value - exact) <= 4 * est.stderr


def test_hessian_trace_bad_method(mlp_mse):
    with pytest.raises(InvalidArgumentError):
        gs.hessian_trace(mlp_mse, 30, "exact")


def test_hessian_density(any_problem, H_ref):
    exact = torch.linalg.eigvalsh(H_ref)
    d = gs.hessian_density(any_problem, 4, 30, seed=0)
    assert d.size == any_problem.num_params and d.matvecs == 4 * 30
    lo, hi = d.support
    span = (exact[-1] - exact[0]).item()
    assert exact[0].item() - 1e-10 * span <= lo and hi <= exact[-1].item() + 1e-10 * span
    assert hi == pytest.approx(exact[-1].item(), abs=1e-6 * span)  # extreme Ritz value converged
    grid = torch.linspace(exact[0].item() - span, exact[-1].item() + span, 20001, dtype=DT)
    assert torch.trapezoid(d.pdf(grid), grid).item() == pytest.approx(1.0, abs=1e-4)
    ggn = gs.hessian_density(any_problem, 2, 20, curvature="ggn")
    assert ggn.support[0] >= -1e-10 * span  # the GGN is PSD


# ---------------------------------------------------------------------- GD map
@pytest.fixture
def mlp_spectrum(mlp_mse, oracle, oracle_args) -> tuple[torch.Tensor, torch.Tensor]:
    H = oracle.hessian(*oracle_args(mlp_mse))
    return H, torch.linalg.eigvalsh(H)


def gap_lrs(h: torch.Tensor, top: int = 6) -> list[float]:
    """Step sizes whose 1/lr sits mid-way between consecutive distinct top eigenvalues."""
    hs = h.flip(0)[: top + 1]
    mids = [(0.5 * (hs[i] + hs[i + 1])).item() for i in range(top)]
    return [1 / (1.5 * hs[0].item())] + [1 / m for m in mids if m > 0]


def test_gd_map_dense_sign_count_logdet(mlp_mse, mlp_spectrum):
    H, h = mlp_spectrum
    I = torch.eye(H.shape[0], dtype=DT)
    lrs = [*gap_lrs(h), 0.05, 3.0, 40.0]
    for lr in lrs:
        rep = gs.gd_map(mlp_mse, lr)
        assert rep.method == "dense" and rep.determined
        sign, logabs = torch.linalg.slogdet(I - lr * H)
        assert rep.sign == int(sign.item()), lr
        assert rep.count_above == int((h > 1 / lr).sum()), lr
        assert rep.sign == (-1) ** rep.count_above
        assert rep.logabsdet.value == pytest.approx(logabs.item(), rel=1e-9, abs=1e-9)
        assert rep.logabsdet.stderr == 0.0
        assert rep.min_factor == pytest.approx((1 - lr * h).abs().min().item(), rel=1e-8)


def test_gd_map_singular_lr_bracket(mlp_mse, mlp_spectrum):
    _, h = mlp_spectrum
    for lr in gap_lrs(h)[1:]:
        rep = gs.gd_map(mlp_mse, lr)
        above, below = h[h > 1 / lr], h[(h > 0) & (h < 1 / lr)]
        assert rep.singular_lr_below == pytest.approx(1 / above.min().item(), rel=1e-9)
        assert rep.singular_lr_above == pytest.approx(1 / below.max().item(), rel=1e-9)
        assert rep.singular_lr_below < lr < rep.singular_lr_above
    tiny = gs.gd_map(mlp_mse, 0.5 / h[-1].item())  # 1/lr above the whole spectrum
    assert tiny.count_above == 0 and tiny.sign == 1 and tiny.singular_lr_below is None
    assert tiny.singular_lr_above == pytest.approx(1 / h[-1].item(), rel=1e-9)


@pytest.mark.parametrize("j", [1, 2, 4])
def test_gd_map_dense_undetermined_at_singular_lr(mlp_mse, mlp_spectrum, j):
    _, h = mlp_spectrum
    rep = gs.gd_map(mlp_mse, 1 / h[-j].item())
    assert rep.sign is None and rep.count_above is None and not rep.determined
    assert rep.min_factor < 1e-10
    assert rep.note


def test_gd_map_lanczos_agrees_with_dense(mlp_mse, mlp_spectrum):
    _, h = mlp_spectrum
    for lr in gap_lrs(h, top=4):
        dense = gs.gd_map(mlp_mse, lr)
        lz = gs.gd_map(mlp_mse, lr, dense_limit=0, slq_vectors=2, slq_steps=8)
        assert lz.method == "lanczos" and lz.determined, (lr, lz.note)
        assert lz.sign == dense.sign and lz.count_above == dense.count_above, lr
        if dense.singular_lr_below is not None:
            assert lz.singular_lr_below == pytest.approx(dense.singular_lr_below, rel=1e-8)
        assert lz.singular_lr_above == pytest.approx(dense.singular_lr_above, rel=1e-8)
        assert lz.min_factor == pytest.approx(dense.min_factor, rel=1e-6)
        assert lz.matvecs > 0


@pytest.mark.parametrize("j", [1, 2, 3])
def test_gd_map_lanczos_determined_when_separated(mlp_mse, mlp_spectrum, j):
    """1/lr a relative 1e-6 away from an eigenvalue: far beyond tol·‖H‖, so determined."""
    _, h = mlp_spectrum
    for delta in (1e-6, -1e-6):
        lr = 1 / (h[-j].item() * (1 + delta))
        rep = gs.gd_map(mlp_mse, lr, dense_limit=0, slq_vectors=2, slq_steps=8)
        assert rep.determined, (lr, rep.note)
        assert rep.count_above == int((h > 1 / lr).sum()) == (j - 1 if delta > 0 else j)


@pytest.mark.parametrize("j", [1, 2, 3])
def test_gd_map_lanczos_undetermined_at_singular_lr(mlp_mse, mlp_spectrum, j):
    _, h = mlp_spectrum
    verdicts = []
    for delta in (0.0, 1e-13, -1e-13):  # |h − 1/lr| ≲ 2e-13 < dense band 10·P·eps·‖H‖ ≈ 6e-13
        lr = 1 / (h[-j].item() * (1 + delta))
        assert not gs.gd_map(mlp_mse, lr).determined  # dense: within round-off of 1/lr
        rep = gs.gd_map(mlp_mse, lr, dense_limit=0, slq_vectors=2, slq_steps=8)
        verdicts.append((delta, rep.sign, rep.count_above, rep.note))
    assert all(v[1] is None and v[2] is None and v[3] for v in verdicts), verdicts


def test_gd_map_lanczos_float32_mid_gap():
    X, Y = regression_data()
    prob = gs.Problem(make_mlp().float(), "mse", (X.float(), Y.float()))
    h = torch.linalg.eigvalsh(gs.dense_hessian(prob).double())
    lr = 1 / (0.5 * (h[-1] + h[-2])).item()  # 1/lr 8% away from both neighbours
    dense = gs.gd_map(prob, lr)
    assert dense.determined and dense.count_above == 1
    lz = gs.gd_map(prob, lr, dense_limit=0, slq_vectors=2, slq_steps=5)
    assert lz.determined, lz.note
    assert lz.count_above == 1 and lz.sign == -1


def test_gd_map_lanczos_logabsdet_slq(mlp_mse, mlp_spectrum):
    _, h = mlp_spectrum
    lr = gap_lrs(h)[2]  # 1/lr between the 2nd and 3rd eigenvalues: inside the spectrum
    exact = torch.log((1 - lr * h).abs()).sum().item()
    rep = gs.gd_map(mlp_mse, lr, dense_limit=0, slq_vectors=16, slq_steps=40, seed=1)
    est = rep.logabsdet
    assert est.method == "slq" and est.samples == 16 and est.stderr > 0
    # singular integrand: generous
    assert abs(est.value - exact) <= 5 * est.stderr + 0.1 * abs(exact)
    small = 0.2 / h[-1].item()  # 1 − lr·h ∈ [0.8, 1.x]: smooth, tight
    exact_s = torch.log((1 - small * h).abs()).sum().item()
    est_s = gs.gd_map(mlp_mse, small, dense_limit=0, slq_vectors=16, slq_steps=30).logabsdet
    assert abs(est_s.value - exact_s) <= 4 * est_s.stderr + 1e-8


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf"), "0.1", None])
def test_gd_map_bad_lr(mlp_mse, lr):
    with pytest.raises(InvalidArgumentError):
        gs.gd_map(mlp_mse, lr)


def test_gd_map_cnn_dense(cnn_ce, oracle, oracle_args):
    H = oracle.hessian(*oracle_args(cnn_ce))
    h = torch.linalg.eigvalsh(H)
    lr = 1 / (0.5 * (h[-2] + h[-3])).item()
    rep = gs.gd_map(cnn_ce, lr)
    sign, logabs = torch.linalg.slogdet(torch.eye(H.shape[0], dtype=DT) - lr * H)
    assert rep.sign == int(sign.item()) == 1 and rep.count_above == 2
    assert rep.logabsdet.value == pytest.approx(logabs.item(), rel=1e-9)
    assert math.isfinite(rep.seconds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_curvature_on_cuda(oracle):
    X, Y = class_data()
    model = make_mlp()  # stays on the CPU: the Problem converts
    H_ref = oracle.hessian(model, X, Y, "cross_entropy")
    exact = torch.linalg.eigvalsh(H_ref)
    prob = gs.Problem(model, "cross_entropy", (X, Y), device="cuda")
    assert all(p.device.type == "cuda" for p in prob.params.values())
    H = gs.dense_hessian(prob)
    assert H.device.type == "cuda"
    assert torch.allclose(H.cpu(), H_ref, atol=1e-11 * exact.abs().max())
    res = gs.hessian_eigs(prob, 2, "both", tol=1e-10)
    want = torch.cat([exact[:2], exact[-2:]])
    assert torch.allclose(res.values.cpu(), want, atol=1e-8 * exact.abs().max())
    G = dense_of(curvature_operator(prob, "ggn")).cpu()
    G_ref = oracle.ggn(model, X, Y, "cross_entropy")
    assert torch.allclose(G, G_ref, atol=1e-12 * spec_norm(G_ref))
    est = gs.hessian_trace(prob, 60)
    assert abs(est.value - H_ref.trace().item()) <= 5 * est.stderr
    lr = 1 / (0.5 * (exact[-1] + exact[-2])).item()
    assert gs.gd_map(prob, lr).count_above == 1
    assert gs.gd_map(prob, lr, dense_limit=0, slq_vectors=2, slq_steps=5).count_above == 1
    assert all(p.device.type == "cpu" for p in model.parameters())
