"""The zoo's transformers and token data: shapes, semantics, determinism, refusals.

Measurements on these models against dense oracles are in tests/test_transformer_oracles.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdscope as gs
from gdscope import zoo
from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.problem import math_attention

D = torch.float64
TINY = dict(d_model=8, n_heads=2, n_layers=2, mlp_ratio=2, init_std=0.3, dtype=D)


def _reference_gpt_logits(model: zoo.GPT, ids: torch.Tensor) -> torch.Tensor:
    """The GPT written out by hand: explicit causal softmax attention, per head."""
    T = ids.shape[1]
    x = model.tok.weight[ids] + model.pos.weight[:T]
    for b in model.blocks:
        h = F.layer_norm(x, (x.shape[-1],), b.ln1.weight, b.ln1.bias)
        q, k, v = (h @ b.attn.qkv.weight.T + b.attn.qkv.bias).chunk(3, dim=-1)
        H, dh = b.attn.n_heads, x.shape[-1] // b.attn.n_heads
        heads = []
        for i in range(H):
            sl = slice(i * dh, (i + 1) * dh)
            s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
            heads.append(torch.softmax(s, -1) @ v[..., sl])
        x = x + torch.cat(heads, -1) @ b.attn.proj.weight.T + b.attn.proj.bias
        h = F.layer_norm(x, (x.shape[-1],), b.ln2.weight, b.ln2.bias)
        m1, m2 = b.mlp[0], b.mlp[2]
        x = x + F.gelu(h @ m1.weight.T + m1.bias) @ m2.weight.T + m2.bias
    x = F.layer_norm(x, (x.shape[-1],), model.ln_f.weight, model.ln_f.bias)
    return x @ model.tok.weight.T


def test_gpt_matches_a_hand_written_transformer_and_is_causal():
    model = zoo.gpt(11, 6, **TINY, seed=0)
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    assert out.shape == (3, 6, 11) and out.dtype == D
    with torch.no_grad():
        torch.testing.assert_close(out, _reference_gpt_logits(model, ids), rtol=1e-12, atol=1e-12)
    # causal: changing token 4 changes no logit before position 4
    other = ids.clone()
    other[:, 4] = (other[:, 4] + 1) % 11
    out2 = model(other)
    torch.testing.assert_close(out2[:, :4], out[:, :4], rtol=0, atol=1e-14)
    assert (out2[:, 4:] - out[:, 4:]).abs().max() > 1e-6
    # shorter sequences use the first positions
    torch.testing.assert_close(model(ids[:, :3]), out[:, :3], rtol=1e-12, atol=1e-13)


def test_gpt_tied_readout_and_untied_head():
    tied = zoo.gpt(5, 4, **TINY, seed=1)
    assert tied.head is None and not any("head" in n for n, _ in tied.named_parameters())
    untied = zoo.gpt(5, 4, **TINY, tied=False, seed=1)
    assert isinstance(untied.head, nn.Linear) and untied.head.bias is None
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 5 * 8


def test_gpt_seed_is_deterministic_and_private():
    state = torch.get_rng_state()
    a, b = zoo.gpt(5, 4, seed=3), zoo.gpt(5, 4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    c = zoo.gpt(5, 4, seed=4)
    assert not torch.equal(a.tok.weight, c.tok.weight)
    assert a.tok.weight.dtype == torch.float32  # default dtype
    assert not any(isinstance(m, nn.Dropout) for m in a.modules())


def test_gpt2_initialization_scales():
    model = zoo.gpt(50, 8, d_model=64, n_heads=4, n_layers=3, init_std=0.02, seed=0, dtype=D)
    assert model.tok.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj = torch.cat([b.attn.proj.weight.reshape(-1) for b in model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    assert all(float(b.attn.qkv.bias.abs().max()) == 0 for b in model.blocks)
    assert torch.equal(model.ln_f.weight, torch.ones(64, dtype=D))


def test_gpt_hf_calling_convention():
    model = zoo.gpt(7, 5, **TINY, seed=0)
    data = zoo.sequences(4, 5, 7, seed=0, min_len=3)
    ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]
    plain = model(ids)
    assert isinstance(plain, torch.Tensor)
    out = model(ids, labels=labels)  # HF way: an output object with the shifted loss
    assert isinstance(out, zoo.CausalLMOutput) and out["logits"] is out.logits
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)
    lg, lb = plain[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)
    keep = lb != -100
    want = -torch.log_softmax(lg[keep], -1)[torch.arange(int(keep.sum())), lb[keep]].mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-14)
    assert model(ids, attention_mask=mask).loss is None
    assert isinstance(model(ids, return_dict=True), zoo.CausalLMOutput)
    assert isinstance(model(ids, labels=labels, return_dict=False), torch.Tensor)
    assert list(out.keys()) == ["loss", "logits"]


def test_gpt_attention_mask_hides_padding():
    """With a mask, what sits in padded positions cannot change any real token's logits; a
    full mask gives the same logits as no mask (the is_causal path)."""
    model = zoo.gpt(7, 6, **TINY, seed=2)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding in row 0
    a = model(ids, attention_mask=mask).logits
    ids2 = ids.clone()
    ids2[0, :2] = torch.tensor([5, 2])
    b = model(ids2, attention_mask=mask).logits
    torch.testing.assert_close(a[0, 2:], b[0, 2:], rtol=1e-12, atol=1e-13)
    assert (model(ids2)[0, 2:] - model(ids)[0, 2:]).abs().max() > 1e-6  # unmasked: they do
    torch.testing.assert_close(a[1], model(ids)[1], rtol=1e-12, atol=1e-13)
    assert torch.isfinite(a).all()  # padded rows still attend to themselves


def test_vit_patches_pools_and_flat_input():
    model = zoo.vit(image_size=8, patch_size=4, **TINY, seed=0)
    X, _ = zoo.digits(5, dtype=D)
    images = X.reshape(-1, 1, 8, 8)
    out = model(images)
    assert out.shape == (5, 10)
    torch.testing.assert_close(model(X), out, rtol=0, atol=0)  # flat rows work too
    p = model.patches(images)
    assert p.shape == (5, 4, 16)
    torch.testing.assert_close(p[:, 1], images[:, 0, 0:4, 4:8].reshape(5, 16))  # top right
    torch.testing.assert_close(p[:, 2], images[:, 0, 4:8, 0:4].reshape(5, 16))  # bottom left
    mean = zoo.vit(patch_size=2, pool="mean", **TINY, seed=0)
    assert mean.cls is None and mean.pos.weight.shape[0] == 16
    assert model.cls is not None and model.pos.weight.shape[0] == 5
    rgb = zoo.vit(image_size=4, patch_size=2, channels=3, num_classes=3, **TINY, seed=0)
    assert rgb(torch.randn(2, 3, 4, 4, dtype=D)).shape == (2, 3)


def test_vit_is_not_causal_and_mean_pool_is_permutation_invariant():
    """Without positions, mean pooling and non-causal attention make the output invariant to
    permuting the patches (a causal or position-dependent model would not be)."""
    model = zoo.vit(image_size=4, patch_size=2, pool="mean", **TINY, seed=1)
    with torch.no_grad():
        model.pos.weight.zero_()
    x = torch.randn(3, 1, 4, 4, dtype=D)
    swapped = x.clone()  # exchange the top-left and bottom-right 2×2 patches
    swapped[..., :2, :2], swapped[..., 2:, 2:] = x[..., 2:, 2:], x[..., :2, :2]
    torch.testing.assert_close(model(swapped), model(x), rtol=1e-12, atol=1e-12)


def test_markov_sequences_are_deterministic_and_follow_the_chain():
    a = zoo.sequences(6, 8, 5, seed=3, min_len=4)
    b = zoo.sequences(6, 8, 5, seed=3, min_len=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(zoo.sequences(6, 8, 5, seed=4)["input_ids"], a["input_ids"])
    lengths = a["attention_mask"].sum(1)
    assert bool(((lengths >= 4) & (lengths <= 8)).all())
    assert bool((a["attention_mask"].diff(dim=1) <= 0).all())  # right padding
    assert bool(((a["labels"] == -100) == (a["attention_mask"] == 0)).all())
    assert bool((a["input_ids"][a["attention_mask"] == 0] == 0).all())  # pad_id
    full = zoo.sequences(3, 8, 5)
    assert bool((full["attention_mask"] == 1).all())
    # transitions: empirical frequencies match the chain (20,000 transitions)
    P = zoo.markov_chain(5, chain_seed=0, alpha=0.3)
    torch.testing.assert_close(P.sum(1), torch.ones(5, dtype=D))
    big = zoo.sequences(2000, 11, 5, seed=0)["input_ids"]
    counts = torch.zeros(5, 5, dtype=D)
    counts.index_put_(
        (big[:, :-1].reshape(-1), big[:, 1:].reshape(-1)), torch.ones(1, dtype=D), accumulate=True
    )
    emp = counts / counts.sum(1, keepdim=True)
    assert (emp - P).abs().max() < 0.03
    other = zoo.markov_chain(5, chain_seed=1)
    assert (other - P).abs().max() > 0.1


def test_sequence_loader_batches_and_problem_from_hf():
    data = zoo.sequences(7, 5, 6, seed=1, min_len=2)
    loader = zoo.sequence_loader(data, batch_size=3)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), data["labels"])
    model = zoo.gpt(6, 5, **TINY, seed=0)
    by_loader = gs.Problem.from_hf(model, loader, shift=True)
    full = gs.Problem.from_hf(model, data, shift=True)
    with torch.no_grad(), math_attention():
        own = model(**data).loss
    torch.testing.assert_close(by_loader.loss(), own, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(full.loss(), own, rtol=1e-12, atol=1e-14)
    shuffled = zoo.sequence_loader(data, batch_size=2, shuffle=True, seed=0)
    torch.testing.assert_close(
        gs.Problem.from_hf(model, shuffled, shift=True).loss(), own, rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: zoo.gpt(0, 4), InvalidArgumentError, "vocab_size"),
        (lambda: zoo.gpt(5, 4, d_model=6, n_heads=4), InvalidArgumentError, "divisible"),
        (lambda: zoo.gpt(5, 4, init_std=0.0), InvalidArgumentError, "init_std"),
        (lambda: zoo.gpt(5, 4, tied="yes"), InvalidArgumentError, "tied"),
        (lambda: zoo.gpt(5, 4, dtype=torch.int64), InvalidArgumentError, "dtype"),
        (lambda: zoo.gpt(5, 4)(torch.zeros(2, 5, dtype=torch.long)), ShapeMismatchError, "seq_len"),
        (lambda: zoo.gpt(5, 4)(torch.zeros(2, 4)), InvalidArgumentError, "LongTensor"),
        (
            lambda: zoo.gpt(5, 4)(
                torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3)
            ),
            ShapeMismatchError,
            "attention_mask",
        ),
        (lambda: zoo.vit(image_size=8, patch_size=3), InvalidArgumentError, "patch_size"),
        (lambda: zoo.vit(pool="max"), InvalidArgumentError, "pool"),
        (lambda: zoo.vit()(torch.zeros(2, 1, 4, 4)), ShapeMismatchError, "8, 8"),
        (lambda: zoo.sequences(3, 4, 5, min_len=6), InvalidArgumentError, "min_len"),
        (lambda: zoo.sequences(3, 4, 5, pad_id=5), InvalidArgumentError, "pad_id"),
        (lambda: zoo.markov_chain(4, alpha=-1.0), InvalidArgumentError, "alpha"),
        (lambda: zoo.sequence_loader({}, 2), InvalidArgumentError, "non-empty"),
        (
            lambda: zoo.sequence_loader({"a": torch.zeros(3), "b": torch.zeros(2)}, 2),
            ShapeMismatchError,
            "samples",
        ),
    ],
)
def test_refusals_name_the_argument(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_output_object_is_a_pytree_for_torch_func():
    """CausalLMOutput flattens to its tensors (logits, and loss when present), so torch.func
    transforms take the HF-style call: a jvp's tangent logits equal a finite difference."""
    import torch.utils._pytree as pytree

    model = zoo.gpt(7, 5, **TINY, seed=0)
    data = zoo.sequences(3, 5, 7, seed=0, min_len=3)
    for out in (model(**data), model(data["input_ids"], return_dict=True)):
        leaves, spec = pytree.tree_flatten(out)
        assert len(leaves) == (2 if out.loss is not None else 1)
        back = pytree.tree_unflatten(leaves, spec)
        assert isinstance(back, zoo.CausalLMOutput) and back.logits is out.logits
        assert back.loss is out.loss
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = {n: torch.randn_like(p) for n, p in params.items()}

    def f(ps):
        return torch.func.functional_call(model, ps, (), data)

    with math_attention():
        out, tan = torch.func.jvp(f, (params,), (tangent,))
        eps = 1e-6
        plus = f({n: p + eps * tangent[n] for n, p in params.items()})
        minus = f({n: p - eps * tangent[n] for n, p in params.items()})
    fd = (plus.logits - minus.logits) / (2 * eps)
    torch.testing.assert_close(tan.logits, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(tan.loss, (plus.loss - minus.loss) / (2 * eps), rtol=1e-6, atol=1e-8)
