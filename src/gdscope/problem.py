"""Model + loss + data in functional form: the object every measurement is taken on.

A :class:`Problem` holds a model, a loss and a data set and exposes the *full empirical risk*

    L(θ) = Σ_b w_b L_b(θ),     w_b = n_b / n   (reduction "mean"),   w_b = 1   (reduction "sum"),

where ``L_b`` is the loss of batch ``b`` under the problem's reduction, as a function of a
parameter dict (``torch.func.functional_call``). Full-batch tensors are one batch; a ``DataLoader``
is accumulated over all its batches with those weights, so both give the same operator.

Conventions (THEORY §0): outputs are stacked sample-major; ``"mse"`` is PyTorch's ``mse_loss``,
whose mean reduction divides by ``n·k``, so the output-space curvature is ``Q = q·I`` with
``q = 2/(n k)`` (mean) or ``q = 2`` (sum). ``"cross_entropy"`` has per-sample blocks
``Q_i = diag(p_i) − p_i p_iᵀ`` (divided by ``n`` for the mean).

Losses as PyTorch writes them are recognised as what they are: ``nn.MSELoss``,
``nn.CrossEntropyLoss`` (``ignore_index``, ``label_smoothing``), ``nn.BCEWithLogitsLoss`` and the
functional ``F.mse_loss``, ``F.cross_entropy``, ``F.binary_cross_entropy_with_logits`` (also as
``functools.partial``), with the reduction taken from them. Label smoothing ``ε`` replaces the
one-hot target by ``(1 − ε) e_y + ε/C``: ``g`` changes, ``Q`` (the softmax Hessian) does not.
``BCEWithLogitsLoss`` has ``Q = diag(σ(1 − σ))`` divided by ``n·k`` for the mean (PyTorch's
mean is over all elements). Cross-entropy with ignored labels (``-100``) averages over the
non-ignored ones *of the whole data set* under ``"mean"``: batch ``b`` weighs ``m_b / m`` with
``m_b`` its non-ignored labels.

Attention: fused scaled-dot-product kernels have no double backward and no forward-mode AD, so a
model that uses attention (``nn.MultiheadAttention`` or ``F.scaled_dot_product_attention``,
detected once) is evaluated by :meth:`Problem.forward` under :func:`math_attention`; the problem's
``notes`` say so.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from gdscope.adapters import Adapter
from gdscope.errors import (
    InvalidArgumentError,
    NonDeterministicError,
    NonFiniteError,
    ShapeMismatchError,
    StatefulModuleError,
)

__all__ = [
    "KNOWN_LOSSES",
    "LOSSES",
    "LossSpec",
    "Params",
    "Problem",
    "check_device",
    "check_finite",
    "check_finite_params",
    "math_attention",
    "uses_attention",
]

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

LOSSES = ("mse", "cross_entropy")
KNOWN_LOSSES = ("mse", "cross_entropy", "bce_with_logits")
ATTENTION_NOTE = (
    "attention evaluated with the math SDPA backend (and nn.MultiheadAttention's fused fast "
    "path off) for double backward and forward-mode AD"
)
_REDUCTIONS = ("mean", "sum")
_STATEFUL_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_RANDOM_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class Problem:
    """A model, a loss and a data set, evaluated functionally over a parameter dict.

    Args:
        model: any ``nn.Module`` with at least one trainable parameter. Its parameters are used
            live (no copy) unless ``dtype``/``device`` ask for a conversion.
        loss: ``"mse"`` (PyTorch's ``mse_loss``), ``"cross_entropy"``, ``"bce_with_logits"``,
            ``nn.MSELoss``/``nn.CrossEntropyLoss``/``nn.BCEWithLogitsLoss`` modules, the
            matching ``torch.nn.functional`` losses (or ``functools.partial`` of them), any
            other ``nn.Module`` loss or a callable ``loss(outputs, targets) -> scalar``. An
            unrecognised callable must honour ``reduction``: return the batch mean of
            per-sample losses for ``"mean"``, their sum for ``"sum"``.
        data: ``(X, Y)`` tensors (full batch) or an iterable of ``(x, y)`` batches such as a
            ``DataLoader`` (iterated in full for every evaluation of ``L``); with an
            ``adapter``, dict batches (or one dict of tensors as the full batch).
        reduction: ``"mean"`` or ``"sum"``; default the loss module's or partial's own, else
            ``"mean"``. A value that conflicts with the loss's own is an error.
        device, dtype: where and in which floating type to evaluate (default: the model's).
        allow_stateful: opt in to train-mode BatchNorm-type modules (samples coupled through batch
            statistics). Running statistics are never overwritten: buffers are cloned per call.
        adapter: a :class:`gdscope.adapters.Adapter` (``gs.adapters.hf()``) for dict batches and
            models returning output objects; see :mod:`gdscope.adapters`.

    Attributes:
        loss_spec: the recognised loss (:class:`LossSpec`); ``loss_name`` is its name.
        notes: how the problem is evaluated when that differs from a plain forward (attention
            through the math SDPA backend).

    >>> import torch
    >>> from torch import nn
    >>> X, Y = torch.randn(8, 3), torch.randn(8, 2)
    >>> prob = Problem(nn.Linear(3, 2), "mse", (X, Y))
    >>> prob.n, prob.num_outputs, prob.num_params, prob.q == 2 / (8 * 2)
    (8, 2, 8, True)
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn | nn.Module = "mse",
        data: tuple[Tensor, Tensor] | Iterable[Any] | None = None,
        *,
        reduction: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        allow_stateful: bool = False,
        adapter: Adapter | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"model must be a torch.nn.Module, got {type(model).__name__}: pass the network "
                "itself (wrap a plain function in an nn.Module)."
            )
        if reduction is not None and (
            not isinstance(reduction, str) or reduction not in _REDUCTIONS
        ):
            raise InvalidArgumentError(
                f"reduction={reduction!r} is not supported: use 'mean' or 'sum' (or None for "
                "the loss's own)."
            )
        if adapter is not None and not isinstance(adapter, Adapter):
            raise InvalidArgumentError(
                f"adapter must be a gdscope.adapters.Adapter (e.g. gs.adapters.hf()), got "
                f"{type(adapter).__name__}."
            )
        self.adapter = adapter
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise InvalidArgumentError(
                f"dtype={dtype!r} is not a floating torch.dtype: pass e.g. dtype=torch.float64 "
                "(or None for the model's own dtype)."
            )
        if not isinstance(allow_stateful, bool):
            raise InvalidArgumentError(f"allow_stateful={allow_stateful!r} must be True or False.")
        self.model = model
        self.allow_stateful = allow_stateful
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise InvalidArgumentError(
                f"model {type(model).__name__} has no trainable parameters "
                "(none with requires_grad=True): nothing to measure."
            )
        first = next(p for p in model.parameters() if p.requires_grad)
        self.device = check_device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        self._convert = self.device != first.device or self.dtype != first.dtype
        self._loss_arg = loss
        self.loss_spec, self._criterion = _resolve_loss(loss, reduction)
        self.loss_name = self.loss_spec.name
        self.reduction = self.loss_spec.reduction
        self._attention = uses_attention(model)
        self.notes: tuple[str, ...] = ()
        if data is None:
            raise InvalidArgumentError(
                "data is required: pass (X, Y) tensors or a DataLoader of (x, y) batches."
            )
        if adapter is not None and isinstance(data, Mapping):
            self._full_batch = adapter.split(data, "data")
        else:
            self._full_batch = _as_full_batch(data)
        self._loader = None if self._full_batch is not None else data
        if self._loader is not None:
            _check_loader(self._loader)
        self._n: int | None = None
        self._k: int | None = None
        self._classes: int | None = None  # cross-entropy: size of the class dimension
        self._units: int | None = None  # cross-entropy "mean": non-ignored labels in all data
        self._checked = False
        if self._full_batch is not None:
            self._n = _batch_size(self._full_batch[0])
            if self._n == 0:
                raise InvalidArgumentError("data is empty (0 samples): pass at least one sample.")
        check_finite_params(model, self.names)
        self._validate()

    def _validate(self) -> None:
        """Check the first batch (all of tensor data) and evaluate the loss on two samples.

        Non-finite values, out-of-range class labels, shapes and dtypes fail here, early.
        Further DataLoader batches are checked as they are used (:meth:`_raw_batches`).
        """
        try:
            x, y = next(iter(self._raw_batches(check=False)))
        except StopIteration:
            raise InvalidArgumentError(
                "data is empty (no batches): pass at least one sample."
            ) from None
        where = "data" if self._full_batch is not None else "batch 0 of data"
        self._check_batch(x, y, where)
        if _batch_size(x) == 0:
            raise InvalidArgumentError("data is empty (0 samples): pass at least one sample.")
        x2, y2 = self._to_device(_take(x, slice(0, 2))), self._to_device(y[:2], targets=True)
        with torch.no_grad():
            if not self._attention:  # hand-written F.scaled_dot_product_attention?
                with _AttentionCalls() as calls:
                    self.forward(self.params, x2)
                self._attention = calls.seen
            if self._attention:
                self.notes = (ATTENTION_NOTE,)
            out = self.forward(self.params, x2)
            if not isinstance(out, Tensor):
                raise InvalidArgumentError(
                    f"the model returns {type(out).__name__}, not a tensor: wrap it so that "
                    "forward returns one tensor of outputs (n, ...), or pass an adapter "
                    "(adapter=gs.adapters.hf() takes output.logits)."
                )
            if self.loss_name == "cross_entropy" and out.ndim >= 2:
                view, _ = self._loss_view(out, y2)
                self._classes = int(view.shape[1])
                self._check_class_targets(y, where)
            self.loss_fn(out, y2)
        self._k = int(out[0].numel())

    def _check_batch(self, x: Any, y: Any, where: str) -> None:
        """Finite inputs and targets, as many of each, valid class labels (once ``C`` known)."""
        if isinstance(x, Mapping):
            if not x:
                raise InvalidArgumentError(f"the inputs in {where} are an empty dict.")
            items = [(f"x[{k!r}]", t) for k, t in x.items()] + [("targets", y)]
        else:
            items = [("x", x), ("targets", y)]
        for name, t in items:
            if not isinstance(t, Tensor):
                raise InvalidArgumentError(
                    f"{name} in {where} is a {type(t).__name__}, not a torch.Tensor: make the "
                    "data yield tensors (torch.as_tensor), e.g. through a TensorDataset."
                )
            if t.ndim == 0:
                raise ShapeMismatchError(
                    f"{name} in {where} is a scalar: pass samples along dimension 0."
                )
            if t.is_complex():
                raise InvalidArgumentError(
                    f"{name} in {where} is complex ({t.dtype}): pass real tensors."
                )
        sizes = {name: int(t.shape[0]) for name, t in items}
        if len(set(sizes.values())) > 1:
            if len(items) == 2:
                raise ShapeMismatchError(
                    f"{where} has {x.shape[0]} inputs x but {y.shape[0]} targets: pass as many "
                    "of each."
                )
            raise ShapeMismatchError(
                f"{where} has different numbers of samples per entry {sizes}: pass as many of each."
            )
        for name, t in items:
            check_finite(t, name, where=where)
        if self._classes is not None:
            self._check_class_targets(y, where)

    def _check_class_targets(self, y: Tensor, where: str) -> None:
        """Cross-entropy targets: labels in ``0..C-1`` (all of them) or probability rows."""
        C = self._classes
        if C is None:  # not known yet (set in _validate)
            return
        if y.dtype == torch.bool:
            raise InvalidArgumentError(
                f"targets in {where} are bool: loss 'cross_entropy' needs integer class indices "
                f"(targets.long(), values 0..{C - 1}) or probabilities of shape (n, {C})."
            )
        if y.is_floating_point():
            if y.ndim != 2 or y.shape[1] != C:
                raise InvalidArgumentError(
                    f"targets in {where} have floating dtype {y.dtype} and shape "
                    f"{tuple(y.shape)}: loss 'cross_entropy' needs integer class indices "
                    f"(a torch.long tensor of shape (n,), values 0..{C - 1}: pass "
                    f"targets.long()) or class probabilities of shape (n, {C}) summing to 1 "
                    "per row."
                )
            neg = y < 0
            if bool(neg.any()):
                i, j = (int(v) for v in torch.nonzero(neg)[0])
                raise InvalidArgumentError(
                    f"targets in {where} are class probabilities (shape (n, {C})) but entry "
                    f"({i}, {j}) is {float(y[i, j])!r} < 0: probabilities must be >= 0 and sum "
                    "to 1 per row (for class indices pass an integer tensor of shape (n,))."
                )
            tol = max(1e-6, 10 * C * torch.finfo(y.dtype).eps)
            err = (y.sum(dim=1) - 1).abs()
            if bool((err > tol).any()):
                i = int(torch.nonzero(err > tol)[0, 0])
                raise InvalidArgumentError(
                    f"targets in {where} are class probabilities (shape (n, {C})) but row {i} "
                    f"sums to {float(y[i].sum())!r}, not 1 (tolerance {tol:.1e}): normalize "
                    "them (targets / targets.sum(dim=1, keepdim=True)), or pass integer class "
                    "indices of shape (n,)."
                )
            return
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= C:
            bad = (y < 0) | (y >= C)
            ignore = self.loss_spec.ignore_index
            if ignore is not None:  # a module's or functional's ignore_index is deliberate
                bad &= y != ignore
            if not bool(bad.any()):
                return
            idx = tuple(int(v) for v in torch.nonzero(bad)[0])
            at = f"sample {idx[0]}" + (f" (index {idx})" if len(idx) > 1 else "")
            raise InvalidArgumentError(
                f"targets in {where} hold class label {int(y[idx])} at {at} "
                f"({int(bad.sum())} labels out of range; min {lo}, max {hi}): valid labels are "
                f"0..{C - 1} for a model with {C} outputs per sample. Fix the labels, or give "
                "the model's last layer as many outputs as there are classes."
            )

    # ------------------------------------------------------------------ parameters
    @property
    def params(self) -> Params:
        """Current trainable parameters, detached (live views unless converted)."""
        out = {}
        named = dict(self.model.named_parameters())
        for n in self.names:
            p = named[n].detach()
            out[n] = p.to(self.device, self.dtype) if self._convert else p
        return out

    def buffers(self) -> Params:
        """Module buffers on the problem's device; floating ones in the problem's dtype."""
        out = {}
        for n, b in self.model.named_buffers():
            b = b.detach().to(self.device)
            out[n] = b.to(self.dtype) if b.is_floating_point() else b
        return out

    @property
    def num_params(self) -> int:
        """Number of trainable scalars ``P``."""
        named = dict(self.model.named_parameters())
        return sum(named[n].numel() for n in self.names)

    def flatten(self, tensors: Params) -> Tensor:
        """Concatenate a parameter-shaped dict into a flat vector (order of ``names``)."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> Params:
        """Split a flat vector into a dict shaped like ``params``."""
        if vec.ndim != 1 or vec.numel() != self.num_params:
            raise ShapeMismatchError(
                f"vector of shape {tuple(vec.shape)} does not match the model's "
                f"{self.num_params} trainable parameters: pass a flat vector of that length."
            )
        out, i = {}, 0
        named = dict(self.model.named_parameters())
        for n in self.names:
            shape = named[n].shape
            m = named[n].numel()
            out[n] = vec[i : i + m].view(shape)
            i += m
        return out

    # ------------------------------------------------------------------ data
    @property
    def n(self) -> int:
        """Number of samples in the data set."""
        if self._n is None:
            self._n = sum(_batch_size(x) for x, _ in self._raw_batches())
            if self._n == 0:
                raise InvalidArgumentError("data is empty (0 samples): pass at least one sample.")
        return self._n

    @property
    def num_outputs(self) -> int:
        """Outputs per sample ``k`` (the model's output numel per sample)."""
        if self._k is None:
            x, _ = next(iter(self._raw_batches()))
            with torch.no_grad():
                out = self.forward(self.params, self._to_device(_take(x, slice(0, 1))))
            self._k = int(out[0].numel())
        return self._k

    @property
    def full_batch(self) -> tuple[Any, Tensor] | None:
        """``(X, Y)`` on the problem's device when the data are tensors, else ``None``."""
        if self._full_batch is None:
            return None
        x, y = self._full_batch
        return self._to_device(x), self._to_device(y, targets=True)

    def subset(self, indices: Tensor) -> Problem:
        """The same model, loss and reduction on samples ``indices`` of tensor data."""
        if self._full_batch is None:
            raise InvalidArgumentError(
                "subset needs the problem's data as (X, Y) tensors; with a DataLoader, build a "
                "Problem on the subset's loader instead."
            )
        x, y = self._full_batch
        if isinstance(x, Mapping):
            raise InvalidArgumentError(
                "subset of dict-batch data is not supported: build a Problem on the subset's "
                "batches instead."
            )
        try:
            idx = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InvalidArgumentError(
                f"subset indices must be a 1-D set of integer sample indices, got "
                f"{type(indices).__name__} ({err})."
            ) from err
        if idx.dtype == torch.bool:
            if idx.shape != (x.shape[0],):
                raise ShapeMismatchError(
                    f"subset indices is a boolean mask of shape {tuple(idx.shape)}: a mask must "
                    f"have one entry per sample, shape ({x.shape[0]},)."
                )
            idx = torch.nonzero(idx).reshape(-1)
        elif idx.numel() and (idx.is_floating_point() or idx.is_complex()):
            raise InvalidArgumentError(
                f"subset indices have dtype {idx.dtype}: pass integer sample indices (or a "
                "boolean mask), e.g. torch.arange(10)."
            )
        idx = idx.to(torch.long)
        if idx.ndim != 1 or idx.numel() == 0 or idx.min() < 0 or idx.max() >= x.shape[0]:
            raise InvalidArgumentError(
                f"subset indices must be a non-empty 1-D set of sample indices in "
                f"[0, {x.shape[0]}), got {repr(indices)[:80]}."
            )
        return Problem(
            self.model,
            self._loss_arg,
            (x[idx], y[idx]),
            reduction=self.reduction,
            device=self.device,
            dtype=self.dtype,
            allow_stateful=self.allow_stateful,
            adapter=self.adapter,
        )

    def with_data(self, data: tuple[Tensor, Tensor] | Iterable[Any]) -> Problem:
        """The same model, loss, reduction and adapter on other ``data``."""
        return Problem(
            self.model,
            self._loss_arg,
            data,
            reduction=self.reduction,
            device=self.device,
            dtype=self.dtype,
            allow_stateful=self.allow_stateful,
            adapter=self.adapter,
        )

    @classmethod
    def from_hf(
        cls,
        model: nn.Module,
        data: Any,
        *,
        loss: str | LossFn | nn.Module | None = None,
        shift: bool = False,
        labels: str = "labels",
        logits: str = "logits",
        **kwargs: Any,
    ) -> Problem:
        """A Problem on a Hugging Face style model and dict batches (see :mod:`gdscope.adapters`).

        ``loss`` defaults to ``nn.CrossEntropyLoss()`` (mean over non-ignored labels, ``-100``
        ignored), as ``transformers`` computes it; ``shift=True`` for causal LMs.
        """
        from gdscope.adapters import hf

        return cls(
            model,
            nn.CrossEntropyLoss() if loss is None else loss,
            data,
            adapter=hf(labels=labels, logits=logits, shift=shift),
            **kwargs,
        )

    def _label_units(self, y: Tensor) -> int | None:
        """Non-ignored labels of a batch (cross-entropy with ``ignore_index``), else ``None``."""
        ignore = self.loss_spec.ignore_index
        if ignore is None or y.is_floating_point():
            return None
        if self.adapter is not None and self.adapter.shift and y.ndim >= 2:
            y = y[:, 1:]
        return int((y != ignore).sum())

    @property
    def units(self) -> int | None:
        """Cross-entropy with ``ignore_index``: non-ignored labels in all the data (the mean's
        denominator); ``None`` for other losses (the mean is then over samples)."""
        if self.loss_spec.ignore_index is None:
            return None
        if self._units is None:
            counts = [self._label_units(y) for _, y in self._raw_batches()]
            if any(c is None for c in counts):
                return None
            self._units = sum(counts)  # type: ignore[arg-type]
            if self._units == 0 and self.reduction == "mean":
                raise InvalidArgumentError(
                    f"every label in data equals ignore_index={self.loss_spec.ignore_index}: "
                    "the mean cross-entropy is 0/0. Pass data with at least one label."
                )
        return self._units

    def batches(self) -> Iterator[tuple[Any, Tensor, float]]:
        """Yield ``(x, y, w)`` with ``L = Σ w·L_batch`` (see the module docstring)."""
        n = self.n
        units = self.units if self.reduction == "mean" else None
        for x, y in self._raw_batches():
            if units is not None:
                w = self._label_units(y) / units  # type: ignore[operator]
            else:
                w = _batch_size(x) / n if self.reduction == "mean" else 1.0
            yield self._to_device(x), self._to_device(y, targets=True), w

    def _raw_batches(self, check: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """The data's ``(x, y)`` batches; DataLoader batches are checked as they come."""
        if self._full_batch is not None:
            yield self._full_batch  # checked once, in _validate
            return
        for b, item in enumerate(self._loader):  # type: ignore[union-attr]
            if self.adapter is not None:
                x, y = self.adapter.split(item, f"batch {b} of data")
                if check:
                    self._check_batch(x, y, f"batch {b} of data")
                yield x, y
                continue
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                what = (
                    f"a {type(item).__name__} of {len(item)} elements"
                    if isinstance(item, (tuple, list))
                    else f"a {type(item).__name__}"
                    + (f" with keys {sorted(map(str, item))}" if isinstance(item, dict) else "")
                )
                raise InvalidArgumentError(
                    f"batch {b} from data is {what}, not an (x, y) pair. gdscope uses exactly "
                    "(inputs, targets): a third element such as per-sample weights would be "
                    "silently ignored, and a loss that takes weights is not supported. Wrap the "
                    "dataset so that it returns (input, target), e.g. "
                    "TensorDataset(X, Y) or a Dataset whose __getitem__ returns (x, y). For dict "
                    "batches (input_ids, attention_mask, labels) pass adapter=gs.adapters.hf()."
                )
            x, y = item
            if check:
                self._check_batch(x, y, f"batch {b} of data")
            yield x, y

    def _to_device(self, t: Any, targets: bool = False) -> Any:
        if isinstance(t, Mapping):
            return {k: self._to_device(v) for k, v in t.items()}
        t = t.to(self.device)
        if t.is_floating_point():
            t = t.to(self.dtype)  # inputs, regression targets, class probabilities
        return t

    # ------------------------------------------------------------------ evaluation
    def attention_context(self) -> contextlib.AbstractContextManager[None]:
        """:func:`math_attention` when the model uses attention, else a no-op context."""
        return math_attention() if self._attention else contextlib.nullcontext()

    def forward(self, params: Params, x: Any) -> Tensor:
        """Model outputs at ``params`` (functional; buffers cloned so they never change).

        Dict inputs are passed as keyword arguments; with an adapter the output is its logits.
        Attention runs through the math SDPA backend (see :func:`math_attention`).
        """
        buffers = {n: b.clone() for n, b in self.buffers().items()}
        try:
            with self.attention_context():
                if isinstance(x, Mapping):
                    out = functional_call(self.model, (params, buffers), (), dict(x))
                else:
                    out = functional_call(self.model, (params, buffers), (x,))
            return out if self.adapter is None else self.adapter.logits(out)
        except RuntimeError as e:
            if isinstance(x, Mapping):
                raise
            if any(w in str(e) for w in ("shape", "size", "dimension")):
                raise ShapeMismatchError(
                    f"the model cannot take inputs of per-sample shape {tuple(x.shape[1:])}: {e}. "
                    "Check that data's inputs match the model's first layer."
                ) from e
            if "dtype" in str(e) or "type" in str(e):
                raise InvalidArgumentError(
                    f"the model cannot take inputs of dtype {x.dtype}: {e}. Pass floating "
                    "inputs (or integer indices for embeddings) matching the model."
                ) from e
            raise

    def _loss_view(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.adapter is None:
            return outputs, targets
        return self.adapter.loss_view(outputs, targets)

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The criterion on one batch, with the problem's reduction (after the adapter's
        :meth:`~gdscope.adapters.Adapter.loss_view`)."""
        outputs, targets = self._loss_view(outputs, targets)
        try:
            return self._criterion(outputs, targets)
        except (RuntimeError, ValueError) as e:
            if not _SHAPE_ERROR.search(str(e)):
                raise  # not about shapes (e.g. under vmap): the error as PyTorch gave it
            raise ShapeMismatchError(
                f"loss {self.loss_name!r} cannot compare outputs of shape {tuple(outputs.shape)} "
                f"with targets of shape {tuple(targets.shape)}: {e}"
            ) from e

    def batch_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """``L_b(params)`` on one batch."""
        return self.loss_fn(self.forward(params, x), y)

    def loss(self, params: Params | None = None) -> Tensor:
        """Full empirical risk ``L(params)`` (default: the current parameters)."""
        params = self.params if params is None else params
        total = None
        for x, y, w in self.batches():
            term = w * self.batch_loss(params, x, y)
            total = term if total is None else total + term
        assert total is not None
        return total

    def gradient(self, params: Params | None = None) -> Tensor:
        """Flat ``∇L(params)``."""
        params = self.params if params is None else params
        grads = torch.func.grad(self.loss)(params)
        return self.flatten(grads)

    def outputs(self, params: Params | None = None) -> Tensor:
        """All outputs ``(n, k)``, sample-major (each sample's output flattened: with an adapter,
        a sequence's logits ``(T, C)`` become ``T·C`` columns)."""
        params = self.params if params is None else params
        with torch.no_grad():
            return torch.cat(
                [self.forward(params, x).reshape(_batch_size(x), -1) for x, _, _ in self.batches()]
            )

    # ------------------------------------------------------------------ loss curvature
    @property
    def q(self) -> float:
        """Scalar output curvature of MSE, ``Q = q·I``: ``2/(n k)`` (mean) or ``2`` (sum)."""
        if self.loss_name != "mse":
            raise InvalidArgumentError(
                f"q is defined only for loss 'mse' (Q = q·I); loss is {self.loss_name!r}: "
                "use output_hessian() for the general Q."
            )
        return 2.0 / (self.n * self.num_outputs) if self.reduction == "mean" else 2.0

    def output_hessian(self, outputs: Tensor, targets: Tensor, weight: float = 1.0) -> Tensor:
        """Per-sample blocks of ``Q = ∂²L/∂F²`` as ``(n_b, k, k)`` for one batch.

        ``weight`` is the batch's ``w`` in ``L = Σ w L_b``. Losses are assumed separable over
        samples (true for mse, cross_entropy, bce_with_logits and any per-sample loss). For
        cross-entropy with ignored labels the blocks of ignored tokens are zero and the others
        are divided by the batch's non-ignored labels (``w`` carries their share of all).
        """
        nb = outputs.shape[0]
        flat = outputs.detach().reshape(nb, -1)

        units = self._label_units(targets) if self.reduction == "mean" else None
        if units is not None:
            # cross-entropy with ignore_index: the batch mean is over its non-ignored labels,
            # not over samples; differentiate each sample's *sum* and divide by the count.
            spec = self.loss_spec

            def per_sample(o: Tensor, t: Tensor) -> Tensor:
                view = self._loss_view(o.reshape((1, *outputs.shape[1:])), t.unsqueeze(0))
                return nn.functional.cross_entropy(
                    *view,
                    reduction="sum",
                    ignore_index=spec.ignore_index,  # type: ignore[arg-type]
                    label_smoothing=spec.label_smoothing,
                )

            hess = torch.func.vmap(torch.func.hessian(per_sample))(flat, targets)
            return hess * (weight / units) if units else hess * 0.0

        def per_sample(o: Tensor, t: Tensor) -> Tensor:
            return self.loss_fn(o.reshape((1, *outputs.shape[1:])), t.unsqueeze(0))

        hess = torch.func.vmap(torch.func.hessian(per_sample))(flat, targets)
        # per_sample's loss on a batch of one: mean reduction divides by 1 sample, so scale.
        scale = weight / nb if self.reduction == "mean" else weight
        return hess * scale

    # ------------------------------------------------------------------ checks
    def check(self, force: bool = False) -> None:
        """Refuse operators that are random or that mutate state, before any iterative solver.

        Raises :class:`StatefulModuleError` for train-mode BatchNorm/InstanceNorm (unless
        ``allow_stateful``) and :class:`NonDeterministicError` when two evaluations of the loss
        differ (dropout in train mode, random augmentation). Runs once; ``force`` repeats it.
        """
        if self._checked and not force:
            return
        if not self.allow_stateful:
            stateful = [
                name or type(self.model).__name__
                for name, m in self.model.named_modules()
                if isinstance(m, _STATEFUL_TYPES) and m.training
            ]
            if stateful:
                raise StatefulModuleError(
                    f"modules {stateful} are in train mode and couple samples through batch "
                    "statistics (and overwrite running statistics in forward). Call "
                    "model.eval() to measure the inference-mode operator, or pass "
                    "allow_stateful=True to Problem to measure the train-mode one."
                )
        self._check_buffers_unchanged()
        self._check_deterministic()
        self._checked = True

    def _check_buffers_unchanged(self) -> None:
        before = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        x, _ = next(iter(self._raw_batches()))
        first = next(p for p in self.model.parameters() if p.requires_grad)

        def conv(t: Tensor) -> Tensor:
            t = t.to(first.device)
            return t.to(first.dtype) if t.is_floating_point() else t

        with torch.no_grad(), self.attention_context():
            if isinstance(x, Mapping):
                self.model(**{k: conv(v) for k, v in x.items()})
            else:
                self.model(conv(x))
        changed = [
            n
            for n, b in self.model.named_buffers()
            if n in before and not torch.equal(before[n], b.detach())
        ]
        # restore, so the check itself never changes the model
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in before:
                    b.copy_(before[n])
        if changed and not self.allow_stateful:
            raise StatefulModuleError(
                f"buffers {changed} change in forward, so every evaluation alters the model. "
                "Put the modules that own them in eval mode, or pass allow_stateful=True "
                "(gdscope then evaluates on cloned buffers)."
            )

    def _check_deterministic(self) -> None:
        params = self.params
        with torch.no_grad():
            a = self.loss(params)
            b = self.loss(params)
        if not torch.isfinite(a):
            raise NonFiniteError(
                f"the loss at the current parameters is {a.item()}: measure a finite point."
            )
        if not torch.equal(a, b) and not math.isclose(
            a.item(), b.item(), rel_tol=1e-12, abs_tol=0.0
        ):
            random = [
                name
                for name, m in self.model.named_modules()
                if isinstance(m, _RANDOM_TYPES) and m.training
            ]
            hint = (
                f"modules {random} are in train mode: call model.eval() or set p=0"
                if random
                else "remove random augmentation and shuffling-dependent losses"
            )
            raise NonDeterministicError(
                f"the loss is not deterministic ({a.item()!r} then {b.item()!r} at the same "
                f"parameters), so curvature operators would be random: {hint}."
            )


# ---------------------------------------------------------------------- helpers
def _describe_nonfinite(t: Tensor) -> tuple[str, tuple[int, ...], int]:
    """``(kind, index, count)`` of the first non-finite entry of ``t`` (row-major)."""
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    pos = torch.nonzero(bad.reshape(-1))[0, 0].item() if t.ndim else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), t.shape)) if t.ndim else ()
    value = float(t.reshape(-1)[pos]) if t.ndim else float(t)
    kind = "NaN" if value != value else ("+inf" if value > 0 else "-inf")
    return kind, idx, count


def check_finite(t: Tensor, name: str, *, samples: bool = True, where: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``name`` and the first offending sample if ``t``
    holds a NaN or inf. Integer tensors are always finite. One ``isfinite().all()`` on success.

    ``samples``: dimension 0 indexes samples (the message names the sample); ``where`` is an
    optional location such as ``"batch 3 of data"``.
    """
    if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
        return
    if bool(torch.isfinite(t).all()):
        return
    kind, idx, count = _describe_nonfinite(t.detach())
    loc = f" in {where}" if where else ""
    if samples and idx:
        at = f"sample {idx[0]} (index {idx})" if len(idx) > 1 else f"sample {idx[0]}"
    else:
        at = f"index {idx}" if idx else "its only entry"
    raise NonFiniteError(
        f"{name}{loc} contains {kind} at {at} ({count} non-finite of {t.numel()} entries): "
        f"every measurement on it would be NaN. Remove or repair that "
        f"{'sample' if samples and idx else 'entry'} before passing {name}."
    )


def check_finite_params(model: nn.Module, names: list[str] | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first trainable parameter holding NaN or inf."""
    named = dict(model.named_parameters())
    for n in names if names is not None else list(named):
        p = named[n].detach()
        if not (p.is_floating_point() or p.is_complex()) or bool(torch.isfinite(p).all()):
            continue
        kind, idx, count = _describe_nonfinite(p)
        raise NonFiniteError(
            f"parameter {n!r} of the model contains {kind} at index {idx} ({count} non-finite of "
            f"{p.numel()} entries): the model is at a non-finite point (a diverged run?). "
            "Measure at finite parameters: reinitialize, or restore a checkpoint from before "
            "the divergence."
        )


def check_device(device: object) -> torch.device:
    """``device`` as a ``torch.device`` that exists here, else a clear error."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise InvalidArgumentError(
            f"device={device!r} must be a torch.device or a name such as 'cpu' or 'cuda:0' "
            "(or None for the model's device)."
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"device={device!r} is not a device name ({err}): pass e.g. 'cpu' or 'cuda:0'."
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device={device!r} but CUDA is not available here (torch.cuda.is_available() "
                "is False): pass device='cpu' (or None for the model's device), or run on a "
                "machine with a CUDA GPU and a CUDA build of PyTorch."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidArgumentError(
                f"device={device!r} but only {count} CUDA device(s) exist: pass one of "
                f"cuda:0..cuda:{count - 1}."
            )
    elif dev.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=dev)
        except Exception as err:
            raise InvalidArgumentError(
                f"device={device!r} is not usable here ({err}): pass device='cpu' "
                "(or None for the model's device)."
            ) from err
    return dev


def _check_loader(data: Any) -> None:
    """Refuse one-shot iterators; warn when a DataLoader drops samples."""
    if isinstance(data, Iterator) or iter(data) is data:
        raise InvalidArgumentError(
            f"data is a one-shot iterator ({type(data).__name__}): it can be read only once, but "
            "every evaluation of the loss iterates over all the data again (the second pass "
            "would see nothing, or only what the first left). Pass a list of (x, y) batches, a "
            "DataLoader, or (X, Y) tensors."
        )
    if getattr(data, "drop_last", False):
        dataset = getattr(data, "dataset", None)
        size = getattr(data, "batch_size", None)
        try:
            dropped = len(dataset) % size if dataset is not None and size else None
        except TypeError:
            dropped = None
        if dropped != 0:
            warnings.warn(
                f"data is a DataLoader with drop_last=True: "
                f"{'some' if dropped is None else dropped} sample(s) of the data set are left "
                "out of every measurement. Pass drop_last=False to measure on all of them.",
                UserWarning,
                stacklevel=3,
            )


_FUNCTIONAL = {
    nn.functional.mse_loss: "mse",
    nn.functional.cross_entropy: "cross_entropy",
    nn.functional.binary_cross_entropy_with_logits: "bce_with_logits",
}
_MODULES = (
    (nn.MSELoss, "mse"),
    (nn.CrossEntropyLoss, "cross_entropy"),
    (nn.BCEWithLogitsLoss, "bce_with_logits"),
)
_KNOWN_KEYWORDS = {
    "mse": ("reduction",),
    "cross_entropy": ("reduction", "ignore_index", "label_smoothing", "weight"),
    "bce_with_logits": ("reduction", "weight", "pos_weight"),
}


@dataclass(frozen=True)
class LossSpec:
    """What the loss is, as far as gdscope knows it.

    ``name`` is ``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"`` for the losses gdscope
    recognises (names, ``nn`` modules, ``torch.nn.functional`` functions, ``functools.partial``
    of them), else the callable's name. ``reduction`` is the problem's (taken from the module or
    partial when not given). ``label_smoothing`` and ``ignore_index`` are cross-entropy's
    (``ignore_index`` honoured only for module and functional forms: the string
    ``"cross_entropy"`` refuses out-of-range labels).
    """

    name: str
    reduction: str
    label_smoothing: float = 0.0
    ignore_index: int | None = None
    source: str = "name"  # "name" | "module" | "functional" | "callable"

    @property
    def known(self) -> bool:
        return self.name in KNOWN_LOSSES


def _loss_fields(loss: Any) -> tuple[str, str, dict[str, Any]] | None:
    """``(name, source, keywords)`` of a recognised module/functional loss, else ``None``."""
    for cls, name in _MODULES:
        if type(loss) is cls:
            kw: dict[str, Any] = {"reduction": loss.reduction}
            for attr in ("ignore_index", "label_smoothing", "weight", "pos_weight"):
                if hasattr(loss, attr):
                    kw[attr] = getattr(loss, attr)
            return name, "module", kw
    func, kw = loss, {}
    while isinstance(func, functools.partial):
        if func.args:
            kind = _FUNCTIONAL.get(func.func)
            if kind is not None:
                raise InvalidArgumentError(
                    f"loss=functools.partial({func.func.__name__}, ...) binds positional "
                    f"arguments {func.args!r}: bind options by keyword only, e.g. "
                    f"partial({func.func.__name__}, reduction='sum')."
                )
            return None
        kw = {**func.keywords, **kw}
        func = func.func
    try:
        name = _FUNCTIONAL.get(func)
    except TypeError:  # unhashable callable
        name = None
    if name is None:
        return None
    unknown = [k for k in kw if k not in _KNOWN_KEYWORDS[name]]
    if unknown:
        raise InvalidArgumentError(
            f"loss={func.__name__} with keywords {unknown}: gdscope reads "
            f"{list(_KNOWN_KEYWORDS[name])} for it (the deprecated size_average/reduce are not "
            "supported: use reduction=)."
        )
    return name, "functional", kw


def _resolve_loss(loss: Any, reduction: str | None) -> tuple[LossSpec, LossFn]:
    """The loss's :class:`LossSpec` and the criterion ``(outputs, targets) -> scalar``."""
    if isinstance(loss, str):
        red = "mean" if reduction is None else reduction
        if loss == "mse":
            return LossSpec("mse", red), _mse_mean if red == "mean" else _mse_sum
        if loss in ("cross_entropy", "ce"):
            return LossSpec("cross_entropy", red), lambda o, t: nn.functional.cross_entropy(
                o, t, reduction=red
            )
        if loss in ("bce_with_logits", "bce"):
            return LossSpec(
                "bce_with_logits", red
            ), lambda o, t: nn.functional.binary_cross_entropy_with_logits(o, t, reduction=red)
        raise InvalidArgumentError(
            f"loss={loss!r} is not a known loss name: use one of {LOSSES}, an nn.Module "
            "loss (nn.MSELoss(), nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss(), ...), a "
            "torch.nn.functional loss or a callable loss(outputs, targets)."
        )
    fields = _loss_fields(loss)
    if fields is not None:
        name, source, kw = fields
        what = type(loss).__name__ if source == "module" else f"{name} (functional)"
        own = kw.get("reduction")
        if own is not None and own not in _REDUCTIONS:
            raise InvalidArgumentError(
                f"loss {what} has reduction={own!r}: gdscope needs a scalar loss, so use "
                "reduction='mean' or 'sum' in the loss."
            )
        if own is not None and reduction is not None and own != reduction:
            raise InvalidArgumentError(
                f"loss {what} has reduction={own!r} but Problem(reduction={reduction!r}) was "
                f"given: they conflict. Drop Problem's reduction= (the loss's is used), or "
                f"build the loss with reduction={reduction!r}."
            )
        red = own or reduction or "mean"
        for attr in ("weight", "pos_weight"):
            if kw.get(attr) is not None:
                raise InvalidArgumentError(
                    f"loss {what} has {attr}= set: class/positive weights are not supported "
                    f"(the curvature Q and the predictions assume unweighted losses). Pass "
                    f"{attr}=None, or a callable loss (then predict and q are unavailable)."
                )
        smooth = float(kw.get("label_smoothing", 0.0) or 0.0)
        if not 0.0 <= smooth <= 1.0:
            raise InvalidArgumentError(
                f"loss {what} has label_smoothing={smooth!r}: it must lie in [0, 1]."
            )
        ignore = int(kw.get("ignore_index", -100)) if name == "cross_entropy" else None
        spec = LossSpec(name, red, smooth, ignore, source)
        if name == "mse":
            return spec, _mse_mean if red == "mean" else _mse_sum
        if name == "cross_entropy":
            return spec, _CrossEntropy(red, smooth, ignore)
        return spec, lambda o, t: nn.functional.binary_cross_entropy_with_logits(
            o, t, reduction=red
        )
    red = "mean" if reduction is None else reduction
    if isinstance(loss, nn.Module):
        own = getattr(loss, "reduction", None)
        if isinstance(own, str):
            if own not in _REDUCTIONS:
                raise InvalidArgumentError(
                    f"loss module {type(loss).__name__} has reduction={own!r}: gdscope needs a "
                    "scalar loss, so use reduction='mean' or 'sum' in the loss."
                )
            if reduction is not None and own != reduction:
                raise InvalidArgumentError(
                    f"loss module {type(loss).__name__} has reduction={own!r} but "
                    f"Problem(reduction={reduction!r}) was given: they conflict. Drop "
                    "Problem's reduction= (the module's is used), or make them agree."
                )
            red = own
        return LossSpec(type(loss).__name__, red, source="callable"), loss
    if callable(loss):
        return LossSpec(getattr(loss, "__name__", "callable"), red, source="callable"), loss
    raise InvalidArgumentError(
        f"loss must be a name, an nn.Module or a callable, got {type(loss).__name__}."
    )


class _CrossEntropy:
    """PyTorch's cross-entropy with ``ignore_index``; a batch with every label ignored has loss
    0 under ``"mean"`` (PyTorch's 0/0 = NaN; such a batch weighs 0 in ``L``)."""

    def __init__(self, reduction: str, label_smoothing: float, ignore_index: int) -> None:
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def __call__(self, o: Tensor, t: Tensor) -> Tensor:
        kw = {"ignore_index": self.ignore_index, "label_smoothing": self.label_smoothing}
        if self.reduction == "mean" and not t.is_floating_point():
            # PyTorch's mean over the non-ignored labels (label smoothing included: both of its
            # terms are divided by that count), written without a data-dependent branch so that
            # vmap (per-sample Hessians) can trace it
            total = nn.functional.cross_entropy(o, t, reduction="sum", **kw)
            return total / (t != self.ignore_index).sum().clamp_min(1)
        return nn.functional.cross_entropy(o, t, reduction=self.reduction, **kw)


def _mse_operands(o: Tensor, t: Tensor) -> Tensor:
    if o.shape != t.shape:
        raise ShapeMismatchError(
            f"mse: outputs of shape {tuple(o.shape)} and targets of shape {tuple(t.shape)} "
            "differ; make targets match the model's outputs (one-hot encode class labels)."
        )
    return (o - t) ** 2


def _mse_mean(o: Tensor, t: Tensor) -> Tensor:
    """PyTorch's ``mse_loss(reduction="mean")``: ``‖o − t‖²/numel``.

    Written out because ``torch.func.jvp(grad(mse_loss))`` fails on ZeroTensors (torch 2.13).
    """
    return _mse_operands(o, t).mean()


def _mse_sum(o: Tensor, t: Tensor) -> Tensor:
    """PyTorch's ``mse_loss(reduction="sum")``: ``‖o − t‖²``."""
    return _mse_operands(o, t).sum()


def _is_array(t: object) -> bool:
    return isinstance(t, Tensor) or hasattr(t, "__array__")


def _as_full_batch(data: Any) -> tuple[Tensor, Tensor] | None:
    if isinstance(data, (tuple, list)) and data and all(_is_array(t) for t in data):
        # tensors or arrays at the top level: meant as (X, Y), not as a list of batches
        kinds = ", ".join(type(t).__name__ for t in data)
        if len(data) != 2:
            raise InvalidArgumentError(
                f"data holds {len(data)} arrays ({kinds}): pass exactly (X, Y). Per-sample "
                "weights or other extra tensors are not supported (a loss that takes weights is "
                "not supported); drop them."
            )
        if not all(isinstance(t, Tensor) for t in data):
            raise InvalidArgumentError(
                f"data=(X, Y) must hold torch tensors, got ({kinds}): convert them with "
                "torch.as_tensor(X), torch.as_tensor(Y) (or gdscope.zoo.as_dataset(X, Y))."
            )
        x, y = data
        for name, t in (("X (data[0])", x), ("Y (data[1])", y)):
            if t.ndim == 0:
                raise ShapeMismatchError(
                    f"{name} is a scalar tensor: pass samples along dimension 0."
                )
        if x.shape[0] != y.shape[0]:
            raise ShapeMismatchError(
                f"data has {x.shape[0]} inputs but {y.shape[0]} targets: pass as many of each."
            )
        return x, y
    if _is_array(data):
        raise InvalidArgumentError(
            f"data must be an (X, Y) pair of tensors, not one {type(data).__name__}: pass "
            "data=(X, Y)."
        )
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise InvalidArgumentError(
            f"data must be (X, Y) tensors or an iterable of (x, y) batches such as a "
            f"DataLoader, got {type(data).__name__}."
        )
    return None


#: RuntimeError messages of a criterion that mean its operands' shapes do not fit.
_SHAPE_ERROR = re.compile(r"size|shape|dimension|expected", re.I)


def _batch_size(x: Any) -> int:
    """Samples in a batch of inputs: a tensor's first dimension, or a dict's first tensor's."""
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor) and v.ndim:
                return int(v.shape[0])
        raise InvalidArgumentError("a dict batch of inputs holds no tensor with a batch dimension.")
    return int(x.shape[0])


def _take(x: Any, idx: Any) -> Any:
    """``x[idx]`` for a tensor, or for every tensor of a dict batch."""
    if isinstance(x, Mapping):
        return {k: v[idx] if isinstance(v, Tensor) and v.ndim else v for k, v in x.items()}
    return x[idx]


_ATTENTION_TYPES = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
_ATTENTION_FUNCS = ("scaled_dot_product_attention", "multi_head_attention")


def uses_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds attention modules (``nn.MultiheadAttention``, ``nn.Transformer*``).

    Hand-written ``F.scaled_dot_product_attention`` calls are found by :class:`Problem` on its
    first forward (a ``TorchFunctionMode`` that records the call).
    """
    return any(isinstance(m, _ATTENTION_TYPES) for m in model.modules())


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Evaluate attention with differentiable kernels: the math SDPA backend, and
    ``nn.MultiheadAttention``'s fused fast path (``_native_multi_head_attention``, taken in
    eval mode when no input requires grad, e.g. under ``torch.func.jvp``) switched off.

    Fused kernels (flash/efficient attention on CPU) have no double backward and no forward-mode
    AD; the math backend is a composition of differentiable ops with the same values (up to
    rounding). The previous settings are restored on exit.
    """
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


class _AttentionCalls(torch.overrides.TorchFunctionMode):
    """Records whether a forward calls scaled-dot-product or multi-head attention."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.seen and any(f in getattr(func, "__name__", "") for f in _ATTENTION_FUNCS):
            self.seen = True
        return func(*args, **(kwargs or {}))
