"""Small transformers: a causal GPT-style language model and a vision transformer (ViT).

Both are pre-LN stacks of :class:`Block` (``x ← x + Attn(LN(x))``, ``x ← x + MLP(LN(x))``, the
MLP ``Linear(d, r·d) → GELU → Linear(r·d, d)``) with learned position embeddings and a final
LayerNorm; there is no dropout anywhere, so every forward is deterministic (what gdscope's
measurements need). Attention is :func:`torch.nn.functional.scaled_dot_product_attention` with
``h`` heads of size ``d/h``: the fused kernel PyTorch users hit. gdscope's :class:`Problem` and
:func:`gdscope.ntk` switch it to the differentiable math backend themselves
(:func:`gdscope.problem.math_attention`), so the models need no special mode.

Initialization (GPT-2's): every ``Linear`` weight and every embedding ``N(0, init_std²)``, the
two residual projections of each block (attention output, second MLP layer)
``N(0, init_std²/(2·n_layers))``, biases 0, LayerNorms ``(1, 0)``. ``seed`` seeds a private
stream (the global RNG is left as it was).

**GPT** (:func:`gpt`): token and position embeddings, causal self-attention, a readout tied to
the token embedding (``logits = LN(h) Eᵀ``; an untied ``Linear(d, V, bias=False)`` with
``tied=False``). Two calling conventions, one forward:

* ``model(input_ids)`` (``LongTensor (N, T)``, positional, nothing else) returns the logits
  tensor ``(N, T, V)``: what :func:`gdscope.ntk`, ``gs.Problem(model, loss, (X, Y))`` and plain
  training loops use;
* a call the Hugging Face way, with ``attention_mask=`` or ``labels=`` (or ``return_dict=True``),
  returns a :class:`CausalLMOutput` with ``.logits`` and ``.loss`` (``None`` without labels):
  the shifted cross-entropy of ``transformers`` (token ``t`` predicts label ``t + 1``, labels
  ``-100`` ignored, mean over the others). So ``gs.Problem.from_hf(model, loader,
  shift=True)`` measures exactly the loss the model reports. The output object is a pytree
  node (as ``transformers`` registers its ``ModelOutput``): ``torch.func`` transforms and
  :func:`gdscope.linearize` pass it through.

``attention_mask`` (``1`` = token, ``0`` = padding) hides padded keys from every query (each
token still sees itself, so a padded row never has an empty softmax); without it the causal mask
is SDPA's ``is_causal=True``.

**ViT** (:func:`vit`): images ``(N, C, H, W)`` (or flat ``(N, C·H·W)`` rows, e.g. from
:func:`gdscope.zoo.digits`) cut into non-overlapping ``p × p`` patches, each flattened
(channel-major, then rows, then columns) and mapped by ``Linear(C·p², d)``; a learned CLS token
is prepended with ``pool="cls"`` (classified from its final state) or the patch states are
averaged with ``pool="mean"``; non-causal attention; head ``Linear(d, num_classes)``.

>>> import torch
>>> net = gpt(vocab_size=7, seq_len=5, d_model=8, seed=0)
>>> ids = torch.randint(0, 7, (3, 5))
>>> tuple(net(ids).shape)
(3, 5, 7)
>>> out = net(ids, labels=ids)
>>> bool(torch.equal(out.logits, net(ids))), out.loss.ndim
(True, 0)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as _pytree
from torch import Tensor, nn

from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.zoo.models import _check_dtype, _flag, _positive_int, _seed

__all__ = ["GPT", "POOLS", "Block", "CausalLMOutput", "SelfAttention", "ViT", "gpt", "vit"]

POOLS = ("cls", "mean")
IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What :class:`GPT` returns when called the Hugging Face way: ``logits`` ``(N, T, V)`` and
    ``loss`` (shifted cross-entropy, or ``None`` without labels). Reads as ``out.logits`` or
    ``out["logits"]``."""

    logits: Tensor
    loss: Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in ("logits", "loss"):
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> Iterator[str]:
        yield from ("loss", "logits") if self.loss is not None else ("logits",)


# A pytree node (as transformers registers its ModelOutput), so torch.func transforms (jvp,
# vmap, jacrev) and gs.linearize pass the output object through: its leaves are logits and loss.
def _flatten_output(o: CausalLMOutput) -> tuple[list[Tensor], tuple[str, ...]]:
    keys = tuple(k for k in ("logits", "loss") if getattr(o, k) is not None)
    return [getattr(o, k) for k in keys], keys


