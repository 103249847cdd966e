"""Every gdscope measurement on the zoo transformers against dense float64 oracles.

Three cases: the zoo GPT on tensors (MSE against one-hot next tokens), the zoo ViT on 8×8 digits
(cross-entropy), and the same GPT through dict batches with padding (``gs.Problem.from_hf``,
shifted cross-entropy with ``-100`` labels, a ``DataLoader`` of two batches).

Oracle, the same for all three: ``L(θ) = ℓ(F(θ))`` written out by hand, ``F`` all the model's
logits as a function of a flat parameter vector (``torch.func.functional_call`` under
:func:`math_attention`), ``H = ∇²L`` by ``torch.autograd.functional.hessian``, ``J = ∂F/∂θ`` by
``torch.func.jacrev``, ``Q = ∇²ℓ(F)`` by ``hessian`` of the hand-written ``ℓ`` (so the GGN
oracle ``JᵀQJ`` shares nothing with gdscope's forward-mode GGN), eigenvalues by ``eigvalsh``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gdscope as gs
from gdscope import zoo
from gdscope.curvature.products import curvature_operator
from gdscope.probes.builtin import SharpnessProbe, default_probes
from gdscope.problem import ATTENTION_NOTE, math_attention

D = torch.float64
V, T = 7, 5  # GPT vocabulary and sequence length
SMALL = dict(d_model=4, n_heads=2, n_layers=1, mlp_ratio=2, init_std=0.5, dtype=D)


# ----------------------------------------------------------------------------- oracle helpers
def _flat(model: nn.Module) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def unflat(theta: Tensor) -> dict[str, Tensor]:
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return ps

    return flat, unflat


@dataclass
class Case:
    """A problem and its hand-written oracle ``L = ell(logits(θ))``."""

    name: str
    model: nn.Module
    prob: gs.Problem
    logits: Callable[[nn.Module, dict[str, Tensor]], Tensor]  # all logits F at params
    ell: Callable[[Tensor], Tensor]  # the loss as a function of F
    x_ntk: Tensor  # what gs.ntk gets (the model's positional input)
    make: Callable[[nn.Module], gs.Problem]  # the same problem (loss, data) on another model

    def F_of(self, model: nn.Module | None = None) -> Callable[[Tensor], Tensor]:
        model = self.model if model is None else model
        _, unflat = _flat(model)
        return lambda t: self.logits(model, unflat(t))

    def dense(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """``H``, ``J`` (rows: all logits), ``Q``, ``G = JᵀQJ``, ``grad`` at ``model``'s params."""
        model = self.model if model is None else model
        flat, _ = _flat(model)
        f = self.F_of(model)
        with math_attention():
            H = torch.autograd.functional.hessian(lambda t: self.ell(f(t)), flat, vectorize=True)
            g = torch.autograd.functional.jacobian(lambda t: self.ell(f(t)), flat)
            J = torch.func.jacrev(f)(flat).reshape(-1, flat.numel())
            F0 = f(flat).detach()
        Q = torch.autograd.functional.hessian(
            lambda z: self.ell(z.reshape(F0.shape)), F0.reshape(-1), vectorize=True
        )
        return {"H": H, "J": J, "Q": Q, "G": J.T @ Q @ J, "grad": g, "F": F0}


def _gpt(tied: bool = True, seed: int = 0) -> zoo.GPT:
    return zoo.gpt(V, T, **SMALL, tied=tied, seed=seed).eval()


