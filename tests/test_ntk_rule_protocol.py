"""Structured NTK rules: the autograd check that admits them, and the protocol by which a module
declares its own rule (issue 13).

Oracle: per-sample, per-output ``torch.autograd.grad`` of a float64 model, ``J J'ᵀ``
(:func:`tests.test_ntk_auto.oracle_ntk`), independent of gdscope's NTK code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdscope as gs
from gdscope.kernels.ntk import _explain
from test_ntk_auto import assert_close, oracle_ntk

F32, F64 = torch.float32, torch.float64


# ---------------------------------------------------------------------------------------------
# The rule check compares a module's gradient at the scale of the whole module


class SoftmaxAttention(nn.Module):
    """One head with separate ``nn.Linear`` projections (all with bias), mean-pooled readout.

    Softmax is invariant to adding a constant along each query's row, so the key projection's
    bias has exactly zero gradient: the rule's and autograd's values for it are both round-off.
    """

    def __init__(self, d: int = 3, h: int = 4, k: int = 2) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h)
        self.out = nn.Linear(h, k)
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.h), dim=-1)
        return self.out((a @ v).mean(1))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_zero_gradient_bias_keeps_its_rule(dtype):
    """Before: ``k`` was demoted ("parameters also used outside its forward") in both dtypes."""
    torch.manual_seed(0)
    model = SoftmaxAttention().to(dtype)
    x = torch.randn(4, 5, 3, dtype=dtype)
    mods = _explain(model, x)["modules"]
    assert any(m.startswith("k (Linear)") for m in mods), mods
    assert not any("gradient check failed" in m for m in mods), mods
    if dtype == F64:
        assert_close(gs.ntk(model, x, method="structured"), oracle_ntk(model, x))


class BiasUsedOutside(nn.Module):
    """``lin``'s bias also enters the output directly: its rule misses that term."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x))) + self.scale * self.lin.bias[:2]


class WeightUsedOutside(nn.Module):
    """``lin``'s weight applied a second time by ``F.linear`` outside ``lin.forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)) + F.linear(x, self.lin.weight))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("make", [lambda: BiasUsedOutside(0.05), WeightUsedOutside])
def test_parameter_used_outside_is_still_rejected(make, dtype):
    torch.manual_seed(1)
    model = make().to(dtype)
    x = torch.randn(5, 3, dtype=dtype)
    mods = " | ".join(_explain(model, x)["modules"])
    assert "lin: jacobian (its parameters are also used outside its forward" in mods, mods
    if dtype == F64:
        assert_close(gs.ntk(model, x), oracle_ntk(model, x))
