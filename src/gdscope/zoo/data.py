"""Data sets available without a download."""

from __future__ import annotations

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError

__all__ = ["digits"]


def digits(
    n: int | None = None,
    *,
    one_hot: bool = True,
    standardize: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits (1,797 images, 64 features, 10 classes).

    Returns ``(X, Y)``: ``X`` is ``(n, 64)``, standardized per feature (constant pixels left at
    0) when ``standardize``; ``Y`` is one-hot ``(n, 10)`` (for MSE) or class indices. ``n``
    samples are drawn without replacement with ``seed`` (all 1,797 when ``None``).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.as_tensor(data.data, dtype=torch.float64)
    y = torch.as_tensor(data.target, dtype=torch.long)
    total = X.shape[0]
    if n is not None:
        if not 1 <= n <= total:
            raise InvalidArgumentError(f"n={n} must be between 1 and {total} for digits.")
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
        X, y = X[idx], y[idx]
    if standardize:
        std = X.std(dim=0)
        X = (X - X.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    X = X.to(dtype)
    Y = torch.nn.functional.one_hot(y, 10).to(dtype) if one_hot else y
    return X, Y
