"""The structured NTK rule for ``nn.MultiheadAttention`` against a dense float64 ``J Jᵀ``.

The rule (``gdscope.kernels.rules.MhaPartRule``) treats the four projections of the module as
Linear-like layers at every position; the oracle differentiates the real module (PyTorch's own
``F.multi_head_attention_forward``) with ``jacrev``. Covered: masks (bool and float
``attn_mask``, per-sample ``key_padding_mask``, ``is_causal``), ``batch_first`` both ways, bias
on/off, ``kdim``/``vdim``, ``need_weights`` (weights used in the output), ``add_zero_attn``,
frozen parameters; refused (Jacobian fallback, still exact): ``add_bias_kv``, an ``out_proj``
called on its own, an ``in_proj_weight`` used outside the module, dropout in train mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from gdscope.errors import NonDeterministicError
from gdscope.kernels.ntk import _explain, _prepare, _run, ntk
from gdscope.problem import math_attention

RTOL = 1e-9
E, H, L = 6, 2, 4  # embed dim, heads, tokens


def dense_ntk(model: nn.Module, x: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle: full-batch ``jacrev`` of the real module, ``J J2ᵀ`` as ``(n, n2, k, k)``."""
    x2 = x if x2 is None else x2
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def jac(xx: torch.Tensor) -> torch.Tensor:
        def f(p):
            return functional_call(model, p, (xx,)).reshape(xx.shape[0], -1)

        with math_attention():
            j = jacrev(f)(params)
        return torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in j.values()], -1)

    return torch.einsum("iap,jbp->ijab", jac(x), jac(x2))


