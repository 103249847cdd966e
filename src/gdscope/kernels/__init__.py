"""Kernels: the empirical NTK, its spectrum, the disparity matrix, infinite-width kernels."""

from gdscope.kernels.disparity import (
    DisparityReport,
    FunctionSpaceDisparityReport,
    disparity,
    function_space_disparity,
)
from gdscope.kernels.eigs import NTKEigResult, ntk_eigs
from gdscope.kernels.functional import ModelFunction, jacobian
from gdscope.kernels.infinite import ACTIVATIONS, du_gram, du_lambda0, infinite_ntk
from gdscope.kernels.ntk import NtkMethod, ntk, ntk_blocks
from gdscope.kernels.operator import ntk_operator

__all__ = [
    # functional form
    "ModelFunction",
    "jacobian",
    # empirical NTK
    "NtkMethod",
    "ntk",
    "ntk_blocks",
    "ntk_operator",
    # spectrum and disparity
    "DisparityReport",
    "FunctionSpaceDisparityReport",
    "NTKEigResult",
    "disparity",
    "function_space_disparity",
    "ntk_eigs",
    # infinite width
    "ACTIVATIONS",
    "du_gram",
    "du_lambda0",
    "infinite_ntk",
]
