"""Kernel probes (THEORY §1): NTK spectrum, kernel drift, alignment, PL ratio, disparity rank.

All evaluate the parameters the model holds (after the update) on one fixed sample of the
training data, drawn once per probe (``samples``, ``seed``), and the empirical NTK Gram
``K = J Jᵀ`` (``nk × nk``, sample-major) of that sample is computed once per step and shared by
every kernel probe with the same sample (``ProbeState.cache``). Attention models are evaluated
under the problem's :meth:`~gdscope.Problem.attention_context` (math SDPA). Problems with an
adapter (dict batches, output objects) are refused: the NTK is formed on tensor inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError
from gdscope.kernels import disparity, ntk
from gdscope.probes.base import Iterate, Probe, ProbeState, Schedule
from gdscope.problem import Problem

__all__ = [
    "DisparityProbe",
    "KernelAlignmentProbe",
    "KernelDriftProbe",
    "KernelProbe",
    "NTKSpectrumProbe",
    "PLProbe",
]


class KernelProbe(Probe):
    """Base of the kernel probes: a fixed sample of ``samples`` points and its NTK Gram."""

    iterate: Iterate = "after"

    def __init__(
        self, schedule: Schedule | int | None = None, samples: int = 64, seed: int = 0
    ) -> None:
        super().__init__(schedule)
        if not isinstance(samples, int) or samples < 1:
            raise InvalidArgumentError(f"samples={samples!r} must be a positive integer.")
        self.samples, self.seed = samples, seed
        self._sample: Problem | None = None

    def sample(self, prob: Problem) -> Problem:
        """The probe's fixed sample of ``prob`` (all of it when it has at most ``samples``)."""
        if prob.adapter is not None:
            raise InvalidArgumentError(
                f"{type(self).__name__}: kernel probes form the NTK of a module mapping tensor "
                "inputs to tensor outputs (gs.ntk(model, x)); this problem has an adapter (dict "
                "batches or output objects). Drop the kernel probes, or measure the NTK directly "
                "with gs.ntk on a module that maps input_ids to logits."
            )
        if self._sample is None:
            n = prob.n
            if n <= self.samples:
                self._sample = prob
            else:
                gen = torch.Generator().manual_seed(self.seed)
                self._sample = prob.subset(torch.randperm(n, generator=gen)[: self.samples])
        return self._sample

    def inputs(self, prob: Problem) -> tuple[Tensor, Tensor]:
        sub = self.sample(prob)
        x, y, _ = next(sub.batches())
        return x, y

    def gram(self, state: ProbeState) -> Tensor:
        """``K`` (``nk × nk``, float64) at the current parameters, once per step and sample."""
        key = ("ntk", self.samples, self.seed)
        if key not in state.cache:
            x, _ = self.inputs(state.problem)
            with state.problem.attention_context():  # math SDPA for attention models
                K = ntk(state.problem.model, x)
            n, _, k, _ = K.shape
            state.cache[key] = K.permute(0, 2, 1, 3).reshape(n * k, n * k).double()
        return state.cache[key]

    def eigenvalues(self, state: ProbeState) -> Tensor:
        key = ("ntk_eigvalsh", self.samples, self.seed)
        if key not in state.cache:
            state.cache[key] = torch.linalg.eigvalsh(self.gram(state))
        return state.cache[key]


class NTKSpectrumProbe(KernelProbe):
    """``ntk_lambda_min``, ``ntk_lambda_max``, ``ntk_condition`` of ``K`` on the sample."""

    name = "ntk_spectrum"

    def compute(self, state: ProbeState) -> dict[str, float]:
        ev = self.eigenvalues(state)
        lo, hi = max(ev[0].item(), 0.0), ev[-1].item()
        return {
            "ntk_lambda_min": lo,
            "ntk_lambda_max": hi,
            "ntk_condition": hi / lo if lo > 0 else math.inf,
        }


class KernelDriftProbe(KernelProbe):
    """``ntk_drift`` = ‖K_t − K_0‖_F / ‖K_0‖_F, with ``K_0`` taken when the tracker starts."""

    name = "ntk_drift"

    def start(self, prob: Problem) -> None:
        x, _ = self.inputs(prob)
        with prob.attention_context():
            K0 = ntk(prob.model, x)
        n, _, k, _ = K0.shape
        self._K0 = K0.permute(0, 2, 1, 3).reshape(n * k, n * k).double()

    def compute(self, state: ProbeState) -> dict[str, float]:
        K = self.gram(state)
        return {"ntk_drift": (torch.linalg.norm(K - self._K0) / torch.linalg.norm(self._K0)).item()}


def _target_matrix(y: Tensor, k: int) -> Tensor:
    """Targets as ``(n, k)`` floats (class indices one-hot encoded)."""
    if not y.is_floating_point():
        return torch.nn.functional.one_hot(y.long().reshape(-1), k).double()
    return y.reshape(y.shape[0], -1).double()


class KernelAlignmentProbe(KernelProbe):
    """``ntk_alignment`` = ⟨K, yyᵀ⟩_F / (‖K‖_F ‖y‖²): uncentred kernel-target alignment.

    ``y`` stacks the targets sample-major (one-hot for class labels), as ``K`` is stacked.
    """

    name = "ntk_alignment"

    def compute(self, state: ProbeState) -> dict[str, float]:
        K = self.gram(state)
        _, y = self.inputs(state.problem)
        yv = _target_matrix(y, state.problem.num_outputs).reshape(-1).to(K.device)
        align = (yv @ K @ yv) / (torch.linalg.norm(K) * (yv @ yv))
        return {"ntk_alignment": align.item()}


class PLProbe(KernelProbe):
    """``pl_ratio`` = ‖∇L‖²/(2L) and its kernel lower bound ``pl_bound`` = q·λ_min(K) (MSE).

    Both on the probe's sample at the same parameters, with ``L`` the sample's loss under the
    problem's reduction (``L* = 0``: interpolation). THEORY §1: for MSE,
    ``‖∇L‖²/(2L) = q rᵀKr/‖r‖² ≥ q λ_min(K)``.
    """

    name = "pl"

    def compute(self, state: ProbeState) -> dict[str, float]:
        sub = self.sample(state.problem)
        loss = sub.loss().item()
        grad = sub.gradient()
        ratio = grad.double().pow(2).sum().item() / (2 * loss) if loss > 0 else math.inf
        out = {"pl_ratio": ratio}
        if sub.loss_name == "mse":
            out["pl_bound"] = sub.q * max(self.eigenvalues(state)[0].item(), 0.0)
        return out


class DisparityProbe(KernelProbe):
    """``disparity_rank``, ``disparity_sigma_min`` and ``disparity_full_rank`` (1/0) of ``Jᵀ``."""

    name = "disparity"

    def compute(self, state: ProbeState) -> dict[str, float]:
        x, _ = self.inputs(state.problem)
        with state.problem.attention_context():  # forward-mode/vmap need math SDPA
            rep = disparity(state.problem.model, x)
        out = {"disparity_sigma_min": rep.sigma_min}
        if rep.rank is not None:
            out["disparity_rank"] = float(rep.rank)
        if rep.full_rank is not None:
            out["disparity_full_rank"] = float(rep.full_rank)
        return out
