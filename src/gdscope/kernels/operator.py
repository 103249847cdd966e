"""The empirical NTK Gram as a matrix-free operator (NTK-vector products, ``J`` never formed).

``K = J Jᵀ`` with ``J = ∂F/∂θ ∈ R^{nk×P}`` and ``F`` the outputs stacked sample-major (sample
``i`` outer, output ``a`` inner, THEORY §0), so ``K`` is ``nk × nk`` and its ``(i, j)`` block is
the ``k × k`` kernel ``Θ(x_i, x_j)``. One product ``K v = J (Jᵀ v)`` is a vector-Jacobian product
(``torch.func.vjp``, reverse mode, through a forward pass recorded once when the operator is
built) followed by a Jacobian-vector product (``torch.func.jvp``, forward mode, which re-runs the
forward pass): about the cost of three forward passes, memory of one recorded forward pass.

The *trace* kernel ``K_tr = Σ_a J_a J_aᵀ`` (``n × n``; ``J_a`` the ``n × P`` Jacobian of output
``a``) sums the diagonal of every ``k × k`` block: it is the **sum**, not neural-tangents'
``trace_axes`` convention, which divides by ``k``. A product ``K_tr u = Σ_a J_a (J_aᵀ u)`` uses the
cotangents ``u ⊗ e_a`` (``u`` in column ``a`` of an ``n × k`` cotangent, zeros elsewhere): **k**
vjp/jvp pairs per product, ``k`` times the cost of a product with ``K``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from gdscope.errors import InvalidArgumentError, NonDeterministicError, ShapeMismatchError
from gdscope.kernels.functional import ModelFunction, check_finite, check_finite_params
from gdscope.linalg.operator import CallableOperator

__all__ = ["ntk_operator"]


def _prepare_inputs(fn: ModelFunction, x: Tensor) -> Tensor:
    """``x`` on the model's device, floating inputs in the model's dtype; validated."""
    if not isinstance(x, Tensor):
        raise InvalidArgumentError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 0:
        raise ShapeMismatchError("x is a scalar: pass a batch of inputs with samples along dim 0.")
    if x.shape[0] == 0:
        raise InvalidArgumentError("x is empty (0 samples): pass at least one input.")
    check_finite(x, "x")
    x = x.to(fn.device)
    if x.is_floating_point():
        x = x.to(fn.dtype)
        check_finite(x, f"x (cast to the model's {fn.dtype})")
    return x


def ntk_operator(
    model: nn.Module | ModelFunction, x: Tensor, *, trace_outputs: bool = False
) -> CallableOperator:
    """The empirical NTK Gram on ``x`` as a symmetric operator, by NTK-vector products.

    Args:
        model: the network (its trainable parameters are snapshotted: training it afterwards does
            not change the operator) or a :class:`ModelFunction`.
        x: inputs ``(n, ...)``; floating inputs are cast to the model's dtype and device.
        trace_outputs: return the ``n × n`` trace kernel ``Σ_a J_a J_aᵀ`` (the sum over outputs,
            not neural-tangents' mean) instead of the ``nk × nk`` Gram.

    Returns:
        A :class:`~gdscope.linalg.CallableOperator` of size ``n·k`` (``n`` with
        ``trace_outputs``) in the model's dtype, acting on sample-major flat vectors
        (entry ``i·k + a`` is sample ``i``, output ``a``). Cost per product: one vjp and one jvp
        (``k`` of each with ``trace_outputs``); ``J`` is never formed.

    >>> import torch
    >>> lin = torch.nn.Linear(3, 2, bias=False).double()
    >>> X = torch.randn(4, 3, dtype=torch.float64)
    >>> K = ntk_operator(lin, X).matmat(torch.eye(8, dtype=torch.float64))
    >>> torch.allclose(K, torch.kron(X @ X.T, torch.eye(2, dtype=torch.float64)))
    True
    """
    fn = model if isinstance(model, ModelFunction) else ModelFunction(model)
    drop = [
        name or type(fn.model).__name__
        for name, m in fn.model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]
    if drop:
        raise NonDeterministicError(
            f"modules {drop} are dropout layers in train mode: the network is random, so its "
            "NTK is not defined (every product would see another network). Call model.eval()."
        )
    check_finite_params(fn.model, fn.names)
    x = _prepare_inputs(fn, x)
    params = {n: p.detach().clone() for n, p in fn.params.items()}

    def f(p: dict[str, Tensor]) -> Tensor:
        return fn(p, x)

    out, vjp_fn = vjp(f, params)
    n, k = out.shape

    def jjt(cot: Tensor) -> Tensor:  # (n, k) -> (n, k): J (Jᵀ cot)
        (tangent,) = vjp_fn(cot)
        return jvp(f, (params,), (tangent,))[1]

    if not trace_outputs:

        def matvec(v: Tensor) -> Tensor:
            return jjt(v.reshape(n, k)).reshape(-1)

        return CallableOperator(matvec, n * k, fn.dtype, fn.device)

    def matvec_trace(u: Tensor) -> Tensor:
        total = torch.zeros_like(u)
        for a in range(k):
            cot = torch.zeros(n, k, dtype=u.dtype, device=u.device)
            cot[:, a] = u
            total = total + jjt(cot)[:, a]
        return total

    return CallableOperator(matvec_trace, n, fn.dtype, fn.device)
