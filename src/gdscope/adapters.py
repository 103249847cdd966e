"""Adapters: how a batch splits into model inputs and targets, and where the logits are.

gdscope's core takes ``(x, y)`` batches and a model that returns one tensor. Models written the
Hugging Face way take a *dict* batch (``input_ids``, ``attention_mask``, ``labels``, ...) as
keyword arguments and return an *output object* (a ``ModelOutput``, dataclass, ``SimpleNamespace``
or dict) carrying ``loss`` and ``logits``. An :class:`Adapter` bridges the two, named in one line::

    import gdscope as gs
    loss = torch.nn.CrossEntropyLoss()
    prob = gs.Problem(model, loss, loader, adapter=gs.adapters.hf(shift=True))
    # or, equivalently for a causal LM (cross-entropy, mean over non-ignored tokens):
    prob = gs.Problem.from_hf(model, loader, shift=True)

What the adapter does, per batch:

* :meth:`Adapter.split`: ``batch -> (inputs, targets)``. For :func:`hf`, ``targets =
  batch["labels"]`` and ``inputs`` is the dict of the other entries (passed to the model as
  keyword arguments, so the model never sees ``labels`` and never computes its own loss);
  ``(x, y)`` tuples pass through.
* :meth:`Adapter.logits`: ``model output -> logits tensor`` (``output.logits``, ``output["logits"]``
  or a tensor as it is). These logits are *the outputs* ``F`` of gdscope: the NTK, the Jacobian,
  the GGN and ``Q = ∂²L/∂F²`` are all taken with respect to them.
* :meth:`Adapter.loss_view`: ``(logits, targets) -> (logits', targets')`` as the loss sees them.
  With ``shift=True`` (causal LMs, as ``transformers`` computes their loss) token ``t`` predicts
  label ``t + 1``: ``logits[:, :-1]`` against ``labels[:, 1:]``. Sequence logits ``(N, T, C)``
  are flattened to ``(N·T, C)`` against labels ``(N·T,)``. Labels equal to the loss's
  ``ignore_index`` (``-100``) drop out; with ``reduction="mean"`` the loss is PyTorch's: the mean
  over the non-ignored tokens **of the whole data set** (each batch is weighted by its share of
  them), and ``Q`` is zero on ignored tokens.

>>> import torch
>>> from types import SimpleNamespace
>>> a = hf(shift=True)
>>> inputs, labels = a.split({"input_ids": torch.tensor([[1, 2, 3]]),
...                           "labels": torch.tensor([[1, 2, 3]])})
>>> sorted(inputs), labels.tolist()
(['input_ids'], [[1, 2, 3]])
>>> logits = a.logits(SimpleNamespace(logits=torch.zeros(1, 3, 5), loss=None))
>>> [tuple(t.shape) for t in a.loss_view(logits, labels)]
[(2, 5), (2,)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from gdscope.errors import InvalidArgumentError

__all__ = ["Adapter", "hf"]


class Adapter:
    """Splits batches, extracts logits and reshapes them for the loss (see the module docstring).

    Args:
        labels: the key of the targets in a dict batch.
        inputs: the keys passed to the model (default: every key but ``labels``).
        logits: the attribute or key of the logits in the model's output.
        shift: causal-LM shift (``logits[:, :-1]`` against ``labels[:, 1:]``).
    """

    def __init__(
        self,
        labels: str = "labels",
        inputs: Sequence[str] | None = None,
        logits: str = "logits",
        shift: bool = False,
    ) -> None:
        if not isinstance(labels, str) or not isinstance(logits, str):
            raise InvalidArgumentError(
                f"labels={labels!r} and logits={logits!r} must be strings (a batch key and an "
                "output attribute), e.g. hf(labels='labels', logits='logits')."
            )
        if inputs is not None and (
            isinstance(inputs, str) or not all(isinstance(k, str) for k in inputs)
        ):
            raise InvalidArgumentError(
                f"inputs={inputs!r} must be a list of batch keys, e.g. ['input_ids', "
                "'attention_mask'], or None for every key but the labels."
            )
        if not isinstance(shift, bool):
            raise InvalidArgumentError(f"shift={shift!r} must be True or False.")
        self.labels = labels
        self.inputs = None if inputs is None else tuple(inputs)
        self.logits_key = logits
        self.shift = shift

    def __repr__(self) -> str:
        return (
            f"Adapter(labels={self.labels!r}, inputs={self.inputs!r}, "
            f"logits={self.logits_key!r}, shift={self.shift})"
        )

    # ------------------------------------------------------------------ batches
    def split(self, batch: Any, where: str = "batch") -> tuple[Any, Any]:
        """``(inputs, targets)`` of one batch: a dict (inputs a dict) or an ``(x, y)`` pair."""
        if isinstance(batch, Mapping):
            if self.labels not in batch:
                raise InvalidArgumentError(
                    f"{where} is a dict with keys {sorted(map(str, batch))} but no "
                    f"{self.labels!r}: the adapter takes the targets from that key (pass "
                    "hf(labels='your_key'), or add labels to the batches)."
                )
            keys = self.inputs or [k for k in batch if k != self.labels]
            missing = [k for k in keys if k not in batch]
            if missing:
                raise InvalidArgumentError(
                    f"{where} has no keys {missing} named in the adapter's inputs; it has "
                    f"{sorted(map(str, batch))}."
                )
            return {k: batch[k] for k in keys}, batch[self.labels]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise InvalidArgumentError(
            f"{where} is a {type(batch).__name__}: the adapter takes a dict of tensors "
            f"(with {self.labels!r}) or an (x, y) pair."
        )

    # ------------------------------------------------------------------ outputs
    def logits(self, output: Any) -> Tensor:
        """The logits tensor of a model output (attribute, key, tuple's first item or tensor)."""
        if isinstance(output, Tensor):
            return output
        key = self.logits_key
        if isinstance(output, Mapping) and key in output:
            value = output[key]
        elif hasattr(output, key):
            value = getattr(output, key)
        elif isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            value = output[0]
        else:
            raise InvalidArgumentError(
                f"the model returns a {type(output).__name__} without {key!r}: name the "
                f"attribute holding the logits, e.g. hf(logits='scores')."
            )
        if not isinstance(value, Tensor):
            raise InvalidArgumentError(
                f"the model output's {key!r} is a {type(value).__name__}, not a tensor."
            )
        return value

    def loss_view(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, targets)`` as the loss compares them (shifted, tokens flattened)."""
        if self.shift:
            if logits.ndim < 3 or targets.ndim < 2:
                raise InvalidArgumentError(
                    f"shift=True needs sequence logits (N, T, C) and labels (N, T); got "
                    f"{tuple(logits.shape)} and {tuple(targets.shape)}: pass shift=False."
                )
            logits, targets = logits[:, :-1], targets[:, 1:]
        if logits.ndim >= 3 and not targets.is_floating_point():
            return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        return logits, targets


def hf(
    labels: str = "labels",
    inputs: Sequence[str] | None = None,
    logits: str = "logits",
    shift: bool = False,
) -> Adapter:
    """The Hugging Face convention: dict batches with ``labels``, outputs with ``.logits``.

    ``shift=True`` for causal language models whose labels are the inputs (the model shifts
    them itself when it computes its loss); ``False`` for token or sequence classification.
    """
    return Adapter(labels=labels, inputs=inputs, logits=logits, shift=shift)
