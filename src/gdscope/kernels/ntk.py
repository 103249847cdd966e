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
    Per-layer contractions that never form the Jacobian (:mod:`gdscope.kernels.rules`). One
    ``vmap(jacrev)`` pass with respect to zero "probes" added to each covered module's output
    yields every module's input ``A`` and output cotangents ``G`` (``k`` backward passes per
    sample, about ``2k`` forward costs). Each module then adds its share by the cheapest exact
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
    ``structured`` where every trainable parameter belongs to a module with a rule that is
    called exactly once per forward; otherwise the covered modules by their rules and the rest
    (shared or reused modules, custom layers, parameters used outside their module) by the
    Jacobian of just those parameters (contributions add over parameter groups); the plain
    ``jacobian`` route if nothing is covered. Each rule is checked against autograd on two
    samples before it is trusted.

With ``x2=None`` the kernel is symmetric and only the upper triangle of tiles is computed.
Everything is tiled over samples under a memory budget (``memory``, bytes; default a quarter of
the available RAM, or half of the free GPU memory); an output larger than the budget is refused
before anything is allocated (see :func:`ntk` for the alternatives).
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap
from torch.utils._pytree import tree_map

from gdscope.errors import (
    InvalidArgumentError,
    NonDeterministicError,
    ShapeMismatchError,
    StatefulModuleError,
)
from gdscope.kernels.functional import ModelFunction, check_finite, check_finite_params
from gdscope.kernels.rules import Rule, make_rule, mha_forward, mha_inputs
from gdscope.problem import math_attention

__all__ = ["NtkMethod", "ntk", "ntk_blocks"]

log = logging.getLogger(__name__)


class NtkMethod(enum.StrEnum):
    """How :func:`ntk` computes the kernel (costs in the module docstring)."""

    AUTO = "auto"
    """Structured rules where they apply, the Jacobian of the remaining parameters elsewhere."""
    STRUCTURED = "structured"
    """Per-layer contractions only; refuses models with uncovered parameters."""
    JACOBIAN = "jacobian"
    """Per-sample Jacobian tiles (``vmap(jacrev)``, or a loop over samples where ``vmap``
    cannot batch the model) contracted by GEMM."""
    VP = "vp"
    """NTK-vector products on identity columns; never forms ``J``; slow, least memory."""


MethodName = Literal["auto", "structured", "jacobian", "vp"]

Block = tuple[int, int, int, int, Tensor]

# Tile targets: rows of the (b·k × b2·k) GEMMs that keep BLAS efficient while leaving several
# tiles for the symmetric case (upper triangle only).
_TILE_ROWS = 1280
_TILE_TRACE = 1024


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
        total = 2.0 * k * self.width
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


def _record(model: nn.Module, fn: ModelFunction, x1: Tensor) -> tuple[dict, int]:
    """One forward of one sample: per-module calls and shapes, output size, buffer check."""
    snapshot = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with _Hooks(model, "record") as hooks, torch.no_grad():
            out = functional_call(model, (fn.params, fn.buffers), (x1,))
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
) -> _Plan:
    plan = _Plan(model=model, fn=fn, k=k, in_shape=tuple(x.shape[1:]), batched=batched)
    plan.act = sum(
        math.prod(r["out"]) * r["calls"] for r in info.values() if r.get("leaf") and r["out"]
    )
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
    if plan.rules:
        _verify_rules(plan, x[: min(2, x.shape[0])])
    if method == "structured" and plan.fb:
        raise InvalidArgumentError(
            "method='structured' cannot cover these modules: "
            + "; ".join(f"{m} ({why})" for m, why in plan.fallback_why.items())
            + ". Use method='auto' (structured rules plus the Jacobian of the rest)."
        )
    _choose(plan, trace, n_other, force)
    return plan


def _choose(plan: _Plan, trace: bool, n_other: int, force: str | dict[str, str] | None) -> None:
    for r in plan.rules:
        want = force.get(r.key, force.get(r.name)) if isinstance(force, dict) else force
        options = [a for a in r.approaches if not (trace and a == "pair")]
        if want is not None and want in options:
            r.approach = want
        else:
            r.approach = min(options, key=lambda a: r.cost(a, trace, n_other))


def _verify_rules(plan: _Plan, xs: Tensor) -> None:
    """Compare every rule's gradient with autograd on a few samples; demote failures."""
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
    bad = {o for o in err2 if err2[o] > tol**2 * scale2[o] and err2[o] > 0}
    for r in [r for r in plan.rules if r.name in bad]:
        plan.rules.remove(r)
        plan.fb.extend(n for n in r.params.values() if n not in plan.fb)
        plan.fallback_why[r.name or type(model).__name__] = (
            "its parameters are also used outside its forward (gradient check failed)"
        )
    for name in bad:
        log.info("ntk: %s failed the structured-rule gradient check; using its Jacobian", name)


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

    with hooks:
        per = jacrev(f, argnums=(0, 1), has_aux=True)
        (G, J), aux = _over_samples(per, plan.batched, (probes, fbp), (xs,))
    return G, J, aux


def _over_samples(f: Callable, batched: bool, const: tuple, per: tuple[Tensor, ...]) -> Any:
    """``f(*const, *(t[i] for t in per))`` for every sample ``i``, stacked along a new dim 0: by
    ``vmap``, or by a Python loop where ``vmap`` cannot batch the model (``nn.GRU``/``nn.LSTM``;
    same result, one call per sample)."""
    if batched:
        return vmap(f, in_dims=(None,) * len(const) + (0,) * len(per))(*const, *per)
    outs = [f(*const, *(t[i] for t in per)) for i in range(per[0].shape[0])]
    return tree_map(lambda *ts: torch.stack(ts), outs[0], *outs[1:])