def assert_close(K: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert K.shape == ref.shape, (K.shape, ref.shape)
    err = (K - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 0
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol}"


class AttnNet(nn.Module):
    """Inputs ``(B, L, 5)`` → Linear to E → MultiheadAttention → tanh → head on two positions."""

    def __init__(
        self,
        batch_first: bool = True,
        bias: bool = True,
        mask: str | None = None,
        need_weights: bool = False,
        cross: bool = False,
        add_zero_attn: bool = False,
        add_bias_kv: bool = False,
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(5, E)
        kd = dict(kdim=4, vdim=3) if cross else {}
        self.attn = nn.MultiheadAttention(
            E,
            H,
            bias=bias,
            batch_first=batch_first,
            add_zero_attn=add_zero_attn,
            add_bias_kv=add_bias_kv,
            **kd,
        )
        self.head = nn.Linear(2 * E, 3)
        self.mask, self.need_weights, self.cross = mask, need_weights, cross
        self.bf = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        q = h
        if self.cross:
            k, v = torch.sin(x[..., :4]), x[..., 1:4] ** 2  # kdim 4, vdim 3
        else:
            k = v = h
        kw: dict = {"need_weights": self.need_weights}
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        if self.mask == "bool":
            kw["attn_mask"] = causal
        elif self.mask == "float":
            kw["attn_mask"] = torch.linspace(-1, 1, L * L, dtype=x.dtype).view(L, L)
        elif self.mask == "causal":
            kw.update(attn_mask=causal, is_causal=True)
        elif self.mask == "padding":  # per sample: the last key is padding where x > 0 there
            kw["key_padding_mask"] = x[:, -1, 0] > 0
            kw["key_padding_mask"] = torch.stack(
                [torch.zeros_like(kw["key_padding_mask"])] * (L - 1) + [kw["key_padding_mask"]], 1
            )
        if not self.bf:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, w = self.attn(q, k, v, **kw)
        if not self.bf:
            out = out.transpose(0, 1)
        y = torch.tanh(out[:, -2:]).reshape(x.shape[0], -1)
        y = self.head(y)
        if w is not None:  # the averaged attention weights enter the output too
            y = y + w[:, -1, :3]
        return y


CASES = {
    "plain": {},
    "seq_first": dict(batch_first=False),
    "no_bias": dict(bias=False),
    "bool_mask": dict(mask="bool"),
    "float_mask": dict(mask="float"),
    "is_causal": dict(mask="causal"),
    "padding_mask": dict(mask="padding"),
    "need_weights": dict(need_weights=True, mask="bool"),
    "kdim_vdim": dict(cross=True, mask="padding"),
    "kdim_vdim_seq_first_no_bias": dict(cross=True, batch_first=False, bias=False),
    "zero_attn": dict(add_zero_attn=True, mask="float"),
}


def make(name: str, **kw) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = CASES.get(name, {})
    m = AttnNet(**{**cfg, **kw}).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, L, 5, generator=g, dtype=torch.float64)
    x2 = torch.randn(3, L, 5, generator=g, dtype=torch.float64)
    return m, x, x2


def _mha_routes(model: nn.Module, x: torch.Tensor) -> list[str]:
    return [m for m in _explain(model, x)["modules"] if "attn" in m]


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_dense_jacobian(name):
    model, x, x2 = make(name)
    routes = _mha_routes(model, x)
    assert len(routes) == 4 and all("MultiheadAttention" in r for r in routes), routes
    assert not any("jacobian" in r for r in routes)
    for xx2 in (None, x2):
        ref = dense_ntk(model, x, xx2)
        assert_close(ntk(model, x, xx2, method="structured"), ref)
        assert_close(ntk(model, x, xx2), ref)
        tr = torch.diagonal(ref, dim1=2, dim2=3).sum(-1)
        assert_close(ntk(model, x, xx2, method="structured", trace_outputs=True), tr)
    assert "forward" not in model.attn.__dict__  # the capture's decomposed forward is gone


@pytest.mark.parametrize("name", ["plain", "kdim_vdim", "padding_mask"])
@pytest.mark.parametrize("route", ["gram", "pair", "jac"])
def test_every_route_of_the_parts(name, route):
    model, x, x2 = make(name)
    for xx2 in (None, x2):
        ref = dense_ntk(model, x, xx2)
        for trace in (False, True):
            with math_attention():
                job, out = _prepare(model, x, xx2, "structured", trace, None, None, force=route)
                K = _run(job, out)
            parts = [r for r in job.plan.rules if r.part is not None]
            assert len(parts) == 4
            if not (trace and route == "pair"):  # no pair route for the trace kernel
                assert all(r.approach == route for r in parts)
            assert_close(K, torch.diagonal(ref, dim1=2, dim2=3).sum(-1) if trace else ref)


def test_frozen_parameters():
    """Only the trainable projections are parts; the frozen ones are not in ``J``."""
    model, x, _ = make("plain")
    model.attn.in_proj_bias.requires_grad_(False)
    model.attn.out_proj.weight.requires_grad_(False)
    parts = {r.split("(MultiheadAttention, ")[1].split(")")[0] for r in _mha_routes(model, x)}
    assert parts == {"query proj.", "key proj.", "value proj.", "out proj."}
    assert_close(ntk(model, x, method="structured"), dense_ntk(model, x))
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.out_proj.bias.requires_grad_(False)
    # no trainable parameter left in the attention: nothing of it in the plan
    assert _mha_routes(model, x) == []
    assert_close(ntk(model, x, method="structured"), dense_ntk(model, x))


class OutProjReused(AttnNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.attn.out_proj(self.inp(x))[:, 0, :3]


class InProjOutside(AttnNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(self.inp(x)[:, 0], self.attn.in_proj_weight[:3])


class SubclassForward(nn.MultiheadAttention):
    def forward(self, q, k, v, **kw):  # a custom forward: the rule does not know it
        out, w = super().forward(q, k, v, **kw)
        return 2.0 * out, w


@pytest.mark.parametrize("case", ["bias_kv", "out_proj_reused", "in_proj_outside", "subclass"])
def test_falls_back_where_the_rule_does_not_apply(case):
    torch.manual_seed(0)
    if case == "bias_kv":
        model = AttnNet(add_bias_kv=True, mask="float")
        why = "no structured rule for MultiheadAttention"
    elif case == "out_proj_reused":
        model = OutProjReused()
        why = "its out_proj is also called on its own"
    elif case == "in_proj_outside":
        model = InProjOutside()
        why = "gradient check failed"
    else:
        model = AttnNet()
        model.attn = SubclassForward(E, H, batch_first=True)
        why = "no structured rule for SubclassForward"
    model = model.double().eval()
    x = torch.randn(4, L, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mods = " | ".join(_explain(model, x)["modules"])
    assert "attn: jacobian (" in mods and why in mods, mods
    assert "query proj." not in mods
    assert_close(ntk(model, x), dense_ntk(model, x))
    with pytest.raises(Exception, match="method='auto'"):
        ntk(model, x, method="structured")


def test_dropout_in_train_mode_refused():
    torch.manual_seed(0)
    model = AttnNet().double()
    model.attn = nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True).double()
    x = torch.randn(2, L, 5, dtype=torch.float64)
    with pytest.raises(NonDeterministicError, match=r"model\.eval"):
        ntk(model, x)
    model.eval()
    assert_close(ntk(model, x, method="structured"), dense_ntk(model, x))


def test_transformer_encoder_layer():
    """``nn.TransformerEncoderLayer`` (MHA inside, self-attention, eval): every part covered."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=8, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(5, E), layer, nn.Flatten(), nn.Linear(L * E, 2))
    model = model.double().eval()
    x = torch.randn(4, L, 5, dtype=torch.float64)
    mods = _explain(model, x)["modules"]
    assert not any("jacobian" in m for m in mods), mods
    assert_close(ntk(model, x, method="structured"), dense_ntk(model, x))


def test_float32_gradient_check_passes():
    """In float32 the parts pass the planner's check (tolerance 1e-3) and stay structured."""
    model, x, _ = make("padding_mask")
    model = model.float()
    routes = _mha_routes(model, x.float())
    assert len(routes) == 4 and not any("jacobian" in r for r in routes)
    ref = dense_ntk(model.double(), x)
    assert_close(ntk(model.float(), x.float()).double(), ref, rtol=1e-5)
