"""Results carry the problem's notes: attention through the math SDPA backend is visible.

``EigResult`` (hessian_eigs), ``StabilityReport`` (stability) and ``Prediction`` (predict) on an
attention model carry :data:`gdscope.problem.ATTENTION_NOTE`; on an MLP they do not. The values
are checked against dense float64 oracles, so the notes sit on correct results.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.problem import ATTENTION_NOTE
from test_adapters import MHA, SDPA, TinyLM, _dense_hessian, _flat, _lm_batches

D = torch.float64


def _attention_problem(cls=MHA, seed: int = 0) -> gs.Problem:
    torch.manual_seed(seed)
    model = cls().to(D).eval()
    X, Y = torch.randn(6, 3, 4, dtype=D), torch.randn(6, 2, dtype=D)
    return gs.Problem(model, "mse", (X, Y))


def _mlp_problem(seed: int = 0) -> gs.Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)
    X, Y = torch.randn(6, 4, dtype=D), torch.randn(6, 2, dtype=D)
    return gs.Problem(model, "mse", (X, Y))


def _hessian(prob: gs.Problem) -> torch.Tensor:
    X, Y = prob.full_batch

    def loss(ps):
        return ((torch.func.functional_call(prob.model, ps, (X,)) - Y) ** 2).mean()

    return _dense_hessian(prob.model, loss)


@pytest.mark.parametrize("cls", [MHA, SDPA])
def test_eig_result_and_stability_carry_attention_note(cls):
    prob = _attention_problem(cls)
    top = torch.linalg.eigvalsh(_hessian(prob))[-1].item()
    eig = gs.hessian_eigs(prob, k=1, tol=1e-10)
    assert eig.values[0].item() == pytest.approx(top, rel=1e-8)
    assert eig.notes == (ATTENTION_NOTE,)
    rep = gs.stability(prob, lr=0.1)
    assert rep.sharpness == pytest.approx(top, rel=1e-8)
    assert rep.notes[0] == ATTENTION_NOTE
    assert ATTENTION_NOTE in json.dumps(rep.to_dict())
    assert f"note: {ATTENTION_NOTE}" in str(rep)


def test_mlp_results_carry_no_attention_note():
    prob = _mlp_problem()
    assert prob.notes == ()
    top = torch.linalg.eigvalsh(_hessian(prob))[-1].item()
    eig = gs.hessian_eigs(prob, k=1, tol=1e-10)
    assert eig.values[0].item() == pytest.approx(top, rel=1e-8)
    assert eig.notes == ()
    rep = gs.stability(prob, lr=0.1)
    assert ATTENTION_NOTE not in rep.notes
    pred = gs.predict(prob, gs.GD(prob.model.parameters(), lr=0.1), 4)
    assert ATTENTION_NOTE not in pred.notes


def test_prediction_carries_attention_note_and_matches_dense_kernel():
    prob = _attention_problem(MHA, seed=1)
    X, Y = prob.full_batch
    lr, steps = 0.2, 5
    pred = gs.predict(prob, gs.GD(prob.model.parameters(), lr=lr), steps)
    assert ATTENTION_NOTE in pred.notes
    # oracle: the linearized MSE recursion r ← (I − lr·q·K) r with K = J Jᵀ from a dense J
    flat, unflat = _flat(prob.model)
    with gs.problem.math_attention():
        J = torch.func.jacrev(lambda t: torch.func.functional_call(prob.model, unflat(t), (X,)))(
            flat
        )
        f0 = prob.model(X).detach()
    J = J.reshape(-1, flat.numel())
    K = J @ J.T
    r = (f0 - Y).reshape(-1)
    q = prob.q
    losses = []
    for _ in range(steps + 1):
        losses.append((q / 2 * r @ r).item())
        r = r - lr * q * K @ r
    torch.testing.assert_close(torch.as_tensor(pred.loss), torch.tensor(losses, dtype=D))


def test_hf_problem_results_carry_attention_note():
    torch.manual_seed(0)
    prob = gs.Problem.from_hf(TinyLM().to(D).eval(), _lm_batches(), shift=True)
    assert gs.hessian_eigs(prob, k=1, tol=1e-6).notes == (ATTENTION_NOTE,)
    assert ATTENTION_NOTE in gs.stability(prob, lr=0.05).notes


def test_gd_map_report_carries_attention_note():
    prob = _attention_problem(MHA, seed=2)
    h = torch.linalg.eigvalsh(_hessian(prob))
    lr = 0.5 / h[-1].item() + 0.5 / h[-2].item()  # 1/lr between the top two eigenvalues
    rep = gs.gd_map(prob, lr)
    assert rep.count_above == 1 and rep.sign == -1
    assert rep.notes == (ATTENTION_NOTE,)
    assert gs.gd_map(_mlp_problem(), 0.1).notes == ()


def test_preconditioned_sharpness_is_not_faked_at_lr_zero():
    """H5 R1: at lr = 0 (the end of a linear schedule) nothing is measured: no value, no inf
    threshold; with lr > 0 the value is λ_max(P^{-1/2} H P^{-1/2}) of the dense Hessian."""
    from gdscope.probes.builtin import PreconditionedSharpnessProbe, ThresholdProbe
    from gdscope.theory.optim import read_optimizer

    prob = _mlp_problem(5)
    opt = torch.optim.Adam(prob.model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        prob.loss(dict(prob.model.named_parameters())).backward()
        opt.step()
    probes = [ThresholdProbe(), PreconditionedSharpnessProbe(tol=1e-10, max_matvecs=500)]
    vals = gs.Tracker(prob, probes).step(0, opt)
    named = dict(prob.model.named_parameters())
    st = read_optimizer(opt, [named[n] for n in prob.names], prob.names)
    d = st.precond.rsqrt()
    want = torch.linalg.eigvalsh(d[:, None] * _hessian(prob) * d[None, :])[-1].item()
    assert vals["preconditioned_sharpness"] == pytest.approx(want, rel=1e-8)
    assert vals["preconditioned_threshold"] == pytest.approx(st.threshold)
    for g in opt.param_groups:
        g["lr"] = 0.0
    probes = [ThresholdProbe(), PreconditionedSharpnessProbe()]
    vals = gs.Tracker(prob, probes).step(0, opt)
    assert vals["lr"] == 0.0
    assert not any(k.startswith(("preconditioned_", "threshold")) for k in vals)
