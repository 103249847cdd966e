"""Structured per-layer NTK rules: one module's share of ``Θ`` without forming the Jacobian.

The empirical NTK is a sum over any partition of the parameters,
``Θ(x, x') = Σ_l J_l(x) J_l(x')ᵀ``. For a module whose output is affine in its own parameters,
``J_l`` factors through two per-sample quantities that one pass of the network yields: the
module's input and the output cotangents ``G = ∂f/∂(module output)``, one per network output
``a = 1..k``. :mod:`gdscope.kernels.ntk` captures both (``vmap(jacrev)`` with respect to zero
"probes" added to each module's output) and hands them to the rules here.

**Linear-like modules** (``Linear``, ``Conv1d``/``Conv2d``, ``Embedding``) act at ``T`` positions
with one shared weight (the positions of a sequence, the output pixels of a convolution): with
``A_t`` the input features at position ``t`` (``d`` of them: a row, an unfolded patch, a one-hot
token) and ``G_t[a] ∈ R^o`` the cotangent there,

    J_W[a] = Σ_t G_t[a] ⊗ A_t,   J_b[a] = Σ_t G_t[a],
    Θ_l(x_i, x'_j)[a, b] = Σ_{t,s} (A_it · A'_js + 1[bias]) (G_it[a] · G'_js[b]).

Three exact ways to evaluate it (costs per sample pair, in multiply-adds; the planner in ``ntk.py``
picks the cheapest with :meth:`Rule.cost`):

- ``"gram"``: the input Gram ``M = A A'ᵀ + 1`` and the cotangent Gram ``G G'ᵀ`` as two GEMMs, then
  ``Σ_{t,s} M ⊙ GG'``: ``T T' (d + k² o)``. For ``T = 1`` (a plain ``Linear``) this is the classic
  ``(A A'ᵀ + 1) ⊙ (G G'ᵀ)``, and it is almost always the best.
- ``"pair"``: ``M`` first, then ``Σ_t G_t M_ts`` per sample pair and a second contraction:
  ``T T' d + k o T' (T + k)``; beats ``gram`` by about ``k`` for sequences.
- ``"jac"``: the per-sample weight Jacobian ``Σ_t G_t ⊗ A_t`` (``k × P_l``, formed once per
  sample), then one GEMM: ``k² P_l``. The choice for convolutions with few parameters and
  many positions.

**Elementwise-affine modules** (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm`` in eval
mode): ``y = x̂ ⊙ γ + β`` broadcast over positions ``p``, so ``J_γ[a] = Σ_p G_p[a] ⊙ x̂_p`` and
``J_β[a] = Σ_p G_p[a]``, ``2C`` columns per sample (``"jac"``). ``x̂`` is recomputed from the
captured input with the module's own functional (``F.layer_norm`` etc. without affine).

**Multi-head attention** (``nn.MultiheadAttention``): its parameters enter only through the input
projections ``q = query W_qᵀ + b_q`` (likewise ``k``, ``v``; packed ``in_proj_weight`` or separate
``q/k/v_proj_weight`` for ``kdim``/``vdim``) and the output projection ``out = core W_oᵀ + b_o``,
each affine at every position, while the attention core (softmax, masks) has none. During the
capture pass the module's ``forward`` is replaced by :func:`mha_forward`, the same computation
decomposed: the four projections by ``F.linear`` with a probe added to each result, the core by
``F.multi_head_attention_forward`` with identity projections (so masks, ``is_causal``,
``need_weights``, ``add_zero_attn`` and ``batch_first`` keep PyTorch's own semantics). Each
projection is then a Linear-like part (:class:`MhaPartRule`) with its own input (``query``,
``key``, ``value``, core output) and cotangent, evaluated by any of the three routes above.
Refused (the Jacobian route takes the module): ``add_bias_kv``, dropout in train mode, a
subclass with its own ``forward``, an ``out_proj`` called anywhere else.

Every rule also gives ``grad`` (``Σ_{i,a} v_ia J_l(x_i)[a]`` from the captures), which the planner
compares with autograd on two samples before trusting the rule: a parameter also used outside its
module's ``forward`` (tied weights, ``F.linear(h, self.lin.weight)``) fails that check and its
module falls back to the Jacobian.

**Custom layers** declare their own rule: a class attribute ``__ntk_rule__`` holding a
:class:`Rule` subclass (or a factory ``module -> Rule subclass | None``), read by
:func:`declared_rule` before the built-in table; see docs/extending.md for a worked example. The
registry knows no model zoo: ``gdscope.zoo.NTKLinear`` declares :class:`NTKLinearRule` this way.

Layouts: a chunk of ``c`` samples arrives as the module input ``inp`` of shape ``(c, *in_shape)``
and cotangents ``G`` of shape ``(c, k, *out_shape)``, where ``in_shape``/``out_shape`` are what the
module saw in a per-sample call (usually with a leading batch dimension 1).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "APPROACHES",
    "ChannelNormRule",
    "ConvRule",
    "EmbeddingRule",
    "LayerNormRule",
    "LinearRule",
    "MhaPartRule",
    "NTKLinearRule",
    "NtkRuleSpec",
    "Rule",
    "declared_rule",
    "make_rule",
    "mha_forward",
    "mha_inputs",
]

APPROACHES = ("gram", "pair", "jac")

# Relative cost weights, in multiply-adds of one large GEMM: contiguous elementwise passes
# (``addcmul_``), batched small matmuls, and strided passes over per-pair position blocks (the
# ``(T, T')`` reductions of ``gram`` and the permuted copy of ``pair`` at ``T > 1``). The last was
# fitted to per-rule timings of every route on a GPT (T = 16, k = 64) and a ViT (T = 5, k = 10)
# at 1 thread (bench/bench_transformer.py, docs/performance.md "Transformers"): about 6.5 ns per
# element against a 93 GFLOP/s GEMM, ~300 GEMM multiply-adds; with the old weight (4) the
# planner chose routes 1.2-4.6x slower than the Jacobian GEMM for sequences.
_ELEMENTWISE = 4.0
_STRIDED = 300.0
_BMM_PENALTY = 1.5


class Rule:
    """One module's structured NTK contribution. Subclasses fill in the geometry."""

    approaches: tuple[str, ...] = ("jac",)
    #: local names of the module's own parameters this rule accounts for; a module holding any
    #: other trainable parameter gets no rule (its parameters go to the Jacobian route)
    param_names: ClassVar[frozenset[str]] = frozenset({"weight", "bias"})
    #: ``None``, or the part of a composite module (``"q"``, ``"k"``, ``"v"``, ``"o"`` of an
    #: ``nn.MultiheadAttention``): the capture then holds a dict of inputs and cotangents per
    #: module name, one entry per part.
    part: str | None = None

    def __init__(
        self,
        name: str,
        module: nn.Module,
        params: dict[str, str],
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        k: int,
    ) -> None:
        self.name = name
        self.module = module
        self.params = params  # local name ('weight'/'bias') -> canonical name, trainable only
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.k = k
        self.approach = "jac"

    @property
    def key(self) -> str:
        """Unique name of this rule (module name, and ``#part`` for a composite's part)."""
        return self.name if self.part is None else f"{self.name}#{self.part}"

    # ---- geometry -------------------------------------------------------------------------
    @property
    def has_w(self) -> bool:
        return "weight" in self.params

    @property
    def has_b(self) -> bool:
        return "bias" in self.params

    def jac_width(self) -> int:
        """Columns of this module's per-sample Jacobian (``P_l``)."""
        raise NotImplementedError

    def cost(self, approach: str, trace: bool, n_other: int) -> float:
        """Multiply-adds per sample pair (forming costs amortised over ``n_other`` partners)."""
        k = self.k if not trace else 1
        return 2.0 * self.k * k * self.jac_width() + 2.0 * self._form_cost() / max(n_other, 1)

    def _form_cost(self) -> float:
        return 0.0

    def form_flops(self) -> float:
        """Matmul FLOPs per sample to form the ``jac`` route's per-sample Jacobian."""
        return 0.0

    #: the ``jac`` route's Jacobians come from one grouped convolution over a chunk of samples
    #: (``torch.utils.flop_counter`` counts it once per group: ``chunk`` times its FLOPs)
    grouped_jac: bool = False

    def flops(self, approach: str, trace: bool) -> float:
        """Matmul FLOPs per sample pair of :meth:`contract` for ``approach`` (what
        ``torch.utils.flop_counter`` counts: GEMMs, not elementwise passes); for ``"jac"``
        this rule's columns in the jac-group GEMM."""
        return 2.0 * (self.k if trace else self.k * self.k) * self.jac_width()

    def feature_bytes(self, approach: str, esize: int) -> int:
        """Bytes stored per sample for ``approach`` (0 for ``jac``: it lives in the jac group)."""
        return 0

    def pair_workspace(self, approach: str, trace: bool) -> int:
        """Elements of scratch per sample pair during :meth:`contract`."""
        return 0

    # ---- computation ------------------------------------------------------------------------
    def jac(self, inp: Tensor, G: Tensor) -> Tensor:
        """Per-sample Jacobian ``(c, k, P_l)`` (weight flattened first, then bias)."""
        parts = self._jac_parts(inp, G)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def jac_into(self, inp: Tensor, G: Tensor, dst: Tensor) -> None:
        """Write :meth:`jac` into ``dst`` (a ``(c, k, P_l)`` view) without a concatenation."""
        off = 0
        for part in self._jac_parts(inp, G):
            dst[:, :, off : off + part.shape[2]] = part
            off += part.shape[2]

    def _jac_parts(self, inp: Tensor, G: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def grad(self, inp: Tensor, G: Tensor, v: Tensor) -> dict[str, Tensor]:
        """``Σ_{i,a} v_ia ∂f_a(x_i)/∂θ`` per trainable parameter (canonical names)."""
        raise NotImplementedError

    def features(self, inp: Tensor, G: Tensor, trace: bool) -> tuple[Tensor, ...]:
        """What :meth:`contract` needs from a chunk of samples (``gram``/``pair`` only)."""
        raise NotImplementedError

    def contract(
        self, fI: tuple[Tensor, ...], fJ: tuple[Tensor, ...], acc: Tensor, trace: bool, ws: int
    ) -> None:
        """Add this module's block to ``acc`` (``(bI, k, bJ, k)``, or ``(bI, bJ)`` with trace)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({type(self.module).__name__}): {self.approach}"


def _chunks(bI: int, bJ: int, per_pair: int, ws: int) -> tuple[int, int]:
    """Sub-tile sizes ``(ci, cj)`` with ``ci · cj · per_pair <= ws`` (at least one pair)."""
    per_pair = max(per_pair, 1)
    cj = min(bJ, max(1, ws // per_pair))
    ci = min(bI, max(1, ws // (per_pair * cj)))
    return ci, cj


class _AffineRule(Rule):
    """Linear-like: ``y_t = W A_t + b`` at ``T`` positions (see the module docstring)."""

    approaches = ("gram", "pair", "jac")
    T: int
    d: int
    o: int
    groups: int = 1
    #: forward ``y = w_scale·W A + b_scale·b`` (1 and 1 but for NTK-parameterized layers)
    w_scale: float = 1.0
    b_scale: float = 1.0

    # subclasses: canonical forms
    def _A(self, inp: Tensor) -> Tensor:  # (c, T, d)
        raise NotImplementedError

    def _Gc(self, G: Tensor) -> Tensor:  # (c, k, o, T), possibly a view
        raise NotImplementedError

    def _M(self, AI: Tensor, AJ: Tensor, dtype: torch.dtype) -> Tensor:
        """``A_it · A'_js (+1)`` as ``(bI, T, bJ, T')``."""
        bI, bJ = AI.shape[0], AJ.shape[0]
        if self.has_w:
            M = AI.reshape(bI * self.T, -1) @ AJ.reshape(bJ * self.T, -1).T
            if self.has_b:
                M += self.b_scale**2
        else:
            M = torch.full(
                (bI * self.T, bJ * self.T), self.b_scale**2, dtype=dtype, device=AI.device
            )
        return M.view(bI, self.T, bJ, self.T)

    def _m_cost(self) -> float:
        return 2.0 * self.T * self.T * self.d if self.has_w else 0.0

    def jac_width(self) -> int:
        return self.o * (self.d // self.groups) * self.has_w + self.o * self.has_b

    def _form_cost(self) -> float:
        return self.k * self.T * self.jac_width()

    def form_flops(self) -> float:
        return 2.0 * self.k * self.T * self.o * (self.d // self.groups) * self.has_w

    def flops(self, approach: str, trace: bool) -> float:
        k, T, o = self.k, self.T, self.o
        m = self._m_cost() if not isinstance(self, EmbeddingRule) else 0.0
        if approach == "gram":
            return m + 2.0 * (k if trace else k * k) * T * T * o
        if approach == "pair":
            return m + 2.0 * k * o * T * T + 2.0 * k * k * o * T
        return super().flops(approach, trace)

    def cost(self, approach: str, trace: bool, n_other: int) -> float:
        k, T, o = self.k, self.T, self.o
        if approach == "jac":
            return super().cost(approach, trace, n_other)
        ew = _ELEMENTWISE if T == 1 else _STRIDED
        if approach == "gram":
            if trace:
                return self._m_cost() + 2.0 * k * T * T * o + ew * T * T
            return self._m_cost() + 2.0 * k * k * T * T * o + ew * k * k * T * T
        if approach == "pair":
            if trace:
                return math.inf
            mm = 2.0 * k * o * T * T + 2.0 * k * k * o * T
            return self._m_cost() + _BMM_PENALTY * mm + 2.0 * ew * k * o * T
        raise ValueError(approach)

    def feature_bytes(self, approach: str, esize: int) -> int:
        if approach == "jac":
            return 0
        return self._a_bytes(esize) + self.k * self.o * self.T * esize

    def _a_bytes(self, esize: int) -> int:
        return self.T * self.d * esize

    def pair_workspace(self, approach: str, trace: bool) -> int:
        k, T, o = self.k, self.T, self.o
        if approach == "gram":
            return T * T + (2 * T * T if trace else 2 * k * k * T * T)
        if approach == "pair":
            return T * T + 2 * k * o * T + k * k
        return 0

    def features(self, inp: Tensor, G: Tensor, trace: bool) -> tuple[Tensor, ...]:
        A = self._A(inp).contiguous()
        Gc = self._Gc(G)
        if self.approach == "pair":
            return A, Gc.contiguous()
        if trace:  # (c, T, k, o)
            return A, Gc.permute(0, 3, 1, 2).contiguous()
        return A, Gc.transpose(2, 3).contiguous()  # (c, k, T, o)

    def _jac_parts(self, inp: Tensor, G: Tensor) -> list[Tensor]:
        A, Gc = self._A(inp), self._Gc(G)
        c, k, o, T = Gc.shape
        parts = []
        if self.has_w:
            if self.groups == 1:
                # (c, k, o, d); Gc stays a (transposed) view: BLAS reads it as Gᵀ, where a
                # contiguous (c, k·o, T) copy takes a slower path for T ≪ o (5x at T = 8)
                Jw = torch.matmul(Gc, A.unsqueeze(1))
            else:
                g = self.groups
                Jw = torch.einsum(
                    "cagut,ctgd->cagud", Gc.reshape(c, k, g, o // g, T), A.reshape(c, T, g, -1)
                )
            parts.append(Jw.reshape(c, k, -1))
        if self.has_b:
            parts.append(Gc.sum(-1) * self.b_scale)
        return parts

    def grad(self, inp: Tensor, G: Tensor, v: Tensor) -> dict[str, Tensor]:
        A, Gc = self._A(inp), self._Gc(G)
        Gv = torch.einsum("ca,caot->cot", v, Gc)
        out = {}
        if self.has_w:
            w = self.module.weight
            if self.groups == 1:
                gw = torch.einsum("cot,ctd->od", Gv, A)
            else:
                g = self.groups
                c = Gv.shape[0]
                gw = torch.einsum(
                    "cgut,ctgd->gud", Gv.reshape(c, g, -1, self.T), A.reshape(c, self.T, g, -1)
                )
            out[self.params["weight"]] = gw.reshape(w.shape)
        if self.has_b:
            out[self.params["bias"]] = Gv.sum((0, 2)) * self.b_scale
        return out

    def contract(
        self, fI: tuple[Tensor, ...], fJ: tuple[Tensor, ...], acc: Tensor, trace: bool, ws: int
    ) -> None:
        AI, GI = fI
        AJ, GJ = fJ
        bI, bJ = AI.shape[0], AJ.shape[0]
        k, T, o = self.k, self.T, self.o
        ci, cj = _chunks(bI, bJ, self.pair_workspace(self.approach, trace), ws)
        for i0 in range(0, bI, ci):
            i1 = min(i0 + ci, bI)
            for j0 in range(0, bJ, cj):
                j1 = min(j0 + cj, bJ)
                ni, nj = i1 - i0, j1 - j0
                M = self._M(AI[i0:i1], AJ[j0:j1], GI.dtype)  # (ni, T, nj, T)
                gi, gj = GI[i0:i1], GJ[j0:j1]
                if self.approach == "gram" and trace:
                    GG = gi.reshape(ni * T, k * o) @ gj.reshape(nj * T, k * o).T
                    if T == 1:
                        acc[i0:i1, j0:j1].addcmul_(GG, M.view(ni, nj))
                    else:
                        acc[i0:i1, j0:j1] += GG.view(ni, T, nj, T).mul_(M).sum((1, 3))
                elif self.approach == "gram":
                    GG = gi.reshape(ni * k * T, o) @ gj.reshape(nj * k * T, o).T
                    blk = acc[i0:i1, :, j0:j1, :]
                    if T == 1:
                        blk.addcmul_(GG.view(ni, k, nj, k), M.view(ni, 1, nj, 1))
                    else:
                        GG = GG.view(ni, k, T, nj, k, T).mul_(M.view(ni, 1, T, nj, 1, T))
                        blk += GG.sum((2, 5))
                else:  # pair, full outputs
                    Y = torch.bmm(gi.reshape(ni, k * o, T), M.reshape(ni, T, nj * T))
                    Yp = Y.view(ni, k, o, nj, T).permute(3, 0, 1, 2, 4).reshape(nj, ni * k, o * T)
                    Z = torch.bmm(Yp, gj.reshape(nj, k, o * T).transpose(1, 2))  # (nj, ni·k, k)
                    acc[i0:i1, :, j0:j1, :] += Z.view(nj, ni, k, k).permute(1, 2, 0, 3)


class LinearRule(_AffineRule):
    """``nn.Linear`` on inputs ``(..., d)``: every leading position shares the weight.

    Reads the module's ``in_features``/``out_features`` and its ``weight``/``bias``. For a custom
    layer ``y = w_scale · W x + b_scale · b`` (docs/extending.md) subclass it and set
    ``self.w_scale``/``self.b_scale`` in ``__init__``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.module
        self.d, self.o = m.in_features, m.out_features
        self.T = max(1, math.prod(self.in_shape[:-1]))

    def _A(self, inp: Tensor) -> Tensor:
        A = inp.reshape(inp.shape[0], self.T, self.d)
        return A if self.w_scale == 1.0 else A * self.w_scale

    def _Gc(self, G: Tensor) -> Tensor:
        return G.reshape(G.shape[0], self.k, self.T, self.o).transpose(2, 3)


