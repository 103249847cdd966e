"""Callers of Problem with dict batches (Hugging Face style, via an adapter) and attention.

Each caller is compared with an independent computation: hand-written training loops and
losses (causal shift, mean over non-ignored labels), dense float64 Jacobians and Hessians from
``torch.func``/``torch.autograd.functional`` under the math SDPA backend, or the same analysis of
the equivalent problem in another data layout.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.probes.builtin import AccuracyProbe, LossProbe, SharpnessProbe
from gdscope.probes.certificates import (
    BlockJacobianProbe,
    DataSeparationProbe,
    MarginProbe,
    block_jacobian,
)
from gdscope.probes.kernel import DisparityProbe, NTKSpectrumProbe
from gdscope.problem import ATTENTION_NOTE, math_attention
from gdscope.theory.linearize import linearize
from gdscope.theory.sgd_stability import SampleCurvature
from gdscope.train.sampler import SAMPLERS
from test_adapters import MHA, SDPA, T, TinyLM, V, _flat, _lm_batches

D = torch.float64


# ---------------------------------------------------------------------- oracles
def _joined(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _lm_loss(model, batch):
    """PyTorch's causal-LM cross-entropy written out: mean over non-ignored shifted labels."""
    with math_attention():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    lg = logits[:, :-1].reshape(-1, V)
    lb = batch["labels"][:, 1:].reshape(-1)
    keep = lb != -100
    logp = lg - torch.logsumexp(lg, 1, keepdim=True)
    return -logp[keep, lb[keep]].sum() / keep.sum()


def _token_view(model, batch):
    """Shifted logits and labels of the non-ignored tokens (the rows the loss compares)."""
    with torch.no_grad(), math_attention():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    lg = logits[:, :-1].reshape(-1, V)
    lb = batch["labels"][:, 1:].reshape(-1)
    keep = lb != -100
    return lg[keep], lb[keep]


def _sgd_by_hand(model, loss_of_batch, batches_per_step, lr):
    """Plain GD/SGD: θ ← θ − lr ∇loss; returns the losses before each step."""
    losses = []
    for batch in batches_per_step:
        model.zero_grad()
        loss = loss_of_batch(model, batch)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return losses


def _lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM().to(D).eval()


# ---------------------------------------------------------------------- fit
def test_fit_full_batch_dict_loader_matches_hand_loop():
    model = _lm()
    twin = copy.deepcopy(model)
    batches = _lm_batches()
    prob = gs.Problem.from_hf(model, batches, shift=True)
    res = gs.fit(prob, gs.GD(model.parameters(), lr=0.3), steps=4)
    # full batch: the loss of all the data (mean over all non-ignored tokens), not per batch
    want = _sgd_by_hand(twin, _lm_loss, [_joined(batches)] * 4, 0.3)
    assert res.losses == pytest.approx(want, rel=1e-11)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_fit_mini_batch_dict_full_batch_matches_hand_loop():
    model = _lm(1)
    twin = copy.deepcopy(model)
    data = _joined(_lm_batches())
    prob = gs.Problem.from_hf(model, data, shift=True)
    res = gs.fit(prob, gs.GD(model.parameters(), lr=0.2), steps=5, batch_size=2, seed=7)
    draw = SAMPLERS["fresh"](5, 2, torch.Generator().manual_seed(7))
    batches = []
    for _ in range(5):
        idx = draw()
        batches.append({k: v[idx] for k, v in data.items()})
    want = _sgd_by_hand(twin, _lm_loss, batches, 0.2)
    assert res.sampler == "fresh" and res.losses == pytest.approx(want, rel=1e-11)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [MHA, SDPA])
def test_fit_attention_model_matches_hand_loop(cls):
    torch.manual_seed(2)
    model = cls().to(D)
    twin = copy.deepcopy(model)
    X, Y = torch.randn(6, 3, 4, dtype=D), torch.randn(6, 2, dtype=D)
    prob = gs.Problem(model, "mse", (X, Y))
    res = gs.fit(prob, gs.GD(model.parameters(), lr=0.1), steps=3)

    def loss(m, _):
        return ((m(X) - Y) ** 2).mean()  # the default (fused) kernels: same values

    want = _sgd_by_hand(twin, loss, [None] * 3, 0.1)
    assert res.losses == pytest.approx(want, rel=1e-10)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- tracker and probes
