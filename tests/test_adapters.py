"""Attention models (fused SDPA kernels) and Hugging Face style models through Problem.

Oracles: dense float64 Hessians/Jacobians of hand-written losses (torch.autograd.functional,
torch.func.jacrev) evaluated under the math SDPA backend.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdscope as gs
from gdscope.curvature.products import curvature_operator
from gdscope.probes.builtin import SharpnessProbe
from gdscope.problem import ATTENTION_NOTE, math_attention

D = torch.float64


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.att(x, x, x, need_weights=False)
        return self.head(y).mean(1)


class SDPA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 2)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).flatten(2)).mean(1)


def _flat(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def unflat(theta):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return ps

    return flat, unflat


def _dense_hessian(model, loss_of_params):
    flat, unflat = _flat(model)
    with math_attention():
        return torch.autograd.functional.hessian(lambda t: loss_of_params(unflat(t)), flat)


@pytest.mark.parametrize("cls", [MHA, SDPA])
def test_attention_models_measure_against_dense_oracle(cls):
    torch.manual_seed(0)
    model = cls().to(D).eval()
    X = torch.randn(5, 3, 4, dtype=D)
    Y = torch.randn(5, 2, dtype=D)
    prob = gs.Problem(model, "mse", (X, Y))
    assert prob.notes == (ATTENTION_NOTE,)

    def loss(ps):
        out = torch.func.functional_call(model, ps, (X,))
        return ((out - Y) ** 2).mean()

    H = _dense_hessian(model, loss)
    top = torch.linalg.eigvalsh(H)[-1]
    eig = gs.hessian_eigs(prob, k=1, tol=1e-10)
    assert abs(eig.values[0].item() - top.item()) < 1e-8 * top.abs().item()
    rep = gs.stability(prob, lr=0.1)
    assert rep.sharpness == pytest.approx(top.item(), rel=1e-8)
    eye = torch.eye(prob.num_params, dtype=D)
    Hm = curvature_operator(prob, "hessian").matmat(eye)
    torch.testing.assert_close(Hm, H, rtol=1e-9, atol=1e-11)
    # GGN (forward mode) vs J^T Q J with a dense Jacobian
    flat, unflat = _flat(model)
    with math_attention():
        J = torch.func.jacrev(lambda t: torch.func.functional_call(model, unflat(t), (X,)))(flat)
    J = J.reshape(-1, flat.numel())
    G = curvature_operator(prob, "ggn").matmat(eye)
    torch.testing.assert_close(G, J.T @ J * prob.q, rtol=1e-9, atol=1e-11)
    # NTK by the Jacobian and by NTK-vector products (forward mode)
    Kd = (J @ J.T).reshape(5, 2, 5, 2).permute(0, 2, 1, 3)
    for method in ("jacobian", "vp"):
        torch.testing.assert_close(gs.ntk(model, X, method=method), Kd, rtol=1e-9, atol=1e-11)
    # a tracker step with the sharpness probe
    tracker = gs.Tracker(prob, [SharpnessProbe(1, tol=1e-10, max_matvecs=2000)])
    vals = tracker.step(0)
    assert vals["sharpness"] == pytest.approx(top.item(), rel=1e-8)


def test_math_attention_restores_settings():
    before = torch.backends.mha.get_fastpath_enabled()
    with math_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before


# --------------------------------------------------------------------- Hugging Face style
V, T, E = 7, 5, 4


class TinyLM(nn.Module):
    """Embedding + one causal attention layer + linear head; its own loss as transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.att = nn.MultiheadAttention(E, 2, batch_first=True)
        self.head = nn.Linear(E, V)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.emb(input_ids)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        pad = None if attention_mask is None else attention_mask == 0
        a, _ = self.att(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)
        logits = self.head(h + a)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return SimpleNamespace(loss=loss, logits=logits)


