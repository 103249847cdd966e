"""The first-order Taylor model of a network, as a trainable ``nn.Module`` (Lee et al. 2019).

    f_lin(x; θ) = f(x; θ0) + J(x)(θ − θ0),        J(x) = ∂f(x; θ)/∂θ at θ0,

evaluated per forward with one ``torch.func.jvp`` (a forward-mode pass: about the cost of two
forward passes, no Jacobian formed). ``θ`` is the module's trainable parameters, initialized to
``θ0``; any optimizer trains it, and autograd differentiates through the ``jvp``. For the
linearized model the NTK is constant, so :func:`gdscope.theory.dynamics.predict` describes its
training exactly (up to rounding). Attention runs through the math SDPA backend inside the
``jvp`` (:func:`gdscope.problem.math_attention`): fused kernels have no forward-mode AD.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_map

from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.problem import math_attention

__all__ = ["LinearizedModel", "linearize"]


class LinearizedModel(nn.Module):
    """``f_lin(x; θ) = f(x; θ0) + J(x)(θ − θ0)`` (build it with :func:`linearize`).

    Attributes:
        base: a frozen copy of the original module holding ``θ0`` (its parameters have
            ``requires_grad=False``; its buffers are cloned for every forward, so they never
            change, even for train-mode BatchNorm).
        theta: ``nn.ParameterList`` of the trainable ``θ``, in the order of :attr:`names`.
        names: names of the original module's trainable parameters.
    """

    def __init__(self, model: nn.Module, params0: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise InvalidArgumentError(
                f"model {type(model).__name__} has no trainable parameters: nothing to linearize."
            )
        base = copy.deepcopy(model)
        named = dict(base.named_parameters())
        if params0 is not None:
            missing = [n for n in names if n not in params0]
            unknown = [n for n in params0 if n not in named]
            if missing or unknown:
                raise InvalidArgumentError(
                    f"params0 must give every trainable parameter by name; missing {missing}, "
                    f"unknown {unknown}."
                )
            with torch.no_grad():
                for n, v in params0.items():
                    if tuple(v.shape) != tuple(named[n].shape):
                        raise ShapeMismatchError(
                            f"params0[{n!r}] has shape {tuple(v.shape)}, the parameter "
                            f"{tuple(named[n].shape)}."
                        )
                    named[n].copy_(v)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.names = names
        self.theta = nn.ParameterList(
            [nn.Parameter(named[n].detach().clone(), requires_grad=True) for n in names]
        )

    def params0(self) -> dict[str, Tensor]:
        """``θ0`` by name (the frozen expansion point)."""
        named = dict(self.base.named_parameters())
        return {n: named[n] for n in self.names}

    def delta(self) -> dict[str, Tensor]:
        """``θ − θ0`` by name."""
        p0 = self.params0()
        return {n: t - p0[n] for n, t in zip(self.names, self.theta, strict=True)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``f(x; θ0) + J(x)(θ − θ0)``; arguments are passed to the original module as given.

        The ``jvp`` runs under :func:`gdscope.problem.math_attention`: fused attention kernels
        (SDPA flash/efficient, ``nn.MultiheadAttention``'s fast path) have no forward-mode AD,
        the math backend computes the same values. Outputs may be a tensor or a pytree of
        tensors (tuple, dict); every tensor leaf is linearized.
        """
        p0 = self.params0()
        buffers = dict(self.base.named_buffers())

        def f(params: dict[str, Tensor]) -> Any:
            # cloned inside the transform: a train-mode BatchNorm may update the clones in place
            fresh = {n: b.clone() for n, b in buffers.items()}
            return functional_call(self.base, (params, fresh), args, kwargs)

        with math_attention():
            try:
                out, tangent = jvp(f, (p0,), (self.delta(),))
            except RuntimeError as e:
                if "return only tensors" not in str(e):
                    raise
                raise InvalidArgumentError(
                    f"linearize: the model returns something other than tensors ({e}); the "
                    "linearized model needs a tensor (or a tuple/dict of tensors) as output: "
                    "wrap the model so that forward returns the logits (e.g. .logits of a "
                    "Hugging Face output)."
                ) from e
        if isinstance(out, Tensor):
            return out + tangent
        own_loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if isinstance(own_loss, Tensor):
            raise InvalidArgumentError(
                "linearize: the model computed its own loss (labels were passed): the "
                "linearization of a loss is not the loss of the linearized outputs (a linear "
                "objective, unbounded below). Call the linearized model without labels and "
                "apply the loss to its logits, e.g. F.cross_entropy(lin(input_ids).logits, ...)."
            )
        return tree_map(lambda o, t: o + t if isinstance(o, Tensor) else o, out, tangent)


def linearize(model: nn.Module, params0: Mapping[str, Tensor] | None = None) -> LinearizedModel:
    """The first-order Taylor expansion of ``model`` around ``params0`` as a trainable module.

    Args:
        model: any ``nn.Module`` that ``torch.func`` can differentiate (copied; the original is
            not touched). Its trainable parameters (``requires_grad``) are the variables ``θ``;
            frozen parameters and buffers stay fixed at their current values.
        params0: the expansion point ``θ0`` by parameter name (default: the current values).

    Returns:
        A :class:`LinearizedModel` whose trainable parameters are ``θ`` (initialized to ``θ0``)
        and whose forward is ``f(x; θ0) + J(x)(θ − θ0)``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> lin = linearize(net)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(lin(x), net(x))
    True
    >>> sum(p.numel() for p in lin.parameters() if p.requires_grad) == 21
    True
    """
    return LinearizedModel(model, params0)
