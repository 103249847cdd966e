"""Kernels: the empirical NTK, its spectrum, the disparity matrix, infinite-width kernels."""

from gdscope.kernels.functional import ModelFunction, jacobian

__all__ = ["ModelFunction", "jacobian"]
