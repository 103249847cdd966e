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
    samples. Symmetric kernels are split into tile rows so that only the upper triangle is
    contracted (BLAS has no symmetric rank-k product). Each module then adds its share by the
    cheapest exact
    route: for ``Linear``, ``(A A'ᵀ + 1) ⊙ (G G'ᵀ)``, ``n n2 (d_in + k² d_out)`` multiply-adds;
    for convolutions and other weight-shared layers at ``T`` positions, the per-sample weight
    Jacobian ``Σ_t G_t ⊗ A_t`` and one GEMM (``n n2 k² P_l``) or the position-pair route
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
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from gdscope.errors import (
    InvalidArgumentError,
    NonDeterministicError,
    ShapeMismatchError,
    StatefulModuleError,
)
from gdscope.kernels._ntk_cost import (
    _SYM_MIN_ROWS,
    _SYM_SPLIT,
    _TILE_ROWS,
    _TILE_TRACE,
    _clearly_cheaper,
    _machine,
    _plan_costs,
    _rule_seconds,
    _vp_chunk,
    _vp_costs,
    _work,
)
from gdscope.kernels.functional import ModelFunction, check_finite, check_finite_params
from gdscope.kernels.rules import Rule, declared_rule, make_rule, mha_forward, mha_inputs
from gdscope.problem import math_attention

__all__ = ["NtkMethod", "ntk", "ntk_blocks"]

log = logging.getLogger(__name__)


class NtkMethod(enum.StrEnum):
    """How :func:`ntk` computes the kernel (costs in the module docstring)."""

    AUTO = "auto"
    """The cheapest exact route by a cost model: per parameter group a structured rule or the
    group's Jacobian, the whole plan against the Jacobian and vp routes."""
    STRUCTURED = "structured"
    """Per-layer contractions only; refuses models with uncovered parameters."""
    JACOBIAN = "jacobian"
    """Per-sample Jacobian tiles (``vmap(jacrev)``, or a loop over samples where ``vmap``
    cannot batch the model) contracted by GEMM."""
    VP = "vp"
    """NTK-vector products on identity columns; never forms ``J``; slow, least memory."""


MethodName = Literal["auto", "structured", "jacobian", "vp"]

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
# Planning


@dataclass
class _Plan:
    model: nn.Module
    fn: ModelFunction
    k: int
    in_shape: tuple[int, ...]
    rules: list[Rule] = field(default_factory=list)
    fb: list[str] = field(default_factory=list)  # canonical names of fallback parameters
    fallback_why: dict[str, str] = field(default_factory=dict)  # module -> reason
    act: int = 0  # activation elements per sample (leaf module outputs)
    #: ``vmap`` can batch the model over samples; else per-sample captures run in a Python loop
    batched: bool = True
    #: matmul FLOPs of each module's one-sample forward (inclusive of children), from _record
    flops: dict[str, float] = field(default_factory=dict)
    #: own (exclusive) forward FLOPs of the module holding each fallback-able parameter
    param_flops: dict[str, float] = field(default_factory=dict)
    #: parameters of convolutions (vmap computes their weight gradients for a whole chunk)
    conv_params: set[str] = field(default_factory=set)
    n_modules: int = 1  # modules called per forward (Python overhead per pass)
    n_ops: int = 1  # ATen operators one forward dispatches
    #: modules that see the samples along dim 0 (from the structure check)
    batch_first: frozenset[str] = frozenset()
    #: the rule check ran through the one-pass capture on two samples and passed
    one_pass_ok: bool = False
    f_first: float = 0.0  # matmul FLOPs of a first layer that reads the input x directly
    n_other: int = 1  # samples on the other side of the kernel (amortises per-sample work)
    n: int = 1  # samples on this side
    sym: bool = True  # x2 is None

    @property
    def one_pass(self) -> bool:
        """The captures can come from one batched forward (and ``k`` batched backward passes)
        instead of ``vmap`` over samples: every parameter has a rule of a module that sees the
        samples along dim 0 (no fallback parameters, no composite rules)."""
        return (
            self.batched
            and self.one_pass_ok
            and not self.fb
            and bool(self.rules)
            and all(r.part is None and r.name in self.batch_first for r in self.rules)
        )

    @property
    def F(self) -> float:
        """Matmul FLOPs of one sample's forward (at least ``2P``: every weight used once)."""
        return max(float(self.flops.get("", 0.0)), 2.0 * self.fn.num_params)

    @property
    def jac_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.approach == "jac"]

    @property
    def feat_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.approach != "jac"]

    @property
    def p_fb(self) -> int:
        return sum(self.fn.params[n].numel() for n in self.fb)

    @property
    def width(self) -> int:
        """Columns of the per-sample "jac group" (jac-route rules, then fallback parameters)."""
        return sum(r.jac_width() for r in self.jac_rules) + self.p_fb

    @property
    def esize(self) -> int:
        return torch.empty((), dtype=self.fn.dtype).element_size()

    def feature_bytes(self) -> int:
        fb = self.k * self.width * self.esize
        return fb + sum(r.feature_bytes(r.approach, self.esize) for r in self.feat_rules)

    def capture_bytes(self) -> int:
        """Rough peak of one sample's ``vmap(jacrev)`` capture (activations and cotangents)."""
        return self.esize * ((2 * self.k + 2) * self.act + 2 * self.k * self.p_fb) + (
            self.feature_bytes()
        )

    def gemm_flops(self, trace: bool) -> float:
        """Multiply-add FLOPs (×2) per sample pair of the contraction (GEMMs only)."""
        k = 1 if trace else self.k * self.k
        # the jac group: a dot product over k·W (trace) or k² of length W (full) per pair
        total = 2.0 * (self.k if trace else k) * self.width
        for r in self.feat_rules:
            T, d, o = r.T, r.d, r.o
            m = 2.0 * T * T * d if r.has_w and not hasattr(r, "V") else 0.0
            if r.approach == "gram":
                total += m + 2.0 * (self.k if trace else k) * T * T * o
            else:
                total += m + 2.0 * self.k * o * T * T + 2.0 * k * o * T
        return total

    def describe(self) -> list[str]:
        lines = [r.describe() for r in self.rules]
        lines += [f"{m}: jacobian ({why})" for m, why in self.fallback_why.items()]
        return lines


