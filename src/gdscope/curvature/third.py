"""Third-derivative products of the loss: gradients of Hessian bilinear forms, matrix-free.

For vectors ``u_i`` (columns of ``U``, ``P × m``) the *HVP gradient*

    G_ij = ∇_θ (u_iᵀ ∇²L(θ) u_j) = D³L(θ)[u_i, u_j, ·] ∈ R^P,      G_ij = G_ji,

is the derivative of the Hessian-vector product: with the gradient graph ``g = ∇L`` built once
(``create_graph``), ``h_j = ∂(gᵀu_j)/∂θ = H u_j`` is built with ``create_graph`` too, and
``G_ij = ∂(h_jᵀu_i)/∂θ`` is one more backward pass through that graph (``u`` held fixed).
Cost per batch: one gradient, ``m`` HVPs and ``m(m+1)/2`` third-order backward passes; the
loss, ``∇L`` and ``HU`` come out of the same graph for free (:func:`edge_derivatives`).

For an eigenvector ``u`` of a simple eigenvalue ``λ`` with ``‖u‖ = 1``, ``G_uu = ∇λ(θ)``
(Hellmann–Feynman): this is the gradient of the sharpness that the central flow needs.

PyTorch's third derivatives of a module are only as good as the double-backward formula of its
kernel. **Measured in torch 2.13 (float64, central differences of reverse-over-reverse Hessians
as the oracle; ``tests/test_third_derivatives.py``):** the built-in ``layer_norm`` kernel
(``nn.LayerNorm``, ``F.layer_norm``) gives *wrong* third derivatives by triple reverse mode (error
of the order of the values themselves) and a wrong, asymmetric forward-over-reverse Hessian
(``torch.func.hessian``: the block between the LayerNorm weight and the layer before it), while
its reverse-over-reverse Hessian is right. ``RMSNorm`` and ``GroupNorm`` are right.
:func:`pure_layer_norm` swaps the kernel for the same formula written in PyTorch operations
(``(x − μ)/√(σ² + ε)·w + b``, biased variance), whose derivatives of every order are right;
:func:`edge_derivatives` uses it by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdscope.curvature.products import check_params, check_problem
from gdscope.errors import InvalidArgumentError, NonFiniteError
from gdscope.problem import Params, Problem

__all__ = [
    "EdgeDerivatives",
    "edge_derivatives",
    "hvp_gradients",
    "pure_layer_norm",
    "third_derivative_warnings",
]

# Modules whose built-in kernels' third derivatives were measured wrong in this PyTorch
# (tests/test_third_derivatives.py keeps the list honest: it fails if one becomes right).
_KNOWN_BAD: dict[type[nn.Module], str] = {
    nn.LayerNorm: (
        "PyTorch's built-in layer_norm kernel has wrong third derivatives (and a wrong "
        "forward-over-reverse Hessian); gdscope's third-derivative products evaluate it as "
        "pure PyTorch operations instead (gdscope.curvature.third.pure_layer_norm)"
    ),
}


def _layer_norm(
    input: Tensor,
    normalized_shape: Any,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *_: Any,
) -> Tensor:
    """``(x − μ)/√(σ² + ε)·w + b`` over the last ``len(normalized_shape)`` dims (biased σ²)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    mu = input.mean(dim=dims, keepdim=True)
    var = (input - mu).square().mean(dim=dims, keepdim=True)
    out = (input - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class _PureLayerNorm(torch.overrides.TorchFunctionMode):
    """Route ``F.layer_norm``/``torch.layer_norm`` to :func:`_layer_norm`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.layer_norm or func is torch.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def pure_layer_norm() -> Iterator[None]:
    """Within the context, every ``F.layer_norm``/``torch.layer_norm`` call (``nn.LayerNorm``
    included) runs as PyTorch operations with correct derivatives of every order (the built-in
    kernel's third derivatives are wrong in torch 2.13: module docstring). Values agree with
    the kernel to rounding."""
    with _PureLayerNorm():
        yield


@dataclass(frozen=True)
class EdgeDerivatives:
    """Loss derivatives at one point along ``U``'s columns (all float, on the problem's device).

    Attributes:
        loss: ``L(θ)`` (0-d tensor).
        grad: ``∇L(θ)``, ``(P,)``.
        HU: ``∇²L(θ) U``, ``(P, m)``.
        G: ``(m, m, P)``, ``G[i, j] = ∇_θ(u_iᵀ ∇²L(θ) u_j)`` (symmetric in ``i, j``).
    """

    loss: Tensor
    grad: Tensor
    HU: Tensor
    G: Tensor


def _flat(parts: tuple[Tensor | None, ...], leaves: list[Tensor]) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if t is None else t).reshape(-1)
            for t, p in zip(parts, leaves, strict=True)
        ]
    )


def _check_U(prob: Problem, U: object) -> Tensor:
    if not isinstance(U, Tensor) or U.is_complex() or not U.is_floating_point():
        raise InvalidArgumentError(
            f"U must be a real floating tensor of shape (P, m) = ({prob.num_params}, m), got "
            f"{type(U).__name__}" + (f" of dtype {U.dtype}" if isinstance(U, Tensor) else "") + "."
        )
    if U.ndim == 1:
        U = U[:, None]
    if U.ndim != 2 or U.shape[0] != prob.num_params or U.shape[1] < 1:
        raise InvalidArgumentError(
            f"U has shape {tuple(U.shape)}: pass (P, m) with P = {prob.num_params} (the model's "
            "trainable parameters, flattened in prob.names order) and m >= 1 columns."
        )
    if not bool(torch.isfinite(U).all()):
        raise NonFiniteError("U holds NaN or inf: pass finite direction vectors.")
    return U.detach().to(prob.device, prob.dtype)


def edge_derivatives(
    prob: Problem,
    U: Tensor,
    *,
    params: Params | None = None,
    third: bool = True,
    pure_layernorm: bool = True,
) -> EdgeDerivatives:
    """``L``, ``∇L``, ``HU`` and (``third``) the HVP gradients ``G`` at ``params`` (module
    docstring), summed over the problem's batches with their weights. ``third=False`` leaves
    ``G`` as zeros of shape ``(m, m, 0)`` and skips the third-order passes. ``pure_layernorm``
    evaluates layer norms under :func:`pure_layer_norm` (their built-in kernel's third
    derivatives are wrong); ``False`` keeps the kernel (to measure it)."""
    ctx = pure_layer_norm() if pure_layernorm else contextlib.nullcontext()
    with ctx:
        return _edge_derivatives(prob, U, params, third)


def _edge_derivatives(
    prob: Problem, U: Tensor, params: Params | None, third: bool
) -> EdgeDerivatives:
    check_problem(prob)
    U = _check_U(prob, U)
    params = check_params(prob, params)
    src = prob.params if params is None else params
    P, m = U.shape
    leaves_d = {n: src[n].detach().clone().to(prob.device, prob.dtype) for n in prob.names}
    leaves = [leaves_d[n].requires_grad_(True) for n in prob.names]
    sizes = [p.numel() for p in leaves]
    cols = [
        [c.view(p.shape) for c, p in zip(U[:, j].split(sizes), leaves, strict=True)]
        for j in range(m)
    ]
    loss_total = torch.zeros((), dtype=prob.dtype, device=prob.device)
    grad_total = torch.zeros(P, dtype=prob.dtype, device=prob.device)
    HU = torch.zeros(P, m, dtype=prob.dtype, device=prob.device)
    G = torch.zeros(m, m, P if third else 0, dtype=prob.dtype, device=prob.device)
    for x, y, w in prob.batches():
        with torch.enable_grad():
            lb = prob.batch_loss(leaves_d, x, y)
            lb = lb if w == 1.0 else w * lb
            loss_total += lb.detach()
            g = torch.autograd.grad(lb, leaves, create_graph=True, allow_unused=True)
            grad_total += _flat(tuple(None if t is None else t.detach() for t in g), leaves)
            live = [i for i, t in enumerate(g) if t is not None and t.requires_grad]
            if not live:
                continue  # the loss is linear in θ on this batch: H = 0, G = 0
            hs: list[tuple[Tensor | None, ...]] = []
            for j in range(m):
                h = torch.autograd.grad(
                    [g[i] for i in live],
                    leaves,
                    grad_outputs=[cols[j][i] for i in live],
                    retain_graph=True,
                    create_graph=third,
                    allow_unused=True,
                )
                hs.append(h)
                HU[:, j] += _flat(tuple(None if t is None else t.detach() for t in h), leaves)
            if not third:
                continue
            for j in range(m):
                hlive = [i for i, t in enumerate(hs[j]) if t is not None and t.requires_grad]
                if not hlive:
                    continue  # H is constant along u_j: its derivative is 0
                for i in range(j + 1):
                    s = sum((hs[j][a] * cols[i][a]).sum() for a in hlive)
                    d = torch.autograd.grad(s, leaves, retain_graph=True, allow_unused=True)
                    gij = _flat(d, leaves)
                    G[i, j] += gij
                    if i != j:
                        G[j, i] += gij
    if not bool(torch.isfinite(loss_total)):
        raise NonFiniteError(
            f"the loss is {loss_total.item()} at these parameters: derivatives are only defined "
            "at finite points."
        )
    return EdgeDerivatives(loss_total, grad_total, HU, G)


def hvp_gradients(
    prob: Problem, U: Tensor, *, params: Params | None = None, pure_layernorm: bool = True
) -> Tensor:
    """``(m, m, P)`` tensor ``G[i, j] = ∇_θ(u_iᵀ ∇²L(θ) u_j)`` for the columns of ``U`` (``(P,)``
    or ``(P, m)``). For a unit eigenvector ``u`` of a simple eigenvalue, ``G[0, 0] = ∇λ``.

    >>> import torch; from torch import nn; import gdscope as gs
    >>> X = torch.randn(8, 2, dtype=torch.float64); Y = torch.randn(8, 1, dtype=torch.float64)
    >>> prob = gs.Problem(nn.Linear(2, 1).double(), "mse", (X, Y))
    >>> hvp_gradients(prob, torch.ones(3, dtype=torch.float64)).abs().max().item()  # L quadratic
    0.0
    """
    return edge_derivatives(prob, U, params=params, pure_layernorm=pure_layernorm).G


def third_derivative_warnings(model: nn.Module) -> list[str]:
    """One line per module of ``model`` whose built-in kernel's third derivatives are known to
    be wrong in this PyTorch (``nn.LayerNorm``), naming the module and what gdscope does."""
    out = []
    for name, mod in model.named_modules():
        for cls, why in _KNOWN_BAD.items():
            if isinstance(mod, cls):
                out.append(f"module {name or type(model).__name__!r} ({cls.__name__}): {why}")
    return out
