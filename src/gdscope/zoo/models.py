"""Reference models: fully connected nets (standard or NTK parameterization) and a small CNN.

The residual networks live in :mod:`gdscope.zoo.resnet`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdscope.errors import InvalidArgumentError

__all__ = ["ACTIVATIONS", "PARAMETERIZATIONS", "Erf", "NTKLinear", "cnn", "mlp"]


class Erf(nn.Module):
    """The elementwise error function ``erf(z)`` (neural-tangents' ``stax.Erf`` with ``a=1``)."""

    def forward(self, z: Tensor) -> Tensor:
        return torch.erf(z)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
    "erf": Erf,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01
}

PARAMETERIZATIONS = ("standard", "ntk")


class NTKLinear(nn.Module):
    """Dense layer in NTK parameterization: ``z = sqrt(weight_var/fan_in) W h + sqrt(bias_var) b``.

    ``W`` (``(out_features, in_features)``) and ``b`` (``(out_features,)``) are drawn from
    ``N(0, 1)`` and trained; the variances only scale the forward pass. This is
    neural-tangents' ``stax.Dense(W_std=sqrt(weight_var), b_std=sqrt(bias_var),
    parameterization="ntk")`` and the convention of :func:`gdscope.infinite_ntk`.

    Declares its structured NTK rule (:class:`gdscope.kernels.rules.NTKLinearRule`) through the
    ``__ntk_rule__`` protocol (docs/extending.md), imported lazily so the zoo does not load the
    kernel code.
    """

    @staticmethod
    def __ntk_rule__(module: nn.Module) -> type:
        from gdscope.kernels.rules import NTKLinearRule

        return NTKLinearRule

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_var: float = 2.0,
        bias_var: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_var, self.bias_var = float(weight_var), float(bias_var)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        # drawn in float32 whatever ``dtype``: a seed gives the same net in every precision
        f32 = torch.float32
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=f32).to(dtype))
        if bias:
            self.bias = nn.Parameter(torch.randn(out_features, dtype=f32).to(dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, h: Tensor) -> Tensor:
        z = F.linear(h, self.weight) * math.sqrt(self.weight_var / self.in_features)
        if self.bias is not None:
            z = z + math.sqrt(self.bias_var) * self.bias
        return z

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight_var={self.weight_var}, "
            f"bias_var={self.bias_var}"
        )