def _accuracy(lg, lb):
    return (lg.argmax(1) == lb).double().mean().item()


def test_tracker_takes_output_objects_and_dict_batches():
    model = _lm(3)
    data = _joined(_lm_batches())
    prob = gs.Problem.from_hf(model, data, shift=True)
    inputs = {k: v for k, v in data.items() if k != "labels"}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = gs.Tracker(prob, [LossProbe(), AccuracyProbe()])
    want = []
    for t in range(3):
        want.append(_accuracy(*_token_view(model, data)))
        opt.zero_grad()
        with math_attention():
            out = model(**inputs)  # SimpleNamespace(loss=None, logits=...)
        loss = prob.loss_fn(out.logits, data["labels"])
        loss.backward()
        opt.step()
        vals = tracker.step(t, opt, loss=loss, outputs=out, targets=data)
        assert vals["accuracy"] == pytest.approx(want[-1], abs=1e-12)
    # without the step's outputs: the current parameters (after the update)
    after = gs.Tracker(prob, [AccuracyProbe()])
    assert after.step(0)["accuracy"] == pytest.approx(_accuracy(*_token_view(model, data)))
    # the ignored (padding) labels do not count: the first sequence of each of the two batches
    # has its last 2 labels ignored, so 5·(T − 1) − 4 shifted labels count
    _, lb = _token_view(model, data)
    assert lb.numel() == 5 * (T - 1) - 4


def test_fit_with_tracker_dict_loader_accuracy_and_loss():
    model = _lm(4)
    twin = copy.deepcopy(model)
    batches = _lm_batches()
    prob = gs.Problem.from_hf(model, batches, shift=True)
    tracker = gs.Tracker(prob, [LossProbe(), AccuracyProbe()])
    gs.fit(prob, gs.GD(model.parameters(), lr=0.3), steps=2, tracker=tracker)
    data = _joined(batches)
    acc0 = _accuracy(*_token_view(twin, data))
    loss0 = _lm_loss(twin, data).item()
    assert tracker.history["loss"][0] == (0, pytest.approx(loss0, rel=1e-11))
    assert tracker.history["accuracy"][0] == (0, pytest.approx(acc0, abs=1e-12))


def test_margin_probe_on_dict_batches():
    model = _lm(5)
    batches = _lm_batches()
    prob = gs.Problem.from_hf(model, batches, shift=True)
    vals = gs.Tracker(prob, [MarginProbe(depth=2)]).step(0)
    lg, lb = _token_view(model, _joined(batches))
    correct = lg.gather(1, lb[:, None]).squeeze(1)
    others = lg.scatter(1, lb[:, None], -float("inf")).max(1).values
    assert vals["margin"] == pytest.approx((correct - others).min().item(), rel=1e-12)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert vals["param_norm"] == pytest.approx(theta.norm().item(), rel=1e-12)


def _emb_jacobian_oracle(model, batch):
    """Per sample: d logits / d (embedding output), dense, by jacrev under math SDPA."""
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    h_all = model.emb(batch["input_ids"]).detach()
    out = []
    for i in range(h_all.shape[0]):
        pad = batch["attention_mask"][i : i + 1] == 0

        def f(h, pad=pad):
            a, _ = model.att(
                h[None],
                h[None],
                h[None],
                attn_mask=causal,
                key_padding_mask=pad,
                need_weights=False,
            )
            return model.head(h[None] + a).reshape(-1)

        with math_attention():
            out.append(torch.func.jacrev(f)(h_all[i]).reshape(T * V, -1))
    return torch.stack(out)


def test_block_jacobian_dict_inputs_from_a_loader():
    model = _lm(6)
    batches = _lm_batches()
    prob = gs.Problem.from_hf(model, batches, shift=True)
    probe = BlockJacobianProbe("emb", samples=4)  # 3 from batch 0, 1 from batch 1
    probe.start(prob)
    assert set(probe._x) == {"input_ids", "attention_mask"}
    first4 = {k: v[:4] for k, v in _joined(batches).items()}
    J = block_jacobian(prob, "emb", probe._x)
    want = _emb_jacobian_oracle(model, first4)
    torch.testing.assert_close(J, want, rtol=1e-10, atol=1e-12)
    sv = probe.singular_values(prob)
    torch.testing.assert_close(sv, torch.linalg.svdvals(want), rtol=1e-9, atol=1e-12)


