"""Pre-activation ResNets (He et al. 2016) with the shortcut variants of THEORY §4.

A block maps ``x ↦ r(x) + shortcut(x)`` with the residual branch
``r = conv2 ∘ act ∘ norm2 ∘ conv1 ∘ act ∘ norm1`` (3-wide convolutions, padding 1, no bias).
Stages double the channel count and downsample with stride ``s = 2`` in their first block (the
first stage keeps the stem's ``width`` and stride 1). The shortcut takes the block's *raw* input
``x``; where the block keeps the shape (stride 1, same channels) every variant except ``"none"``
is the identity, and where it changes the shape (a transition block):

- ``"none"``: no shortcut, ``x ↦ r(x)``.
- ``"identity"``: subsample with stride ``s`` (``x[..., ::s, ::s]``), zero-pad the channels.
- ``"projection"``: a 1×1 convolution with stride ``s`` (no bias).
- ``"modified"``: ``s^{D/2} · AvgPool_s(x)`` in ``D`` spatial dimensions (factor ``s`` in 2-D,
  ``sqrt(s)`` in 1-D), zero-padded to the new channel count, plus the projection. The
  non-overlapping ``s^D`` windows with weights ``s^{-D}`` make every row of the pooling map have
  norm ``s^{-D/2}``, so the pooled path has unit singular values (exactly when the spatial sizes
  are multiples of ``s``; a ragged last window is averaged over what it covers).

Every variant built with the same ``seed`` has identical weights in every layer they share: the
shared layers (stem, residual branches, head) are created first, in a fixed order, and the
projections last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from gdscope.errors import InvalidArgumentError
from gdscope.zoo.models import ACTIVATIONS, _activation, _check_dtype, _positive_int, _seed

__all__ = [
    "NORMS",
    "SHORTCUTS",
    "IdentityShortcut",
    "ModifiedShortcut",
    "PooledShortcut",
    "PreActBlock",
    "PreActResNet",
    "preact_resnet",
]

SHORTCUTS = ("none", "identity", "projection", "modified")
NORMS = ("batch", "weight", "none")


def _pad_channels(x: Tensor, out_channels: int) -> Tensor:
    """Zero-pad dimension 1 (channels) of ``(n, C, *spatial)`` at the end to ``out_channels``."""
    extra = out_channels - x.shape[1]
    if extra == 0:
        return x
    spatial = x.ndim - 2
    return F.pad(x, (0, 0) * spatial + (0, extra))


class IdentityShortcut(nn.Module):
    """``x ↦ pad_C(x[..., ::s, ::s])``: strided subsampling, then zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dims: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.dims = stride, dims

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[(..., *([slice(None, None, self.stride)] * self.dims))]
        return _pad_channels(x, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class PooledShortcut(nn.Module):
    """``x ↦ pad_C(s^{D/2} · AvgPool_s(x))``: unit singular values for sizes divisible by ``s``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dims: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.dims = stride, dims
        self.scale = float(stride) ** (dims / 2)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        pool = F.avg_pool1d if self.dims == 1 else F.avg_pool2d
        x = self.scale * pool(x, s, s, ceil_mode=True)
        return _pad_channels(x, self.out_channels)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, scale={self.scale:g}"
        )


class ModifiedShortcut(nn.Module):
    """``x ↦ pooled(x) + projection(x)`` (:class:`PooledShortcut` plus a strided 1×1 conv)."""

    def __init__(self, pooled: PooledShortcut, projection: nn.Module) -> None:
        super().__init__()
        self.pooled = pooled
        self.projection = projection

    def forward(self, x: Tensor) -> Tensor:
        return self.pooled(x) + self.projection(x)


class PreActBlock(nn.Module):
    """``x ↦ conv2(act(norm2(conv1(act(norm1(x)))))) + shortcut(x)`` (no shortcut if ``None``).

    ``norm1``/``norm2`` are ``BatchNorm`` or ``Identity``; with weight norm the convolutions
    carry it. ``shortcut`` is set by :func:`preact_resnet` after all shared layers exist.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        dims: int,
        batch_norm: bool,
        activation: str,
    ) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.norm1 = bn(in_channels) if batch_norm else nn.Identity()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = bn(out_channels) if batch_norm else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.shortcut: nn.Module | None = None

    @property
    def transition(self) -> bool:
        """Whether the block changes the shape (stride or channel count)."""
        return self.stride != 1 or self.in_channels != self.out_channels

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch ``r(x)`` alone."""
        h = self.conv1(self.act(self.norm1(x)))
        return self.conv2(self.act(self.norm2(h)))

    def forward(self, x: Tensor) -> Tensor:
        r = self.residual(x)
        return r if self.shortcut is None else r + self.shortcut(x)


class PreActResNet(nn.Module):
    """``stem → blocks → head``; ``blocks`` is a flat ``nn.ModuleList`` over all stages.

    ``head`` is ``norm → act → global average pool → Flatten → Linear``. For the Jacobian of
    the logits with respect to block ``i``'s output ``h``, differentiate
    ``h ↦ model.from_block_output(h, i)`` at ``h = model.block_output(x, i)``.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[PreActBlock],
        head: nn.Module,
        *,
        dims: int,
        shortcut: str,
        norm: str,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.dims, self.shortcut, self.norm = dims, shortcut, norm

    def _index(self, i: int) -> int:
        nb = len(self.blocks)
        if isinstance(i, bool) or not isinstance(i, int) or not -nb <= i < nb:
            raise InvalidArgumentError(
                f"i={i!r} is not a block index: the model has {nb} blocks, pass 0..{nb - 1} "
                "(or a negative index from the end)."
            )
        return i % nb

    def block_output(self, x: Tensor, i: int) -> Tensor:
        """Output of block ``i`` (``stem`` then ``blocks[0..i]``)."""
        i = self._index(i)
        h = self.stem(x)
        for block in self.blocks[: i + 1]:
            h = block(h)
        return h

    def from_block_output(self, h: Tensor, i: int) -> Tensor:
        """Logits from block ``i``'s output (``blocks[i+1..]`` then ``head``)."""
        i = self._index(i)
        for block in self.blocks[i + 1 :]:
            h = block(h)
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidArgumentError(f"{name}={value!r} is unknown: use one of {choices}.")
    return value  # type: ignore[return-value]