def _activation(activation: str) -> type[nn.Module]:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise InvalidArgumentError(
            f"activation={activation!r} is unknown: use one of {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[activation]


def _variance(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name}={value!r} must be a finite number >= 0.")
    if value < 0:
        raise InvalidArgumentError(
            f"{name}={value!r} is negative: it is a variance; pass a value >= 0 "
            "(e.g. weight_var=2.0, bias_var=0.0)."
        )
    return float(value)


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(
            f"dtype={dtype!r} must be a floating torch.dtype, e.g. torch.float32 or torch.float64."
        )
    return dtype


def _seed(seed: object, name: str = "seed", *, optional: bool = False) -> int | None:
    """A seed: an int (not a bool) that ``torch.manual_seed`` accepts, or ``None`` if optional."""
    if seed is None and optional:
        return None
    if (
        isinstance(seed, (bool, np.bool_))
        or not isinstance(seed, numbers.Integral)
        or not -(2**63) <= int(seed) < 2**64
    ):
        raise InvalidArgumentError(
            f"{name}={seed!r} must be an integer in [-2**63, 2**64)"
            + (" or None" if optional else "")
            + f", e.g. {name}=0."
        )
    return int(seed)


def _flag(value: object, name: str) -> bool:
    """A boolean option: True or False, nothing else (no truthy strings)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name}={value!r} must be True or False.")
    return bool(value)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}={value!r} must be an integer >= 1.")
    return value


def mlp(
    sizes: Sequence[int],
    activation: str = "tanh",
    *,
    bias: bool = True,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    parameterization: str = "standard",
    weight_var: float | None = None,
    bias_var: float | None = None,
) -> nn.Sequential:
    """Fully connected net ``sizes[0] → … → sizes[-1]`` with ``len(sizes) - 2`` hidden layers.

    ``parameterization``:

    - ``"standard"``: ``nn.Linear`` layers. Without ``weight_var``/``bias_var``, PyTorch's
      default initialization; with them, ``W ~ N(0, weight_var/fan_in)``, ``b ~ N(0, bias_var)``
      (a missing one of the two keeps PyTorch's default for its tensor).
    - ``"ntk"``: :class:`NTKLinear` layers, ``z = sqrt(weight_var/fan_in) W h + sqrt(bias_var) b``
      with ``W, b ~ N(0, 1)`` (defaults ``weight_var=2.0``, ``bias_var=0.0``, those of
      :func:`gdscope.infinite_ntk`). The readout uses the same variances, so as the hidden
      widths grow, ``gdscope.ntk(net, x, trace_outputs=True) / sizes[-1]`` tends to
      ``gdscope.infinite_ntk(x, depth=len(sizes) - 2, activation=..., weight_var=...,
      bias_var=...)``.

    ``seed`` seeds a private RNG stream (the global one is left as it was).
    """
    try:
        bad = (
            isinstance(sizes, (str, bytes))
            or len(sizes) < 2
            or any(isinstance(s, bool) or int(s) != s or int(s) < 1 for s in sizes)
        )
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise InvalidArgumentError(
            f"sizes={sizes!r} must list at least an input and an output width, all integers "
            ">= 1, e.g. sizes=[784, 128, 10]."
        )
    seed = _seed(seed, optional=True)
    bias = _flag(bias, "bias")
    act = _activation(activation)
    dtype = _check_dtype(dtype)
    if parameterization not in PARAMETERIZATIONS:
        raise InvalidArgumentError(
            f"parameterization={parameterization!r} is unknown: use one of {PARAMETERIZATIONS}."
        )
    wv = None if weight_var is None else _variance(weight_var, "weight_var")
    bv = None if bias_var is None else _variance(bias_var, "bias_var")
    if not bias and bv is not None and bv > 0:
        raise InvalidArgumentError(
            f"bias_var={bv} with bias=False: the net has no biases; pass bias=True or drop "
            "bias_var."
        )
    depth = len(sizes) - 2
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            a, b = int(a), int(b)
            if parameterization == "ntk":
                layer: nn.Module = NTKLinear(
                    a,
                    b,
                    bias=bias,
                    weight_var=2.0 if wv is None else wv,
                    bias_var=0.0 if bv is None else bv,
                    dtype=dtype,
                )
            else:
                layer = nn.Linear(a, b, bias=bias)
                with torch.no_grad():
                    if wv is not None:
                        layer.weight.normal_(0.0, math.sqrt(wv / a))
                    if bv is not None and layer.bias is not None:
                        layer.bias.normal_(0.0, math.sqrt(bv))
            layers.append(layer)
            if i < depth:
                layers.append(act())
        return nn.Sequential(*layers).to(dtype)


def cnn(
    in_channels: int,
    num_classes: int,
    *,
    dims: int = 2,
    channels: Sequence[int] = (16, 32),
    kernel_size: int = 3,
    activation: str = "relu",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Small CNN: per entry ``c`` of ``channels``, ``Conv(k, stride 2, padding k//2) → act``;
    then global average pooling, ``Flatten`` and ``Linear(channels[-1], num_classes)``.

    Inputs ``(n, in_channels, L)`` for ``dims=1``, ``(n, in_channels, H, W)`` for ``dims=2``;
    any spatial size works (each conv halves it, rounding up). PyTorch's default
    initialization, from a private RNG stream seeded with ``seed``.
    """
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    kernel_size = _positive_int(kernel_size, "kernel_size")
    seed = _seed(seed, optional=True)
    if isinstance(dims, bool) or dims not in (1, 2):
        raise InvalidArgumentError(
            f"dims={dims!r} must be 1 (inputs (n, C, L)) or 2 (inputs (n, C, H, W))."
        )
    if (
        isinstance(channels, (str, bytes, int))
        or not hasattr(channels, "__len__")
        or len(channels) == 0
    ):
        raise InvalidArgumentError(
            f"channels={channels!r} must be a non-empty sequence of widths, e.g. (16, 32)."
        )
    for c in channels:
        _positive_int(c, "channels entry")
    act = _activation(activation)
    dtype = _check_dtype(dtype)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [conv(c_in, c, kernel_size, stride=2, padding=kernel_size // 2), act()]
            c_in = c
        layers += [pool, nn.Flatten(), nn.Linear(c_in, num_classes)]
        return nn.Sequential(*layers).to(dtype)
