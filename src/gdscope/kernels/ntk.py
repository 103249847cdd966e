"""The empirical neural tangent kernel ``Θ(x, x') = J(x) J(x')ᵀ``, exactly, by four methods.

Conventions (THEORY §0): the network ``f(x; θ) ∈ R^k`` (outputs flattened), ``J(x) = ∂f/∂θ`` over
the trainable parameters, ``Θ(x_i, x'_j)`` the ``k × k`` block of ``K = J Jᵀ``. :func:`ntk`
returns the blocks as ``(n, n2, k, k)`` (``out[i, j, a, b] = ∂f_a(x_i)/∂θ · ∂f_b(x'_j)/∂θ``);
reshaping ``out.permute(0, 2, 1, 3).reshape(n·k, n2·k)`` gives the sample-major ``J J'ᵀ``.

**Trace kernel.** ``trace_outputs=True`` returns the ``(n, n2)`` kernel
``Σ_a Θ(x_i, x'_j)[a, a]``: the **sum** of each block's diagonal. neural-tangents'
``trace_axes`` *divides* that sum by ``k`` (its kernel is the mean over outputs); divide ours by
``k`` to compare.

Methods (:class:`NtkMethod`), with ``n``, ``n2`` samples, ``k`` outputs, ``P`` parameters:

``"structured"``
    Per-layer contractions that never form the Jacobian (:mod:`gdscope.kernels.rules`). Zero
    "probes" added to each covered module's output yield every module's input ``A`` and output
    cotangents ``G`` (``k`` backward passes, about ``2k`` forward costs per sample): in one
    batched forward and ``k`` batched backward passes when every parameter has a rule of a
    module that sees the samples along dim 0 (``∂(Σ_i f_a(x_i))/∂probe_i`` is sample ``i``'s
    cotangent, as sample ``i`` touches only its own probe row; the rule check against
    per-sample autograd catches a model that couples samples), else by ``vmap(jacrev)`` over
    samples. For a symmetric kernel only the upper triangle is contracted: on the CPU the
    per-sample Jacobian columns (below) by one BLAS ``syrk`` over all samples where the
    ``(n k)²`` triangle fits in ``memory``, else tile rows. Each module then adds its share by
    the cheapest exact route: for ``Linear``, ``(A A'ᵀ + 1) ⊙ (G G'ᵀ)``,
    ``n n2 (d_in + k² d_out)`` multiply-adds; for convolutions and other weight-shared layers
    at ``T`` positions, the per-sample weight Jacobian ``Σ_t G_t ⊗ A_t`` and one GEMM
    (``n n2 k² P_l``) or the position-pair route
    (``n n2 T (T d_in + k T d_out + k² d_out)``), whichever is cheaper; for normalisation
    layers, ``2C`` Jacobian columns; ``nn.MultiheadAttention`` as its four projections (query,
    key, value, out), each Linear-like at every position. Memory: ``A`` and ``G`` for a tile of
    samples (``k × activations``). Refused (with the reason) if some trainable parameter has no
    rule.
``"jacobian"``
    ``vmap(jacrev)`` Jacobians of a tile of samples (``k`` backward passes per sample), then one
    GEMM per pair of tiles: ``n n2 k² P`` multiply-adds, ``(b + b2) k P`` memory for tiles of
    ``b``, ``b2`` samples. Works where ``torch.func.jacrev`` works on one sample. Where
    ``vmap`` cannot batch the model over samples (``nn.GRU``, ``nn.LSTM``: PyTorch has no batching
    rule for them), the per-sample Jacobians (and the structured captures) are formed in a Python
    loop over samples instead, with the same result (and the log and ``_explain`` say so); where
    even ``jacrev`` of one sample fails, this method and ``"structured"`` refuse with the module's
    name and ``"auto"`` takes ``"vp"``.
``"vp"``
    NTK-vector products ``v ↦ J Jᵀ v`` (:func:`gdscope.kernels.operator.ntk_operator`: a vjp and
    a jvp, about three forward passes of all ``n + n2`` samples each) applied to identity
    columns: ``n2 k`` vjp/jvp pairs (also with ``trace_outputs``). Slow, but memory is one
    forward pass plus the output columns.
``"auto"`` (default)
    The cheapest exact route by a cost model (:mod:`gdscope.kernels._ntk_cost`). Every module with a
    rule that is called exactly once per forward (built-in layers, or a custom layer declaring
    ``__ntk_rule__``: docs/extending.md) is a parameter group; each group takes the cheapest of its
    rule's routes and the Jacobian of its parameters; the rest (shared or reused modules, layers
    without a rule, parameters used outside their module) goes by the Jacobian of just those
    parameters (contributions add over parameter groups). That plan is then compared as a whole with
    the plain ``jacobian`` route and with ``vp``; another route is taken only when predicted clearly
    faster (≥ 1.25× and ≥ 1 ms). The prediction counts matmul FLOPs (from a
    :class:`~torch.utils.flop_counter.FlopCounterMode` pass of one sample), per-sample Jacobian
    elements written (what makes the Jacobian route slow for dense layers), ATen operators
    dispatched per pass (overhead), tiles and columns, under the memory layout each route would get.
    Each rule is checked against autograd on two samples before it is trusted. The checks (vmap
    batching, FLOP count, rule check) are cached per model *structure* (module classes, scalar
    attributes, parameter names/shapes/tying, input shape, dtype, device, ``k``; not values), so
    repeated calls on a training model pay them once. ``_explain`` reports each route's predicted
    FLOPs and seconds and the route taken.

With ``x2=None`` the kernel is symmetric and only the upper triangle of tiles is computed.
Everything is tiled over samples under a memory budget (``memory``, bytes; default a quarter of
the available RAM, or half of the free GPU memory); an output larger than the budget is refused
before anything is allocated (see :func:`ntk` for the alternatives).

Implementation (private modules, one logger ``gdscope.kernels.ntk``): ``_ntk_plan`` (input and
batching checks, the shape record, the per-structure cache, each module's route and the rule
check), ``_ntk_capture`` (hooks, captures, per-sample features, one tile's contraction),
``_ntk_job`` (memory budget, tile layout, the tiles of each route, ``auto``'s route choice) and
``_ntk_cost`` (the cost model).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

# default_memory is re-exported: the theory modules take the NTK's memory budget from here
from gdscope.kernels._ntk_cost import _work
from gdscope.kernels._ntk_job import (
    Block,
    _Job,
    _prepare,
    default_memory,  # noqa: F401 (re-export)
)
from gdscope.kernels._ntk_plan import (
    MethodName,
    NtkMethod,
)
from gdscope.kernels.functional import ModelFunction
from gdscope.problem import math_attention

__all__ = ["NtkMethod", "ntk", "ntk_blocks"]


NtkMethod.__module__ = __name__  # documented here, defined with the plan


def ntk(
    model: nn.Module | ModelFunction,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    method: MethodName | NtkMethod = "auto",
    trace_outputs: bool = False,
    memory: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The empirical NTK ``Θ(x_i, x2_j) = J(x_i) J(x2_j)ᵀ`` of ``model``, exactly.

    Args:
        model: an ``nn.Module`` (or a :class:`ModelFunction` of one) mapping a batch
            ``(n, ...)`` to outputs ``(n, ...)`` (flattened to ``k`` per sample); its trainable
            parameters define ``J``. BatchNorm must be in eval mode (train-mode batch
            statistics couple samples: ``StatefulModuleError``), and so must dropout
            (``NonDeterministicError``); a forward that changes buffers is refused.
        x: inputs ``(n, ...)``; floating inputs are cast to the model's dtype (the result's dtype
            follows the model); integer inputs (token ids) pass as they are.
        x2: second inputs ``(n2, ...)`` with the same per-sample shape, on ``x``'s device;
            default ``x`` (then the kernel is symmetric and half of it is computed).
        method: ``"auto"``, ``"structured"``, ``"jacobian"`` or ``"vp"``; see :class:`NtkMethod`
            and the module docstring for what each costs.
        trace_outputs: return the ``(n, n2)`` kernel ``Σ_a Θ[a, a]``, the **sum** over outputs
            (neural-tangents' ``trace_axes`` returns the mean: divide by ``k`` to compare).
        memory: budget in bytes for the output and the working tiles; default 1/4 of the
            available RAM (1/2 of the free GPU memory). An output larger than this is refused up
            front; pass ``trace_outputs=True``, ``out=``, use :func:`ntk_blocks`, or
            ``gs.ntk_eigs`` instead.
        out: a preallocated ``(n, n2, k, k)`` (or ``(n, n2)``) floating tensor to write into
            tile by tile, on any device (a ``torch.from_numpy(np.memmap(...))`` tensor keeps a
            huge kernel on disk); it does not count against ``memory``. Returned.

    Returns:
        ``(n, n2, k, k)`` with ``[i, j, a, b] = ∂f_a(x_i)/∂θ · ∂f_b(x2_j)/∂θ``, or ``(n, n2)``.

    >>> import torch
    >>> lin = torch.nn.Linear(3, 2).double()
    >>> X = torch.randn(4, 3, dtype=torch.float64)
    >>> K = ntk(lin, X)
    >>> K.shape
    torch.Size([4, 4, 2, 2])
    >>> torch.allclose(K[..., 0, 0], X @ X.T + 1) and bool((K[..., 0, 1] == 0).all())
    True
    """
    with math_attention():  # fused attention kernels have no forward-mode AD (the "vp" method)
        job, out = _prepare(model, x, x2, method, trace_outputs, memory, out)
        return _run(job, out)


