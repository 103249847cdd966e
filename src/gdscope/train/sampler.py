"""Mini-batch index samplers: fresh draws (the process SGD stability theory assumes) and epochs.

* :class:`FreshBatchSampler`: every batch is ``B`` indices drawn without replacement from all
  ``n``, independently of the previous batches (THEORY §3's SGD: ``p = (n − B)/(B(n − 1))``).
* :class:`EpochSampler`: one shuffle per epoch, then consecutive batches, as a shuffling
  ``DataLoader`` does: a different process (each index appears once per epoch).

Both are infinite streams: ``sampler()`` returns the next batch (a ``LongTensor`` on the CPU) and
``iter(sampler)`` yields batches forever. Randomness comes only from the ``generator`` given
(``None``: PyTorch's global generator), so a seeded generator reproduces the stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError

__all__ = ["SAMPLERS", "EpochSampler", "FreshBatchSampler"]


def _check(n: int, batch_size: int, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"{name}: n={n!r} must be a positive number of samples.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise InvalidArgumentError(
            f"{name}: batch_size={batch_size!r} must be an integer with 1 <= batch_size <= n={n}."
        )


class FreshBatchSampler:
    """Each batch ``torch.randperm(n, generator=g)[:B]``: fresh, without replacement within it.

    Args:
        n: number of samples.
        batch_size: ``B``, ``1 <= B <= n``.
        generator: source of randomness (seed it for reproducibility).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None) -> None:
        _check(n, batch_size, "FreshBatchSampler")
        self.n = n
        self.batch_size = batch_size
        self.generator = generator

    def __call__(self) -> Tensor:
        """The next batch of ``batch_size`` distinct indices."""
        return torch.randperm(self.n, generator=self.generator)[: self.batch_size]

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self()

    def __repr__(self) -> str:
        return f"FreshBatchSampler(n={self.n}, batch_size={self.batch_size})"


class EpochSampler:
    """Shuffle once per epoch, then consecutive batches of ``batch_size`` indices.

    The last batch of an epoch holds the ``n mod B`` leftover indices, or is dropped with
    ``drop_last=True``. ``epoch`` counts the epochs started.

    Args:
        n: number of samples.
        batch_size: ``B``, ``1 <= B <= n``.
        generator: source of randomness (seed it for reproducibility).
        drop_last: drop each epoch's incomplete last batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        _check(n, batch_size, "EpochSampler")
        self.n = n
        self.batch_size = batch_size
        self.generator = generator
        self.drop_last = drop_last
        self.epoch = 0
        self._perm: Tensor | None = None
        self._pos = 0

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __call__(self) -> Tensor:
        """The next batch; a new epoch (new shuffle) starts when the current one is used up."""
        remaining = 0 if self._perm is None else self.n - self._pos
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
            self.epoch += 1
        assert self._perm is not None
        batch = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += batch.numel()
        return batch

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self()

    def __repr__(self) -> str:
        return f"EpochSampler(n={self.n}, batch_size={self.batch_size}, drop_last={self.drop_last})"


SAMPLERS: dict[str, type[FreshBatchSampler] | type[EpochSampler]] = {
    "fresh": FreshBatchSampler,
    "epoch": EpochSampler,
}