def test_probes_that_need_tensor_inputs_say_so():
    prob = gs.Problem.from_hf(_lm(7), _lm_batches(), shift=True)
    with pytest.raises(InvalidArgumentError, match="dict batches"):
        gs.Tracker(prob, [DataSeparationProbe()])
    with pytest.raises(InvalidArgumentError, match="adapter"):
        gs.Tracker(prob, [NTKSpectrumProbe()]).step(0)


# ---------------------------------------------------------------------- linearize
@pytest.mark.parametrize("cls", [MHA, SDPA])
def test_linearize_attention_model_against_dense_jacobian(cls):
    torch.manual_seed(8)
    model = cls().to(D).eval()
    X = torch.randn(4, 3, 4, dtype=D)
    lin = linearize(model)
    with torch.no_grad():
        torch.testing.assert_close(lin(X), model(X), rtol=1e-12, atol=1e-13)
        delta = [0.01 * torch.randn_like(p) for p in lin.theta]
        for p, d in zip(lin.theta, delta, strict=True):
            p += d
        got = lin(X)  # forward-mode through attention (eval, no grad: MHA's fast path is off)
    flat, unflat = _flat(model)
    with math_attention():
        J = torch.func.jacrev(lambda t: torch.func.functional_call(model, unflat(t), (X,)))(flat)
        f0 = model(X)
    want = f0 + (J.reshape(-1, flat.numel()) @ torch.cat([d.reshape(-1) for d in delta])).view(
        f0.shape
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and autograd through the jvp trains it
    lin(X).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lin.theta)


def test_linearize_refuses_output_objects_clearly():
    lin = linearize(_lm())
    b = _lm_batches()[0]
    with pytest.raises(InvalidArgumentError, match="logits"):
        lin(b["input_ids"], attention_mask=b["attention_mask"])


def test_linearize_refuses_a_loss_the_model_computed_itself():
    """An output object registered as a pytree (zoo.gpt's) is linearized leaf by leaf; its
    ``loss`` leaf would be the Taylor polynomial of the loss, so labels are refused."""
    from gdscope import zoo

    m = zoo.gpt(7, 5, d_model=8, n_heads=2, n_layers=1, seed=0, dtype=torch.float64)
    lin = linearize(m)
    d = zoo.sequences(3, 5, 7, seed=1)
    with torch.no_grad():
        for p in lin.theta:
            p.add_(0.01 * torch.randn_like(p))
    out = lin(d["input_ids"], attention_mask=d["attention_mask"])
    assert out.loss is None
    torch.testing.assert_close(out.logits, lin(d["input_ids"]), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="computed its own loss"):
        lin(d["input_ids"], attention_mask=d["attention_mask"], labels=d["labels"])


# ---------------------------------------------------------------------- SGD stability
def _unpadded_batches():
    g = torch.Generator().manual_seed(11)
    out = []
    for nb in (3, 3):
        ids = torch.randint(0, V, (nb, T), generator=g)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones(nb, T, dtype=torch.long), "labels": ids}
        )
    return out


def test_sample_hessians_of_dict_problem_against_dense_oracle():
    model = _lm(9)
    data = _joined(_unpadded_batches())
    prob = gs.Problem.from_hf(model, data, shift=True)
    Hs = SampleCurvature(prob).dense()
    flat, unflat = _flat(model)
    for i in (0, 4):
        one = {k: v[i : i + 1] for k, v in data.items()}

        def loss(t, one=one):
            with math_attention():
                out = torch.func.functional_call(
                    model, unflat(t), (one["input_ids"],), {"attention_mask": one["attention_mask"]}
                )
            lg, lb = out.logits[:, :-1].reshape(-1, V), one["labels"][:, 1:].reshape(-1)
            return nn.functional.cross_entropy(lg, lb)

        H = torch.autograd.functional.hessian(loss, flat)
        torch.testing.assert_close(Hs[i], 0.5 * (H + H.T), rtol=1e-9, atol=1e-11)
    # (1/n) Σ H_i = H: equal label counts make the token mean a mean over samples
    Hfull = torch.autograd.functional.hessian(
        lambda t: _lm_loss_functional(model, unflat(t), data), flat
    )
    torch.testing.assert_close(Hs.mean(0), 0.5 * (Hfull + Hfull.T), rtol=1e-9, atol=1e-11)