def _gpt_case() -> Case:
    model = _gpt()
    data = zoo.sequences(4, T, V, seed=1)
    ids = data["input_ids"]
    Y = F.one_hot(ids.roll(-1, 1), V).to(D)  # MSE against the next token, one-hot
    make = lambda m: gs.Problem(m, "mse", (ids, Y))  # noqa: E731
    prob = make(model)

    def logits(m: nn.Module, ps: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(m, ps, (ids,))

    return Case("gpt", model, prob, logits, lambda z: ((z - Y) ** 2).mean(), ids, make)


def _vit_case() -> Case:
    model = zoo.vit(patch_size=4, **SMALL, seed=0).eval()
    X, y = zoo.digits(6, one_hot=False, seed=2, dtype=D)
    images = X.reshape(-1, 1, 8, 8)
    make = lambda m: gs.Problem(m, "cross_entropy", (images, y))  # noqa: E731
    prob = make(model)

    def logits(m: nn.Module, ps: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(m, ps, (images,))

    def ell(z: Tensor) -> Tensor:
        logp = z - torch.logsumexp(z, 1, keepdim=True)
        return -logp[torch.arange(len(y)), y].mean()

    return Case("vit", model, prob, logits, ell, images, make)


def _hf_data() -> dict[str, Tensor]:
    return zoo.sequences(5, T, V, seed=3, min_len=3)


def _hf_case(data: dict[str, Tensor] | None = None, name: str = "gpt_hf") -> Case:
    """The GPT through from_hf on a DataLoader (default: padded sequences, -100 labels)."""
    model = _gpt(seed=1)
    data = _hf_data() if data is None else data
    loader = zoo.sequence_loader(data, batch_size=3)
    make = lambda m: gs.Problem.from_hf(m, loader, shift=True)  # noqa: E731
    prob = make(model)
    ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]

    def logits(m: nn.Module, ps: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(m, ps, (ids,), {"attention_mask": mask}).logits

    def ell(z: Tensor) -> Tensor:
        lg = z[:, :-1].reshape(-1, V)
        lb = labels[:, 1:].reshape(-1)
        keep = lb != -100
        logp = lg - torch.logsumexp(lg, 1, keepdim=True)
        return -logp[keep, lb[keep]].sum() / keep.sum()

    return Case(name, model, prob, logits, ell, ids, make)


BUILDERS = {"gpt": _gpt_case, "vit": _vit_case, "gpt_hf": _hf_case}
#: full-length sequences: every sequence holds as many labels, so SGD's uniform sampling applies
SGD_BUILDERS = {
    **BUILDERS,
    "gpt_hf_full": lambda: _hf_case(zoo.sequences(4, T, V, seed=3), "gpt_hf_full"),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request: pytest.FixtureRequest) -> tuple[Case, dict[str, Tensor]]:
    c = BUILDERS[request.param]()
    return c, c.dense()


# ----------------------------------------------------------------------------- the problem
def test_problem_loss_gradient_and_notes(case):
    c, d = case
    assert c.prob.notes == (ATTENTION_NOTE,)  # SDPA found and switched to math
    flat, _ = _flat(c.model)
    with math_attention():
        want = c.ell(c.F_of()(flat))
    torch.testing.assert_close(c.prob.loss(), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c.prob.gradient(), d["grad"], rtol=1e-10, atol=1e-12)


def test_hf_loss_is_the_models_own_loss():
    """from_hf measures exactly the shifted cross-entropy the GPT reports with labels=."""
    c = _hf_case()
    data = _hf_data()
    with torch.no_grad():
        own = c.model(**data).loss
    torch.testing.assert_close(c.prob.loss(), own, rtol=1e-12, atol=1e-14)
    assert c.prob.units == int((data["labels"][:, 1:] != -100).sum())


# ----------------------------------------------------------------------------- NTK
def _ntk_oracle(model: nn.Module, x: Tensor) -> Tensor:
    flat, unflat = _flat(model)
    with math_attention():
        J = torch.func.jacrev(lambda t: torch.func.functional_call(model, unflat(t), (x,)))(flat)
    n = x.shape[0]
    J = J.reshape(n, -1, flat.numel())
    k = J.shape[1]
    return torch.einsum("iap,jbp->ijab", J, J), J.reshape(n * k, -1)


@pytest.mark.parametrize("method", ["auto", "jacobian", "vp", "structured"])
def test_ntk_every_method(case, method):
    c, _ = case
    K, _ = _ntk_oracle(c.model, c.x_ntk)
    if method == "structured":
        # the tied readout (GPT) and the CLS token (ViT) are parameters used outside their
        # module: no structured rule covers them, and the refusal says what to use instead
        with pytest.raises(gs.errors.InvalidArgumentError, match="auto"):
            gs.ntk(c.model, c.x_ntk, method=method)
        return
    got = gs.ntk(c.model, c.x_ntk, method=method)
    torch.testing.assert_close(got, K, rtol=1e-9, atol=1e-11)
    tr = gs.ntk(c.model, c.x_ntk, method=method, trace_outputs=True)
    torch.testing.assert_close(tr, K.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("which", ["gpt_untied", "vit_mean"])
@pytest.mark.parametrize("method", ["structured", "auto"])
def test_ntk_structured_where_every_parameter_has_a_rule(which, method):
    """Untied GPT and mean-pooled ViT: every parameter sits in a module with a rule."""
    if which == "gpt_untied":
        model: nn.Module = _gpt(tied=False)
        x = zoo.sequences(3, T, V, seed=4)["input_ids"]
    else:
        model = zoo.vit(patch_size=2, pool="mean", **SMALL, seed=0).eval()
        x = zoo.digits(3, one_hot=False, dtype=D)[0]
    K, _ = _ntk_oracle(model, x)
    torch.testing.assert_close(gs.ntk(model, x, method=method), K, rtol=1e-9, atol=1e-11)
    x2 = x.flip(0)[:2]
    K2 = _ntk_oracle_cross(model, x, x2)
    torch.testing.assert_close(gs.ntk(model, x, x2, method=method), K2, rtol=1e-9, atol=1e-11)


def _ntk_oracle_cross(model: nn.Module, x: Tensor, x2: Tensor) -> Tensor:
    _, J1 = _ntk_oracle(model, x)
    _, J2 = _ntk_oracle(model, x2)
    k = J1.shape[0] // x.shape[0]
    return (J1 @ J2.T).reshape(x.shape[0], k, x2.shape[0], k).permute(0, 2, 1, 3)


def _singular_by_oracle(J: Tensor) -> bool:
    """The LAPACK rank rule on the dense float64 ``J``, refusing borderline cases."""
    s = torch.linalg.svdvals(J)
    tau = max(J.shape) * torch.finfo(D).eps * s[0].item()
    assert not 1e-3 * tau < s[-1].item() < 1e3 * tau, "borderline rank: pick other data"
    return s[-1].item() <= tau


def _wide_gpt() -> tuple[nn.Module, Tensor]:
    """d_model 8 and distinct first tokens: J has full row rank (nk = 105 < P)."""
    model = zoo.gpt(V, T, **{**SMALL, "d_model": 8}, seed=0).eval()
    return model, torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2], [0, 1, 1, 2, 3]])


