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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gdscope.errors import (
    InvalidArgumentError,
    NonDeterministicError,
    NonFiniteError,
    ShapeMismatchError,
    StatefulModuleError,
)

__all__ = ["LOSSES", "Params", "Problem", "check_device", "check_finite", "check_finite_params"]

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

LOSSES = ("mse", "cross_entropy")
_REDUCTIONS = ("mean", "sum")
_STATEFUL_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_RANDOM_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class Problem:
    """A model, a loss and a data set, evaluated functionally over a parameter dict.

    Args:
        model: any ``nn.Module`` with at least one trainable parameter. Its parameters are used
            live (no copy) unless ``dtype``/``device`` ask for a conversion.
        loss: ``"mse"`` (PyTorch's ``mse_loss``), ``"cross_entropy"``, an ``nn.Module`` loss or a
            callable ``loss(outputs, targets) -> scalar``. A callable must honour ``reduction``:
            return the batch mean of per-sample losses for ``"mean"``, their sum for ``"sum"``.
        data: ``(X, Y)`` tensors (full batch) or an iterable of ``(x, y)`` batches such as a
            ``DataLoader`` (iterated in full for every evaluation of ``L``).
        reduction: ``"mean"`` or ``"sum"`` over samples.
        device, dtype: where and in which floating type to evaluate (default: the model's).
        allow_stateful: opt in to train-mode BatchNorm-type modules (samples coupled through batch
            statistics). Running statistics are never overwritten: buffers are cloned per call.

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
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        allow_stateful: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"model must be a torch.nn.Module, got {type(model).__name__}: pass the network "
                "itself (wrap a plain function in an nn.Module)."
            )
        if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
            raise InvalidArgumentError(
                f"reduction={reduction!r} is not supported: use 'mean' or 'sum'."
            )
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
        self.reduction = reduction
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
        self.loss_name, self._criterion = _resolve_loss(loss, reduction)
        if data is None:
            raise InvalidArgumentError(
                "data is required: pass (X, Y) tensors or a DataLoader of (x, y) batches."
            )
        self._full_batch = _as_full_batch(data)
        self._loader = None if self._full_batch is not None else data
        if self._loader is not None:
            _check_loader(self._loader)
        self._n: int | None = None
        self._k: int | None = None
        self._classes: int | None = None  # cross-entropy: size of the class dimension
        self._checked = False
        if self._full_batch is not None:
            self._n = int(self._full_batch[0].shape[0])
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
        if x.shape[0] == 0:
            raise InvalidArgumentError("data is empty (0 samples): pass at least one sample.")
        x2, y2 = self._to_device(x[:2]), self._to_device(y[:2], targets=True)
        with torch.no_grad():
            out = self.forward(self.params, x2)
            if not isinstance(out, Tensor):
                raise InvalidArgumentError(
                    f"the model returns {type(out).__name__}, not a tensor: wrap it so that "
                    "forward returns one tensor of outputs (n, ...)."
                )
            ce = self.loss_name == "cross_entropy" or isinstance(
                self._loss_arg, nn.CrossEntropyLoss
            )
            if ce and out.ndim >= 2:
                self._classes = int(out.shape[1])
                self._check_class_targets(y, where)
            self.loss_fn(out, y2)
        self._k = int(out[0].numel())

    def _check_batch(self, x: Any, y: Any, where: str) -> None:
        """Finite inputs and targets, as many of each, valid class labels (once ``C`` known)."""
        for name, t in (("x", x), ("targets", y)):
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
        if x.shape[0] != y.shape[0]:
            raise ShapeMismatchError(
                f"{where} has {x.shape[0]} inputs x but {y.shape[0]} targets: pass as many of each."
            )
        check_finite(x, "x", where=where)
        check_finite(y, "targets", where=where)
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
            if isinstance(self._loss_arg, nn.CrossEntropyLoss):  # its ignore_index is deliberate
                bad &= y != self._loss_arg.ignore_index
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
            self._n = sum(int(x.shape[0]) for x, _ in self._raw_batches())
            if self._n == 0:
                raise InvalidArgumentError("data is empty (0 samples): pass at least one sample.")
        return self._n

    @property
    def num_outputs(self) -> int:
        """Outputs per sample ``k`` (the model's output numel per sample)."""
        if self._k is None:
            x, _ = next(iter(self._raw_batches()))
            with torch.no_grad():
                out = self.forward(self.params, self._to_device(x[:1]))
            self._k = int(out[0].numel())
        return self._k

    @property
    def full_batch(self) -> tuple[Tensor, Tensor] | None:
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
        )

    def batches(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        """Yield ``(x, y, w)`` with ``L = Σ w·L_batch`` (see the module docstring)."""
        n = self.n
        for x, y in self._raw_batches():
            w = x.shape[0] / n if self.reduction == "mean" else 1.0
            yield self._to_device(x), self._to_device(y, targets=True), w

    def _raw_batches(self, check: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """The data's ``(x, y)`` batches; DataLoader batches are checked as they come."""
        if self._full_batch is not None:
            yield self._full_batch  # checked once, in _validate
            return
        for b, item in enumerate(self._loader):  # type: ignore[union-attr]
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
                    "TensorDataset(X, Y) or a Dataset whose __getitem__ returns (x, y)."
                )
            x, y = item
            if check:
                self._check_batch(x, y, f"batch {b} of data")
            yield x, y

    def _to_device(self, t: Tensor, targets: bool = False) -> Tensor:
        t = t.to(self.device)
        if t.is_floating_point():
            t = t.to(self.dtype)  # inputs, regression targets, class probabilities
        return t

    # ------------------------------------------------------------------ evaluation
    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Model outputs at ``params`` (functional; buffers cloned so they never change)."""
        buffers = {n: b.clone() for n, b in self.buffers().items()}
        try:
            return functional_call(self.model, (params, buffers), (x,))
        except RuntimeError as e:
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

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The criterion on one batch, with the problem's reduction."""
        try:
            return self._criterion(outputs, targets)
        except RuntimeError as e:
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
        """All outputs ``(n, k)``, sample-major."""
        params = self.params if params is None else params
        with torch.no_grad():
            return torch.cat(
                [self.forward(params, x).reshape(x.shape[0], -1) for x, _, _ in self.batches()]
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
        samples (true for mse, cross_entropy and any per-sample loss).
        """
        nb = outputs.shape[0]
        flat = outputs.detach().reshape(nb, -1)

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
        x = x.to(first.device)
        with torch.no_grad():
            self.model(x.to(first.dtype) if x.is_floating_point() else x)
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


def _resolve_loss(loss: str | LossFn | nn.Module, reduction: str) -> tuple[str, LossFn]:
    if isinstance(loss, str):
        if loss == "mse":
            return "mse", _mse_mean if reduction == "mean" else _mse_sum
        if loss in ("cross_entropy", "ce"):
            return "cross_entropy", lambda o, t: nn.functional.cross_entropy(
                o, t, reduction=reduction
            )
        raise InvalidArgumentError(
            f"loss={loss!r} is not a known loss name: use one of {LOSSES}, an nn.Module "
            "loss or a callable loss(outputs, targets)."
        )
    if isinstance(loss, nn.Module):
        red = getattr(loss, "reduction", None)
        if red is not None and red != reduction:
            raise InvalidArgumentError(
                f"loss module {type(loss).__name__} has reduction={red!r} but the problem's "
                f"reduction is {reduction!r}: make them agree."
            )
        return type(loss).__name__, loss
    if callable(loss):
        return getattr(loss, "__name__", "callable"), loss
    raise InvalidArgumentError(
        f"loss must be a name, an nn.Module or a callable, got {type(loss).__name__}."
    )


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