def preact_resnet(
    in_channels: int,
    num_classes: int,
    *,
    dims: int = 2,
    width: int = 16,
    depth: Sequence[int] = (1, 1, 1),
    shortcut: str = "identity",
    norm: str = "batch",
    activation: str = "relu",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreActResNet:
    """Pre-activation ResNet with ``len(depth)`` stages of ``depth[j]`` blocks each.

    Stage ``j`` has ``width · 2^j`` channels; its first block has stride 2 for ``j > 0``. Inputs
    ``(n, in_channels, L)`` (``dims=1``) or ``(n, in_channels, H, W)`` (``dims=2``). Stem: a
    3-wide convolution to ``width`` channels. ``shortcut`` is one of ``"none"``, ``"identity"``,
    ``"projection"``, ``"modified"`` (module docstring). ``norm``: ``"batch"`` (BatchNorm before
    each activation: call ``model.eval()`` before ``gdscope.ntk``), ``"weight"`` (weight norm
    on every convolution and the readout, ``w = g v/‖v‖`` per output channel, initialized to
    the same function as ``"none"``) or ``"none"``. PyTorch's default initialization from a
    private RNG stream seeded with ``seed``; variants with the same seed share their common
    weights exactly.

    >>> net = preact_resnet(1, 10, dims=1, width=4, depth=(1, 1), seed=0)
    >>> net(torch.randn(2, 1, 40)).shape
    torch.Size([2, 10])
    """
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    width = _positive_int(width, "width")
    seed = _seed(seed, optional=True)
    if isinstance(dims, bool) or dims not in (1, 2):
        raise InvalidArgumentError(
            f"dims={dims!r} must be 1 (inputs (n, C, L)) or 2 (inputs (n, C, H, W))."
        )
    if isinstance(depth, (str, bytes, int)) or not hasattr(depth, "__len__") or len(depth) == 0:
        raise InvalidArgumentError(
            f"depth={depth!r} must be a non-empty sequence of blocks per stage, e.g. (1, 1, 1)."
        )
    for d in depth:
        _positive_int(d, "depth entry")
    shortcut = _check_choice(shortcut, "shortcut", SHORTCUTS)
    norm = _check_choice(norm, "norm", NORMS)
    _activation(activation)
    dtype = _check_dtype(dtype)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    batch_norm = norm == "batch"

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        # 1. shared layers, in a fixed order: stem, residual branches, readout
        stem = conv(in_channels, width, 3, padding=1, bias=False)
        blocks: list[PreActBlock] = []
        c_in = width
        for j, count in enumerate(depth):
            c_out = width * 2**j
            for b in range(count):
                stride = 2 if j > 0 and b == 0 else 1
                blocks.append(
                    PreActBlock(
                        c_in, c_out, stride, dims=dims, batch_norm=batch_norm, activation=activation
                    )
                )
                c_in = c_out
        readout = nn.Linear(c_in, num_classes)
        # 2. variant-specific layers: projections of the transition blocks, in block order
        for block in blocks:
            if shortcut == "none":
                continue
            if not block.transition:
                block.shortcut = nn.Identity()
                continue
            args = (block.in_channels, block.out_channels, block.stride, dims)
            if shortcut == "identity":
                block.shortcut = IdentityShortcut(*args)
                continue
            proj = conv(block.in_channels, block.out_channels, 1, stride=block.stride, bias=False)
            block.shortcut = (
                proj if shortcut == "projection" else ModifiedShortcut(PooledShortcut(*args), proj)
            )

    head = nn.Sequential(
        bn(c_in) if batch_norm else nn.Identity(),
        ACTIVATIONS[activation](),
        pool,
        nn.Flatten(),
        readout,
    )
    model = PreActResNet(stem, blocks, head, dims=dims, shortcut=shortcut, norm=norm).to(dtype)
    if norm == "weight":  # after the cast, so that g v/‖v‖ reproduces w to rounding in dtype
        for module in list(model.modules()):
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                weight_norm(module)  # in place
    return model