class NTKLinearRule(LinearRule):
    """A dense layer in NTK parameterization, ``y = sqrt(σ_w²/d) W h + sqrt(σ_b²) b``: ``A``
    carries the weight scale and the bias term of ``M`` is ``σ_b²`` instead of 1.

    Reads the module's ``in_features``, ``out_features``, ``weight_var`` and ``bias_var``
    (``gdscope.zoo.NTKLinear`` declares it through ``__ntk_rule__``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.module
        self.w_scale = math.sqrt(m.weight_var / m.in_features)
        self.b_scale = math.sqrt(m.bias_var)


#: a convolution's per-sample weight Jacobians by one grouped convolution while
#: ``in_channels · out_channels`` is at most this (:meth:`ConvRule._jac_parts`)
_GROUPED_MAX = 512


class ConvRule(_AffineRule):
    """``nn.Conv1d``/``nn.Conv2d``: unfolded patches at the output positions share the kernel."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.module
        self.nd = 1 if isinstance(m, nn.Conv1d) else 2
        batched = len(self.in_shape) == self.nd + 2
        self.B = self.in_shape[0] if batched else 1  # images per per-sample call
        self.C = self.in_shape[1 if batched else 0]
        self.sp = self.in_shape[-self.nd :]
        self.osp = self.out_shape[-self.nd :]
        self.L = math.prod(self.osp)
        self.T = self.B * self.L
        self.groups = m.groups
        if self.groups > 1:
            self.approaches = ("jac",)  # block-diagonal weight: only the Jacobian route
        self.o = m.out_channels
        self.d = self.C * math.prod(m.kernel_size)

    def _A(self, inp: Tensor) -> Tensor:
        m, c = self.module, inp.shape[0]
        x = inp.reshape(c * self.B, self.C, *self.sp)
        pad = list(m._reversed_padding_repeated_twice)  # (left, right) per dim, last dim first
        sym = all(pad[2 * i] == pad[2 * i + 1] for i in range(self.nd))
        unfold_pad = [0] * self.nd
        if m.padding_mode == "zeros" and sym:
            unfold_pad = pad[::2][::-1]  # symmetric zero padding: let unfold do it
        elif any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        if self.nd == 1:
            x = x.unsqueeze(2)
            ks, dil, st = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
            unfold_pad = [0, *unfold_pad]
        else:
            ks, dil, st = m.kernel_size, m.dilation, m.stride
        U = F.unfold(x, ks, dilation=dil, padding=tuple(unfold_pad), stride=st)  # (c·B, d, L)
        return U.view(c, self.B, self.d, self.L).permute(0, 1, 3, 2).reshape(c, self.T, self.d)

    @property
    def grouped_jac(self) -> bool:
        """Whether :meth:`_jac_parts` forms the weight Jacobians by one grouped convolution."""
        return self.groups == 1 and self.has_w and self.C * self.o <= _GROUPED_MAX

    def _jac_parts(self, inp: Tensor, G: Tensor) -> list[Tensor]:
        """Per-sample weight Jacobians as the weight gradient of one grouped convolution: the
        ``c`` samples side by side as ``c`` groups (input channels ``c·C``, output channels
        ``c·k·o``, the ``B`` images per sample as its batch), so ``J_w[i, a] =
        Σ_positions G_i[a] ⊗ patches_i`` without the unfolded patches in memory. Measured
        (one CPU thread, 256 samples, 8-16² images): 1.4-8x faster than im2col plus a batched
        matmul while ``C·o <= _GROUPED_MAX``, up to 2.5x slower above it (there: im2col)."""
        if not self.grouped_jac:
            return super()._jac_parts(inp, G)
        m, c, k, o, B, C = self.module, inp.shape[0], self.k, self.o, self.B, self.C
        x = inp.reshape(c, B, C, *self.sp).transpose(0, 1).reshape(B, c * C, *self.sp)
        pad = list(m._reversed_padding_repeated_twice)  # (left, right) per dim, last dim first
        padding = [0] * self.nd
        if m.padding_mode == "zeros" and all(pad[2 * i] == pad[2 * i + 1] for i in range(self.nd)):
            padding = pad[::2][::-1]
        elif any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        g = G.reshape(c, k, B, o, *self.osp).permute(2, 0, 1, 3, *range(4, 4 + self.nd))
        g = g.reshape(B, c * k * o, *self.osp)
        shape = (c * k * o, C, *m.kernel_size)  # the weight's: only its shape is used
        # a stride-0 placeholder on the CPU (measured); elsewhere an untouched allocation, in
        # case a backend inspects the weight's layout (not run on a GPU in this revision)
        w = x.new_empty((1,)).expand(shape) if x.device.type == "cpu" else x.new_empty(shape)
        _, gw, _ = torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            None,
            list(m.stride),
            padding,
            list(m.dilation),
            False,
            [0] * self.nd,
            c,
            [False, True, False],
        )
        parts = [gw.reshape(c, k, o * self.d)]
        if self.has_b:
            parts.append(self._Gc(G).sum(-1) * self.b_scale)
        return parts

    def _Gc(self, G: Tensor) -> Tensor:
        c = G.shape[0]
        g = G.reshape(c, self.k, self.B, self.o, self.L)
        if self.B == 1:
            return g.view(c, self.k, self.o, self.L)
        return g.permute(0, 1, 3, 2, 4).reshape(c, self.k, self.o, self.T)