class _Feats:
    """Per-sample features of a set of samples: the jac group and the gram/pair rules' inputs."""

    def __init__(self, jac: Tensor | None, rules: dict[str, tuple[Tensor, ...]]) -> None:
        self.jac = jac
        self.rules = rules

    def slice(self, a: int, b: int) -> _Feats:
        jac = None if self.jac is None else self.jac[a:b]
        return _Feats(jac, {n: tuple(t[a:b] for t in ts) for n, ts in self.rules.items()})


def _features(plan: _Plan, xs: Tensor, trace: bool, chunk: int) -> _Feats:
    N, k, W = xs.shape[0], plan.k, plan.width
    fn = plan.fn
    jac = torch.empty(N, k, W, dtype=fn.dtype, device=fn.device) if W else None
    store: dict[str, tuple[Tensor, ...]] = {}
    jr, fr = plan.jac_rules, plan.feat_rules
    for s0 in range(0, N, chunk):
        s1 = min(s0 + chunk, N)
        G, Jfb, aux = _capture(plan, xs[s0:s1], plan.rules, plan.fb)
        c = s1 - s0
        off = 0
        for r in jr:
            w = r.jac_width()
            r.jac_into(aux[r.name], G[r.name], jac[s0:s1, :, off : off + w])
            off += w
        for n in plan.fb:
            Jn = Jfb[n].reshape(c, k, -1)
            jac[s0:s1, :, off : off + Jn.shape[2]] = Jn
            off += Jn.shape[2]
        for r in fr:
            ts = r.features(aux[r.name], G[r.name], trace)
            if r.key not in store:
                store[r.key] = tuple(t.new_empty((N, *t.shape[1:])) for t in ts)
            for dst, t in zip(store[r.key], ts, strict=True):
                dst[s0:s1] = t
        del G, Jfb, aux
    return _Feats(jac, store)


def _contract(plan: _Plan, fI: _Feats, fJ: _Feats, trace: bool, ws: int) -> Tensor:
    """One tile: ``(bI, k, bJ, k)`` (sample-major ``J_I J_Jᵀ``), or ``(bI, bJ)`` with trace."""
    k = plan.k
    bI = fI.jac.shape[0] if fI.jac is not None else next(iter(fI.rules.values()))[0].shape[0]
    bJ = fJ.jac.shape[0] if fJ.jac is not None else next(iter(fJ.rules.values()))[0].shape[0]
    fn = plan.fn
    shape = (bI, bJ) if trace else (bI, k, bJ, k)
    if fI.jac is not None:
        W = fI.jac.shape[2]
        if trace:
            acc = fI.jac.reshape(bI, k * W) @ fJ.jac.reshape(bJ, k * W).T
        else:
            acc = (fI.jac.reshape(bI * k, W) @ fJ.jac.reshape(bJ * k, W).T).view(shape)
    else:
        acc = torch.zeros(shape, dtype=fn.dtype, device=fn.device)
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
    for r in plan.feat_rules:
        if r.pair_workspace(r.approach, trace) > ws:
            raise InvalidArgumentError(
                f"memory={budget} bytes is too small for module {r.name}'s contraction "
                f"({_gb(r.pair_workspace(r.approach, trace) * es * 4)} per sample pair). "
                "Raise memory=."
            )
    return _Layout(b, b2, cached, chunk, ws)


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
        from gdscope.kernels.operator import ntk_operator

        x, n, n2, k, trace = self.x, self.n, self.n2, self.k, self.trace
        xc = x if self.x2 is None else torch.cat([x, self.x2])
        N = xc.shape[0]
        op = ntk_operator(self.fn, xc, trace_outputs=trace)
        rows = N if trace else N * k
        per_col = 3 * rows * self.plan.esize
        cols = max(1, int(self.budget / 2 / per_col))
        width = 1 if trace else k
        bc = max(1, min(n2, cols // width, self.block_size or n2))
        off = 0 if self.x2 is None else n
        for j0 in range(0, n2, bc):
            j1 = min(j0 + bc, n2)
            E = torch.zeros(rows, (j1 - j0) * width, dtype=self.fn.dtype, device=self.fn.device)
            idx = torch.arange((j1 - j0) * width, device=E.device)
            E[(off + j0) * width + idx, idx] = 1.0
            R = op.matmat(E)[: n * width]
            yield 0, n, j0, j1, (R if trace else R.view(n, k, j1 - j0, k))


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
    batching = _Batching() if method == "vp" else _batching(model, fn, x[:1])
    if not batching.vmap:
        log.info("ntk: %s", batching.describe())
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
    job.plan = _build_plan(model, fn, x, info, k, method, trace_outputs, n2, force, batching.vmap)
    if method != "vp":
        job.layout = _layout(job.plan, n, n2, x2 is None, trace_outputs, budget, block_size)
    return job, out


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
    with ``trace_outputs``), in the model's dtype and device; only one tile (plus the per-sample
    features of the current tiles) is held at a time, so a kernel far larger than memory can be
    written to disk or reduced on the fly. With ``x2=None`` each lower tile is the transpose of
    an upper one, computed once and yielded twice. ``block_size`` fixes the tile edge in
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
                yield i0, i1, j0, j1, acc
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
    """What :func:`ntk` would do (per-module routes, tiles) and its GEMM FLOP count."""
    with math_attention():
        job, _ = _prepare(model, x, x2, method, trace_outputs, memory, None, force=force)
    plan, lay = job.plan, job.layout
    info = {
        "method": job.method,
        "k": job.k,
        "modules": plan.describe(),
        "batching": job.batching.describe(),
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
            pairs=pairs,
            gemm_flops=pairs * plan.gemm_flops(trace_outputs),
        )
    return info