def _wide_vit() -> tuple[nn.Module, Tensor]:
    model = zoo.vit(patch_size=4, **{**SMALL, "d_model": 8}, seed=0).eval()
    return model, zoo.digits(3, one_hot=False, seed=2, dtype=D)[0]


def _ntk_subjects(which: str) -> tuple[nn.Module, Tensor]:
    """The oracle cases (d_model 4: a narrow bottleneck, J rank-deficient) and wide models."""
    if which == "gpt_wide":
        return _wide_gpt()
    if which == "vit_wide":
        return _wide_vit()
    c = BUILDERS[which]()
    return c.model, c.x_ntk


NTK_SUBJECTS = ["gpt", "vit", "gpt_wide", "vit_wide"]


@pytest.mark.parametrize("dense_limit", [2000, 0], ids=["dense", "lanczos"])
@pytest.mark.parametrize("which", NTK_SUBJECTS)
def test_ntk_eigs(which, dense_limit):
    model, x = _ntk_subjects(which)
    _, J = _ntk_oracle(model, x)
    lam = torch.linalg.eigvalsh(J @ J.T)
    res = gs.ntk_eigs(
        model, x, k=2, which="both", tol=1e-12, dense_limit=dense_limit, max_matvecs=200
    )
    assert res.lambda_max == pytest.approx(lam[-1].item(), rel=1e-8)
    assert not res.lambda_max_is_lower_bound
    singular = _singular_by_oracle(J)
    assert singular is (which in ("gpt", "vit"))  # the narrow ones are, the wide ones not
    # a Ritz value is an upper bound on λ_min, converged or not
    assert res.lambda_min is not None and res.lambda_min >= lam[0].item() - 1e-9 * lam[-1].item()
    if singular:  # decided (dense: from the SVD of J) or undetermined (Lanczos), never False
        assert res.singular is True if dense_limit else res.singular in (True, None)
        if res.singular:
            assert abs(res.lambda_min) <= 1e-9 * lam[-1].item()
    elif not res.lambda_min_is_upper_bound:  # converged: the value and the decision
        assert res.singular is False
        assert res.lambda_min == pytest.approx(lam[0].item(), rel=1e-6)
    else:  # the budget ran out resolving a tiny λ_min (cond ~1e7): flagged, undecided
        assert dense_limit == 0 and res.singular is None
    if dense_limit:
        assert not res.lambda_min_is_upper_bound


@pytest.mark.parametrize("which", NTK_SUBJECTS)
def test_disparity(which):
    model, x = _ntk_subjects(which)
    _, J = _ntk_oracle(model, x)
    rep = gs.disparity(model, x)
    s = torch.linalg.svdvals(J)
    assert rep.sigma_max == pytest.approx(s[0].item(), rel=1e-10)
    singular = _singular_by_oracle(J)
    assert rep.full_rank is (not singular)
    assert rep.rank == int((s > rep.tol).sum())
    if not singular:  # σ_min² = λ_min(K)
        assert rep.sigma_min == pytest.approx(s[-1].item(), rel=1e-8)
        lam_min = torch.linalg.eigvalsh(J @ J.T)[0].item()
        assert rep.sigma_min**2 == pytest.approx(lam_min, rel=1e-6)
    else:
        assert rep.sigma_min <= rep.tol