def _run(job: _Job, out: Tensor | None) -> Tensor:
    n, n2, k = job.n, job.n2, job.k
    if out is None:
        shape = (n, n2) if job.trace else (n, n2, k, k)
        out = torch.empty(shape, dtype=job.fn.dtype, device=job.fn.device)
    for i0, i1, j0, j1, acc in job.blocks():
        acc = acc.to(out.device)
        if job.trace:
            out[i0:i1, j0:j1].copy_(acc)
            if job.sym and job.method != "vp" and j0 != i0:
                out[j0:j1, i0:i1].copy_(acc.T)
        else:
            out[i0:i1, j0:j1].copy_(acc.permute(0, 2, 1, 3))
            if job.sym and job.method != "vp" and j0 != i0:
                out[j0:j1, i0:i1].copy_(acc.permute(2, 0, 3, 1))
    return out


def ntk_blocks(
    model: nn.Module | ModelFunction,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    method: MethodName | NtkMethod = "auto",
    trace_outputs: bool = False,
    memory: float | None = None,
    block_size: int | None = None,
) -> Iterator[Block]:
    """Stream the NTK as tiles ``(i0, i1, j0, j1, block)`` covering the whole kernel once.

    ``block`` is ``ntk(model, x, x2)[i0:i1, j0:j1]`` (``(i1-i0, j1-j0, k, k)``, or ``(.., ..)``
    with ``trace_outputs``), in the model's dtype and device; only one tile, or one row of
    tiles where it fits in ``memory`` (plus the per-sample features), is held at a time, so a
    kernel far larger than memory can be written to disk or reduced on the fly. With
    ``x2=None`` each lower tile is the transpose of an upper one, computed once and yielded
    twice. ``block_size`` fixes the tile edge in samples (default: chosen for GEMM efficiency
    under ``memory``). Arguments are checked when this is called, before the first tile. Same
    arguments as :func:`ntk` otherwise.

    >>> import torch
    >>> lin = torch.nn.Linear(3, 2).double()
    >>> X = torch.randn(5, 3, dtype=torch.float64)
    >>> K = torch.empty(5, 5, 2, 2, dtype=torch.float64)
    >>> for i0, i1, j0, j1, blk in ntk_blocks(lin, X, block_size=2):
    ...     K[i0:i1, j0:j1] = blk
    >>> torch.allclose(K, ntk(lin, X))
    True
    """
    with math_attention():
        job, _ = _prepare(
            model,
            x,
            x2,
            method,
            trace_outputs,
            memory,
            None,
            for_blocks=True,
            block_size=block_size,
        )

    def tiles() -> Iterator[Block]:  # math attention while a tile is computed, not in between
        it = job.blocks()
        while True:
            with math_attention():
                item = next(it, None)
            if item is None:
                return
            yield item

    def gen() -> Iterator[Block]:
        for i0, i1, j0, j1, acc in tiles():
            if trace_outputs:
                yield i0, i1, j0, j1, acc.contiguous()
                if job.sym and job.method != "vp" and j0 != i0:
                    yield j0, j1, i0, i1, acc.T.contiguous()
            else:
                yield i0, i1, j0, j1, acc.permute(0, 2, 1, 3).contiguous()
                if job.sym and job.method != "vp" and j0 != i0:
                    yield j0, j1, i0, i1, acc.permute(2, 0, 3, 1).contiguous()

    return gen()


