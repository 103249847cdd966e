"""The NTK's plan: input checks, the batching check, the shape record and FLOP count, the
per-structure cache of the checks, and the per-module routes (rules checked against
autograd, demoted to the Jacobian where they fail or cost more).
"""

from __future__ import annotations

import enum
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from gdscope.errors import (
    InvalidArgumentError,
    NonDeterministicError,
    ShapeMismatchError,
    StatefulModuleError,
)
from gdscope.kernels._ntk_capture import _capture, _Hooks, _over_samples
from gdscope.kernels._ntk_cost import (
    _clearly_cheaper,
    _rule_seconds,
    _work,
)
from gdscope.kernels.functional import ModelFunction, check_finite
from gdscope.kernels.rules import Rule, declared_rule, make_rule

log = logging.getLogger("gdscope.kernels.ntk")  # one logger for the whole NTK


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

    def jac_gemm_flops(self, trace: bool) -> float:
        """The jac group's GEMM FLOPs per sample pair: a dot product over ``k·W`` (trace) or
        ``k²`` of length ``W`` (full)."""
        return 2.0 * (self.k if trace else self.k * self.k) * self.width

    def gemm_flops(self, trace: bool) -> float:
        """Multiply-add FLOPs (×2) per sample pair of the contraction (GEMMs only)."""
        k = 1 if trace else self.k * self.k
        total = self.jac_gemm_flops(trace)
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
    work = _work(plan, None, plan.n, plan.n_other, plan.sym, trace)
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
