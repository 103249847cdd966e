"""Structured NTK rules: the autograd check that admits them, and the protocol by which a module
declares its own rule (issue 13).

Oracle: per-sample, per-output ``torch.autograd.grad`` of a float64 model, ``J J'ᵀ``
(:func:`tests.test_ntk_auto.oracle_ntk`), independent of gdscope's NTK code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdscope as gs
from gdscope.kernels.ntk import _explain, _prepare, _run
from test_ntk_auto import assert_close, oracle_ntk
from test_ntk_spectrum_agreement import SoftmaxAttention

F32, F64 = torch.float32, torch.float64


# ---------------------------------------------------------------------------------------------
# The rule check compares a module's gradient at the scale of the whole module


# SoftmaxAttention: softmax is invariant to adding a constant along each query's row, so the key
# projection's bias has exactly zero gradient: the rule's and autograd's values are round-off.
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


# ---------------------------------------------------------------------------------------------
# The protocol: a module declares its rule (``__ntk_rule__``)

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _doc_namespace() -> dict:
    """Run every ```python block of docs/extending.md in one namespace (as a reader would)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2
    ns: dict = {"__name__": "extending_doc"}
    for b in blocks:
        exec(compile(b, str(DOC), "exec"), ns)
    return ns


def test_extending_doc_example_runs_and_matches_jacobian_route():
    ns = _doc_namespace()
    net, x, K = ns["net"], ns["x"], ns["K"]
    assert _explain(net, x)["modules"] == ["0 (ScaledLinear): gram", "2 (ScaledLinear): gram"]
    assert_close(K, oracle_ntk(net, x), rtol=1e-10)
    assert_close(gs.ntk(net, x), gs.ntk(net, x, method="jacobian"), rtol=1e-10)
    for route in ("gram", "jac", "pair"):
        job, out = _prepare(net, x, None, "structured", False, None, None, force=route)
        assert_close(_run(job, out), K, rtol=1e-10)


def test_wrong_declared_rule_is_demoted_and_the_kernel_stays_exact():
    """Declaring the plain LinearRule for the scaled layer (scale ignored) fails the check."""
    ns = _doc_namespace()
    from gdscope.kernels.rules import LinearRule

    class Wrong(ns["ScaledLinear"]):
        __ntk_rule__ = LinearRule

    torch.manual_seed(0)
    net = nn.Sequential(Wrong(4, 5, scale=0.3), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(5, 4, dtype=F64)
    mods = " | ".join(_explain(net, x)["modules"])
    assert "0: jacobian (its parameters are also used outside its forward" in mods, mods
    assert_close(gs.ntk(net, x), oracle_ntk(net, x))


def test_declaration_rules():
    ns = _doc_namespace()
    from gdscope.kernels.rules import declared_rule

    Scaled, Rule_ = ns["ScaledLinear"], ns["ScaledLinearRule"]

    class Inherits(Scaled):  # same forward: the declaration carries over
        pass

    class NewForward(Scaled):  # another function: no rule unless declared again
        def forward(self, x):
            return super().forward(x) ** 2

    class OptOut(Scaled):
        __ntk_rule__ = None

    class Factory(Scaled):
        __ntk_rule__ = staticmethod(lambda m: Rule_ if m.scale < 1 else None)

    class Bad(Scaled):
        __ntk_rule__ = staticmethod(lambda m: nn.Linear)

    assert declared_rule(Scaled(3, 2)) is Rule_
    assert declared_rule(Inherits(3, 2)) is Rule_
    assert declared_rule(NewForward(3, 2)) is None
    assert declared_rule(OptOut(3, 2)) is None
    assert declared_rule(Factory(4, 2)) is Rule_ and declared_rule(Factory(4, 2, 2.0)) is None
    patched = Scaled(3, 2)
    patched.forward = lambda x: x
    assert declared_rule(patched) is None
    with pytest.raises(TypeError, match=r"Bad\.__ntk_rule__"):
        declared_rule(Bad(3, 2))
    assert declared_rule(nn.Linear(3, 2)) is None  # built-ins come from the table


def test_zoo_ntk_linear_declares_its_rule_and_rules_do_not_import_the_zoo():
    from gdscope.kernels.rules import NTKLinearRule, declared_rule
    from gdscope.zoo.models import NTKLinear

    layer = NTKLinear(3, 4, bias_var=0.5, dtype=F64)
    assert declared_rule(layer) is NTKLinearRule
    tree = ast.parse((Path(gs.__file__).parent / "kernels" / "rules.py").read_text())
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    ]
    assert not [m for m in imported if m and "zoo" in m], imported
    torch.manual_seed(0)
    net = nn.Sequential(layer, nn.ReLU(), NTKLinear(4, 2, dtype=F64))
    x = torch.randn(6, 3, dtype=F64)
    assert _explain(net, x)["modules"] == ["0 (NTKLinear): gram", "2 (NTKLinear): gram"]
    assert_close(gs.ntk(net, x, method="structured"), oracle_ntk(net, x))