def _lm_batches():
    g = torch.Generator().manual_seed(3)
    batches = []
    for nb in (3, 2):
        ids = torch.randint(0, V, (nb, T), generator=g)
        mask = torch.ones(nb, T, dtype=torch.long)
        mask[0, -2:] = 0  # padding at the end of the first sequence
        labels = ids.clone()
        labels[mask == 0] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_hf_causal_lm_loss_hessian_ggn_ntk():
    torch.manual_seed(0)
    model = TinyLM().to(D).eval()
    batches = _lm_batches()
    prob = gs.Problem.from_hf(model, batches, shift=True)
    same = gs.Problem(model, nn.CrossEntropyLoss(), batches, adapter=gs.adapters.hf(shift=True))
    assert prob.notes == (ATTENTION_NOTE,) and prob.n == 5
    # PyTorch's loss: mean over all non-ignored (shifted) labels of the data set
    with torch.no_grad(), math_attention():
        ids = torch.cat([b["input_ids"] for b in batches])
        mask = torch.cat([b["attention_mask"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        own = model(ids, mask, labels).loss
    torch.testing.assert_close(prob.loss(), own, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(same.loss(), own, rtol=1e-12, atol=1e-14)
    assert prob.units == int((labels[:, 1:] != -100).sum())

    flat, unflat = _flat(model)

    def loss(ps):
        out = torch.func.functional_call(model, ps, (ids,), {"attention_mask": mask})
        lg = out.logits[:, :-1].reshape(-1, V)
        lb = labels[:, 1:].reshape(-1)
        keep = lb != -100
        logp = lg - torch.logsumexp(lg, 1, keepdim=True)
        return -logp[keep, lb[keep]].sum() / keep.sum()

    H = _dense_hessian(model, loss)
    eye = torch.eye(prob.num_params, dtype=D)
    Hm = curvature_operator(prob, "hessian").matmat(eye)
    torch.testing.assert_close(Hm, H, rtol=1e-9, atol=1e-11)
    top = torch.linalg.eigvalsh(H)[-1]
    eig = gs.hessian_eigs(prob, k=1, tol=1e-10)
    assert abs(eig.values[0].item() - top.item()) < 1e-8 * top.abs().item()

    # GGN: J^T Q J with Q from hand-written softmax Hessians on non-ignored tokens / count
    def logits_of(t):
        out = torch.func.functional_call(model, unflat(t), (ids,), {"attention_mask": mask})
        return out.logits

    with math_attention():
        J = torch.func.jacrev(logits_of)(flat).reshape(-1, flat.numel())  # (n·T·V, P)
        lg = logits_of(flat).detach()
    p = torch.softmax(lg, -1)
    blocks = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # (n, T, V, V)
    keep = torch.zeros(5, T, dtype=D)
    keep[:, :-1] = (labels[:, 1:] != -100).to(D)  # token t predicts label t + 1
    blocks = blocks * keep[..., None, None] / keep.sum()
    Q = torch.block_diag(*blocks.reshape(-1, V, V))
    G = curvature_operator(prob, "ggn").matmat(eye)
    torch.testing.assert_close(G, J.T @ Q @ J, rtol=1e-9, atol=1e-11)
    # output_hessian blocks agree with Q, batch by batch
    i = 0
    for x, y, w in prob.batches():
        out = prob.forward(prob.params, x)
        Qb = prob.output_hessian(out, y, weight=w)
        nb = out.shape[0]
        want = blocks[i : i + nb]  # (nb, T, V, V) -> (nb, T·V, T·V) block diagonal
        full = torch.stack([torch.block_diag(*want[j]) for j in range(nb)])
        torch.testing.assert_close(Qb, full, rtol=1e-10, atol=1e-13)
        i += nb

    # NTK on the logits of unpadded sequences (samples 1, 2): a module input_ids -> logits
    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(x).logits

    assert bool((mask[1:3] == 1).all())
    K = gs.ntk(Logits(model), ids[1:3], method="jacobian")
    J2 = J.reshape(5, T * V, -1)[1:3].reshape(2 * T * V, -1)
    Kd = (J2 @ J2.T).reshape(2, T * V, 2, T * V).permute(0, 2, 1, 3)
    torch.testing.assert_close(K, Kd, rtol=1e-9, atol=1e-11)


def test_adapter_refusals():
    model = TinyLM().to(D).eval()
    batches = _lm_batches()
    with pytest.raises(gs.errors.InvalidArgumentError, match="adapter"):
        gs.Problem(model, nn.CrossEntropyLoss(), batches)  # dict batches without an adapter
    bad = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(gs.errors.InvalidArgumentError, match="labels"):
        gs.Problem.from_hf(model, bad)
    prob = gs.Problem.from_hf(model, batches, shift=True)
    with pytest.raises(gs.errors.InvalidArgumentError, match="x_test"):
        gs.predict(
            prob,
            torch.optim.SGD(model.parameters(), lr=0.1),
            3,
            x_test=batches[0]["input_ids"],
        )


def test_outputs_of_dict_batches_are_each_sequence_flattened():
    model = TinyLM().to(D).eval()
    batches = _lm_batches()
    prob = gs.Problem.from_hf(model, batches, shift=True)
    out = prob.outputs()
    with torch.no_grad():
        direct = torch.cat([model(b["input_ids"], b["attention_mask"]).logits for b in batches])
    assert out.shape == (5, T * V)
    torch.testing.assert_close(out, direct.reshape(5, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_mean_is_pytorchs_and_vmappable(smoothing):
    """nn.CrossEntropyLoss() (ignore_index -100) per sample under vmap: per-sample Hessians of
    the problem's criterion equal those of F.cross_entropy; an all-ignored batch has loss 0."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    X = torch.randn(6, 3, dtype=D)
    Y = torch.tensor([0, 2, -100, 1, 1, 2])
    prob = gs.Problem(model, nn.CrossEntropyLoss(label_smoothing=smoothing), (X, Y))
    o = model(X).detach()
    ref = F.cross_entropy(o, Y, label_smoothing=smoothing)
    torch.testing.assert_close(prob.loss_fn(o, Y), ref, rtol=1e-13, atol=1e-13)
    assert prob.loss_fn(o[:1], torch.tensor([-100])).item() == 0.0

    def per(oi, yi):
        return prob.loss_fn(oi[None], yi[None])

    H = torch.func.vmap(torch.func.hessian(per))(o, Y)
    for i in range(6):
        if Y[i] == -100:
            assert H[i].abs().max() == 0
            continue
        Hi = torch.autograd.functional.hessian(
            lambda oi, i=i: F.cross_entropy(oi[None], Y[i : i + 1], label_smoothing=smoothing), o[i]
        )
        torch.testing.assert_close(H[i], Hi, rtol=1e-12, atol=1e-13)
    rep = gs.stability(prob, lr=0.1, batch_size=2)  # per-sample Hessians through vmap
    assert rep.sharpness > 0
    with pytest.raises(gs.errors.ShapeMismatchError, match="cannot compare"):
        prob.loss_fn(o, Y[:4])