def test_gpt_ntk_is_singular_exactly_when_two_sequences_share_a_first_token():
    """Causal attention: position 0 sees only its own token, so two sequences starting with the
    same token have equal position-0 logits, equal Jacobian rows, and a singular NTK."""
    model, ids = _wide_gpt()
    assert gs.disparity(model, ids).full_rank is True
    same = ids.clone()
    same[2, 0] = 1  # now sequences 0 and 2 share their first token
    rep = gs.disparity(model, same)
    assert rep.full_rank is False and rep.rank == min(rep.shape) - V
    K = gs.ntk(model, same)
    torch.testing.assert_close(K[0, 0, :V, :V], K[2, 2, :V, :V], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- Hessian
def test_hessian_and_ggn_operators(case):
    c, d = case
    M = torch.randn(c.prob.num_params, 6, dtype=D, generator=torch.Generator().manual_seed(0))
    Hm = curvature_operator(c.prob, "hessian").matmat(M)
    torch.testing.assert_close(Hm, d["H"] @ M, rtol=1e-9, atol=1e-11)
    Gm = curvature_operator(c.prob, "ggn").matmat(M)
    torch.testing.assert_close(Gm, d["G"] @ M, rtol=1e-9, atol=1e-11)


def test_hessian_eigs_top_bottom_and_ggn(case):
    c, d = case
    h = torch.linalg.eigvalsh(d["H"])
    scale = h.abs().max().item()
    top = gs.hessian_eigs(c.prob, k=3, tol=1e-10)
    assert top.converged
    torch.testing.assert_close(top.values.double(), h[-3:].flip(0), rtol=0, atol=1e-8 * scale)
    low = gs.hessian_eigs(c.prob, k=2, which="smallest", tol=1e-10)
    torch.testing.assert_close(low.values.double(), h[:2], rtol=0, atol=1e-8 * scale)
    g = torch.linalg.eigvalsh(d["G"])
    ggn = gs.hessian_eigs(c.prob, k=2, tol=1e-10, curvature="ggn")
    torch.testing.assert_close(ggn.values.double(), g[-2:].flip(0), rtol=0, atol=1e-8 * g[-1])
    assert g[0] > -1e-10 * g[-1]  # the GGN is PSD; the Hessian need not be
    assert torch.allclose(gs.dense_hessian(c.prob), d["H"], rtol=1e-9, atol=1e-11)


def test_hessian_trace_interval_covers_dense_trace(case):
    c, d = case
    H = d["H"]
    tr = torch.trace(H).item()
    for method, samples in (("hutch++", 60), ("hutchinson", 40)):
        est = gs.hessian_trace(c.prob, samples=samples, method=method, seed=1)
        lo, hi = est.interval(0.99)
        assert lo <= tr <= hi, (method, est, tr)
        if method == "hutchinson":  # exact Rademacher variance 2(‖H‖_F² − Σ H_ii²)/m
            exact = math.sqrt(2 * ((H**2).sum() - (H.diagonal() ** 2).sum()).item() / samples)
            assert 0.3 < est.stderr / exact < 3.0
    gtr = torch.trace(d["G"]).item()
    est = gs.hessian_trace(c.prob, samples=60, curvature="ggn", seed=2)
    lo, hi = est.interval(0.99)
    assert lo <= gtr <= hi


def test_hessian_density_quadrature_moments(case):
    """SLQ is exact quadrature: node/weight moments equal vᵀHᵐv/P for m < 2·steps."""
    c, d = case
    H = d["H"]
    P = H.shape[0]
    dens = gs.hessian_density(c.prob, num_vectors=3, steps=8, seed=5)
    gen = torch.Generator().manual_seed(5)
    for th, w in zip(dens.nodes, dens.weights, strict=True):
        v = (2 * torch.randint(0, 2, (P,), generator=gen) - 1).to(D)
        u = v.clone()
        scale = torch.linalg.eigvalsh(H).abs().max().item()
        for m in range(5):
            want = (v @ u).item() / P
            got = (w.double() * th.double() ** m).sum().item()
            assert got == pytest.approx(want, rel=1e-7, abs=1e-9 * scale**m)
            u = H @ u
    h = torch.linalg.eigvalsh(H)
    lo, hi = dens.support
    assert h[0].item() - 1e-8 <= lo and hi <= h[-1].item() + 1e-8
    assert dens.mass(h[0].item() - 1, h[-1].item() + 1) == pytest.approx(1.0, abs=1e-10)


def test_gd_map_dense_and_lanczos(case):
    c, d = case
    h = torch.linalg.eigvalsh(d["H"])
    lr = 2.0 / (h[-3] + h[-4]).item()  # 1/lr between the 3rd and 4th largest: 3 above
    want_logdet = torch.log((1 - lr * h).abs()).sum().item()
    dense = gs.gd_map(c.prob, lr)
    assert dense.method == "dense" and dense.count_above == 3 and dense.sign == -1
    assert dense.singular_lr_below == pytest.approx(1 / h[-3].item(), rel=1e-9)
    assert dense.singular_lr_above == pytest.approx(1 / h[-4].item(), rel=1e-9)
    assert dense.logabsdet.value == pytest.approx(want_logdet, rel=1e-9)
    assert dense.min_factor == pytest.approx((1 - lr * h).abs().min().item(), rel=1e-8)
    lan = gs.gd_map(c.prob, lr, dense_limit=0, tol=1e-10, slq_vectors=3, slq_steps=16)
    assert lan.count_above == 3 and lan.sign == -1
    assert lan.singular_lr_below == pytest.approx(1 / h[-3].item(), rel=1e-8)
    lo, hi = lan.logabsdet.interval(0.999)
    assert lo <= want_logdet <= hi


# ----------------------------------------------------------------------------- stability
def test_stability_heavy_ball_against_dense(case):
    """Heavy ball (β = 0.5) with its threshold 2(1+β)/η between the 3rd and 4th largest
    Hessian eigenvalues: three modes above it, the top one's rate from the recursion's roots."""
    import numpy as np

    c, d = case
    h = torch.linalg.eigvalsh(d["H"])
    beta = 0.5
    lr = 4 * (1 + beta) / (h[-3] + h[-4]).item()
    rep = gs.stability(c.prob, lr=lr, momentum=beta, tol=1e-10)
    assert rep.sharpness == pytest.approx(h[-1].item(), rel=1e-8)
    assert rep.threshold == pytest.approx(2 * (1 + beta) / lr)
    assert rep.count_above == 3
    saddle = h[0].item() < -1e-6 * h[-1].item()  # default flat_tol: 1e-6 at this tol
    assert saddle or h[0].item() > -1e-9 * h[-1].item(), "borderline: pick another point"
    assert rep.is_saddle is saddle
    assert rep.gd_stable is False  # three modes above the threshold
    a = lr * h[-1].item()  # e_{t+1} = (1 + β − a) e_t − β e_{t−1}
    rate = math.log(float(np.abs(np.roots([1.0, -(1 + beta - a), beta])).max()))
    assert rep.mu_top == pytest.approx(rate, rel=1e-7)
    assert rep.smallest == pytest.approx(h[0].item(), rel=1e-6, abs=1e-8 * h[-1].item())
    assert rep.gradient_norm == pytest.approx(d["grad"].norm().item(), rel=1e-10)


def _rebuild(c: Case, model: nn.Module) -> gs.Problem:
    """The case's problem (loss, data, adapter) on another model."""
    return c.make(model)


def _adamw_steps(c: Case, steps: int = 3) -> tuple[nn.Module, gs.Problem, torch.optim.AdamW]:
    """A copy of the case's model after a few real AdamW steps on its own full loss."""
    model = copy.deepcopy(c.model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    prob = _rebuild(c, model)
    for _ in range(steps):
        opt.zero_grad()
        with math_attention():
            prob.loss(dict(model.named_parameters())).backward()
        opt.step()
    return model, prob, opt


def _adam_precond(model: nn.Module, opt: torch.optim.Optimizer) -> Tensor:
    """``(1−β₁ᵗ)(√(v/(1−β₂ᵗ)) + ε)`` straight from PyTorch's state, flat in parameter order."""
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    out = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        vhat = st["exp_avg_sq"] / (1 - b2**t)
        out.append(((1 - b1**t) * (vhat.sqrt() + eps)).reshape(-1))
    return torch.cat(out)


def test_stability_adamw_preconditioned_sharpness(case):
    c, _ = case
    model, prob, opt = _adamw_steps(c)
    dd = Case(c.name, model, prob, c.logits, c.ell, c.x_ntk, c.make).dense()
    Pinv = _adam_precond(model, opt).rsqrt()
    A = Pinv[:, None] * dd["H"] * Pinv[None, :]
    a = torch.linalg.eigvalsh(A)
    assert a[-1] > 10 * torch.linalg.eigvalsh(dd["H"])[-1]  # v is small: P matters
    rep = gs.stability(prob, lr=None, optimizer=opt, tol=1e-10)
    assert rep.preconditioned_sharpness == pytest.approx(a[-1].item(), rel=1e-7)
    assert rep.threshold == pytest.approx((2 + 2 * 0.9) / ((1 - 0.9) * 0.01))
    assert rep.sharpness == pytest.approx(torch.linalg.eigvalsh(dd["H"])[-1].item(), rel=1e-8)


def _per_sample_hessians(c: Case) -> Tensor:
    """Dense ``H_i`` with ``L = (1/n) Σ L_i`` (their mean is ``H``): ``n`` times the Hessian of
    ``ℓ`` with only sample ``i``'s logits depending on ``θ``."""
    flat, _ = _flat(c.model)
    f = c.F_of()
    with torch.no_grad(), math_attention():
        F0 = f(flat)
    n = F0.shape[0]
    out = []
    for i in range(n):

        def loss_i(t: Tensor, i: int = i) -> Tensor:
            Fi = f(t)[i : i + 1]
            return c.ell(torch.cat([F0[:i], Fi, F0[i + 1 :]]))

        with math_attention():
            out.append(n * torch.autograd.functional.hessian(loss_i, flat, vectorize=True))
    return torch.stack(out)


def _sgd_oracle(name: str, B: int) -> tuple[gs.theory.StabilityReport, dict[str, object]]:
    c = SGD_BUILDERS[name]()
    H = c.dense()["H"]
    Hs = _per_sample_hessians(c)
    torch.testing.assert_close(Hs.mean(0), H, rtol=1e-10, atol=1e-12)
    n = c.prob.n
    h = torch.linalg.eigvalsh(H)
    lr = 1.0 / h[-1].item()
    p = (n - B) / (B * (n - 1))
    Sigma = torch.einsum("iab,ibc->ac", Hs, Hs) / n - H @ H  # covariance of H_ξ
    eye = torch.eye(H.shape[0], dtype=D)
    W = (eye - lr * H) @ (eye - lr * H) + lr**2 * p * Sigma
    rep = gs.stability(c.prob, lr=lr, batch_size=B, tol=1e-10, chains=2, lyapunov_steps=8)
    return rep, {"lr": lr, "p": p, "Sigma": Sigma, "W": W, "H": H, "Hs": Hs, "h": h}


@pytest.mark.parametrize("name", ["gpt", "vit", "gpt_hf_full"])
def test_stability_sgd_noise_nonuniformity_and_wu_ma_e(name):
    """SGD with batches of 2: ``p = (n−B)/(B(n−1))``, ``√λ_max(Σ)`` and Wu–Ma–E
    ``λ_max[(I − ηH)² + η²pΣ]`` from dense per-sample Hessians."""
    rep, o = _sgd_oracle(name, 2)
    assert rep.noise_factor == pytest.approx(o["p"], rel=1e-14)
    sig = torch.linalg.eigvalsh(o["Sigma"])[-1].item()
    assert rep.nonuniformity == pytest.approx(math.sqrt(sig), rel=1e-9)
    w = torch.linalg.eigvalsh(o["W"])[-1].item()
    assert w > 1  # so the normal-space value is the full-space one (tangent directions give 1)
    assert rep.wu_ma_e == pytest.approx(w, rel=1e-9)
    assert rep.wu_ma_e_holds is False
    # the normal space: range of Σ H_i² (rank of the stacked per-sample Hessians)
    s = torch.linalg.svdvals(o["Hs"].reshape(-1, o["H"].shape[0]))
    assert rep.normal_dim == int((s > 1e-6 * s[0]).sum())


def test_stability_sgd_refused_when_sequences_hold_different_label_counts():
    """Padded sequences: the loss weighs each by its label count, so uniform sampling of
    sequences is not what it averages; the SGD parts say so instead of guessing."""
    c = _hf_case()
    with pytest.warns(RuntimeWarning):
        rep = gs.stability(c.prob, lr=0.01, batch_size=2, chains=2, lyapunov_steps=8)
    assert rep.noise_factor is None and rep.mean_square_rho is None and rep.wu_ma_e is None
    assert any("ignore_index" in note and "SGD" in note for note in rep.notes)
    assert rep.sharpness > 0  # the full-batch parts are still there


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "vit", "gpt_hf_full"])
def test_stability_sgd_mean_square_rho(name):
    """``ρ(T)``, ``T(M) = (1−p) A M A + (p/n) Σ A_i M A_i`` (``A_i = I − ηH_i``), by ARPACK on
    all of parameter space (10–30 s). Above 1 it equals the normal-space value gdscope reports."""
    import numpy as np
    import scipy.sparse.linalg as sla

    rep, o = _sgd_oracle(name, 2)
    P = o["H"].shape[0]
    eye = torch.eye(P, dtype=D)
    A = (eye - o["lr"] * o["H"]).numpy()
    As = (eye - o["lr"] * o["Hs"]).numpy()
    n, p = As.shape[0], o["p"]

    def T(vec: np.ndarray) -> np.ndarray:
        M = vec.reshape(P, P)
        return ((1 - p) * A @ M @ A + (p / n) * sum(Ai @ M @ Ai for Ai in As)).reshape(-1)

    op = sla.LinearOperator((P * P, P * P), matvec=T, dtype=np.float64)
    rho = float(sla.eigsh(op, k=1, which="LA", tol=1e-12)[0][0])
    assert rho > 1
    assert rep.mean_square_rho == pytest.approx(rho, rel=1e-8)
    assert rep.sgd_mean_square_stable is False