def _lm_loss_functional(model, params, batch):
    with math_attention():
        out = torch.func.functional_call(
            model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
        )
    lg, lb = out.logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1)
    return nn.functional.cross_entropy(lg, lb)


def test_sgd_stability_dict_loader_equals_full_batch():
    model = _lm(10)
    batches = _unpadded_batches()
    loader_prob = gs.Problem.from_hf(model, batches, shift=True)
    full_prob = gs.Problem.from_hf(model, _joined(batches), shift=True)
    kw = {"lr": 0.5, "batch_size": 2, "exact_limit": 1, "lyapunov_steps": 4, "chains": 2}
    with pytest.warns(RuntimeWarning, match="large for a minimum"):
        a = gs.stability(loader_prob, **kw)
    with pytest.warns(RuntimeWarning, match="large for a minimum"):
        b = gs.stability(full_prob, **kw)
    assert any("gathered into tensors" in n for n in a.notes)
    assert a.wu_ma_e is not None and a.wu_ma_e == pytest.approx(b.wu_ma_e, rel=1e-8)
    assert a.nonuniformity == pytest.approx(b.nonuniformity, rel=1e-8)


def test_sgd_stability_refuses_uneven_label_counts():
    prob = gs.Problem.from_hf(_lm(12), _lm_batches(), shift=True)  # one sequence is padded
    with pytest.warns(RuntimeWarning, match="different numbers"):
        rep = gs.stability(prob, lr=0.1, batch_size=2)
    assert rep.sgd_mean_square_stable is None and rep.wu_ma_e is None
    assert any("ignore_index=-100" in n for n in rep.notes)


def test_sgd_stability_cross_entropy_module_equals_name():
    """``nn.CrossEntropyLoss()`` (ignore_index set) and ``"cross_entropy"`` give one analysis."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    X, Y = torch.randn(8, 3, dtype=D), torch.randint(0, 3, (8,))
    kw = {"lr": 0.1, "batch_size": 2, "lyapunov_steps": 20, "chains": 4}
    with pytest.warns(RuntimeWarning):
        a = gs.stability(gs.Problem(model, nn.CrossEntropyLoss(), (X, Y)), **kw)
    with pytest.warns(RuntimeWarning):
        b = gs.stability(gs.Problem(model, "cross_entropy", (X, Y)), **kw)
    assert a.mean_square_rho is not None
    assert a.mean_square_rho == pytest.approx(b.mean_square_rho, rel=1e-8)
    assert a.wu_ma_e == pytest.approx(b.wu_ma_e, rel=1e-8)


def test_tracker_subset_of_dict_data_against_dense_hessian():
    model = _lm(14)
    data = _joined(_lm_batches())
    prob = gs.Problem.from_hf(model, data, shift=True)
    tracker = gs.Tracker(prob, [SharpnessProbe(1, tol=1e-10, max_matvecs=2000)], subset=[0, 3, 4])
    sub = {k: v[[0, 3, 4]] for k, v in data.items()}  # samples 0 and 3 are padded
    flat, unflat = _flat(model)

    def loss(t):
        with math_attention():
            out = torch.func.functional_call(
                model, unflat(t), (sub["input_ids"],), {"attention_mask": sub["attention_mask"]}
            )
        lg, lb = out.logits[:, :-1].reshape(-1, V), sub["labels"][:, 1:].reshape(-1)
        keep = lb != -100
        logp = lg - torch.logsumexp(lg, 1, keepdim=True)
        return -logp[keep, lb[keep]].sum() / keep.sum()

    top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1].item()
    assert tracker.subset.n == 3 and tracker.subset.adapter is prob.adapter
    assert tracker.step(0)["sharpness"] == pytest.approx(top, rel=1e-8)


@pytest.mark.parametrize("cls", [MHA, SDPA])
def test_kernel_probes_on_attention_models_against_dense_jacobian(cls):
    torch.manual_seed(15)
    model = cls().to(D).eval()
    X, Y = torch.randn(4, 3, 4, dtype=D), torch.randn(4, 2, dtype=D)
    prob = gs.Problem(model, "mse", (X, Y))
    vals = gs.Tracker(prob, [NTKSpectrumProbe(samples=4), DisparityProbe(samples=4)]).step(0)
    flat, unflat = _flat(model)
    with math_attention():
        J = torch.func.jacrev(lambda t: torch.func.functional_call(model, unflat(t), (X,)))(flat)
    J = J.reshape(-1, flat.numel())  # (n·k, P), sample-major
    ev = torch.linalg.eigvalsh(J @ J.T)
    assert vals["ntk_lambda_max"] == pytest.approx(ev[-1].item(), rel=1e-9)
    assert vals["ntk_lambda_min"] == pytest.approx(ev[0].item(), rel=1e-6)
    sv = torch.linalg.svdvals(J)
    assert vals["disparity_sigma_min"] == pytest.approx(sv[-1].item(), rel=1e-6)


# ---------------------------------------------------------------------- predict
class _Logits(nn.Module):
    """input_ids, attention_mask -> logits of a TinyLM (a tensor-output module to linearize)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(ids, mask).logits


