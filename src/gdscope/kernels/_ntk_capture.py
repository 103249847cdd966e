"""The NTK's captures: forward hooks that record module calls and shapes or add zero probes,
per-sample module inputs and output cotangents (one batched pass, ``vmap`` over samples or a
loop), the per-sample features of a set of samples, the contraction of one tile, and the
symmetric product of the Jacobian group over all samples (BLAS ``syrk``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap
from torch.utils._pytree import tree_map

from gdscope.kernels.rules import Rule, mha_forward, mha_inputs

if TYPE_CHECKING:
    from gdscope.kernels._ntk_plan import _Plan

log = logging.getLogger("gdscope.kernels.ntk")  # one logger for the whole NTK


# --------------------------------------------------------------------------------------------
# Hooks: call counting (record) and probes (capture)


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    if args:
        return args[0] if isinstance(args[0], Tensor) else None
    for v in kwargs.values():
        if isinstance(v, Tensor):
            return v
    return None


class _Hooks:
    """Forward hooks on every submodule, registered only for the duration of a ``with``."""

    def __init__(self, model: nn.Module, mode: str, probes: dict[str, Tensor] | None = None):
        self.model = model
        self.mode = mode
        self.info: dict[str, dict] = {}
        self.probes = probes or {}
        self.active = mode == "record"
        self.aux: dict[str, Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> _Hooks:
        self.patched: list[nn.Module] = []
        for name, mod in self.model.named_modules():
            if self.mode == "capture" and name not in self.probes:
                continue
            if self.mode == "capture" and isinstance(self.probes[name], dict):
                # a composite rule (nn.MultiheadAttention): its decomposed forward, with probes
                mod.forward = functools.partial(self._composite, mod, name)
                self.patched.append(mod)
                continue
            h = mod.register_forward_hook(self._make(name), with_kwargs=True, prepend=True)
            self.handles.append(h)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for mod in self.patched:
            del mod.forward  # the instance attribute: the class's forward again
        self.patched.clear()

    def _composite(self, mod: nn.Module, name: str, *args: object, **kwargs: object) -> object:
        if not self.active:
            return type(mod).forward(mod, *args, **kwargs)
        aux: dict[str, Tensor] = {}
        out = mha_forward(mod, self.probes[name], aux, *args, **kwargs)
        self.aux[name] = aux
        return out

    def _make(self, name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            if not self.active:
                return None
            inp = _first_tensor(args, kwargs)
            if self.mode == "record":
                rec = self.info.setdefault(name, {"calls": 0})
                rec["calls"] += 1
                rec["in"] = tuple(inp.shape) if inp is not None else None
                rec["out"] = tuple(output.shape) if isinstance(output, Tensor) else None
                rec["leaf"] = next(iter(mod.children()), None) is None
                if isinstance(mod, nn.MultiheadAttention):
                    a = mha_inputs(mod, args, kwargs)
                    rec["out"] = tuple(output[0].shape)
                    rec["extra"] = {
                        n: tuple(a[n].shape) if isinstance(a[n], Tensor) else None
                        for n in ("query", "key", "value")
                    }
                return None
            self.aux[name] = inp
            return output + self.probes[name]

        return hook


# --------------------------------------------------------------------------------------------
# Capture and features


def _capture(
    plan: _Plan, xs: Tensor, rules: list[Rule], fb: list[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Per-sample output cotangents at each rule's module, fallback Jacobians, module inputs."""
    fn, model = plan.fn, plan.model
    probes: dict[str, Tensor | dict[str, Tensor]] = {}
    for r in rules:
        z = torch.zeros(r.out_shape, dtype=fn.dtype, device=fn.device)
        if r.part is None:
            probes[r.name] = z
        else:
            probes.setdefault(r.name, {})[r.part] = z
    fbp = {n: fn.params[n] for n in fb}
    fixed = {n: p for n, p in fn.params.items() if n not in fbp}
    hooks = _Hooks(model, "capture", probes)

    def f(pr: dict[str, Tensor], fbv: dict[str, Tensor], xi: Tensor):
        hooks.probes, hooks.aux, hooks.active = pr, {}, True
        try:
            out = functional_call(model, ({**fixed, **fbv}, fn.buffers), (xi.unsqueeze(0),))
        finally:
            hooks.active = False
        return out.reshape(-1), hooks.aux

    if not fb and plan.one_pass and all(r.part is None for r in rules):
        return _capture_one_pass(plan, xs, rules, hooks)
    with hooks:
        per = jacrev(f, argnums=(0, 1), has_aux=True)
        (G, J), aux = _over_samples(per, plan.batched, (probes, fbp), (xs,))
    return G, J, aux


