"""A small trainer and the optimizers of THEORY §2: GD, heavy ball, Nesterov, samplers, fit."""

from gdscope.train.fit import FitResult, fit
from gdscope.train.optimizers import (
    GD,
    HeavyBall,
    Nesterov,
    adaptive_threshold,
    describe_optimizer,
    stability_threshold,
)
from gdscope.train.sampler import EpochSampler, FreshBatchSampler

__all__ = [
    # optimizers
    "GD",
    "HeavyBall",
    "Nesterov",
    "adaptive_threshold",
    "describe_optimizer",
    "stability_threshold",
    # samplers
    "EpochSampler",
    "FreshBatchSampler",
    # trainer
    "FitResult",
    "fit",
]
