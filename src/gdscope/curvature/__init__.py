"""Curvature of the loss: Hessian and GGN products, spectra, trace, density and the GD map."""

from gdscope.curvature.gd_map import GDMapReport, gd_map
from gdscope.curvature.hessian import dense_hessian, hessian_density, hessian_eigs, hessian_trace
from gdscope.curvature.products import CURVATURES, curvature_operator

__all__ = [
    "CURVATURES",
    "GDMapReport",
    "curvature_operator",
    "dense_hessian",
    "gd_map",
    "hessian_density",
    "hessian_eigs",
    "hessian_trace",
]