# ----------------------------------------------------------------------------- predict
@pytest.mark.parametrize("name", ["gpt", "vit", "gpt_hf"])
def test_predict_first_step_equals_linearized_real_sgd_step(name):
    """``F_lin(θ₁) = F(θ₀) + J(θ₁ − θ₀)`` with ``θ₁`` a real ``torch.optim.SGD`` step; the real
    outputs differ from it at second order (the error falls 4× when η halves). The causal LM
    (from_hf) is predicted on the rows its loss compares: logits of positions ``0..T−2``."""
    c = BUILDERS[name]()
    d = c.dense()
    flat0, _ = _flat(c.model)
    P = flat0.numel()
    rows = (lambda z: z[:, :-1]) if name == "gpt_hf" else (lambda z: z)
    F0 = d["F"]
    J = d["J"].reshape(*F0.shape, P)
    errs = []
    for lr in (0.002, 0.001):
        model = copy.deepcopy(c.model)
        prob = _rebuild(c, model)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        pred = gs.predict(prob, opt, 2)
        assert pred.loss[0] == pytest.approx(c.prob.loss().item(), rel=1e-12)
        out0 = torch.as_tensor(pred.outputs[0])
        torch.testing.assert_close(out0, rows(F0).reshape(-1), rtol=1e-12, atol=1e-12)
        opt.zero_grad()
        with math_attention():
            prob.loss(dict(model.named_parameters())).backward()
        opt.step()
        flat1, _ = _flat(model)
        lin = F0 + J @ (flat1 - flat0)  # the linearized network after the real step
        out1 = torch.as_tensor(pred.outputs[1])
        torch.testing.assert_close(out1, rows(lin).reshape(-1), rtol=1e-9, atol=1e-11)
        assert pred.loss[1] == pytest.approx(c.ell(lin).item(), rel=1e-9)
        with torch.no_grad(), math_attention():
            real = c.F_of(model)(flat1)
        errs.append((rows(real) - rows(lin)).norm().item())
    assert 3.5 < errs[0] / errs[1] < 4.5, errs


