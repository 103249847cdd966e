"""Integrations: gdscope inside other people's trainers, and its values where users look.

* :mod:`gdscope.integrations.lightning`: ``GdscopeCallback`` for ``lightning.pytorch.Trainer``
  (``pip install 'gdscope[lightning]'``);
* :mod:`gdscope.integrations.hf`: ``GdscopeCallback`` for ``transformers.Trainer``
  (``pip install 'gdscope[hf]'``);
* :mod:`gdscope.integrations.sinks`: mirror tracked values to TensorBoard, MLflow or any
  logger (``gdscope[tensorboard]``, ``gdscope[mlflow]``).

Nothing here is imported by ``import gdscope``: each submodule imports its library when it is
imported itself, so the core install needs none of them. See ``docs/integrations.md``.

Here: :func:`callback_probes` (the callbacks' default probes, to extend) and
:class:`EvalLossProbe`.
"""

from gdscope.integrations._common import (
    DEFAULT_CURVATURE_EVERY,
    DEFAULT_EVAL_SAMPLES,
    EvalLossProbe,
    callback_probes,
)

__all__ = ["DEFAULT_CURVATURE_EVERY", "DEFAULT_EVAL_SAMPLES", "EvalLossProbe", "callback_probes"]