def _method(method: object) -> str:
    valid = [m.value for m in NtkMethod]
    if isinstance(method, NtkMethod):
        return method.value
    if isinstance(method, str) and method.lower() in valid:
        return method.lower()
    raise InvalidArgumentError(f"unknown method={method!r}: use one of {valid} (default 'auto').")


def _check_model(model: nn.Module) -> ModelFunction:
    fn = ModelFunction(model)  # refuses train-mode BatchNorm/InstanceNorm
    drop = [
        n or type(model).__name__
        for n, m in model.named_modules()
        if (isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0)
        or (isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0)
    ]
    if drop:
        raise NonDeterministicError(
            f"modules {drop} are dropout layers in train mode: the network is random, so its "
            "NTK is not defined. Call model.eval() first."
        )
    return fn


def _check_x(fn: ModelFunction, x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 0:
        raise ShapeMismatchError(
            f"{name} is a scalar: pass a batch of inputs with samples along dim 0."
        )
    if x.shape[0] == 0:
        raise InvalidArgumentError(
            f"{name} is empty ({name}.shape = {tuple(x.shape)}): pass at least one sample."
        )
    if x.is_complex():
        raise InvalidArgumentError(f"{name} is complex ({x.dtype}); pass real inputs.")
    x = x.detach()
    check_finite(x, name)
    if x.is_floating_point() and x.dtype != fn.dtype:
        x = x.to(fn.dtype)  # the dtype follows the model
        check_finite(x, f"{name} (cast to the model's {fn.dtype})")
    return x


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        same_nan = torch.equal(a.isnan(), b.isnan())
        return bool(same_nan and torch.equal(a.nan_to_num(), b.nan_to_num()))
    return bool(torch.equal(a, b))


@dataclass(frozen=True)
class _Batching:
    """How per-sample Jacobians can be formed on this model (:func:`_batching`)."""

    vmap: bool = True  # ``vmap`` batches the model over samples
    jac: bool = True  # ``jacrev`` works on one sample (k cotangents batched by ``vmap``)
    module: str | None = None  # the innermost module running when ``vmap`` failed
    why: str = ""  # PyTorch's message, first line

    def describe(self) -> str:
        where = f"module {self.module!r}" if self.module else "the model"
        if self.vmap:
            return "per-sample Jacobians by vmap over samples"
        if self.jac:
            return (
                f"per-sample Jacobians in a Python loop over samples: vmap cannot batch {where} "
                f"over samples ({self.why})"
            )
        return f"no per-sample Jacobians: vmap fails in {where} ({self.why})"


def _batching(model: nn.Module, fn: ModelFunction, x1: Tensor) -> _Batching:
    """Can ``vmap`` batch the model over samples (a forward and one backward on two copies of
    one sample)? If not (``nn.GRU``, ``nn.LSTM``, custom autograd functions without a vmap
    rule), can ``jacrev`` at least batch the cotangents of one sample? The innermost module that
    was running when ``vmap`` failed is named in the reason."""
    stack: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        label = name or type(model).__name__
        handles.append(mod.register_forward_pre_hook(lambda *_, lb=label: stack.append(lb)))
        handles.append(mod.register_forward_hook(lambda *_: stack.pop() and None))
    params = fn.params

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, (p, fn.buffers), (xi.unsqueeze(0),)).reshape(-1)

    def one(xi: Tensor) -> dict[str, Tensor]:
        out, pull = vjp(lambda p: f(p, xi), params)
        return pull(torch.ones_like(out))[0]

    culprit, why = None, ""
    try:
        with torch.enable_grad():
            vmap(one)(x1.expand(2, *x1.shape[1:]))
        return _Batching()
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        culprit = stack[-1] if stack else None
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
    finally:
        for h in handles:
            h.remove()
    try:
        out, pull = vjp(lambda p: f(p, x1[0]), params)
        vmap(pull)(torch.ones(2, *out.shape, dtype=out.dtype, device=out.device))
        ok = True
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        ok = False
    return _Batching(vmap=False, jac=ok, module=culprit, why=why)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators a forward dispatches (per-operator overhead of a pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _record(model: nn.Module, fn: ModelFunction, x1: Tensor) -> tuple[dict, int]:
    """One forward of one sample: per-module calls and shapes, output size, buffer check."""
    snapshot = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with _Hooks(model, "record") as hooks, torch.no_grad():
            out = model(x1)  # fn.params are the model's own (detached): no functional_call
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not x1.is_floating_point() and ("dtype" in msg.lower() or "type" in msg.lower()):
            raise InvalidArgumentError(
                f"x has dtype {x1.dtype} but the model needs floating inputs ({msg}). Pass "
                f"x.to({fn.dtype})."
            ) from e
        if x1.is_floating_point() and ("indices" in msg.lower() or "long" in msg.lower()):
            raise InvalidArgumentError(
                f"x has dtype {x1.dtype} but the model needs integer inputs ({msg}): pass token "
                "indices as x.long()."
            ) from e
        raise ShapeMismatchError(
            f"the model fails on x with per-sample shape {tuple(x1.shape[1:])}: {msg}. Check "
            "that x's feature dimensions match what the model expects (samples along dim 0)."
        ) from e
    finally:
        changed = []
        for n, b in model.named_buffers():
            if n in snapshot and not _same(b, snapshot[n]):
                changed.append(n)
                with torch.no_grad():
                    b.copy_(snapshot[n])
    if not changed and not isinstance(out, Tensor):
        raise InvalidArgumentError(
            f"the model returns {type(out).__name__}, not a tensor: wrap it so that forward "
            "returns one tensor of outputs (n, ...)."
        )
    if changed:
        raise StatefulModuleError(
            f"the model's forward changed its buffers {changed} (restored): a network that "
            "updates state as it runs (running statistics, counters) has no fixed NTK. Put "
            "such modules in eval mode (model.eval()) or freeze that state."
        )
    return hooks.info, int(out.numel())


def _count(model: nn.Module, fn: ModelFunction, x1: Tensor) -> tuple[dict[str, float], int]:
    """Matmul FLOPs of a one-sample forward per module name (inclusive of its children) and
    the number of ATen operators it dispatches (once per model structure: cached)."""
    counter = FlopCounterMode(display=False)
    ops = _OpCounter()
    try:
        with torch.no_grad(), counter, ops:
            functional_call(model, (fn.params, fn.buffers), (x1,))
    except Exception as e:  # only the cost estimate depends on it
        log.debug("ntk: FLOP count failed (%s); the cost model assumes 2 FLOPs per weight", e)
        return {}, 1
    root = type(model).__name__
    counts = {m: float(sum(c.values())) for m, c in counter.get_flop_counts().items()}
    flops = {}
    for name, _ in model.named_modules():
        flops[name] = counts.get(f"{root}.{name}" if name else root, 0.0)
    return flops, max(1, ops.n)


# --------------------------------------------------------------------------------------------
# The structure cache: the rule check and the batching check, per model structure


@dataclass
class _Checked:
    """What is known about a model structure: how to batch it, which rules failed the check."""

    batching: _Batching
    flops: dict[str, float]  # matmul FLOPs of a one-sample forward per module (inclusive)
    ops: int  # ATen operators of that forward
    failed: frozenset[str] | None = None  # None: rules not checked yet
    said: bool = False  # the batching fallback was logged at INFO once
    #: the one-pass capture passed the rule check on two samples (so samples do not couple)
    one_pass_ok: bool = False
    #: modules whose batched call puts the samples along dim 0 of input and output (their
    #: captures can come from one batched pass instead of vmap over samples)
    batch_first: frozenset[str] = frozenset()
    pinned: tuple = ()  # objects whose ids are in the key (kept alive)

    def level(self) -> int:
        """INFO the first time a structure's fallback is reported, DEBUG after that."""
        first, self.said = not self.said, True
        return logging.INFO if first else logging.DEBUG


_CACHE: OrderedDict[tuple, _Checked] = OrderedDict()
_CACHE_SIZE = 64
_SCALARS = (bool, int, float, str, type(None))


def _structure_key(model: nn.Module, fn: ModelFunction, x1: Tensor, k: int) -> tuple:
    """A key for everything the rule and batching checks depend on except parameter *values*:
    module classes (and a replaced ``forward``), their scalar attributes (flags such as
    ``training``, ``batch_first``, ``eps``), parameter names, shapes, ``requires_grad`` and
    tying, buffer shapes, the per-sample input's shape and dtype, the model's dtype, device and
    ``k``. Models that differ only in their weights share one entry."""
    canon = {id(p): n for n, p in model.named_parameters()}
    mods = []
    for name, m in model.named_modules():
        attrs = tuple(
            sorted(
                (a, v)
                for a, v in vars(m).items()
                if not a.startswith("_") and isinstance(v, _SCALARS)
            )
        )
        params = tuple(
            (pn, canon.get(id(p)), tuple(p.shape), p.requires_grad)
            for pn, p in m._parameters.items()
            if p is not None
        )
        bufs = tuple((bn, tuple(b.shape)) for bn, b in m._buffers.items() if b is not None)
        fwd = vars(m).get("forward")
        mods.append((name, id(type(m)), type(m).__qualname__, id(fwd), attrs, params, bufs))
    return (
        tuple(mods),
        tuple(x1.shape[1:]),
        x1.dtype,
        fn.dtype,
        str(fn.device),
        k,
    )


def _checked(
    model: nn.Module, fn: ModelFunction, x1: Tensor, k: int, batching: bool = True
) -> _Checked:
    """The cached facts about this model structure (computed on a miss; ``batching=False``
    skips the batching check for the ``"vp"`` method, which does not need it)."""
    key = _structure_key(model, fn, x1, k)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    if not batching:
        return _Checked(_Batching(), *_count(model, fn, x1))
    hit = _Checked(_batching(model, fn, x1), *_count(model, fn, x1))
    if hit.batching.vmap:
        hit.batch_first = _batch_first(model, fn, x1)
    # hold the classes (and replaced forwards) whose ids are in the key, so that no other class
    # can reuse an id while the entry lives
    hit.pinned = tuple(type(m) for m in model.modules()) + tuple(
        vars(m)["forward"] for m in model.modules() if "forward" in vars(m)
    )
    _CACHE[key] = hit
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return hit


def _batch_first(model: nn.Module, fn: ModelFunction, x1: Tensor) -> frozenset[str]:
    """Modules called once whose input and output carry the samples along dim 0: the shapes
    a forward of two samples records are those of one sample with dim 0 doubled."""
    try:
        one, _ = _record(model, fn, x1)
        two, _ = _record(model, fn, x1.expand(2, *x1.shape[1:]))
    except (InvalidArgumentError, ShapeMismatchError, StatefulModuleError):
        return frozenset()

    def doubled(a: tuple | None, b: tuple | None) -> bool:
        if a is None or b is None or not a or a[0] != 1:
            return False
        return b == (2, *a[1:])

    return frozenset(
        name
        for name, rec in one.items()
        if rec["calls"] == 1
        and name in two
        and doubled(rec["in"], two[name]["in"])
        and doubled(rec["out"], two[name]["out"])
    )


def _build_plan(
    model: nn.Module,
    fn: ModelFunction,
    x: Tensor,
    info: dict,
    k: int,
    method: str,
    trace: bool,
    n_other: int,
    force: str | dict[str, str] | None = None,
    batched: bool = True,
    checked: _Checked | None = None,
    sym: bool = True,
) -> _Plan:
    plan = _Plan(model=model, fn=fn, k=k, in_shape=tuple(x.shape[1:]), batched=batched)
    plan.act = sum(
        math.prod(r["out"]) * r["calls"] for r in info.values() if r.get("leaf") and r["out"]
    )
    plan.n_other, plan.n, plan.sym = n_other, x.shape[0], sym
    plan.n_modules = max(1, sum(r["calls"] for r in info.values()))
    if checked is not None:
        plan.flops, plan.n_ops, plan.batch_first = checked.flops, checked.ops, checked.batch_first
        plan.one_pass_ok = checked.one_pass_ok
    # the first layer, if it reads the input itself, needs no input gradient (nor a tangent)
    x1 = (1, *x.shape[1:])
    mods = dict(model.named_modules())
    for name, rec in info.items():  # in the order the modules finished: leaves first
        if rec.get("leaf") and plan.flops.get(name, 0.0) > 0:
            m = mods.get(name)
            affine = isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or (
                m is not None and declared_rule(m) is not None
            )
            if affine and rec["in"] == x1 and rec["calls"] == 1:
                plan.f_first = plan.flops[name]
            break
    _own_flops(plan, model)
    if method in ("vp",):
        return plan
    canon = {id(p): n for n, p in model.named_parameters()}
    trainable = set(fn.names)
    holders: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    claimed: set[str] = set()  # covered by a composite rule of a parent module
    shapes = {n: tuple(p.shape) for n, p in fn.params.items()}
    for mname, mod in model.named_modules():
        own = {
            pn: canon[id(p)]
            for pn, p in mod._parameters.items()
            if p is not None and canon.get(id(p)) in trainable and canon[id(p)] not in claimed
        }
        sub: dict[str, str] = {}
        sub_shared = False
        if isinstance(mod, nn.MultiheadAttention) and own:
            # its out_proj is never called: F.multi_head_attention_forward uses its weights
            op = mod.out_proj
            sub = {
                f"out_proj.{pn}": canon[id(p)]
                for pn, p in op._parameters.items()
                if p is not None and canon.get(id(p)) in trainable
            }
            sub_shared = any(holders[id(p)] > 1 for p in op._parameters.values() if p is not None)
        if not own:
            continue
        label = mname or type(model).__name__
        rec = info.get(mname)
        calls = rec["calls"] if rec else 0
        rule = None
        sub_calls = info.get(f"{mname}.out_proj" if mname else "out_proj", {}).get("calls", 0)
        if method == "jacobian":
            why = "method='jacobian'"
        elif any(holders[id(mod._parameters[pn])] > 1 for pn in own) or sub_shared:
            why = "parameter shared with another module"
        elif calls != 1:
            why = f"called {calls} times per forward"
        elif sub and sub_calls:
            why = "its out_proj is also called on its own"
        else:
            rule = make_rule(
                mname, mod, {**own, **sub}, rec["in"], rec["out"], k, rec.get("extra"), shapes
            )
            why = f"no structured rule for {type(mod).__name__}"
        if rule is None:
            plan.fb.extend(n for n in own.values() if n not in plan.fb)
            plan.fallback_why[label] = why
        else:
            plan.rules.extend(rule if isinstance(rule, list) else [rule])
            claimed.update(sub.values())
    if plan.rules and checked is not None and checked.failed is not None:
        _demote_failed(plan, checked.failed)  # checked before: no samples to pick
    elif plan.rules:
        _verify_rules(plan, _two_distinct(x), checked)
    if method == "structured" and plan.fb:
        raise InvalidArgumentError(
            "method='structured' cannot cover these modules: "
            + "; ".join(f"{m} ({why})" for m, why in plan.fallback_why.items())
            + ". Use method='auto' (structured rules plus the Jacobian of the rest)."
        )
    _choose(plan, trace, n_other, force, allow_fb=method == "auto")
    return plan


def _own_flops(plan: _Plan, model: nn.Module) -> None:
    """Each parameter's module's exclusive forward FLOPs (its weight-gradient cost per
    cotangent in the Jacobian route), shared evenly among the module's parameters' owner."""
    canon = {id(p): n for n, p in model.named_parameters()}
    for mname, mod in model.named_modules():
        own = [canon[id(p)] for p in mod._parameters.values() if p is not None]
        if not own:
            continue
        f = plan.flops.get(mname, 0.0)
        pre = f"{mname}." if mname else ""
        f -= sum(
            plan.flops.get(c, 0.0)
            for c in plan.flops
            if c.startswith(pre) and c != mname and "." not in c[len(pre) :]
        )
        for n in own:
            plan.param_flops[n] = plan.param_flops.get(n, 0.0) + max(f, 0.0) / len(own)
            if isinstance(mod, nn.modules.conv._ConvNd):
                plan.conv_params.add(n)


def _choose(
    plan: _Plan,
    trace: bool,
    n_other: int,
    force: str | dict[str, str] | None,
    allow_fb: bool = False,
) -> None:
    """Each rule's route: the forced one, else the cheapest by :func:`_rule_seconds` among its
    approaches and (``allow_fb``, method ``"auto"``) the Jacobian of its parameters."""
    demote = []
    work = _work(plan, None, plan.n, plan.n_other, plan.sym)
    for r in plan.rules:
        want = force.get(r.key, force.get(r.name)) if isinstance(force, dict) else force
        options = [a for a in r.approaches if not (trace and a == "pair")]
        if allow_fb and r.part is None:
            options.append("fb")
        if want is not None and want in options:
            r.approach = want
        else:
            # the contraction-only choice (rules.py's weights, tuned per route), replaced by
            # the whole-cost model's (capture, per-call overhead, the Jacobian route) only
            # where that is clearly cheaper
            base = [a for a in options if a != "fb"]
            r.approach = min(base, key=lambda a: r.cost(a, trace, n_other))
            cost = {a: _rule_seconds(plan, r, a, trace, work) for a in options}
            best = min(options, key=cost.__getitem__)
            if _clearly_cheaper(cost[best], cost[r.approach]):
                r.approach = best
        if r.approach == "fb":
            demote.append(r)
    for r in demote:
        r.approach = "jac"
        plan.rules.remove(r)
        plan.fb.extend(n for n in r.params.values() if n not in plan.fb)
        plan.fallback_why[r.name or type(plan.model).__name__] = (
            "the Jacobian route is cheaper here (cost model)"
        )


def _two_distinct(x: Tensor) -> Tensor:
    """The first sample and the first one that differs from it (or just the first): the rule
    check needs two different samples to see a model that couples the samples of a batch."""
    if x.shape[0] < 2:
        return x[:1]
    differ = (x[1:] != x[:1]).reshape(x.shape[0] - 1, -1).any(1).nonzero()
    return x[:1] if differ.numel() == 0 else x[[0, int(differ[0]) + 1]]


def _verify_rules(plan: _Plan, xs: Tensor, checked: _Checked | None = None) -> None:
    """Compare every rule's gradient with autograd on a few samples; demote failures. The
    outcome is cached per model structure (``checked``): a second call pays nothing.

    With two samples the check first runs through the one-pass capture where it applies. A
    model that couples the samples of a batch (``x - x.mean(0)``) fails there; the check is then
    repeated with the capture per sample, so that such a model loses the one-pass capture, not
    its rules."""
    if checked is not None and checked.failed is not None:
        _demote_failed(plan, checked.failed)
        return
    plan.one_pass_ok = xs.shape[0] >= 2
    bad = _rule_errors(plan, xs)
    if bad and plan.one_pass:  # the batched pass was used: is it the rules or the coupling?
        plan.one_pass_ok = False
        bad = _rule_errors(plan, xs)
        log.info("ntk: the samples of a batch couple in this model; captured per sample")
    plan.one_pass_ok = plan.one_pass_ok and not bad
    if checked is not None:
        checked.failed = frozenset(bad)
        checked.one_pass_ok = plan.one_pass_ok
    _demote_failed(plan, bad)
    for name in bad:
        log.info("ntk: %s failed the structured-rule gradient check; using its Jacobian", name)


def _rule_errors(plan: _Plan, xs: Tensor) -> set[str]:
    """The rules whose gradient (through :func:`_capture` as the plan stands) differs from
    autograd's per sample on ``xs``, each module compared at the scale of its whole gradient."""
    fn, model = plan.fn, plan.model
    G, _, aux = _capture(plan, xs, plan.rules, [])
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(xs.shape[0], plan.k, generator=gen, dtype=torch.float64)
    v = v.to(device=fn.device, dtype=fn.dtype)
    names = [n for r in plan.rules for n in r.params.values()]
    rp = {n: fn.params[n] for n in names}
    fixed = {n: p for n, p in fn.params.items() if n not in rp}

    def per(xi: Tensor, vi: Tensor) -> dict[str, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(model, ({**fixed, **p}, fn.buffers), (xi.unsqueeze(0),))
            return out.reshape(-1)

        _, pull = vjp(f, rp)
        return pull(vi)[0]

    true = {n: g.sum(0) for n, g in _over_samples(per, plan.batched, (), (xs, v)).items()}
    tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(fn.dtype, 3e-2)
    if fn.dtype == torch.float32 and fn.device.type == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        tol = 1e-2 if tf32 else tol  # autograd's convolutions may run in TF32 there
    mine: dict[str, Tensor] = {}  # the parts of a composite rule add up
    owner: dict[str, str] = {}
    for r in plan.rules:
        for n, g in r.grad(aux[r.name], G[r.name], v).items():
            mine[n] = mine[n] + g if n in mine else g
            owner[n] = r.name
    # Compare per module against the scale of the whole module's gradient: a parameter whose
    # true gradient is exactly zero (the key projection's bias in softmax attention: softmax is
    # shift-invariant) has two round-off-sized gradients whose difference is as large as they are.
    err2: dict[str, float] = {}
    scale2: dict[str, float] = {}
    for n, g in mine.items():
        t, o = true[n], owner[n]
        err2[o] = err2.get(o, 0.0) + float((g - t).norm()) ** 2
        scale2[o] = scale2.get(o, 0.0) + max(float(t.norm()), float(g.norm())) ** 2
    return {o for o in err2 if err2[o] > tol**2 * scale2[o] and err2[o] > 0}


def _demote_failed(plan: _Plan, bad: frozenset[str] | set[str]) -> None:
    for r in [r for r in plan.rules if r.name in bad]:
        plan.rules.remove(r)
        plan.fb.extend(n for n in r.params.values() if n not in plan.fb)
        plan.fallback_why[r.name or type(plan.model).__name__] = (
            "its parameters are also used outside its forward (gradient check failed)"
        )


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
    if sym and cached and block_size is None:
        # BLAS has no symmetric rank-k product: split the kernel into s tile rows so that the
        # upper triangle (computed) is ~(s+1)/(2s) of the square, keeping at least
        # _SYM_MIN_ROWS GEMM rows per tile; s by the cost model (pairs saved against the
        # per-tile overhead of each rule's contraction call)
        rows = 1 if trace else k
        mach = _machine(plan)
        per_pair = plan.gemm_flops(trace) * mach.gemm
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
    for r in plan.feat_rules:
        if r.pair_workspace(r.approach, trace) > ws:
            raise InvalidArgumentError(
                f"memory={budget} bytes is too small for module {r.name}'s contraction "
                f"({_gb(r.pair_workspace(r.approach, trace) * es * 4)} per sample pair). "
                "Raise memory=."
            )
    return _Layout(b, b2, cached, chunk, ws, rows)


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
        job.costs = {name: _plan_costs(plan, _work(plan, job.layout, n, n2, sym), trace)}
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
            job.costs["jacobian"] = _plan_costs(jplan, _work(jplan, jlay, n, n2, sym), trace)
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
    twice. ``block_size`` fixes the tile edge in
    samples (default: chosen for GEMM efficiency under ``memory``). Arguments are checked when
    this is called, before the first tile. Same arguments as :func:`ntk` otherwise.

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
    contraction per tile row) and the GEMM FLOP count of the contraction."""
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
        pairs = 0
        for i0 in range(0, job.n, lay.tile):
            i1 = min(i0 + lay.tile, job.n)
            for j0 in range(i0 if job.sym else 0, job.n2, lay.tile2):
                pairs += (i1 - i0) * (min(j0 + lay.tile2, job.n2) - j0)
        info.update(
            tile=lay.tile,
            tile2=lay.tile2,
            cached=lay.cached,
            chunk=lay.chunk,
            rows=lay.rows,
            pairs=pairs,
            gemm_flops=pairs * plan.gemm_flops(trace_outputs),
        )
    return info
