"""``ntk_eigs`` and ``disparity`` never contradict each other, nor a dense float64 oracle.

Issue 10: ``ntk_eigs`` called a full-rank kernel singular (``λ_min = 0``, condition number
``inf``) where ``disparity`` reported ``σ_min = 0.00758`` and a dense eigensolver
``λ_min = 5.77e-5 = σ_min²``: its "singular" test was ``λ_min ≤ 10·eps32·λ_max``, a relative
tolerance far above what a float32 Gram resolves and unrelated to disparity's rank rule. Both now
decide with one rule (:func:`gdscope.kernels.eigs.rank_tolerance`) and say "unresolved" where the
computation cannot tell.

The oracle is independent of gdscope: ``torch.func.jacrev`` of a float64 copy of the model at the
same parameters (a float32 model's parameters and inputs are exact in float64), then
``torch.linalg.svdvals``. Its verdict applies the same rank rule, with ``eps`` of the model's
dtype (the precision the model's ``J`` lives in).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import gdscope as gs
from gdscope.kernels.eigs import rank_tolerance
from gdscope.zoo import cnn, mlp, preact_resnet

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps


class SoftmaxAttention(nn.Module):
    """One head: ``softmax(QKᵀ/√h) V`` over the sequence, mean-pooled, then a linear readout."""

    def __init__(self, d: int = 3, h: int = 4, k: int = 2) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h)
        self.out = nn.Linear(h, k)
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.h), dim=-1)
        return self.out((a @ v).mean(1))


class TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) with a linear readout.

    ``need_weights=True`` keeps it on the explicit softmax path: the fused
    ``scaled_dot_product_attention`` kernel has no forward-mode derivative, which the matrix-free
    operator needs.
    """

    def __init__(self, d: int = 4, k: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=True)
        return self.out(y.mean(1))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Tiny float64 model and inputs (nk ≤ 16, P ≤ 120): every route takes well under a second."""
    if name == "mlp":
        return mlp([3, 8, 8, 2], seed=0, dtype=F64), torch.randn(8, 3, generator=_gen(1), dtype=F64)
    if name == "ntk_mlp":
        net = mlp([3, 12, 2], seed=0, parameterization="ntk", dtype=F64)
        return net, torch.randn(8, 3, generator=_gen(2), dtype=F64)
    if name == "cnn":
        net = cnn(1, 2, channels=(3, 3), seed=0, dtype=F64)
        return net, torch.randn(6, 1, 5, 5, generator=_gen(3), dtype=F64)
    if name == "resnet":
        net = preact_resnet(1, 2, dims=1, width=2, depth=(1,), norm="none", seed=0, dtype=F64)
        return net.eval(), torch.randn(6, 1, 6, generator=_gen(4), dtype=F64)
    torch.manual_seed(0)
    if name == "attention":
        return SoftmaxAttention().to(F64), torch.randn(8, 4, 3, generator=_gen(5), dtype=F64)
    if name == "mha":
        return TorchAttention().to(F64), torch.randn(6, 3, 4, generator=_gen(6), dtype=F64)
    raise AssertionError(name)


MODELS = ["mlp", "ntk_mlp", "cnn", "resnet", "attention", "mha"]


def _oracle(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Singular values of ``J`` by ``jacrev`` of a float64 copy (same parameters), descending."""
    m = copy.deepcopy(model).to(F64)
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    buffers = dict(m.named_buffers())

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(m, {**p, **buffers}, (x.to(F64),)).reshape(-1)

    jac = jacrev(f)(params)
    J = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], dim=1)
    return torch.linalg.svdvals(J), J.shape[0], J.shape[1]


