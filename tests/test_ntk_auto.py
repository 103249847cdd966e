"""``method="auto"`` (issue 13): a route that works on every model, and the cheapest exact one.

Oracles are independent of gdscope's NTK code: per-sample, per-output ``torch.autograd.grad``
of a float64 model (no ``torch.func``), stacked into ``J`` (``n × k × P``), then ``J J'ᵀ``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.kernels.ntk import _explain

F64 = torch.float64
RTOL = 1e-10


def autograd_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J`` as ``(n, k, P)`` by one ``torch.autograd.grad`` per sample and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        per = []
        for a in range(out.numel()):
            g = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if gi is None else gi).reshape(-1)
                        for gi, p in zip(g, params, strict=True)
                    ]
                )
            )
        rows.append(torch.stack(per))
    return torch.stack(rows)


def oracle_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    J = autograd_jacobian(model, x)
    return torch.einsum("iap,jbp->ijab", J, J)


def assert_close(K: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert K.shape == ref.shape, (K.shape, ref.shape)
    err = (K - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol}"


# ---------------------------------------------------------------------------------------------
# Models vmap cannot batch over samples


class Recurrent(nn.Module):
    """A GRU or LSTM over a sequence, the last hidden state read out linearly."""

    def __init__(self, cell: type[nn.RNNBase] = nn.GRU, k: int = 2) -> None:
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def _recurrent(cell: type[nn.RNNBase], n: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Recurrent(cell).to(F64), torch.randn(n, 6, 3, dtype=F64)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("method", ["auto", "jacobian", "vp"])
def test_recurrent_ntk_every_route(cell, method, caplog):
    model, x = _recurrent(cell)
    ref = oracle_ntk(model, x)
    with caplog.at_level(logging.INFO, logger="gdscope.kernels.ntk"):
        K = gs.ntk(model, x, method=method)
    assert_close(K, ref)
    if method != "vp":  # the fallback is said, naming the module that vmap cannot batch
        assert "'rnn'" in caplog.text and "loop over samples" in caplog.text


def test_recurrent_explain_names_the_route_and_cross_kernel():
    model, x = _recurrent(nn.GRU)
    info = _explain(model, x)
    assert "loop over samples" in info["batching"] and "'rnn'" in info["batching"]
    assert any("rnn" in m and "jacobian" in m for m in info["modules"])
    x2 = torch.randn(3, 6, 3, dtype=F64)
    J, J2 = autograd_jacobian(model, x), autograd_jacobian(model, x2)
    ref = torch.einsum("iap,jbp->ijab", J, J2)
    assert_close(gs.ntk(model, x, x2), ref)
    tr = gs.ntk(model, x, x2, trace_outputs=True)
    assert_close(tr, torch.einsum("iap,jap->ij", J, J2))


def test_recurrent_structured_refused_clearly():
    model, x = _recurrent(nn.LSTM)
    with pytest.raises(InvalidArgumentError, match=r"rnn.*method='auto'"):
        gs.ntk(model, x, method="structured")


def test_batchable_model_uses_vmap():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    info = _explain(model, torch.randn(3, 3, dtype=F64))
    assert info["batching"] == "per-sample Jacobians by vmap over samples"


def test_gru_ntk_eigs_matches_dense_oracle():
    model, x = _recurrent(nn.GRU, n=5)
    J = autograd_jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    lam = torch.linalg.eigvalsh(J @ J.T)
    res = gs.ntk_eigs(model, x, which="both")
    assert res.lambda_min == pytest.approx(float(lam[0]), rel=1e-8)
    assert res.lambda_max == pytest.approx(float(lam[-1]), rel=1e-10)


def test_gru_disparity_matches_dense_oracle():
    model, x = _recurrent(nn.GRU, n=5)
    J = autograd_jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    sv = torch.linalg.svdvals(J)
    rep = gs.disparity(model, x)
    assert rep.sigma_min == pytest.approx(float(sv[-1]), rel=1e-8)
    assert rep.sigma_max == pytest.approx(float(sv[0]), rel=1e-10)


def test_gru_disparity_ntk_eigs_fallback_matches_dense_oracle():
    """The disparity report's matrix-free fallback (``J`` over ``memory``) goes through ntk."""
    model, x = _recurrent(nn.GRU, n=5)
    J = autograd_jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    sv = torch.linalg.svdvals(J)
    rep = gs.disparity(model, x, memory=64)
    assert rep.method == "ntk_eigs"
    assert rep.sigma_min == pytest.approx(float(sv[-1]), rel=1e-6)
    assert rep.sigma_max == pytest.approx(float(sv[0]), rel=1e-8)
