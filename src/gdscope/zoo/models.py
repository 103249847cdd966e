"""Reference models."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from gdscope.errors import InvalidArgumentError

__all__ = ["ACTIVATIONS", "mlp"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


def mlp(
    sizes: Sequence[int],
    activation: str = "tanh",
    *,
    bias: bool = True,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Fully connected net ``sizes[0] → … → sizes[-1]`` (PyTorch's default initialization)."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise InvalidArgumentError(
            f"sizes={list(sizes)} must list at least an input and an output width, all >= 1."
        )
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(
            f"activation={activation!r} is unknown: use one of {sorted(ACTIVATIONS)}."
        )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(int(a), int(b), bias=bias))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        return nn.Sequential(*layers).to(dtype)
