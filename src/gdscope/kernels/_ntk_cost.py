"""The cost model of :func:`gdscope.kernels.ntk.ntk`'s ``auto`` route: the predicted FLOPs and
seconds of each exact route (structured rules per layer, the Jacobian of a parameter group, the
whole Jacobian route, NTK-vector products) from a plan's recorded shapes and operator counts,
and the tile sizes they are priced at.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gdscope.kernels._ntk_capture import _syrk_ok
from gdscope.kernels.rules import Rule

if TYPE_CHECKING:
    from gdscope.kernels._ntk_job import _Layout
    from gdscope.kernels._ntk_plan import _Plan

# Tile targets: rows of the (b·k × b2·k) GEMMs that keep BLAS efficient while leaving several
# tiles for the symmetric case (upper triangle only).
_TILE_ROWS = 1280
_TILE_TRACE = 1024
_SYM_SPLIT = 8
_SYM_MIN_ROWS = 64  # measured: 64-row tiles 3-4% faster than 128 at n = 256 (k = 1), 32 slower


@dataclass(frozen=True)
class _Machine:
    """Seconds per unit of work, for predicting each route's time (:func:`_plan_costs`).

    Fixed constants fitted on the development machine (2-vCPU AMD EPYC VM, torch 2.13 CPU, one
    thread, float32; load 2-3 from other work) to ``_features`` and ``"vp"`` timings of MLPs
    (d 4-64, width 8-256, 1-4 hidden layers) and convnets (two 3×3 convolutions, 4-16 channels,
    8×8 inputs) at k = 1 and 10, n = 16 and 128 (most predictions within 2× of the measured
    time), and a 1024² ``torch.mm`` (82 GFLOP/s float32, 29 float64). What they say:

    - ``gemm``: the contraction GEMMs (and the structured rules' Gram products).
    - ``cap_flop``: matmul FLOPs inside a ``vmap(jacrev)`` capture (about 25 GFLOP/s);
      ``one_pass_flop`` in the one-pass capture of fully structured plans (batched forward
      and backward, the rules' batched per-sample Jacobians: about 35 GFLOP/s).
    - ``jac_elem``: **each per-sample Jacobian element autograd forms** in the Jacobian route
      (about 8 ns in float32: a weight gradient per sample and output is an outer product
      written to memory, then copied into the GEMM's operand). This term, not the GEMM, makes
      the tutorial's ``vmap(jacrev)`` recipe slow for dense layers at small ``n·k``.
    - ``rule_elem``/``feat_elem``: elements the structured rules write per sample (their
      per-sample Jacobians by one batched matmul; the Gram routes' inputs and cotangents).
    - ``act_elem``: the ``k`` backward passes' elementwise work, per activation element.
    - ``op_call``: dispatch overhead per ATen operator of a pass under ``vmap``/autograd (the
      forward's operators are counted once by ``_record``; a capture runs about 3× as many,
      a vjp + jvp pair 4×); ``pass_call`` per capture call; ``module_call`` per rule hook;
      ``tile_call`` per rule per tile. A GRU dispatches ~100 operators per forward, an MLP ~8.
    - ``vpb_*``: the NTK-vector-product route, a vjp and a jvp per output column, ``vmap``-ed
      over chunks of columns (batched matmuls over columns run at ~5 GFLOP/s here);
      ``vp_*``: the same one column at a time (models ``vmap`` cannot batch), whose per-column
      overhead (``vp_col`` + operators) dominates at small sizes.

    Only ratios matter for the choice. Float64 doubles the FLOP and element terms (the measured
    GEMM ratio is 2.8); an accelerator divides them by 50 and keeps the per-call terms, which
    then dominate (no GPU calibration was run).
    """

    gemm: float = 1 / 80e9
    cap_flop: float = 1 / 25e9
    one_pass_flop: float = 1 / 35e9
    jac_elem: float = 8e-9
    rule_elem: float = 1e-9
    feat_elem: float = 1e-9
    act_elem: float = 1e-9
    module_call: float = 25e-6
    op_call: float = 20e-6
    pass_call: float = 1e-3
    tile_call: float = 30e-6
    vp_flop: float = 1 / 20e9
    vp_act: float = 4e-8
    vp_col: float = 5e-4
    vpb_flop: float = 1 / 5e9
    vpb_col: float = 1.5e-4


#: Another route replaces the structured plan (or the Jacobian route a rule) only when it is
#: predicted this much faster and saves at least ``_MIN_SAVING`` seconds: the model is good to
#: about 2× in absolute time (better in ratios), and near ties or on tiny problems a stable
#: choice is worth more than a few predicted microseconds.
_MARGIN = 1.25
_MIN_SAVING = 1e-3


def _clearly_cheaper(new: float, old: float) -> bool:
    return new * _MARGIN < old and old - new > _MIN_SAVING


_FLOAT_TERMS = (
    "gemm",
    "cap_flop",
    "one_pass_flop",
    "jac_elem",
    "rule_elem",
    "feat_elem",
    "act_elem",
    "vp_flop",
    "vp_act",
    "vpb_flop",
)


def _machine(plan: _Plan) -> _Machine:
    return _machine_for(plan.fn.dtype == torch.float64, plan.fn.device.type != "cpu")


@functools.cache
def _machine_for(double: bool, accelerator: bool) -> _Machine:
    m = _Machine()
    scale = 2.0 if double else 1.0
    if accelerator:
        scale /= 50.0  # an accelerator: FLOPs and bytes are cheap, per-call overhead is not
    return dataclasses.replace(m, **{t: getattr(m, t) * scale for t in _FLOAT_TERMS})


@dataclass
class _Work:
    """How much of each kind of work one plan does (per call of :func:`ntk`)."""

    pairs: float  # sample pairs contracted
    captured: float  # samples passed through a capture (features recomputed per tile if not cached)
    passes: int  # capture calls (chunks, or samples in a loop when vmap cannot batch)
    tiles: int  # (i, j) tiles
    chunk: int = 1  # samples per capture call
    jac_pairs: float | None = None  # pairs of the jac group's GEMM, if not ``pairs`` (syrk)

    @property
    def gemm_pairs(self) -> float:
        return self.pairs if self.jac_pairs is None else self.jac_pairs


def _work(
    plan: _Plan, lay: _Layout | None, n: int, n2: int, sym: bool, trace: bool = False
) -> _Work:
    # syrk: the (n·r)² triangle, diagonal included, in sample pairs (r rows per sample)
    r = 1 if trace else plan.k
    tri = n * (n * r + 1) / (2 * r)
    if lay is None:  # before a layout exists: one tile row of a nominal size, features cached
        b = max(1, min(n, math.ceil(_TILE_ROWS / plan.k)))
        pairs = n * (n + b) / 2 if sym else float(n * n2)
        cap = float(n if sym else n + n2)
        syrk = sym and _syrk_ok(plan.fn.dtype, plan.fn.device)
        tiles = max(1, math.ceil(pairs / b / b))
        return _Work(pairs, cap, 1 if sym else 2, tiles, n, tri if syrk else None)
    pairs = 0.0
    cap = 0.0 if not lay.cached else float(n if sym else n + n2)
    tiles = 0
    for i0 in range(0, n, lay.tile):
        bi = min(i0 + lay.tile, n) - i0
        if not lay.cached:
            cap += bi
        for j0 in range(i0 if sym else 0, n2, lay.tile2):
            bj = min(j0 + lay.tile2, n2) - j0
            pairs += bi * bj
            tiles += 1
            if not lay.cached and not (sym and j0 == i0):
                cap += bj
    if lay.rows:  # one contraction call per tile row
        tiles = math.ceil(n / lay.tile)
    chunk = min(lay.chunk, n) if plan.batched else 1
    passes = max(1, math.ceil(cap / max(lay.chunk, 1)))
    return _Work(pairs, cap, passes, tiles, chunk, tri if lay.syrk else None)


def _capture_flops(plan: _Plan, chunk: int = 1) -> float:
    """Matmul FLOPs of one sample's capture: the forward, ``k`` backward passes through every
    layer (input gradients, ≈ the forward), the weight gradients of the fallback parameters
    (≈ their modules' forward each) and the ``jac`` rules' per-sample Jacobians.

    ``chunk``: samples per ``vmap`` call. PyTorch's batching rule for a convolution's weight
    gradient runs one grouped convolution over the whole chunk, which the FLOP counter counts
    ``chunk`` times (the measured time grows far less: the time model passes 1); so does a
    conv rule's ``jac`` route (:attr:`Rule.grouped_jac`)."""
    F, k = plan.F, plan.k
    wgrad = sum(
        plan.param_flops.get(n, 0.0) * (chunk if n in plan.conv_params else 1) for n in plan.fb
    )
    form = sum(r.form_flops() * (chunk if r.grouped_jac else 1) for r in plan.jac_rules)
    return F + k * (F - plan.f_first + wgrad) + form


def _capture_seconds(plan: _Plan, work: _Work, mach: _Machine) -> float:
    k = plan.k
    feat = sum(r.feature_bytes(r.approach, 1) for r in plan.feat_rules)
    per_sample = (
        _capture_flops(plan) * (mach.one_pass_flop if plan.one_pass else mach.cap_flop)
        + k * plan.p_fb * mach.jac_elem
        + k * sum(r.jac_width() for r in plan.jac_rules) * mach.rule_elem
        + feat * mach.feat_elem
        + k * plan.act * mach.act_elem
    )
    passes = work.passes if plan.batched else work.captured
    per_pass = mach.pass_call + 3 * plan.n_ops * mach.op_call
    per_pass += 2 * len(plan.rules) * mach.module_call
    return work.captured * per_sample + passes * per_pass


def _plan_costs(plan: _Plan, work: _Work, trace: bool) -> tuple[float, float]:
    """``(matmul FLOPs, predicted seconds)`` of a structured/mixed/Jacobian plan."""
    mach = _machine(plan)
    cap = work.captured * _capture_flops(plan, work.chunk)
    gemm = work.gemm_pairs * plan.jac_gemm_flops(trace)
    rules = work.pairs * sum(r.flops(r.approach, trace) for r in plan.feat_rules)
    weighted = work.pairs * sum(r.cost(r.approach, trace, plan.n_other) for r in plan.feat_rules)
    seconds = (
        _capture_seconds(plan, work, mach)
        + (gemm + weighted) * mach.gemm
        + work.tiles * (1 + len(plan.feat_rules)) * mach.tile_call
    )
    return cap + gemm + rules, seconds


def _vp_chunk(plan: _Plan, N: int, n2: int, budget: float, block_size: int | None) -> int:
    """Samples ``j`` per ``vmap`` chunk of the vp route (``k`` columns each) under ``budget``."""
    k = plan.k
    per_col = plan.esize * (2 * plan.fn.num_params + 3 * N * max(plan.act, k) + 2 * N * k)
    return max(1, min(n2, int(budget / 2 / per_col) // k, block_size or n2))


def _vp_costs(
    plan: _Plan, n: int, n2: int, sym: bool, budget: float = math.inf, block_size: int | None = None
) -> tuple[float, float]:
    """``(matmul FLOPs, seconds)`` of the ``"vp"`` route: ``n2·k`` columns (also with
    ``trace_outputs``), each a vjp and a jvp (≈ 2 forwards each) over all ``N`` samples."""
    mach = _machine(plan)
    N = n if sym else n + n2
    cols = n2 * plan.k
    # per column: a vjp (weight and input gradients, 2F - F1) and a jvp's tangents (2F - F1);
    # the primal forward once for the recorded vjp, and once per jvp (per chunk under vmap)
    per_col = 4.0 * plan.F - 2.0 * plan.f_first
    if plan.batched:  # vmap over chunks of columns
        chunks = math.ceil(n2 / _vp_chunk(plan, N, n2, budget, block_size))
        flops = N * plan.F * (1 + chunks) + cols * N * per_col
        per_chunk = mach.pass_call + 4 * plan.n_ops * mach.op_call
        return flops, flops * mach.vpb_flop + cols * mach.vpb_col + chunks * per_chunk
    flops = N * plan.F + cols * N * (per_col + plan.F)
    seconds = (
        flops * mach.vp_flop
        + cols * N * plan.act * mach.vp_act
        + cols * (mach.vp_col + 4 * plan.n_ops * mach.op_call)
    )
    return flops, seconds


def _rule_seconds(plan: _Plan, r: Rule, approach: str, trace: bool, work: _Work) -> float:
    """Predicted seconds of one rule's share by ``approach`` (or ``"fb"``: its parameters by
    the Jacobian route, weight gradients formed by autograd inside the capture).

    A ``jac``/``fb`` share is priced at the tiles' pairs even where BLAS ``syrk`` computes only
    the triangle: priced at the triangle, cnn-mid's last convolution (k = 10, n = 64) went from
    the pair route to ``jac`` and the call from 0.40 to 0.85 s (a 189 MB Jacobian block, formed
    in fresh memory, that the model does not price)."""
    mach = _machine(plan)
    kk = plan.k if trace else plan.k * plan.k  # jac-group GEMM FLOPs per pair and column: 2·kk
    width = r.jac_width()
    if approach == "fb":
        # autograd forms the same per-sample weight gradients as the rule's "jac" route (for a
        # normalisation layer: elementwise work the FLOP count does not see), then writes them
        wg = sum(plan.param_flops.get(n, 0.0) for n in r.params.values())
        form = max(plan.k * wg, r.form_flops())
        per = form * mach.cap_flop + plan.k * width * mach.jac_elem
        return work.pairs * 2.0 * kk * width * mach.gemm + work.captured * per
    passes = work.passes if plan.batched else work.captured
    hooks = passes * 2 * mach.module_call  # its probe and hook in every capture pass
    if approach == "jac":
        per = r.form_flops() * mach.cap_flop + plan.k * width * mach.rule_elem
        return work.pairs * 2.0 * kk * width * mach.gemm + work.captured * per + hooks
    contract = work.pairs * r.cost(approach, trace, plan.n_other) * mach.gemm
    feat = work.captured * r.feature_bytes(approach, 1) * mach.feat_elem
    return contract + feat + hooks + work.tiles * mach.tile_call