@pytest.mark.parametrize(
    "opt_kw", [{"lr": 0.5}, {"lr": 0.3, "momentum": 0.5, "weight_decay": 0.05}]
)
def test_predict_hf_problem_matches_trained_linearized_model(opt_kw):
    """The NTK prediction of a causal LM (shifted rows, ignored labels masked) equals the loss
    of the linearized network trained by the same optimizer (jvp-based, no kernel)."""
    model = _lm(16)
    data = _joined(_lm_batches())
    prob = gs.Problem.from_hf(model, data, shift=True)
    steps = 4
    pred = gs.predict(prob, torch.optim.SGD(model.parameters(), **opt_kw), steps)
    assert pred.loss[0] == pytest.approx(prob.loss().item(), rel=1e-12)
    assert ATTENTION_NOTE in pred.notes
    lin = linearize(_Logits(model))
    opt = torch.optim.SGD(lin.parameters(), **opt_kw)
    want = []
    for _ in range(steps + 1):
        opt.zero_grad()
        lg = lin(data["input_ids"], data["attention_mask"])
        loss = nn.functional.cross_entropy(
            lg[:, :-1].reshape(-1, V), data["labels"][:, 1:].reshape(-1)
        )
        want.append(loss.item())
        loss.backward()
        opt.step()
    torch.testing.assert_close(torch.as_tensor(pred.loss), torch.tensor(want, dtype=D))


def test_predict_hf_problem_refusals():
    model = _lm(17)
    data = _joined(_lm_batches())
    prob = gs.Problem.from_hf(model, data, shift=True)
    with pytest.raises(InvalidArgumentError, match="x_test"):
        gs.predict(prob, gs.GD(model.parameters(), lr=0.1), 2, x_test=data["input_ids"])
    # a list of dict batches is joined: the same prediction as on the joined full batch
    loader = gs.Problem.from_hf(model, _lm_batches(), shift=True)
    a = gs.predict(loader, gs.GD(model.parameters(), lr=0.1), 3)
    b = gs.predict(prob, gs.GD(model.parameters(), lr=0.1), 3)
    torch.testing.assert_close(torch.as_tensor(a.loss), torch.as_tensor(b.loss))
    assert a.loss[0] == pytest.approx(loader.loss().item(), rel=1e-12)
    ragged = [dict(_lm_batches()[0]), {k: v[:, :4] for k, v in _lm_batches()[1].items()}]
    bag = _Bigram().to(D)
    with pytest.raises(InvalidArgumentError, match="do not join"):
        gs.predict(gs.Problem.from_hf(bag, ragged, shift=True), gs.GD(bag.parameters(), lr=0.1), 2)


class _Bigram(nn.Module):
    """An HF-style bigram model (any sequence length)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, V)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.emb(input_ids))


def test_sample_hessians_through_layernorm_against_autograd():
    """Per-sample Hessians by reverse-over-reverse products (H6 R1: forward-over-reverse is
    wrong through the fused LayerNorm kernel in torch 2.13)."""
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    X, Y = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
    prob = gs.Problem(model, "mse", (X, Y))
    Hs = SampleCurvature(prob).dense()
    flat, unflat = _flat(model)
    for i in range(6):

        def loss(t, i=i):
            out = torch.func.functional_call(model, unflat(t), (X[i : i + 1],))
            return ((out - Y[i : i + 1]) ** 2).mean()

        H = torch.autograd.functional.hessian(loss, flat)
        torch.testing.assert_close(Hs[i], H, rtol=1e-9, atol=1e-11)
