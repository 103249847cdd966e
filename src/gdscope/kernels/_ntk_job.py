"""The NTK's job: the memory budget, the tile layout, the tiles of the structured/Jacobian and
vp routes, argument checks and the route choice of ``method="auto"``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from gdscope.errors import (
    InvalidArgumentError,
    ShapeMismatchError,
)
from gdscope.kernels._ntk_capture import _contract, _features, _sym_features, _syrk_ok
from gdscope.kernels._ntk_cost import (
    _SYM_MIN_ROWS,
    _SYM_SPLIT,
    _TILE_ROWS,
    _TILE_TRACE,
    _clearly_cheaper,
    _machine,
    _plan_costs,
    _vp_chunk,
    _vp_costs,
    _work,
)
from gdscope.kernels._ntk_plan import (
    _Batching,
    _build_plan,
    _check_model,
    _check_x,
    _checked,
    _method,
    _Plan,
    _record,
)
from gdscope.kernels.functional import ModelFunction, check_finite_params

log = logging.getLogger("gdscope.kernels.ntk")  # one logger for the whole NTK


Block = tuple[int, int, int, int, Tensor]


# --------------------------------------------------------------------------------------------
# Memory


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_memory(device: torch.device | str) -> int:
    """The default budget in bytes: 1/4 of available RAM, or 1/2 of free memory on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return int(_available_ram() // 4)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


# --------------------------------------------------------------------------------------------
# The job: validation, budget, tiles


@dataclass
class _Layout:
    tile: int
    tile2: int
    cached: bool
    chunk: int
    ws: int
    #: symmetric and cached: each tile row's upper part ``[i0:i1, i0:n]`` is one contraction
    #: (one GEMM per jac block instead of one per tile: fewer, larger calls), cut into tiles
    rows: bool = False
    #: symmetric and cached, on the CPU: the jac group's upper triangle over all samples by one
    #: BLAS ``syrk`` (:func:`_sym_jac`), cut into tiles to which the gram/pair rules add
    syrk: bool = False


def _layout(
    plan: _Plan, n: int, n2: int, sym: bool, trace: bool, budget: int, block_size: int | None
) -> _Layout:
    es, k = plan.esize, plan.k
    f = max(plan.feature_bytes(), 1)
    cap = max(plan.capture_bytes(), 1)
    kk = 1 if trace else k * k
    B = budget
    need_one = 2 * f + 3 * kk * es + cap
    if need_one > B:
        raise InvalidArgumentError(
            f"memory={B} bytes (left after the output) is too small for one tile of one sample: "
            f"that needs about {_gb(need_one)}. Raise memory=, or pass out= so the output is not "
            "counted against it."
        )
    target = block_size or (_TILE_TRACE if trace else max(1, math.ceil(_TILE_ROWS / k)))
    if not sym and block_size is None:
        target *= 2
    b_acc = math.isqrt(max(int(B / 4 / (3 * kk * es)), 1))
    cached = (n + (0 if sym else n2)) * f <= B / 2
    # syrk: half the jac group's GEMM FLOPs whatever the tiles (tile rows compute (s+1)/(2s) of
    # the square); it holds the (n·k)² triangle, as large as the output, within the budget
    syrk = sym and cached and plan.width > 0 and n * n * kk * es <= B / 4
    syrk = syrk and _syrk_ok(plan.fn.dtype, plan.fn.device)
    if sym and cached and block_size is None:
        # only the upper triangle: split the kernel into s tile rows so that the part computed
        # is ~(s+1)/(2s) of the square, keeping at least _SYM_MIN_ROWS GEMM rows per tile; s by
        # the cost model (pairs saved against the per-tile overhead of each rule's contraction
        # call; with syrk only the gram/pair rules' pairs count)
        rows = 1 if trace else k
        mach = _machine(plan)
        per_pair = plan.gemm_flops(trace) - (plan.jac_gemm_flops(trace) if syrk else 0.0)
        per_pair *= mach.gemm
        per_tile = (1 + len(plan.feat_rules)) * mach.tile_call

        def split_cost(split: int) -> float:
            b = min(target, max(math.ceil(_SYM_MIN_ROWS / rows), math.ceil(n / split)))
            t = math.ceil(n / b)
            return n * (n + b) / 2 * per_pair + t * (t + 1) / 2 * per_tile

        best = min((1, 2, 4, _SYM_SPLIT), key=split_cost)
        target = min(target, max(math.ceil(_SYM_MIN_ROWS / rows), math.ceil(n / best)))
    b = min(target, b_acc, n) if block_size is None else min(target, n)
    if not cached:
        b = min(b, max(1, int(B / 4 / f)))
    b = max(b, 1)
    nt = math.ceil(n / b)
    b = math.ceil(n / nt)
    b2 = b if sym else min(n2, b if block_size is not None else max(b, min(n2, target)))
    if not cached:
        b2 = min(b2, max(1, int(B / 4 / f)))
    chunk = max(1, min(int(B / 4 / cap), n if cached else b))
    ws = max(int(B / 4 / es), 1)
    rows = sym and cached and b2 == b and b < n and 3 * b * n * kk * es <= B / 4
    # ... where the jac group's GEMM costs at least what the gram/pair rules cost per pair
    # (their weighted cost: elementwise passes, which run faster on tiles that stay in cache).
    # Measured, contraction: cnn-mid k=10 n=64 (a pair rule 3.7x the jac group) rows 0.39 s
    # against tiles 0.25 s, the 64-wide MLP at n=4096 (gram rules) 0.14 against 0.12 s; gpt
    # trace (gram rules a small share) 0.51 against 0.54 s, preact k=10 n=64 (1:1) 0.59/0.69 s
    jac_pair = 2.0 * (plan.k if trace else kk) * plan.width
    feat = sum(r.cost(r.approach, trace, plan.n_other) for r in plan.feat_rules)
    rows = rows and jac_pair >= feat and not syrk
    for r in plan.feat_rules:
        if r.pair_workspace(r.approach, trace) > ws:
            raise InvalidArgumentError(
                f"memory={budget} bytes is too small for module {r.name}'s contraction "
                f"({_gb(r.pair_workspace(r.approach, trace) * es * 4)} per sample pair). "
                "Raise memory=."
            )
    return _Layout(b, b2, cached, chunk, ws, rows, syrk)


@dataclass
class _Job:
    method: str
    model: nn.Module
    fn: ModelFunction
    x: Tensor
    x2: Tensor | None
    trace: bool
    budget: int
    k: int
    plan: _Plan | None = None
    layout: _Layout | None = None
    block_size: int | None = None
    batching: _Batching = field(default_factory=lambda: _Batching())
    #: predicted ``(matmul FLOPs, seconds)`` per route considered, and the route taken
    costs: dict[str, tuple[float, float]] = field(default_factory=dict)
    route: str = ""

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def n2(self) -> int:
        return self.n if self.x2 is None else self.x2.shape[0]

    @property
    def sym(self) -> bool:
        return self.x2 is None

    def blocks(self) -> Iterator[Block]:
        """Tiles ``(i0, i1, j0, j1, acc)``, acc in the internal layout; upper ones if ``sym``."""
        with torch.no_grad():
            if self.method == "vp":
                yield from self._vp_blocks()
            else:
                yield from self._tile_blocks()

    def _tile_blocks(self) -> Iterator[Block]:
        plan, lay, trace = self.plan, self.layout, self.trace
        x, n, n2 = self.x, self.n, self.n2
        x2 = x if self.x2 is None else self.x2
        log.debug(
            "ntk: tiles %d/%d, cached=%s, chunk=%d; %s",
            lay.tile,
            lay.tile2,
            lay.cached,
            lay.chunk,
            "; ".join(plan.describe()),
        )
        if lay.syrk:
            yield from self._syrk_blocks()
            return
        if lay.cached:
            FX = _features(plan, x, trace, lay.chunk)
            FX2 = FX if self.sym else _features(plan, x2, trace, lay.chunk)
        for i0 in range(0, n, lay.tile):
            i1 = min(i0 + lay.tile, n)
            fI = FX.slice(i0, i1) if lay.cached else _features(plan, x[i0:i1], trace, lay.chunk)
            if lay.rows:  # the tile row's upper part in one contraction, yielded tile by tile
                acc = _contract(plan, fI, FX.slice(i0, n), trace, lay.ws)
                for j0 in range(i0, n, lay.tile2):
                    j1 = min(j0 + lay.tile2, n)
                    blk = acc[:, j0 - i0 : j1 - i0] if trace else acc[:, :, j0 - i0 : j1 - i0]
                    yield i0, i1, j0, j1, blk
                continue
            for j0 in range(i0 if self.sym else 0, n2, lay.tile2):
                j1 = min(j0 + lay.tile2, n2)
                if lay.cached:
                    fJ = FX2.slice(j0, j1)
                elif self.sym and j0 == i0:
                    fJ = fI
                else:
                    fJ = _features(plan, x2[j0:j1], trace, lay.chunk)
                yield i0, i1, j0, j1, _contract(plan, fI, fJ, trace, lay.ws)

    def _syrk_blocks(self) -> Iterator[Block]:
        """Upper tiles of a symmetric kernel: the jac group's part cut from its ``syrk``
        triangle (a diagonal tile made whole), then each gram/pair rule's part."""
        plan, lay, trace, n = self.plan, self.layout, self.trace, self.n
        r = 1 if trace else plan.k
        S, FX = _sym_features(plan, self.x, trace, lay.chunk)
        for i0 in range(0, n, lay.tile):
            i1 = min(i0 + lay.tile, n)
            for j0 in range(i0, n, lay.tile):
                j1 = min(j0 + lay.tile, n)
                blk = S[i0 * r : i1 * r, j0 * r : j1 * r]
                if j0 == i0:
                    blk = blk.triu() + blk.triu(1).T
                acc = blk if trace else blk.view(i1 - i0, r, j1 - j0, r)
                fI, fJ = FX.slice(i0, i1), FX.slice(j0, j1)
                for rule in plan.feat_rules:
                    rule.contract(fI.rules[rule.key], fJ.rules[rule.key], acc, trace, lay.ws)
                yield i0, i1, j0, j1, acc

    def _vp_blocks(self) -> Iterator[Block]:
        """NTK-vector products ``J Jᵀ e`` on the identity columns ``e`` of output ``b`` of
        sample ``j`` (``n2·k`` of them, also for the trace kernel, which sums the diagonal
        blocks): one vjp of all samples recorded once, then per column a vjp and a jvp, by
        ``vmap`` over a chunk of columns (the tutorial's batched NTK-vector products), or one
        column at a time where ``vmap`` cannot batch the model."""
        x, n, n2, k, trace, fn = self.x, self.n, self.n2, self.k, self.trace, self.fn
        xc = x if self.x2 is None else torch.cat([x, self.x2])
        N = xc.shape[0]
        params = {name: p.detach() for name, p in fn.params.items()}

        def f(p: dict[str, Tensor]) -> Tensor:
            return fn(p, xc)  # (N, k)

        _, pull = vjp(f, params)

        def column(cot: Tensor) -> Tensor:
            (tangent,) = pull(cot)
            return jvp(f, (params,), (tangent,))[1]

        bj = _vp_chunk(self.plan, N, n2, self.budget, self.block_size)
        off = 0 if self.x2 is None else n
        batched = self.plan.batched
        for j0 in range(0, n2, bj):
            j1 = min(j0 + bj, n2)
            c = (j1 - j0) * k
            E = torch.zeros(c, N, k, dtype=fn.dtype, device=fn.device)
            idx = torch.arange(c, device=E.device)
            E[idx, off + j0 + idx // k, idx % k] = 1.0
            R = None
            if batched:
                try:
                    R = vmap(column)(E)
                except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                    batched = False
                    log.info("ntk vp: vmap over columns failed (%s); one column at a time", e)
            if R is None:
                R = torch.stack([column(E[i]) for i in range(c)])
            R = R[:, :n].reshape(j1 - j0, k, n, k)  # [j, b, i, a]
            if trace:
                yield 0, n, j0, j1, torch.einsum("jaia->ij", R)
            else:
                yield 0, n, j0, j1, R.permute(2, 3, 0, 1)


def _prepare(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None,
    method: object,
    trace_outputs: bool,
    memory: float | None,
    out: Tensor | None,
    *,
    for_blocks: bool = False,
    block_size: int | None = None,
    force: str | dict[str, str] | None = None,
) -> tuple[_Job, Tensor | None]:
    method = _method(method)
    if not isinstance(trace_outputs, bool):
        raise InvalidArgumentError(f"trace_outputs must be True or False, got {trace_outputs!r}.")
    if memory is not None and (
        isinstance(memory, bool)
        or not isinstance(memory, (int, float))
        or not math.isfinite(memory)
        or not memory > 0
    ):
        raise InvalidArgumentError(
            f"memory must be a positive, finite number of bytes (or None for the default), got "
            f"{memory!r}: pass e.g. memory=2**30."
        )
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise InvalidArgumentError(
            f"block_size must be a positive int, got {block_size!r}: pass e.g. block_size=64 "
            "(or None to choose it from memory)."
        )
    if isinstance(model, ModelFunction):
        model = model.model
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    fn = _check_model(model)
    check_finite_params(model, fn.names)
    if isinstance(x, Tensor) and isinstance(x2, Tensor) and x2.device != x.device:
        raise InvalidArgumentError(
            f"x2 is on {x2.device} but x is on {x.device}: move x2 with x2.to({str(x.device)!r})."
        )
    x = _check_x(fn, x, "x")
    if x.device != fn.device:
        raise InvalidArgumentError(
            f"x is on {x.device} but the model's parameters are on {fn.device}: move x with "
            f"x.to({str(fn.device)!r})."
        )
    if x2 is not None:
        x2 = _check_x(fn, x2, "x2")
        if x2.shape[1:] != x.shape[1:]:
            raise ShapeMismatchError(
                f"x2 has per-sample shape {tuple(x2.shape[1:])} but x has {tuple(x.shape[1:])}: "
                "both must be inputs of the same model (samples along dim 0)."
            )
        if x2.is_floating_point() != x.is_floating_point():
            raise InvalidArgumentError(
                f"x2 has dtype {x2.dtype} but x has {x.dtype}: pass both as the model's input type."
            )
    n = x.shape[0]
    n2 = n if x2 is None else x2.shape[0]
    budget = int(memory) if memory is not None else default_memory(fn.device)
    info, k = _record(model, fn, x[:1])
    es = torch.empty((), dtype=fn.dtype).element_size()
    out_shape = (n, n2) if trace_outputs else (n, n2, k, k)
    out_bytes = math.prod(out_shape) * es
    if out is None and not for_blocks and out_bytes > budget:
        tr = n * n2 * es
        raise InvalidArgumentError(
            f"the NTK of shape {out_shape} in {fn.dtype} needs {_gb(out_bytes)}, more than "
            f"memory={_gb(budget)}"
            + ("" if memory is not None else " (default: 1/4 of available RAM, 1/2 of free GPU)")
            + ". Alternatives: trace_outputs=True (an (n, n2) kernel"
            + ("" if trace_outputs else f", {_gb(tr)}")
            + "); out= a preallocated tensor filled tile by tile (e.g. torch.from_numpy of a "
            "numpy.memmap); gdscope.ntk_blocks(...) to stream (i0, i1, j0, j1, block) tiles; "
            "gdscope.ntk_eigs for the spectrum matrix-free; or a larger memory=."
        )
    if out is not None:
        if for_blocks or not isinstance(out, Tensor):
            raise InvalidArgumentError(f"out must be a torch.Tensor, got {type(out).__name__}.")
        if tuple(out.shape) != out_shape:
            raise ShapeMismatchError(
                f"out has shape {tuple(out.shape)} but the result has shape {out_shape}: "
                "allocate it as torch.empty(" + ", ".join(map(str, out_shape)) + ")."
            )
        if not out.is_floating_point():
            raise InvalidArgumentError(f"out must have a floating dtype, got {out.dtype}.")
    else:
        budget -= 0 if for_blocks else out_bytes
    checked = _checked(model, fn, x[:1], k, method != "vp")
    batching = checked.batching
    if not batching.vmap:
        log.log(checked.level(), "ntk: %s", batching.describe())
    if not batching.jac:
        if method != "auto":
            where = f"module {batching.module!r}" if batching.module else "the model"
            raise InvalidArgumentError(
                f"method={method!r} needs per-sample Jacobians, but torch.func cannot form them "
                f"on {where} ({batching.why}). Use method='vp' (NTK-vector products; also what "
                "method='auto' does here)."
            )
        method = "vp"
        log.info("ntk: method='auto' takes 'vp' (NTK-vector products)")
    job = _Job(method, model, fn, x, x2, trace_outputs, budget, k, block_size=block_size)
    job.batching = batching
    job.plan = _build_plan(
        model, fn, x, info, k, method, trace_outputs, n2, force, batching.vmap, checked, x2 is None
    )
    if method != "vp":
        job.layout = _layout(job.plan, n, n2, x2 is None, trace_outputs, budget, block_size)
    _pick_route(job, compare=method == "auto" and force is None)
    return job, out


def _pick_route(job: _Job, compare: bool) -> None:
    """Predict the cost of the job's plan and, with ``compare`` (``method="auto"``), of the
    plain Jacobian route and the NTK-vector products too; switch to the cheapest.

    Each route's cost is ``(matmul FLOPs, seconds)`` from :func:`_plan_costs` /
    :func:`_vp_costs` under the layout it would get (recomputed features when they do not fit
    count again); ``job.costs`` keeps them for :func:`_explain` and the log."""
    plan, n, n2, sym, trace = job.plan, job.n, job.n2, job.sym, job.trace
    name = "vp" if job.method == "vp" else ("jacobian" if not plan.rules else "structured")
    if job.method == "vp":
        job.costs = {"vp": _vp_costs(plan, n, n2, sym, job.budget, job.block_size)}
    else:
        job.costs = {name: _plan_costs(plan, _work(plan, job.layout, n, n2, sym, trace), trace)}
    job.route = name
    if not compare:
        return
    alt: dict[str, tuple[_Plan, _Layout | None]] = {}
    if plan.rules:
        jplan = dataclasses.replace(
            plan,
            rules=[],
            fb=list(plan.fn.names),
            fallback_why={"(all)": "the Jacobian route is cheaper here (cost model)"},
        )
        try:
            jlay = _layout(jplan, n, n2, sym, trace, job.budget, job.block_size)
        except InvalidArgumentError:
            pass  # its per-sample Jacobians do not fit the budget
        else:
            alt["jacobian"] = (jplan, jlay)
            job.costs["jacobian"] = _plan_costs(jplan, _work(jplan, jlay, n, n2, sym, trace), trace)
    job.costs["vp"] = _vp_costs(plan, n, n2, sym, job.budget, job.block_size)
    best = min(job.costs, key=lambda r: job.costs[r][1])
    if not _clearly_cheaper(job.costs[best][1], job.costs[name][1]):
        best = name  # within the model's accuracy: keep the plan (stable routes near ties)
    if best == "vp":
        job.method, job.layout = "vp", None
    elif best != name:
        job.plan, job.layout = alt[best]
    job.route = best
    log.debug(
        "ntk auto: %s (predicted %s)",
        best,
        ", ".join(f"{r}: {c[1]:.3g} s, {c[0]:.3g} FLOP" for r, c in job.costs.items()),
    )