def _explain(
    model: nn.Module | ModelFunction,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    method: MethodName | NtkMethod = "auto",
    trace_outputs: bool = False,
    memory: float | None = None,
    force: str | dict[str, str] | None = None,
) -> dict:
    """What :func:`ntk` would do, without doing it: ``method`` (after ``auto``'s choice),
    ``route`` (``"structured"`` for rules, mixed or not; ``"jacobian"``; ``"vp"``),
    ``predicted`` (each route considered: matmul ``flops`` and ``seconds`` by the cost model),
    ``modules`` (each module's route, and why a module takes the Jacobian), ``batching`` and
    ``capture`` (one batched pass, ``vmap`` over samples, or a loop), the tiles (``rows``: one
    contraction per tile row; ``syrk``: the jac group's triangle by one BLAS ``syrk``) and the
    GEMM FLOP count of the contraction."""
    with math_attention():
        job, _ = _prepare(model, x, x2, method, trace_outputs, memory, None, force=force)
    plan, lay = job.plan, job.layout
    info = {
        "method": job.method,
        "k": job.k,
        "modules": plan.describe(),
        "batching": job.batching.describe(),
        "route": job.route,
        "capture": (
            "none (vp)"
            if job.method == "vp"
            else "one batched pass"
            if plan.one_pass
            else "vmap over samples"
            if plan.batched
            else "loop over samples"
        ),
        "predicted": {r: {"flops": c[0], "seconds": c[1]} for r, c in job.costs.items()},
    }
    if lay is not None:
        work = _work(plan, lay, job.n, job.n2, job.sym, trace_outputs)
        jac = plan.jac_gemm_flops(trace_outputs)  # over the pairs, or the triangle by syrk
        info.update(
            tile=lay.tile,
            tile2=lay.tile2,
            cached=lay.cached,
            chunk=lay.chunk,
            rows=lay.rows,
            syrk=lay.syrk,
            pairs=int(work.pairs),
            gemm_flops=work.pairs * (plan.gemm_flops(trace_outputs) - jac) + work.gemm_pairs * jac,
        )
    return info