def _capture_one_pass(
    plan: _Plan, xs: Tensor, rules: list[Rule], hooks: _Hooks
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The same captures from one forward of all ``c`` samples and ``k`` backward passes
    (``vmap`` over the cotangents ``e_a``): a zero probe of batched shape ``(c, ...)`` on each
    module's output; since sample ``i``'s outputs depend only on its own probe row (the
    planner's rule check compares with per-sample autograd), ``∂(Σ_i f_a(x_i))/∂probe[i]`` is
    sample ``i``'s cotangent ``G_i[a]``. Inputs and cotangents come out as ``(c, ...)`` and
    ``(c, k, ...)``, which the rules read like the per-sample layout."""
    fn, model, k, c = plan.fn, plan.model, plan.k, xs.shape[0]
    probes = {
        r.name: torch.zeros((c, *r.out_shape[1:]), dtype=fn.dtype, device=fn.device) for r in rules
    }

    def f(pr: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        hooks.probes, hooks.aux, hooks.active = pr, {}, True
        try:
            out = functional_call(model, (fn.params, fn.buffers), (xs,))
        finally:
            hooks.active = False
        return out.reshape(c, k), hooks.aux

    with hooks:
        _, pull, aux = vjp(f, probes, has_aux=True)
        if k == 1:  # one cotangent: a plain backward pass
            (G,) = pull(torch.ones(c, 1, dtype=fn.dtype, device=fn.device))
            return {name: g.unsqueeze(1) for name, g in G.items()}, {}, aux
        cot = torch.eye(k, dtype=fn.dtype, device=fn.device)[:, None, :].expand(k, c, k)
        (G,) = vmap(pull)(cot)  # name -> (k, c, ...)
    G = {name: g.transpose(0, 1) for name, g in G.items()}
    return G, {}, aux


def _over_samples(f: Callable, batched: bool, const: tuple, per: tuple[Tensor, ...]) -> Any:
    """``f(*const, *(t[i] for t in per))`` for every sample ``i``, stacked along a new dim 0: by
    ``vmap``, or by a Python loop where ``vmap`` cannot batch the model (``nn.GRU``/``nn.LSTM``;
    same result, one call per sample)."""
    if batched:
        return vmap(f, in_dims=(None,) * len(const) + (0,) * len(per))(*const, *per)
    outs = [f(*const, *(t[i] for t in per)) for i in range(per[0].shape[0])]
    return tree_map(lambda *ts: torch.stack(ts), outs[0], *outs[1:])


class _Feats:
    """Per-sample features of a set of samples: the jac group as column blocks ``(N, k, w)``
    (contracted block by block, so that large per-sample Jacobians are never copied into one
    matrix) and the gram/pair rules' inputs."""

    def __init__(self, jac: list[Tensor], rules: dict[str, tuple[Tensor, ...]]) -> None:
        self.jac = jac
        self.rules = rules

    def slice(self, a: int, b: int) -> _Feats:
        return _Feats(
            [t[a:b] for t in self.jac],
            {n: tuple(t[a:b] for t in ts) for n, ts in self.rules.items()},
        )

    def __len__(self) -> int:
        if self.jac:
            return self.jac[0].shape[0]
        return next(iter(self.rules.values()))[0].shape[0]


#: a jac-group part at least this wide (columns per output) is its own GEMM block; narrower
#: parts (biases, small layers) are concatenated into one block
_BLOCK_MIN = 2048


def _features(plan: _Plan, xs: Tensor, trace: bool, chunk: int) -> _Feats:
    N, k = xs.shape[0], plan.k
    store: dict[str, tuple[Tensor, ...]] = {}
    jr, fr = plan.jac_rules, plan.feat_rules
    blocks: list[Tensor] = []
    spec: list[list[int]] | None = None
    for s0 in range(0, N, chunk):
        s1 = min(s0 + chunk, N)
        G, Jfb, aux = _capture(plan, xs[s0:s1], plan.rules, plan.fb)
        c = s1 - s0
        parts: list[Tensor] = []
        for r in jr:
            parts += r._jac_parts(aux[r.name], G[r.name])
        parts += [Jfb[n].reshape(c, k, -1) for n in plan.fb]
        if spec is None:
            big = [i for i, t in enumerate(parts) if t.shape[2] >= _BLOCK_MIN]
            small = [i for i, t in enumerate(parts) if t.shape[2] < _BLOCK_MIN]
            spec = [[i] for i in big] + ([small] if small else [])
        if c == N:  # one chunk: the parts themselves (no copy for the large ones)
            blocks = [
                parts[g[0]].contiguous() if len(g) == 1 else torch.cat([parts[i] for i in g], 2)
                for g in spec
            ]
        else:
            if not blocks:
                blocks = [
                    parts[g[0]].new_empty((N, k, sum(parts[i].shape[2] for i in g))) for g in spec
                ]
            for blk, g in zip(blocks, spec, strict=True):
                off = 0
                for i in g:
                    w = parts[i].shape[2]
                    blk[s0:s1, :, off : off + w] = parts[i]
                    off += w
        del parts
        for r in fr:
            ts = r.features(aux[r.name], G[r.name], trace)
            if r.key not in store:
                store[r.key] = tuple(t.new_empty((N, *t.shape[1:])) for t in ts)
            for dst, t in zip(store[r.key], ts, strict=True):
                dst[s0:s1] = t
        del G, Jfb, aux
    return _Feats(blocks, store)


def _contract(plan: _Plan, fI: _Feats, fJ: _Feats, trace: bool, ws: int) -> Tensor:
    """One tile: ``(bI, k, bJ, k)`` (sample-major ``J_I J_Jᵀ``), or ``(bI, bJ)`` with trace."""
    k = plan.k
    bI, bJ = len(fI), len(fJ)
    fn = plan.fn
    shape = (bI, bJ) if trace else (bI, k, bJ, k)
    acc = None
    for a, b in zip(fI.jac, fJ.jac, strict=True):
        w = a.shape[2]
        A, B = (
            (a.reshape(bI, k * w), b.reshape(bJ, k * w))
            if trace
            else (
                a.reshape(bI * k, w),
                b.reshape(bJ * k, w),
            )
        )
        if acc is None:
            acc = A @ B.T
        else:
            acc.addmm_(A, B.T)
    acc = torch.zeros(shape, dtype=fn.dtype, device=fn.device) if acc is None else acc.view(shape)
    for r in plan.feat_rules:
        r.contract(fI.rules[r.key], fJ.rules[r.key], acc, trace, ws)
    return acc


def _syrk_ok(fn_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`_sym_jac` can run: float32/float64 tensors in CPU memory."""
    return device.type == "cpu" and fn_dtype in (torch.float32, torch.float64)


@functools.cache
def _blas_pools() -> Any:
    """threadpoolctl's controller of the BLAS pools loaded with scipy (found once: 20 µs a
    limit afterwards, against 1.2 ms for a fresh ``threadpool_limits``)."""
    import scipy.linalg.blas  # noqa: F401  (loaded before the scan)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class _Triangle:
    """``J Jᵀ`` of the jac group over ``N`` samples, accumulated column block by column block by
    BLAS ``syrk`` (scipy's), which computes one triangle: half the FLOPs of the GEMM (torch has
    no symmetric rank-k product). ``(N·k, N·k)`` with rows ``(i, a)``, or ``(N, N)`` with
    ``trace`` (the trace's ``Σ_a`` is the dot product over a sample's ``k·w`` columns); only
    the upper triangle (diagonal included) is set. Runs on as many BLAS threads as torch."""

    def __init__(self, N: int, k: int, trace: bool) -> None:
        self.m = N if trace else N * k
        self.C: Any = None

    def add(self, block: Tensor) -> None:
        """Add ``A Aᵀ`` of a ``(N, k, w)`` column block."""
        from scipy.linalg import blas

        syrk = blas.ssyrk if block.dtype == torch.float32 else blas.dsyrk
        # a C-order (m, w) matrix is the Fortran-order (w, m) matrix Aᵀ: no copy; syrk with
        # trans=1 gives (Aᵀ)ᵀ Aᵀ = A Aᵀ, its lower triangle in Fortran order = the upper in C
        At = block.reshape(self.m, -1).contiguous().numpy().T
        with _blas_pools().limit(limits=torch.get_num_threads(), user_api="blas"):
            if self.C is None:
                self.C = syrk(1.0, At, trans=1, lower=1)
            else:
                self.C = syrk(1.0, At, beta=1.0, c=self.C, trans=1, lower=1, overwrite_c=1)

    def result(self) -> Tensor:
        return torch.from_numpy(self.C.T)


def _sym_features(plan: _Plan, xs: Tensor, trace: bool, chunk: int) -> tuple[Tensor, _Feats]:
    """The jac group's :class:`_Triangle` over all samples of ``xs`` and the gram/pair rules'
    features. With all samples in one capture (``chunk >= N``) each rule's Jacobian columns
    go into the triangle as they are formed and are then freed: the whole ``J`` is never in
    memory, and the allocator hands the freed pages to the next rule's columns (a fresh ``J``
    first-touches every page: ~0.6 ms per MB measured on the development VM, 40 ms of a
    0.2 s call on the GPT at k = 10, n = 64). Else the columns of :func:`_features`."""
    N, k = xs.shape[0], plan.k
    tri = _Triangle(N, k, trace)
    if chunk < N:
        F = _features(plan, xs, trace, chunk)
        for a in F.jac:
            tri.add(a)
        return tri.result(), _Feats([], F.rules)
    G, Jfb, aux = _capture(plan, xs, plan.rules, plan.fb)
    small: list[Tensor] = []  # narrow parts (biases, small layers): one block at the end

    def add(part: Tensor) -> None:
        if part.shape[2] >= _BLOCK_MIN:
            tri.add(part)
        else:
            small.append(part)

    for r in plan.jac_rules:
        for part in r._jac_parts(aux[r.name], G[r.name]):
            add(part)
    for name in plan.fb:
        add(Jfb.pop(name).reshape(N, k, -1))
    if small:
        tri.add(torch.cat(small, 2))
    store = {r.key: r.features(aux[r.name], G[r.name], trace) for r in plan.feat_rules}
    return tri.result(), _Feats([], store)