def _unflatten_output(leaves: Any, keys: tuple[str, ...]) -> CausalLMOutput:
    return CausalLMOutput(**dict(zip(keys, leaves, strict=True)))


_pytree.register_pytree_node(
    CausalLMOutput,
    _flatten_output,
    _unflatten_output,
    serialized_type_name="gdscope.zoo.transformer.CausalLMOutput",
)


def _check_init_std(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise InvalidArgumentError(
            f"init_std={value!r} must be a positive finite number (GPT-2 uses 0.02)."
        )
    return float(value)


def _check_heads(d_model: int, n_heads: int) -> None:
    if d_model % n_heads:
        raise InvalidArgumentError(
            f"d_model={d_model} is not divisible by n_heads={n_heads}: each head gets "
            f"d_model/n_heads features; pick e.g. n_heads={math.gcd(d_model, n_heads)} or "
            f"d_model={n_heads * max(1, round(d_model / n_heads))}."
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention ``softmax(QKᵀ/√(d/h) + M) V`` through
    :func:`torch.nn.functional.scaled_dot_product_attention`, then an output projection.

    ``qkv = Linear(d, 3d)`` (queries, keys, values, each split into ``h`` heads), ``proj =
    Linear(d, d)``. ``causal`` masks future keys; ``key_mask`` (``(N, T)``, true or 1 = attend)
    hides padded keys (the diagonal stays visible).
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool) -> None:
        super().__init__()
        _check_heads(d_model, n_heads)
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        N, T, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).reshape(N, T, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            allowed = key_mask.to(torch.bool)[:, None, None, :] | eye  # (N, 1, T, T)
            if self.causal:
                allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(y.transpose(1, 2).reshape(N, T, d))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}"


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN₁(x))``, then ``+ MLP(LN₂(x))`` (GELU)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


