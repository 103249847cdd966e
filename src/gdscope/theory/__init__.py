"""Theory: predicted dynamics (the linearized model; the central flow at the edge of stability),
rate fits, ODE limits, stability of minima, orbits, GD-map stats,
and the optimizer adapters (:mod:`gdscope.theory.optim`)."""

from gdscope.theory.central_flow import CentralFlowPrediction, central_flow
from gdscope.theory.dynamics import Prediction, optimizer_spec, predict
from gdscope.theory.gd_map_stats import (
    MinFactorReport,
    SingularStepTrace,
    min_factor_distribution,
    singular_step_sizes,
)
from gdscope.theory.linearize import LinearizedModel, linearize
from gdscope.theory.optim import OptimizerSetting, optimizer_threshold, read_optimizer
from gdscope.theory.orbits import OrbitReport, detect_orbit, gd_orbit, orbit_from_store
from gdscope.theory.ratefit import RateFit, fit_rates
from gdscope.theory.stability import StabilityReport, stability

__all__ = [
    "CentralFlowPrediction",
    "LinearizedModel",
    "MinFactorReport",
    "OptimizerSetting",
    "OrbitReport",
    "Prediction",
    "RateFit",
    "SingularStepTrace",
    "StabilityReport",
    "central_flow",
    "detect_orbit",
    "fit_rates",
    "gd_orbit",
    "linearize",
    "min_factor_distribution",
    "optimizer_spec",
    "optimizer_threshold",
    "orbit_from_store",
    "predict",
    "read_optimizer",
    "singular_step_sizes",
    "stability",
]
