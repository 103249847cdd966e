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

__all__ = ["LOSSES", "Params", "Problem"]

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
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        if reduction not in _REDUCTIONS:
            raise InvalidArgumentError(
                f"reduction={reduction!r} is not supported: use 'mean' or 'sum'."
            )
        if dtype is not None and not dtype.is_floating_point:
            raise InvalidArgumentError(f"dtype={dtype} is not a floating type: use e.g. float64.")
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
        self.device = torch.device(device) if device is not None else first.device
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
        self._n: int | None = None
        self._k: int | None = None
        self._checked = False
        if self._full_batch is not None:
            self._n = int(self._full_batch[0].shape[0])
            if self._n == 0:
                raise InvalidArgumentError("data is empty (0 samples): pass at least one sample.")
        self._validate()

    def _validate(self) -> None:
        """Evaluate the loss on the first two samples: shapes and dtypes fail here, early."""
        try:
            x, y = next(iter(self._raw_batches()))
        except StopIteration:
            raise InvalidArgumentError(
                "data is empty (no batches): pass at least one sample."
            ) from None
        if x.shape[0] == 0:
            raise InvalidArgumentError("data is empty (0 samples): pass at least one sample.")
        x, y = self._to_device(x[:2]), self._to_device(y[:2], targets=True)
        with torch.no_grad():
            out = self.forward(self.params, x)
            self.loss_fn(out, y)
        self._k = int(out[0].numel())

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
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.ndim != 1 or idx.numel() == 0 or idx.min() < 0 or idx.max() >= x.shape[0]:
            raise InvalidArgumentError(
                f"subset indices must be a non-empty 1-D set of sample indices in "
                f"[0, {x.shape[0]})."
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

    def _raw_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._full_batch is not None:
            yield self._full_batch
            return
        for item in self._loader:  # type: ignore[union-attr]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise InvalidArgumentError(
                    "each batch from data must be an (x, y) pair; got "
                    f"{type(item).__name__}. Wrap your dataset to return (input, target)."
                )
            yield item[0], item[1]

    def _to_device(self, t: Tensor, targets: bool = False) -> Tensor:
        t = t.to(self.device)
        if t.is_floating_point() and not (targets and self.loss_name == "cross_entropy"):
            t = t.to(self.dtype)
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


def _as_full_batch(data: Any) -> tuple[Tensor, Tensor] | None:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ShapeMismatchError(
                f"data has {x.shape[0]} inputs but {y.shape[0]} targets: pass as many of each."
            )
        return x, y
    if isinstance(data, Tensor):
        raise InvalidArgumentError("data must be an (X, Y) pair of tensors, not one tensor.")
    if not hasattr(data, "__iter__"):
        raise InvalidArgumentError(
            f"data must be (X, Y) tensors or an iterable of (x, y) batches, "
            f"got {type(data).__name__}."
        )
    return None