# ----------------------------------------------------------------------------- Tracker
def test_tracker_default_probes_in_a_real_adamw_loop_over_dict_batches():
    """A hand-written AdamW loop over a DataLoader of dict batches through from_hf: every stored
    value equals its direct recomputation at the same iterate."""
    c = _hf_case()
    model, prob = c.model, c.prob
    loader = zoo.sequence_loader(_hf_data(), batch_size=3)  # the batches the problem holds
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    probes = default_probes(curvature_every=1)
    for p in probes:  # tight solves, so values can be compared to 1e-7
        if hasattr(p, "tol"):
            p.tol, p.max_matvecs, p.warm_matvecs = 1e-10, 2000, None
    tracker = gs.Tracker(prob, probes)
    theta0 = _flat(model)[0].clone()
    step = 0
    for _epoch in range(2):
        for batch in loader:
            opt.zero_grad()
            out = model(**batch)
            out.loss.backward()
            grad_norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
            opt.step()
            labels = batch["labels"]
            vals = tracker.step(step, opt, loss=out.loss, outputs=out.logits, targets=labels)
            step += 1
            # values of the step's own loss and gradient (the iterate before the update)
            assert vals["loss"] == pytest.approx(out.loss.item(), rel=1e-12)
            assert vals["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-12)
            # values at the iterate after the update
            flat, _ = _flat(model)
            assert vals["dist_init"] == pytest.approx((flat - theta0).norm().item(), rel=1e-10)
            assert vals["lr"] == 0.01
            assert vals["preconditioned_threshold"] == pytest.approx(38 / 0.01)
            dd = Case(c.name, model, prob, c.logits, c.ell, c.x_ntk, c.make).dense()
            h = torch.linalg.eigvalsh(dd["H"])
            assert vals["sharpness_converged"] == 1.0
            assert vals["sharpness"] == pytest.approx(h[-1].item(), rel=1e-7)
            Pinv = _adam_precond(model, opt).rsqrt()
            a = torch.linalg.eigvalsh(Pinv[:, None] * dd["H"] * Pinv[None, :])
            assert vals["preconditioned_sharpness"] == pytest.approx(a[-1].item(), rel=1e-7)
            tr = torch.trace(dd["H"]).item()
            se = vals["hessian_trace_se"]
            assert abs(vals["hessian_trace"] - tr) <= 4 * se + 1e-12, (vals["hessian_trace"], tr)
            # token accuracy of the step's logits on the shifted, non-ignored labels
            lg = out.logits[:, :-1].argmax(-1)
            lb = labels[:, 1:]
            keep = lb != -100
            want = (lg[keep] == lb[keep]).double().mean().item()
            assert vals["accuracy"] == pytest.approx(want, rel=1e-12)
    assert step == 4
    steps, losses = tracker.series("sharpness")
    assert steps == [0, 1, 2, 3] and len(losses) == 4


def test_fit_adamw_through_from_hf_equals_a_hand_written_loop():
    """gs.fit on the GPT through from_hf (a DataLoader of dict batches, full-batch steps) takes
    the same AdamW steps as a hand loop on ``ℓ(F(θ))``; its tracker's sharpness at the end is
    the dense Hessian's."""
    c = _hf_case()
    twin = copy.deepcopy(c.model)
    opt = torch.optim.AdamW(c.model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    tracker = gs.Tracker(c.prob, [SharpnessProbe(1, tol=1e-10, max_matvecs=2000)])
    res = gs.fit(c.prob, opt, 3, tracker)
    opt2 = torch.optim.AdamW(twin.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    hand = []
    for _ in range(3):
        opt2.zero_grad()
        with math_attention():
            loss = c.ell(c.logits(twin, dict(twin.named_parameters())))
        loss.backward()
        hand.append(loss.item())
        opt2.step()
    assert res.steps == 3 and res.batch_size is None
    assert res.losses == pytest.approx(hand, rel=1e-10)
    torch.testing.assert_close(_flat(c.model)[0], _flat(twin)[0], rtol=1e-10, atol=1e-12)
    h = torch.linalg.eigvalsh(c.dense()["H"])
    steps, values = tracker.series("sharpness")
    assert steps == [0, 1, 2]  # after each update: the last one at the final parameters
    assert values[-1] == pytest.approx(h[-1].item(), rel=1e-8)


@pytest.mark.parametrize("name", ["gpt", "vit", "gpt_hf"])
def test_linearize_gpt_and_vit_equal_first_order_taylor(name):
    """``gs.linearize``: ``f(θ0) + J(θ − θ0)`` with the dense ``J`` (the jvp runs SDPA under the
    math backend); the GPT's output object passes through as a pytree (logits linearized)."""
    c = BUILDERS[name]()
    d = c.dense()
    lin = gs.linearize(c.model)
    flat0, unflat = _flat(c.model)
    delta = 1e-2 * torch.randn(flat0.numel(), dtype=D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p, t in zip(lin.theta, unflat(flat0 + delta).values(), strict=True):
            p.copy_(t)
    want = d["F"] + (d["J"] @ delta).reshape(d["F"].shape)
    with torch.no_grad():
        if name == "gpt_hf":
            data = _hf_data()
            got = lin(data["input_ids"], attention_mask=data["attention_mask"]).logits
        else:
            got = lin(c.x_ntk)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gpt", "vit", "gpt_hf"])
def test_float32_models_agree_with_the_float64_oracle(name):
    """The same weights in float32 (what users train): sharpness, loss and NTK within float32
    accuracy of the float64 oracle, the attention switched to math in float32 too."""
    c = BUILDERS[name]()
    d = c.dense()
    h = torch.linalg.eigvalsh(d["H"])
    m32 = copy.deepcopy(c.model).float()
    prob32 = _rebuild(c, m32)
    assert prob32.dtype == torch.float32 and prob32.notes == (ATTENTION_NOTE,)
    assert prob32.loss().item() == pytest.approx(c.prob.loss().item(), rel=1e-5)
    top = gs.hessian_eigs(prob32, k=1, tol=1e-5)
    assert top.converged
    assert top.values[0].item() == pytest.approx(h[-1].item(), rel=1e-4)
    K64, _ = _ntk_oracle(c.model, c.x_ntk)
    x32 = c.x_ntk.float() if c.x_ntk.is_floating_point() else c.x_ntk
    K32 = gs.ntk(m32, x32)
    assert K32.dtype == torch.float32
    assert (K32.double() - K64).abs().max() <= 1e-5 * K64.abs().max()