def _init_weights(model: nn.Module, blocks: nn.ModuleList, std: float) -> None:
    """GPT-2's initialization (module docstring), in place."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for b in blocks:
            for proj in (b.attn.proj, b.mlp[2]):  # type: ignore[union-attr, index]
                proj.weight.normal_(0.0, std / math.sqrt(2 * len(blocks)))  # type: ignore[operator]


class GPT(nn.Module):
    """Causal GPT-style language model; see the module docstring and :func:`gpt`."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: int,
        tied: bool,
    ) -> None:
        super().__init__()
        self.vocab_size, self.seq_len, self.tied = vocab_size, seq_len, tied
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, causal=True) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = None if tied else nn.Linear(d_model, vocab_size, bias=False)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(N, T, V)`` next-token logits of ``input_ids`` ``(N, T)``."""
        if not isinstance(input_ids, Tensor) or input_ids.is_floating_point():
            raise InvalidArgumentError(
                f"input_ids must be an integer tensor of token ids (N, T), got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}: pass a LongTensor."
            )
        if input_ids.ndim != 2 or not 1 <= input_ids.shape[1] <= self.seq_len:
            raise ShapeMismatchError(
                f"input_ids has shape {tuple(input_ids.shape)}: the model takes (N, T) with "
                f"1 <= T <= seq_len={self.seq_len}."
            )
        T = input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ShapeMismatchError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                f"{tuple(input_ids.shape)}: pass one 0/1 entry per token."
            )
        positions = torch.arange(T, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x, attention_mask)
        x = self.ln_f(x)
        return x @ self.tok.weight.T if self.head is None else self.head(x)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        return_dict: bool | None = None,
    ) -> Tensor | CausalLMOutput:
        """Logits ``(N, T, V)``; a :class:`CausalLMOutput` when called with ``attention_mask``,
        ``labels`` or ``return_dict=True`` (``return_dict=False`` forces the tensor)."""
        logits = self.logits(input_ids, attention_mask)
        hf = attention_mask is not None or labels is not None
        if not (hf if return_dict is None else return_dict):
            return logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return CausalLMOutput(logits=logits, loss=loss)


class ViT(nn.Module):
    """Vision transformer; see the module docstring and :func:`vit`."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: int,
        num_classes: int,
        pool: str,
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.channels, self.pool = (
            image_size,
            patch_size,
            channels,
            pool,
        )
        self.num_patches = (image_size // patch_size) ** 2
        tokens = self.num_patches + (pool == "cls")
        self.patch = nn.Linear(channels * patch_size**2, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        self.pos = nn.Embedding(tokens, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, causal=False) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def patches(self, x: Tensor) -> Tensor:
        """``(N, num_patches, C·p²)``: row-major patches, each flattened channel-major."""
        C, S, p = self.channels, self.image_size, self.patch_size
        if x.ndim == 2 and x.shape[1] == C * S * S:
            x = x.reshape(-1, C, S, S)
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ShapeMismatchError(
                f"images of shape {tuple(x.shape)}: the model takes (N, {C}, {S}, {S}) or flat "
                f"(N, {C * S * S})."
            )
        g = S // p
        x = x.reshape(-1, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(x.shape[0], g * g, C * p * p)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)``."""
        h = self.patch(self.patches(x))
        if self.cls is not None:
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.pos(torch.arange(h.shape[1], device=h.device))
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return self.head(h[:, 0] if self.cls is not None else h.mean(dim=1))


def _common(
    d_model: object, n_heads: object, n_layers: object, mlp_ratio: object, init_std: object
) -> tuple[int, int, int, int, float]:
    d = _positive_int(d_model, "d_model")
    h = _positive_int(n_heads, "n_heads")
    _check_heads(d, h)
    return (
        d,
        h,
        _positive_int(n_layers, "n_layers"),
        _positive_int(mlp_ratio, "mlp_ratio"),
        _check_init_std(init_std),
    )


def gpt(
    vocab_size: int,
    seq_len: int,
    d_model: int = 32,
    n_heads: int = 2,
    n_layers: int = 2,
    mlp_ratio: int = 4,
    *,
    tied: bool = True,
    init_std: float = 0.02,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> GPT:
    """A causal GPT-style transformer ``input_ids (N, T) ↦ logits (N, T, vocab_size)``.

    ``seq_len`` is the longest sequence (the number of learned positions); ``tied`` reads out
    through the token embedding. No dropout. Called with ``attention_mask=``/``labels=`` it
    returns a :class:`CausalLMOutput` (module docstring), so both ``gs.Problem(model,
    loss, (X, Y))`` on its logits and ``gs.Problem.from_hf(model, batches, shift=True)`` work.
    """
    V = _positive_int(vocab_size, "vocab_size")
    T = _positive_int(seq_len, "seq_len")
    d, h, L, r, std = _common(d_model, n_heads, n_layers, mlp_ratio, init_std)
    tied = _flag(tied, "tied")
    seed = _seed(seed, optional=True)
    dtype = _check_dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = GPT(V, T, d, h, L, r, tied)
        _init_weights(model, model.blocks, std)
    return model.to(dtype)


def vit(
    image_size: int = 8,
    patch_size: int = 4,
    channels: int = 1,
    d_model: int = 32,
    n_heads: int = 2,
    n_layers: int = 2,
    num_classes: int = 10,
    *,
    pool: str = "cls",
    mlp_ratio: int = 4,
    init_std: float = 0.02,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> ViT:
    """A vision transformer ``images (N, C, S, S) or (N, C·S²) ↦ logits (N, num_classes)``.

    Defaults fit scikit-learn's 8×8 digits (:func:`gdscope.zoo.digits`, 1 channel): 4 patches
    of 4×4. ``pool`` is ``"cls"`` (a learned CLS token) or ``"mean"`` (average of the patch
    states). No dropout.
    """
    S = _positive_int(image_size, "image_size")
    p = _positive_int(patch_size, "patch_size")
    if S % p:
        raise InvalidArgumentError(
            f"image_size={S} is not a multiple of patch_size={p}: the patches must tile the "
            f"image; pick a divisor of {S} as patch_size."
        )
    C = _positive_int(channels, "channels")
    classes = _positive_int(num_classes, "num_classes")
    d, h, L, r, std = _common(d_model, n_heads, n_layers, mlp_ratio, init_std)
    if not isinstance(pool, str) or pool not in POOLS:
        raise InvalidArgumentError(f"pool={pool!r} is unknown: use one of {POOLS}.")
    seed = _seed(seed, optional=True)
    dtype = _check_dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ViT(S, p, C, d, h, L, r, classes, pool)
        _init_weights(model, model.blocks, std)
        if model.cls is not None:
            with torch.no_grad():
                model.cls.normal_(0.0, std)
    return model.to(dtype)
