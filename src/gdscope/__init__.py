"""gdscope: does gradient descent reach a global minimum on my network, how fast, and why?

Measure the certificates of global-convergence theory (NTK conditioning, sharpness against the
optimizer's stability threshold, ...) on your own PyTorch model and data, predict the run from
them, and compare with the measured run.
"""

from gdscope import adapters
from gdscope.curvature import (
    GDMapReport,
    curvature_operator,
    dense_hessian,
    gd_map,
    hessian_density,
    hessian_eigs,
    hessian_trace,
)
from gdscope.errors import GdscopeError
from gdscope.kernels import (
    DisparityReport,
    NTKEigResult,
    disparity,
    function_space_disparity,
    infinite_ntk,
    ntk,
    ntk_blocks,
    ntk_eigs,
)
from gdscope.linalg import Density, EigResult, Estimate
from gdscope.problem import Problem
from gdscope.runner import ExperimentResult, run_experiment, run_sweep
from gdscope.theory import central_flow, fit_rates, linearize, predict, stability
from gdscope.tracker import Tracker
from gdscope.train import GD, FitResult, HeavyBall, Nesterov, fit, stability_threshold

__version__ = "0.1.0"

__all__ = [
    # problem
    "Problem",
    "adapters",
    # curvature
    "GDMapReport",
    "curvature_operator",
    "dense_hessian",
    "gd_map",
    "hessian_density",
    "hessian_eigs",
    "hessian_trace",
    # kernels
    "DisparityReport",
    "NTKEigResult",
    "disparity",
    "function_space_disparity",
    "infinite_ntk",
    "ntk",
    "ntk_blocks",
    "ntk_eigs",
    # theory
    "central_flow",
    "fit_rates",
    "linearize",
    "predict",
    "stability",
    # training and tracking
    "FitResult",
    "GD",
    "HeavyBall",
    "Nesterov",
    "Tracker",
    "fit",
    "stability_threshold",
    # experiments
    "ExperimentResult",
    "run_experiment",
    "run_sweep",
    # results
    "Density",
    "EigResult",
    "Estimate",
    # errors
    "GdscopeError",
]
