"""Losses as PyTorch writes them (nn modules, functional forms, partials) through Problem.

Oracles: dense float64 Hessians (torch.autograd.functional.hessian of a hand-written loss),
actual torch.optim.SGD training of linear models (exact for predict: constant NTK).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdscope as gs
from gdscope.curvature.products import curvature_operator
from gdscope.errors import InvalidArgumentError

D = torch.float64
N, DIN, K = 6, 3, 4


def _data(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, DIN, generator=g, dtype=D)
    if kind == "mse":
        Y = torch.randn(N, K, generator=g, dtype=D)
    elif kind == "ce":
        Y = torch.randint(0, K, (N,), generator=g)
    else:
        Y = torch.rand(N, K, generator=g, dtype=D)
    return X, Y


def _linear(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(DIN, K).to(D)


def _hand_loss(kind: str, reduction: str, smoothing: float = 0.0):
    """Hand-written losses (no torch loss functions) for the oracles."""

    def mse(o, y):
        s = ((o - y) ** 2).sum()
        return s / o.numel() if reduction == "mean" else s

    def ce(o, y):
        logp = o - torch.logsumexp(o, dim=1, keepdim=True)
        t = torch.zeros_like(o).scatter_(1, y[:, None], 1.0)
        t = (1 - smoothing) * t + smoothing / o.shape[1]
        s = -(t * logp).sum()
        return s / o.shape[0] if reduction == "mean" else s

    def bce(o, y):
        s = (torch.log1p(torch.exp(o)) - y * o).sum()
        return s / o.numel() if reduction == "mean" else s

    return {"mse": mse, "ce": ce, "bce": bce}[kind]


CASES = [
    ("mse", nn.MSELoss, {}),
    ("ce", nn.CrossEntropyLoss, {}),
    ("ce", nn.CrossEntropyLoss, {"label_smoothing": 0.2}),
    ("bce", nn.BCEWithLogitsLoss, {}),
]
FUNCS = {"mse": F.mse_loss, "ce": F.cross_entropy, "bce": F.binary_cross_entropy_with_logits}


def _dense_hessian(model, X, Y, loss):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]

    def f(theta):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            m = s.numel()
            ps[n] = theta[i : i + m].view(s)
            i += m
        return loss(torch.func.functional_call(model, ps, (X,)), Y)

    return torch.autograd.functional.hessian(f, flat)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("kind", "cls", "kw"), CASES)
def test_module_and_functional_losses_match_dense_hessian(kind, cls, kw, reduction):
    model = _linear()
    X, Y = _data(kind)
    H = _dense_hessian(model, X, Y, _hand_loss(kind, reduction, kw.get("label_smoothing", 0.0)))
    forms = [
        cls(reduction=reduction, **kw),
        functools.partial(FUNCS[kind], reduction=reduction, **kw),
    ]
    for loss in forms:
        prob = gs.Problem(model, loss, (X, Y))  # reduction follows the loss
        assert prob.reduction == reduction
        assert (
            prob.loss_name == {"mse": "mse", "ce": "cross_entropy", "bce": "bce_with_logits"}[kind]
        )
        hand = _hand_loss(kind, reduction, kw.get("label_smoothing", 0.0))(model(X), Y)
        torch.testing.assert_close(prob.loss(), hand, rtol=1e-12, atol=1e-14)
        eye = torch.eye(prob.num_params, dtype=D)
        Hm = curvature_operator(prob, "hessian").matmat(eye)
        G = curvature_operator(prob, "ggn").matmat(eye)
        torch.testing.assert_close(Hm, H, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)  # linear model: GGN = H


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_output_hessian_blocks(reduction):
    model = _linear()
    for kind, loss in [
        ("ce", nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)),
        ("bce", nn.BCEWithLogitsLoss(reduction=reduction)),
    ]:
        X, Y = _data(kind)
        prob = gs.Problem(model, loss, (X, Y))
        with torch.no_grad():
            out = model(X)
        Q = prob.output_hessian(out, Y, weight=1.0)
        p = torch.softmax(out, 1) if kind == "ce" else torch.sigmoid(out)
        if kind == "ce":  # softmax Hessian, unchanged by smoothing
            want = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            scale = 1 / N if reduction == "mean" else 1.0
        else:  # diag(σ(1 − σ)), PyTorch's mean is over all n·k elements
            want = torch.diag_embed(p * (1 - p))
            scale = 1 / (N * K) if reduction == "mean" else 1.0
        torch.testing.assert_close(Q, want * scale, rtol=1e-12, atol=1e-14)


def test_q_and_thresholds_identical_for_string_and_module():
    model = _linear()
    X, Y = _data("mse")
    for red in ("mean", "sum"):
        a = gs.Problem(model, "mse", (X, Y), reduction=red)
        for loss in (nn.MSELoss(reduction=red), functools.partial(F.mse_loss, reduction=red)):
            b = gs.Problem(model, loss, (X, Y))
            assert a.q == b.q and a.loss_name == b.loss_name == "mse"
            assert torch.equal(a.loss(), b.loss())
            ea, eb = gs.hessian_eigs(a, k=1), gs.hessian_eigs(b, k=1)
            assert ea.values.tolist() == eb.values.tolist()
            sa, sb = gs.stability(a, lr=0.1), gs.stability(b, lr=0.1)
            assert sa.threshold == sb.threshold and sa.sharpness == sb.sharpness
            if red == "mean":
                sa, sb = (
                    gs.stability(a, lr=0.1, batch_size=3),
                    gs.stability(b, lr=0.1, batch_size=3),
                )
                assert sa.mean_square_threshold == sb.mean_square_threshold
                assert sa.noise_factor == sb.noise_factor
    # F.mse_loss as it is, with Problem's reduction
    c = gs.Problem(model, F.mse_loss, (X, Y), reduction="sum")
    assert c.reduction == "sum" and c.q == 2.0


def test_reduction_conflict_and_refusals():
    model = _linear()
    X, Y = _data("mse")
    gs.Problem(model, nn.MSELoss(reduction="sum"), (X, Y))  # no second reduction needed
    gs.Problem(model, nn.MSELoss(reduction="sum"), (X, Y), reduction="sum")
    with pytest.raises(InvalidArgumentError, match="conflict"):
        gs.Problem(model, nn.MSELoss(reduction="sum"), (X, Y), reduction="mean")
    with pytest.raises(InvalidArgumentError, match="conflict"):
        gs.Problem(model, functools.partial(F.mse_loss, reduction="sum"), (X, Y), reduction="mean")
    with pytest.raises(InvalidArgumentError, match="reduction='none'"):
        gs.Problem(model, nn.MSELoss(reduction="none"), (X, Y))
    Xc, Yc = _data("ce")
    with pytest.raises(InvalidArgumentError, match="weight"):
        gs.Problem(model, nn.CrossEntropyLoss(weight=torch.ones(K, dtype=D)), (Xc, Yc))
    with pytest.raises(InvalidArgumentError, match="pos_weight"):
        gs.Problem(model, nn.BCEWithLogitsLoss(pos_weight=torch.ones(K, dtype=D)), _data("bce"))


def _train(model, loss, X, Y, lr, momentum, steps):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        val = loss(model(X), Y)
        losses.append(val.item())
        val.backward()
        opt.step()
    with torch.no_grad():
        losses.append(loss(model(X), Y).item())
        out = model(X)
    return torch.tensor(losses, dtype=D), out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("kind", "cls", "kw"), CASES)
def test_predict_exact_for_linear_models(kind, cls, kw, reduction):
    X, Y = _data(kind)
    if kind == "ce":  # one ignored label: the mean is over the others
        Y = Y.clone()
        Y[2] = -100
    lr = {"mean": 0.5, "sum": 0.05}[reduction]
    steps = 25
    for momentum in (0.0, 0.5):
        model = _linear()
        loss = cls(reduction=reduction, **kw)
        prob = gs.Problem(model, loss, (X, Y))
        pred = gs.predict(prob, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), 25)
        want, out = _train(model, loss, X, Y, lr, momentum, steps)
        err = float((torch.as_tensor(pred.loss) - want).abs().max() / want.abs().max())
        assert err < 1e-10, err
        torch.testing.assert_close(
            torch.as_tensor(pred.final_outputs), out.reshape(-1), rtol=1e-10, atol=1e-10
        )