class EmbeddingRule(_AffineRule):
    """``nn.Embedding``: the input features are one-hot tokens, so ``A_t·A'_s = 1[idx_t = idx'_s]``.

    ``jac`` scatters into all ``num_embeddings`` rows (only worth it for small vocabularies; the
    planner's cost model knows); ``padding_idx`` rows get no gradient, as in PyTorch.
    """

    param_names = frozenset({"weight"})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.module
        self.V, self.o = m.num_embeddings, m.embedding_dim
        self.d = self.V
        self.T = max(1, math.prod(self.in_shape))
        self.pad = m.padding_idx

    def _A(self, inp: Tensor) -> Tensor:  # token ids (c, T)
        return inp.reshape(inp.shape[0], self.T)

    def _Gc(self, G: Tensor) -> Tensor:
        Gt = G.reshape(G.shape[0], self.k, self.T, self.o)
        return Gt.transpose(2, 3)

    def _mask(self, idx: Tensor) -> Tensor | None:
        return None if self.pad is None else idx != self.pad

    def _M(self, AI: Tensor, AJ: Tensor, dtype: torch.dtype) -> Tensor:
        bI, bJ = AI.shape[0], AJ.shape[0]
        eq = AI.reshape(bI * self.T, 1) == AJ.reshape(1, bJ * self.T)
        mask = self._mask(AI)
        if mask is not None:
            eq &= mask.reshape(bI * self.T, 1)
        return eq.to(dtype).view(bI, self.T, bJ, self.T)

    def _m_cost(self) -> float:
        return _ELEMENTWISE * self.T * self.T

    def _a_bytes(self, esize: int) -> int:
        return self.T * 8

    def jac_width(self) -> int:
        return self.V * self.o

    def _form_cost(self) -> float:
        return self.k * (self.T + self.V) * self.o

    def form_flops(self) -> float:
        return 0.0  # a scatter

    def _masked_G(self, inp: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        idx = self._A(inp)
        Gt = G.reshape(G.shape[0], self.k, self.T, self.o)
        mask = self._mask(idx)
        if mask is not None:
            Gt = Gt * mask[:, None, :, None].to(Gt.dtype)
        return idx, Gt

    def _jac_parts(self, inp: Tensor, G: Tensor) -> list[Tensor]:
        idx, Gt = self._masked_G(inp, G)
        c, k = Gt.shape[:2]
        J = Gt.new_zeros(c, k, self.V, self.o)
        J.scatter_add_(2, idx.view(c, 1, self.T, 1).expand(c, k, self.T, self.o), Gt)
        return [J.view(c, k, -1)]

    def grad(self, inp: Tensor, G: Tensor, v: Tensor) -> dict[str, Tensor]:
        idx, Gt = self._masked_G(inp, G)
        Gv = torch.einsum("ca,cato->cto", v, Gt).reshape(-1, self.o)
        gw = Gv.new_zeros(self.V, self.o).index_add_(0, idx.reshape(-1), Gv)
        return {self.params["weight"]: gw}


class _NormRule(Rule):
    """Elementwise affine ``y = x̂ ⊙ γ + β``: ``J_γ = Σ_p G_p ⊙ x̂_p``, ``J_β = Σ_p G_p``."""

    C: int

    def _xhat_G(self, inp: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        """``x̂`` as ``(c, P, C)`` and ``G`` as ``(c, k, P, C)``."""
        raise NotImplementedError

    def jac_width(self) -> int:
        return self.C * (self.has_w + self.has_b)

    def _form_cost(self) -> float:
        return self.k * math.prod(self.out_shape) * 2

    def form_flops(self) -> float:
        return 2.0 * self.k * math.prod(self.out_shape) * self.has_w  # the einsum for γ

    def _jac_parts(self, inp: Tensor, G: Tensor) -> list[Tensor]:
        xh, Gn = self._xhat_G(inp, G)
        parts = []
        if self.has_w:
            parts.append(torch.einsum("ckpC,cpC->ckC", Gn, xh))
        if self.has_b:
            parts.append(Gn.sum(2))
        return parts

    def grad(self, inp: Tensor, G: Tensor, v: Tensor) -> dict[str, Tensor]:
        xh, Gn = self._xhat_G(inp, G)
        Gv = torch.einsum("ca,capC->cpC", v, Gn)
        out = {}
        if self.has_w:
            w = self.params["weight"]
            out[w] = (Gv * xh).sum((0, 1)).reshape(self.module.weight.shape)
        if self.has_b:
            out[self.params["bias"]] = Gv.sum((0, 1)).reshape(self.module.bias.shape)
        return out


class LayerNormRule(_NormRule):
    """``nn.LayerNorm`` and ``nn.RMSNorm`` over ``normalized_shape`` (positions = leading dims)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ns = tuple(self.module.normalized_shape)
        self.C = math.prod(self.ns)

    def _xhat_G(self, inp: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        m, c = self.module, inp.shape[0]
        if isinstance(m, nn.LayerNorm):
            xh = F.layer_norm(inp, self.ns, None, None, m.eps)
        else:
            xh = F.rms_norm(inp, self.ns, None, m.eps)
        return xh.reshape(c, -1, self.C), G.reshape(c, self.k, -1, self.C)


class ChannelNormRule(_NormRule):
    """``nn.GroupNorm`` and eval-mode ``BatchNorm{1,2,3}d`` (affine over channel dim 1)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.B = self.in_shape[0]
        self.C = self.in_shape[1]
        self.S = math.prod(self.in_shape[2:])

    def _xhat_G(self, inp: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        m, c = self.module, inp.shape[0]
        x = inp.reshape(c * self.B, *self.in_shape[1:])
        if isinstance(m, nn.GroupNorm):
            xh = F.group_norm(x, m.num_groups, None, None, m.eps)
        else:
            xh = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        P = self.B * self.S
        xh = xh.reshape(c, self.B, self.C, self.S).transpose(2, 3).reshape(c, P, self.C)
        Gn = G.reshape(c, self.k, self.B, self.C, self.S).transpose(3, 4)
        return xh, Gn.reshape(c, self.k, P, self.C)


class MhaPartRule(_AffineRule):
    """One projection of an ``nn.MultiheadAttention``: ``y_t = W A_t + b`` at ``T`` positions.

    ``part`` is ``"q"``, ``"k"``, ``"v"`` (input projections; ``A`` the query, key or value) or
    ``"o"`` (output projection; ``A`` the attention core's output). A packed ``in_proj_weight``
    (``3E × E``) and the packed ``in_proj_bias`` contribute rows ``rows`` of the parameter;
    :meth:`grad` returns the full-size gradient, zero outside those rows.
    """

    param_names = frozenset(
        {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
    )

    def __init__(
        self,
        name: str,
        module: nn.Module,
        params: dict[str, str],
        part: str,
        T: int,
        d: int,
        o: int,
        k: int,
        shapes: dict[str, tuple[int, ...]],
        w_rows: slice | None,
        b_rows: slice | None,
        probe_shape: tuple[int, ...],
    ) -> None:
        super().__init__(name, module, params, (T, d), probe_shape, k)
        self.part, self.T, self.d, self.o = part, T, d, o
        self.shapes = shapes  # canonical name -> full parameter shape
        self.w_rows, self.b_rows = w_rows, b_rows

    def _A(self, inp: Any) -> Tensor:
        x = inp[self.part]
        return x.reshape(x.shape[0], self.T, self.d)

    def _Gc(self, G: Any) -> Tensor:
        g = G[self.part]
        return g.reshape(g.shape[0], self.k, self.T, self.o).transpose(2, 3)

    def grad(self, inp: Any, G: Any, v: Tensor) -> dict[str, Tensor]:
        A, Gc = self._A(inp), self._Gc(G)
        Gv = torch.einsum("ca,caot->cot", v, Gc)
        out = {}
        for local, rows, val in (
            ("weight", self.w_rows, lambda: torch.einsum("cot,ctd->od", Gv, A)),
            ("bias", self.b_rows, lambda: Gv.sum((0, 2))),
        ):
            if local not in self.params:
                continue
            g = val()
            canon = self.params[local]
            if rows is not None:
                full = g.new_zeros(self.shapes[canon])
                full[rows] = g
                g = full
            out[canon] = g
        return out

    def describe(self) -> str:
        return f"{self.name} (MultiheadAttention, {_PART_NAMES[self.part]}): {self.approach}"


_PART_NAMES = {"q": "query proj.", "k": "key proj.", "v": "value proj.", "o": "out proj."}
_MHA_ARGS = inspect.signature(nn.MultiheadAttention.forward)


def mha_inputs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of ``module.forward(*args, **kwargs)`` by name (defaults filled in)."""
    bound = _MHA_ARGS.bind(module, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    return out


def _mha_layout(m: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """``x`` in the ``(L, B, E)`` layout of ``F.multi_head_attention_forward``."""
    return x.transpose(0, 1) if m.batch_first and x.dim() == 3 else x


def _mha_weights(m: nn.MultiheadAttention) -> tuple[list[Tensor], list[Tensor | None]]:
    E = m.embed_dim
    if m._qkv_same_embed_dim:
        W = list(m.in_proj_weight.split(E, dim=0))
    else:
        W = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    b = [None] * 3 if m.in_proj_bias is None else list(m.in_proj_bias.split(E, dim=0))
    return W, b


def mha_forward(
    module: nn.MultiheadAttention,
    probes: dict[str, Tensor],
    aux: dict[str, Tensor],
    *args: Any,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """``module.forward`` decomposed, with ``probes[part]`` added to each projection's output.

    The inputs of the four projections are stored in ``aux`` (``(L, B, ·)`` layout). Same
    arguments and result as ``nn.MultiheadAttention.forward``; the attention core is
    ``F.multi_head_attention_forward`` with identity projections.
    """
    m = module
    a = mha_inputs(m, args, kwargs)
    query, key, value = (_mha_layout(m, a[n]) for n in ("query", "key", "value"))
    W, b = _mha_weights(m)
    proj = []
    for part, x, w, bias in zip("qkv", (query, key, value), W, b, strict=True):
        aux[part] = x
        y = F.linear(x, w, bias)
        proj.append(y + probes[part] if part in probes else y)
    E = m.embed_dim
    eye = torch.eye(E, dtype=query.dtype, device=query.device)
    core, weights = F.multi_head_attention_forward(
        *proj,
        E,
        m.num_heads,
        None,
        None,
        None,
        None,
        m.add_zero_attn,
        m.dropout,
        eye,
        None,
        training=m.training,
        key_padding_mask=a["key_padding_mask"],
        need_weights=a["need_weights"],
        attn_mask=a["attn_mask"],
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=a["average_attn_weights"],
        is_causal=a["is_causal"],
    )
    aux["o"] = core
    out = F.linear(core, m.out_proj.weight, m.out_proj.bias)
    if "o" in probes:
        out = out + probes["o"]
    return _mha_layout(m, out), weights


def _mha_rules(
    name: str,
    m: nn.MultiheadAttention,
    params: dict[str, str],
    extra: dict[str, Any] | None,
    k: int,
    shapes: dict[str, tuple[int, ...]],
) -> list[Rule] | None:
    """The projection parts of an ``nn.MultiheadAttention`` (``None`` where refused)."""
    if extra is None or m.bias_k is not None or m.bias_v is not None:
        return None
    if m.training and m.dropout > 0:
        return None
    q, key, v = (extra.get(n) for n in ("query", "key", "value"))
    if q is None or key is None or v is None:
        return None
    E = m.embed_dim
    L = math.prod(q[:-1])  # positions (times batch) of the per-sample call
    S = math.prod(key[:-1])
    lay = (lambda s: (s[1], s[0], E)) if m.batch_first and len(q) == 3 else (lambda s: (*s[:-1], E))
    dims = {"q": (L, q[-1], lay(q)), "k": (S, key[-1], lay(key)), "v": (S, v[-1], lay(v))}
    dims["o"] = (L, E, lay(q))
    if m._qkv_same_embed_dim:
        wname = {p: "in_proj_weight" for p in "qkv"}
        wrows = {p: slice(i * E, (i + 1) * E) for i, p in enumerate("qkv")}
    else:
        wname = {"q": "q_proj_weight", "k": "k_proj_weight", "v": "v_proj_weight"}
        wrows = dict.fromkeys("qkv")
    wname["o"], wrows["o"] = "out_proj.weight", None
    bname = {p: "in_proj_bias" for p in "qkv"} | {"o": "out_proj.bias"}
    brows = {p: slice(i * E, (i + 1) * E) for i, p in enumerate("qkv")} | {"o": None}
    rules: list[Rule] = []
    for part, (T, d, pshape) in dims.items():
        own = {}
        if wname[part] in params:
            own["weight"] = params[wname[part]]
        if bname[part] in params:
            own["bias"] = params[bname[part]]
        if not own:
            continue
        rules.append(
            MhaPartRule(name, m, own, part, T, d, E, k, shapes, wrows[part], brows[part], pshape)
        )
    return rules or None


# --------------------------------------------------------------------------------------------
# Which modules have a rule

_RMSNorm = getattr(nn, "RMSNorm", None)


def _forward_is(m: nn.Module, cls: type) -> bool:
    """``m`` is a ``cls`` running ``cls.forward`` (no subclass or instance override)."""
    return isinstance(m, cls) and type(m).forward is cls.forward and "forward" not in vars(m)


#: What a module class puts in ``__ntk_rule__``: a :class:`Rule` subclass, or a factory called
#: with the module that returns one (or ``None``: no rule for this instance).
NtkRuleSpec: TypeAlias = type[Rule] | Callable[[nn.Module], type[Rule] | None]


def declared_rule(m: nn.Module) -> type[Rule] | None:
    """The rule ``m``'s class declares through ``__ntk_rule__`` (the protocol), else ``None``.

    A class declares ``__ntk_rule__ = MyRule`` (a :class:`Rule` subclass whose
    ``__init__(name, module, params, in_shape, out_shape, k)`` reads the geometry from the module
    and the shapes the module saw in a one-sample forward), or a factory
    ``__ntk_rule__ = staticmethod(lambda module: MyRule)`` (which may return ``None``, and lets
    the rule's module be imported lazily). The declaration is honoured only where it is at least
    as derived as the class that defines ``forward``: a subclass that overrides ``forward``
    without declaring again gets no rule (``__ntk_rule__ = None`` also opts out), and so does an
    instance whose ``forward`` was replaced. Every rule is still checked against autograd on two
    samples before the planner trusts it (see :mod:`gdscope.kernels.ntk`).
    """
    cls = type(m)
    if "forward" in vars(m):
        return None
    fwd = next((c for c in cls.__mro__ if "forward" in vars(c)), None)
    own = next((c for c in cls.__mro__ if "__ntk_rule__" in vars(c)), None)
    if own is None or fwd is None or not issubclass(own, fwd):
        return None
    spec = vars(own)["__ntk_rule__"]
    if isinstance(spec, staticmethod):
        spec = spec.__func__
    if spec is None:
        return None
    rule = spec if isinstance(spec, type) else spec(m)
    if rule is None:
        return None
    if not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise TypeError(
            f"{cls.__name__}.__ntk_rule__ gives {rule!r}, not a subclass of "
            "gdscope.kernels.rules.Rule: declare the rule class (or a factory returning one)."
        )
    return rule


def _rule_class(m: nn.Module) -> type[Rule] | None:
    declared = declared_rule(m)
    if declared is not None:
        return declared
    if _forward_is(m, nn.MultiheadAttention):
        return MhaPartRule
    if _forward_is(m, nn.Linear):
        return LinearRule
    if _forward_is(m, nn.Conv1d) or _forward_is(m, nn.Conv2d):
        return ConvRule
    if _forward_is(m, nn.Embedding):
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
            return None  # renormalises weights in place / batch-dependent gradient scaling
        return EmbeddingRule
    if _forward_is(m, nn.LayerNorm) or (_RMSNorm is not None and _forward_is(m, _RMSNorm)):
        return LayerNormRule
    if _forward_is(m, nn.GroupNorm):
        return ChannelNormRule
    if isinstance(m, _BatchNorm) and type(m).forward is _BatchNorm.forward:
        uses_running = m.running_mean is not None and m.running_var is not None
        if not m.training and uses_running:
            return ChannelNormRule
    return None


def make_rule(
    name: str,
    module: nn.Module,
    params: dict[str, str],
    in_shape: tuple[int, ...] | None,
    out_shape: tuple[int, ...] | None,
    k: int,
    extra: dict[str, Any] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Rule | list[Rule] | None:
    """A rule (or, for a composite module, a list of part rules) for ``module``, else ``None``.

    ``params`` maps the module's own trainable parameter names to canonical model names (for an
    ``nn.MultiheadAttention`` also ``"out_proj.weight"``/``"out_proj.bias"``).
    ``in_shape``/``out_shape`` come from the record pass (``None`` if not a plain tensor);
    ``extra`` holds an ``nn.MultiheadAttention``'s ``query``/``key``/``value`` shapes and
    ``shapes`` the canonical parameters' shapes.
    """
    cls = _rule_class(module)
    if cls is None or not params:
        return None
    own = {n for n, p in module._parameters.items() if p is not None}
    if cls is MhaPartRule:
        sub = {n for n, p in module.out_proj._parameters.items() if p is not None}
        mine = {n for n in params if not n.startswith("out_proj.")}
        if not (own | mine) <= cls.param_names or not sub <= {"weight", "bias"}:
            return None
        return _mha_rules(name, module, params, extra, k, shapes or {})
    if in_shape is None or out_shape is None:
        return None
    if not own <= cls.param_names or not set(params) <= cls.param_names:
        return None
    if cls is ConvRule:
        nd = 1 if isinstance(module, nn.Conv1d) else 2
        if len(in_shape) not in (nd + 1, nd + 2):
            return None
    if cls is ChannelNormRule and len(in_shape) < 2:
        return None
    return cls(name, module, params, in_shape, out_shape, k)
