"""Reference models and data sets (bundled or generated offline; nothing is downloaded)."""

from gdscope.zoo.data import digits
from gdscope.zoo.models import mlp

__all__ = ["digits", "mlp"]
