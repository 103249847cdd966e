"""Shared fixtures: small seeded float64 problems and *independent* oracles.

The oracles never go through gdscope's own machinery (``Problem.loss``, the HVP operators): they
rebuild the loss from ``torch.func.functional_call`` and PyTorch's functional losses and
differentiate it with ``torch.autograd.functional.hessian`` / ``torch.func.jacrev``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import gdscope as gs

# The test models are tiny: one intra-op thread is as fast, and it avoids OpenMP spin-waiting,
# which on a loaded 2-core machine made every backward pass cost ~25 ms instead of ~50 µs.
torch.set_num_threads(1)

DT = torch.float64
N, D_IN, K_OUT = 20, 4, 3


# ---------------------------------------------------------------------- models and data
def make_mlp(seed: int = 0, sizes: tuple[int, ...] = (D_IN, 10, 8, K_OUT)) -> nn.Module:
    """tanh MLP, float64 (P = 165 with the default sizes)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT)


def make_cnn(seed: int = 0) -> nn.Module:
    """Conv2d(1→3, 3x3) + tanh + MaxPool2d(2) + Linear(12→3), float64 (P = 69)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, K_OUT),
    ).to(DT)


def regression_data(seed: int = 1, n: int = N, d: int = D_IN, k: int = K_OUT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, k, generator=g, dtype=DT)


def class_data(seed: int = 1, n: int = N, d: int = D_IN, k: int = K_OUT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, k, (n,), generator=g)


def image_data(seed: int = 2, n: int = 12, classes: bool = False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 6, 6, generator=g, dtype=DT)
    if classes:
        return X, torch.randint(0, K_OUT, (n,), generator=g)
    return X, torch.randn(n, K_OUT, generator=g, dtype=DT)


# ---------------------------------------------------------------------- independent oracles
class Oracle:
    """Dense float64 quantities computed without gdscope."""

    @staticmethod
    def names(model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    @staticmethod
    def flat(model: nn.Module) -> Tensor:
        return torch.cat(
            [p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]
        ).clone()

    @staticmethod
    def unflat(model: nn.Module, vec: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n] = vec[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
        assert i == vec.numel()
        return out

    @staticmethod
    def criterion(loss: str, reduction: str) -> Callable[[Tensor, Tensor], Tensor]:
        if loss == "mse":
            return lambda o, t: (
                ((o - t) ** 2).mean() if reduction == "mean" else ((o - t) ** 2).sum()
            )
        if loss == "cross_entropy":
            return lambda o, t: nn.functional.cross_entropy(o, t, reduction=reduction)
        raise AssertionError(loss)

    @classmethod
    def outputs_fn(cls, model: nn.Module, X: Tensor) -> Callable[[Tensor], Tensor]:
        """``flat θ ↦ F(θ)`` (n, k); buffers cloned so train-mode BatchNorm never mutates."""
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

        def f(vec: Tensor) -> Tensor:
            bufs = {n: b.clone() for n, b in buffers.items()}
            out = functional_call(model, {**cls.unflat(model, vec), **bufs}, (X,))
            return out.reshape(X.shape[0], -1)

        return f

    @classmethod
    def loss_fn(cls, model, X, Y, loss="mse", reduction="mean") -> Callable[[Tensor], Tensor]:
        f, crit = cls.outputs_fn(model, X), cls.criterion(loss, reduction)
        return lambda vec: crit(f(vec), Y)

    @classmethod
    def hessian(cls, model, X, Y, loss="mse", reduction="mean", theta=None) -> Tensor:
        theta = cls.flat(model) if theta is None else theta
        H = torch.autograd.functional.hessian(
            cls.loss_fn(model, X, Y, loss, reduction), theta, vectorize=True
        )
        return 0.5 * (H + H.T)

    @classmethod
    def gradient(cls, model, X, Y, loss="mse", reduction="mean") -> Tensor:
        return torch.func.grad(cls.loss_fn(model, X, Y, loss, reduction))(cls.flat(model))

    @classmethod
    def jacobian(cls, model, X) -> Tensor:
        """``J = ∂F/∂θ`` as ``(n k, P)``, sample-major rows."""
        J = jacrev(cls.outputs_fn(model, X))(cls.flat(model))
        return J.reshape(-1, J.shape[-1])

    @classmethod
    def output_curvature(cls, model, X, Y, loss="mse", reduction="mean") -> Tensor:
        """Closed-form ``Q = ∂²L/∂F²`` as a dense ``(n k, n k)`` block-diagonal matrix."""
        with torch.no_grad():
            F = cls.outputs_fn(model, X)(cls.flat(model))
        n, k = F.shape
        if loss == "mse":
            q = 2.0 / (n * k) if reduction == "mean" else 2.0
            return q * torch.eye(n * k, dtype=F.dtype)
        p = torch.softmax(F, dim=1)
        blocks = [torch.diag(pi) - torch.outer(pi, pi) for pi in p]
        Q = torch.block_diag(*blocks)
        return Q / n if reduction == "mean" else Q

    @classmethod
    def ggn(cls, model, X, Y, loss="mse", reduction="mean") -> Tensor:
        J = cls.jacobian(model, X)
        return J.T @ cls.output_curvature(model, X, Y, loss, reduction) @ J


@pytest.fixture
def oracle() -> type[Oracle]:
    return Oracle


# ---------------------------------------------------------------------- problems
@pytest.fixture
def mlp_mse() -> gs.Problem:
    X, Y = regression_data()
    return gs.Problem(make_mlp(), "mse", (X, Y))


@pytest.fixture
def mlp_ce() -> gs.Problem:
    X, Y = class_data()
    return gs.Problem(make_mlp(), "cross_entropy", (X, Y))


@pytest.fixture
def cnn_mse() -> gs.Problem:
    X, Y = image_data()
    return gs.Problem(make_cnn(), "mse", (X, Y))


@pytest.fixture
def cnn_ce() -> gs.Problem:
    X, Y = image_data(classes=True)
    return gs.Problem(make_cnn(), "cross_entropy", (X, Y))


PROBLEMS = ("mlp_mse", "mlp_ce", "cnn_mse", "cnn_ce")


@pytest.fixture(params=PROBLEMS)
def any_problem(request) -> gs.Problem:
    """Each of the four small problems (MLP/CNN × MSE/cross-entropy)."""
    return request.getfixturevalue(request.param)


def problem_oracle_args(prob: gs.Problem) -> tuple:
    """``(model, X, Y, loss, reduction)`` for the Oracle, from a full-batch problem."""
    X, Y = prob.full_batch
    return prob.model, X, Y, prob.loss_name, prob.reduction


@pytest.fixture
def oracle_args():
    return problem_oracle_args
