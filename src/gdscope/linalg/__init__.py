"""Matrix-free linear algebra on flat torch vectors: operators, Lanczos, trace and density."""

from gdscope.linalg.density import Density, slq, spectral_sum
from gdscope.linalg.lanczos import EigResult, lanczos, lanczos_tridiag
from gdscope.linalg.operator import CallableOperator, DenseOperator, LinearOperator
from gdscope.linalg.trace import Estimate, hutchinson, hutchpp

__all__ = [
    # operators
    "CallableOperator",
    "DenseOperator",
    "LinearOperator",
    # eigenvalues
    "EigResult",
    "lanczos",
    "lanczos_tridiag",
    # trace and density
    "Density",
    "Estimate",
    "hutchinson",
    "hutchpp",
    "slq",
    "spectral_sum",
]