def _oracle_singular(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    sv, nk, P = _oracle(model, x)
    smin = float(sv[nk - 1]) if nk <= P else 0.0
    return smin <= rank_tolerance(nk, P, dtype, float(sv[0])), smin


def _near_duplicate(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Sample 1 moved to within ``scale`` of sample 0: λ_min falls like ``scale²``."""
    x = x.clone()
    x[1] = x[0] + scale * torch.randn(x[0].shape, generator=_gen(9), dtype=x.dtype)
    return x


def _check_agreement(model: nn.Module, x: torch.Tensor, route: str) -> float:
    """The invariants of issue 10 on one model, dtype and route; returns |λ_min − σ_min²|/σ_min²."""
    dtype = next(model.parameters()).dtype
    sv, nk, _ = _oracle(model, x)
    lam_ref = float(sv[nk - 1]) ** 2
    rep = gs.disparity(model, x)
    res = gs.ntk_eigs(model, x, which="both", dense_limit=0 if route == "lanczos" else 2000)
    assert res.method == route
    # disparity's σ_min against the oracle, within its stated error
    assert abs(rep.sigma_min - math.sqrt(lam_ref)) <= rep.sigma_min_error + 1e-12 * sv[0]
    # never a contradiction: where both decide, they agree; both agree with the oracle's verdict
    ref_singular, _ = _oracle_singular(model, x, dtype)
    assert rep.full_rank is (not ref_singular)
    if res.singular is not None:
        assert res.singular is ref_singular, res
    if res.singular is False:
        # λ_min = σ_min² within the stated errors of both
        s, es = rep.sigma_min, rep.sigma_min_error
        assert abs(res.lambda_min - s * s) <= res.lambda_min_error + 2 * s * es + es * es, res
        assert abs(res.lambda_min - lam_ref) <= res.lambda_min_error * (1 + 1e-9), res
        assert res.condition_number == pytest.approx(res.lambda_max / res.lambda_min)
    else:
        assert res.singular is None and res.note and "unresolved" in repr(res)
        assert res.lambda_min != 0.0  # the computed value, not a clipped 0
        assert res.lambda_min + res.lambda_min_error >= lam_ref  # the stated interval holds
        assert res.condition_number_is_lower_bound
        assert res.condition_number <= float(sv[0] ** 2) / lam_ref * (1 + 1e-9)
    return abs(res.lambda_min - lam_ref) / lam_ref


@pytest.mark.parametrize("route", ["dense", "lanczos"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_lambda_min_is_sigma_min_squared(name, dtype, route):
    model, x = _model(name)
    model, x = model.to(dtype), x.to(dtype)
    err = _check_agreement(model, x, route)
    res = gs.ntk_eigs(model, x, which="both", dense_limit=0 if route == "lanczos" else 2000)
    if dtype == F64 or route == "dense":
        # float64 resolves these kernels; the dense float32 route decides by the SVD of J
        # where K cannot (the attention model's λ_min/λ_max ≈ 1e-7 < its float32 floor)
        assert res.singular is False
    if res.singular is False:  # measured: float64 ≤ 1e-10, float32 ≤ 1e-3 relative
        assert err < (1e-9 if dtype == F64 else 1e-2)


@pytest.mark.parametrize("route", ["dense", "lanczos"])
@pytest.mark.parametrize(("name", "scale"), [("attention", None), ("cnn", 3e-2), ("mha", 1e-2)])
def test_reported_case_full_rank_with_tiny_lambda_min_is_not_singular(name, scale, route):
    """λ_min/λ_max below the old 10·eps32 cut-off, σ_min far above disparity's τ_σ (float32)."""
    model, x = _model(name)
    x = x if scale is None else _near_duplicate(x, scale)
    model, x = model.float(), x.float()
    sv, nk, P = _oracle(model, x)
    lam_ratio = float(sv[nk - 1] / sv[0]) ** 2
    assert lam_ratio < 10 * EPS32  # the old rule said "λ_min = 0, singular"
    assert float(sv[nk - 1]) > 20 * rank_tolerance(nk, P, F32, float(sv[0]))  # full rank
    rep = gs.disparity(model, x)
    assert rep.full_rank is True
    res = gs.ntk_eigs(model, x, which="both", dense_limit=0 if route == "lanczos" else 2000)
    assert res.singular is not True and res.lambda_min != 0.0
    assert res.condition_number != math.inf
    if route == "dense":  # K in float32 cannot resolve it: decided by the SVD of J, as disparity
        assert res.singular is False and res.lambda_min_source == "svd"
        assert res.lambda_min == pytest.approx(rep.sigma_min**2, rel=1e-12)
        assert res.lambda_min == pytest.approx(float(sv[nk - 1]) ** 2, rel=1e-2)
    else:  # matrix-free float32: honest "below resolution", never 0
        assert res.singular is None
        assert "float32" in res.note or "resolution" in res.note
        assert res.lambda_min + res.lambda_min_error >= float(sv[nk - 1]) ** 2
    _check_agreement(model, x, route)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_near_duplicate_inputs_agree_across_routes(name, dtype):
    """λ_min/λ_max ≈ 1e-9…1e-11: resolved in float64, below K's floor in float32."""
    model, x = _model(name)
    x = _near_duplicate(x, 3e-4)
    model, x = model.to(dtype), x.to(dtype)
    for route in ("dense", "lanczos"):
        if dtype == F64:
            _check_agreement(model, x, route)
        res = gs.ntk_eigs(model, x, which="both", dense_limit=0 if route == "lanczos" else 2000)
        ref_singular, smin = _oracle_singular(model, x, dtype)
        assert res.singular in (None, ref_singular)
        if dtype == F64:
            assert res.singular is False
            assert res.lambda_min == pytest.approx(smin**2, rel=1e-4)


def _linear_net() -> tuple[nn.Module, torch.Tensor]:
    """Deep linear net ``3 → 6 → 2``: ``J`` is linear in ``x``, so 8 inputs in R³ give rank ≤ 6
    of nk = 16 although P = 30 > nk and no two inputs coincide."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6, bias=False), nn.Linear(6, 2, bias=False)).to(F64)
    return net, torch.randn(8, 3, generator=_gen(7), dtype=F64)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", ["more_rows_than_params", "duplicate", "linear_net"])
def test_rank_deficient_both_say_singular(case, dtype):
    if case == "more_rows_than_params":
        model = mlp([3, 2, 1], seed=0, dtype=F64)  # P = 11
        x = torch.randn(14, 3, generator=_gen(8), dtype=F64)
    elif case == "duplicate":
        model, x = _model("attention")
        x = x.clone()
        x[3] = x[0]
    else:
        model, x = _linear_net()
    model, x = model.to(dtype), x.to(dtype)
    ref_singular, _ = _oracle_singular(model, x, dtype)
    assert ref_singular  # the dense float64 check agrees: rank deficient
    rep = gs.disparity(model, x)
    assert rep.full_rank is False and "NOT full rank" in repr(rep)
    dense = gs.ntk_eigs(model, x, which="both")
    assert dense.singular is True and dense.lambda_min == 0.0
    assert dense.condition_number == math.inf and "singular" in repr(dense)
    lz = gs.ntk_eigs(model, x, which="both", dense_limit=0)
    if case == "linear_net":  # no exact structure to see: matrix-free can only say unresolved
        assert lz.singular is None and lz.lambda_min_is_upper_bound is False
        assert lz.lambda_min <= lz.lambda_min_error
    else:
        assert lz.singular is True and lz.lambda_min_source == "structure"
    # disparity's fallback (J does not fit) says what ntk_eigs says
    fb = gs.disparity(model, x, memory=8)
    assert fb.method == "ntk_eigs"
    assert fb.full_rank is (None if fb.eig.singular is None else not fb.eig.singular)
    assert fb.full_rank is not True


@pytest.mark.parametrize("route", ["dense", "lanczos"])
def test_below_resolution_both_say_the_same(route):
    """float32, J too large for ``memory``: neither the Gram nor its fallback can decide."""
    model, x = _model("attention")
    model, x = model.float(), _near_duplicate(x, 3e-4).float()
    dl = 0 if route == "lanczos" else 2000
    res = gs.ntk_eigs(model, x, which="both", dense_limit=dl, memory=0)
    assert res.singular is None and res.condition_number_is_lower_bound
    assert "float32" in res.note and ("recompute in float64" in res.note)
    rep = gs.disparity(model, x, memory=8)
    assert rep.full_rank is None and rep.rank is None
    assert rep.note == rep.eig.note and "recompute in float64" in repr(rep)
    # the float64 model resolves it, and every route agrees there
    m64, x64 = model.double(), x.double()
    assert gs.ntk_eigs(m64, x64, which="both", dense_limit=dl).singular is False
    assert gs.disparity(m64, x64, memory=8).full_rank is True
    assert gs.disparity(m64, x64).full_rank is True


def test_trace_kernel_uses_the_same_rule():
    model, x = _model("attention")
    model, x = model.float(), _near_duplicate(x, 3e-3).float()
    res = gs.ntk_eigs(model, x, which="both", trace_outputs=True)
    assert res.singular is False
    m = copy.deepcopy(model).double()
    K = gs.ntk(m, x.double(), trace_outputs=True)
    ref = float(torch.linalg.eigvalsh(K)[0])
    assert abs(res.lambda_min - ref) <= res.lambda_min_error
