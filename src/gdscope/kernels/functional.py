"""A model as a function of its parameters, per sample, and its Jacobian.

Stacking convention (THEORY §0): outputs ``F ∈ R^{nk}`` are sample-major (sample ``i`` outer,
output ``a`` inner) and ``J = ∂F/∂θ ∈ R^{nk × P}`` with parameters flattened in
``named_parameters`` order (trainable ones only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from gdscope.errors import InvalidArgumentError, StatefulModuleError
from gdscope.problem import check_finite, check_finite_params, math_attention

__all__ = ["ModelFunction", "check_finite", "check_finite_params", "jacobian"]

log = logging.getLogger(__name__)

_COUPLING = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class ModelFunction:
    """``f(θ, x)`` of an ``nn.Module`` over its trainable parameters (buffers held fixed).

    Refuses train-mode BatchNorm-type modules: they couple the samples of a batch, so the
    per-sample Jacobian (and the NTK) of the train-mode network is not defined sample by sample.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        coupled = [
            n or type(model).__name__
            for n, m in model.named_modules()
            if isinstance(m, _COUPLING) and m.training
        ]
        if coupled:
            raise StatefulModuleError(
                f"modules {coupled} are in train mode: batch statistics couple the samples, so "
                "the NTK is not a per-sample kernel. Call model.eval() first."
            )
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise InvalidArgumentError(f"model {type(model).__name__} has no trainable parameters.")
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in self.names}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.num_params = sum(p.numel() for p in self.params.values())
        first = self.params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``(n, k)`` (each sample's output flattened), attention through the math
        backend (:func:`~gdscope.problem.math_attention`: fused kernels have no forward-mode AD
        and no vmap rule)."""
        with math_attention():
            out = functional_call(self.model, (params, self.buffers), (x,))
        return out.reshape(x.shape[0], -1)

    def per_sample(self) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """``(params, x_i) ↦ f(params, x_i)`` of shape ``(k,)`` for ``vmap``."""

        def f(params: dict[str, Tensor], xi: Tensor) -> Tensor:
            return self(params, xi.unsqueeze(0))[0]

        return f

    def flatten(self, tensors: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors along their parameter dims (keep ``lead`` dims)."""
        parts = []
        for n in self.names:
            t = tensors[n]
            parts.append(t.reshape(*t.shape[:lead], -1))
        return torch.cat(parts, dim=lead)


def jacobian(model: nn.Module | ModelFunction, x: Tensor, *, chunk: int | None = None) -> Tensor:
    """``J = ∂F/∂θ`` as ``(n·k, P)`` (sample-major), by ``vmap(jacrev)`` in chunks of samples.

    Where ``vmap`` cannot batch a module over samples (``nn.GRU``, ``nn.LSTM``: their fused
    kernels have no batching rule) the per-sample Jacobians are taken one sample at a time:
    the same matrix, ``n`` Python-level calls instead of one.
    """
    fn = model if isinstance(model, ModelFunction) else ModelFunction(model)
    if x.shape[0] == 0:
        raise InvalidArgumentError("x is empty (0 samples): pass at least one input.")
    one = jacrev(fn.per_sample())
    try:
        jac = vmap(one, in_dims=(None, 0), chunk_size=chunk)(fn.params, x)
    except RuntimeError as batched:
        try:
            rows = [one(fn.params, x[i]) for i in range(x.shape[0])]
        except RuntimeError:
            raise batched from None  # not a batching limit: the model fails on one sample too
        log.info("jacobian: vmap cannot batch this model over samples; one sample at a time")
        jac = {n: torch.stack([r[n] for r in rows]) for n in fn.names}
    # jac: dict name -> (n, k, *shape)
    J = fn.flatten(jac, lead=2)  # (n, k, P)
    return J.reshape(-1, J.shape[-1])
