"""``method="auto"`` (issue 13): a route that works on every model, and the cheapest exact one.

Oracles are independent of gdscope's NTK code: per-sample, per-output ``torch.autograd.grad``
of a float64 model (no ``torch.func``), stacked into ``J`` (``n × k × P``), then ``J J'ᵀ``.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.kernels.ntk import _explain

F64 = torch.float64
RTOL = 1e-10


def autograd_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J`` as ``(n, k, P)`` by one ``torch.autograd.grad`` per sample and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        per = []
        for a in range(out.numel()):
            g = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if gi is None else gi).reshape(-1)
                        for gi, p in zip(g, params, strict=True)
                    ]
                )
            )
        rows.append(torch.stack(per))
    return torch.stack(rows)


def oracle_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    J = autograd_jacobian(model, x)
    return torch.einsum("iap,jbp->ijab", J, J)


def assert_close(K: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert K.shape == ref.shape, (K.shape, ref.shape)
    err = (K - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol}"


# ---------------------------------------------------------------------------------------------
# Models vmap cannot batch over samples


class Recurrent(nn.Module):
    """A GRU or LSTM over a sequence, the last hidden state read out linearly."""

    def __init__(self, cell: type[nn.RNNBase] = nn.GRU, k: int = 2) -> None:
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def _recurrent(cell: type[nn.RNNBase], n: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Recurrent(cell).to(F64), torch.randn(n, 6, 3, dtype=F64)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("method", ["auto", "jacobian", "vp"])
def test_recurrent_ntk_every_route(cell, method, caplog):
    model, x = _recurrent(cell)
    ref = oracle_ntk(model, x)
    with caplog.at_level(logging.DEBUG, logger="gdscope.kernels.ntk"):
        K = gs.ntk(model, x, method=method)
    assert_close(K, ref)
    if method != "vp":  # the fallback is said, naming the module that vmap cannot batch
        assert "'rnn'" in caplog.text and "loop over samples" in caplog.text


def test_recurrent_explain_names_the_route_and_cross_kernel():
    model, x = _recurrent(nn.GRU)
    info = _explain(model, x)
    assert "loop over samples" in info["batching"] and "'rnn'" in info["batching"]
    assert any("rnn" in m and "jacobian" in m for m in info["modules"])
    x2 = torch.randn(3, 6, 3, dtype=F64)
    J, J2 = autograd_jacobian(model, x), autograd_jacobian(model, x2)
    ref = torch.einsum("iap,jbp->ijab", J, J2)
    assert_close(gs.ntk(model, x, x2), ref)
    tr = gs.ntk(model, x, x2, trace_outputs=True)
    assert_close(tr, torch.einsum("iap,jap->ij", J, J2))


def test_recurrent_structured_refused_clearly():
    model, x = _recurrent(nn.LSTM)
    with pytest.raises(InvalidArgumentError, match=r"rnn.*method='auto'"):
        gs.ntk(model, x, method="structured")


def test_batchable_model_uses_vmap():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    info = _explain(model, torch.randn(3, 3, dtype=F64))
    assert info["batching"] == "per-sample Jacobians by vmap over samples"


def test_gru_ntk_eigs_matches_dense_oracle():
    model, x = _recurrent(nn.GRU, n=5)
    J = autograd_jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    lam = torch.linalg.eigvalsh(J @ J.T)
    res = gs.ntk_eigs(model, x, which="both")
    assert res.lambda_min == pytest.approx(float(lam[0]), rel=1e-8)
    assert res.lambda_max == pytest.approx(float(lam[-1]), rel=1e-10)


def test_gru_disparity_matches_dense_oracle():
    model, x = _recurrent(nn.GRU, n=5)
    J = autograd_jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    sv = torch.linalg.svdvals(J)
    rep = gs.disparity(model, x)
    assert rep.sigma_min == pytest.approx(float(sv[-1]), rel=1e-8)
    assert rep.sigma_max == pytest.approx(float(sv[0]), rel=1e-10)


def test_gru_disparity_ntk_eigs_fallback_matches_dense_oracle():
    """The disparity report's matrix-free fallback (``J`` over ``memory``) goes through ntk."""
    model, x = _recurrent(nn.GRU, n=5)
    J = autograd_jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    sv = torch.linalg.svdvals(J)
    rep = gs.disparity(model, x, memory=64)
    assert rep.method == "ntk_eigs"
    assert rep.sigma_min == pytest.approx(float(sv[-1]), rel=1e-6)
    assert rep.sigma_max == pytest.approx(float(sv[0]), rel=1e-8)


def test_no_per_sample_jacobians_auto_takes_vp_and_the_others_refuse(monkeypatch):
    """Where even ``jacrev`` of one sample fails, ``auto`` takes ``vp``; ``jacobian`` and
    ``structured`` refuse naming the module and the fix (simulated: no such module is known)."""
    ntk_mod = importlib.import_module("gdscope.kernels._ntk_plan")  # checks and cache

    def broken(model, fn, x1):
        return ntk_mod._Batching(vmap=False, jac=False, module="rnn", why="no batching rule")

    monkeypatch.setattr(ntk_mod, "_batching", broken)
    monkeypatch.setattr(ntk_mod, "_CACHE", OrderedDict())
    model, x = _recurrent(nn.GRU)
    assert _explain(model, x)["method"] == "vp"
    assert_close(gs.ntk(model, x), oracle_ntk(model, x))
    for method in ("jacobian", "structured"):
        with pytest.raises(InvalidArgumentError, match=r"module 'rnn'.*method='vp'"):
            gs.ntk(model, x, method=method)


# ---------------------------------------------------------------------------------------------
# auto agrees with every route; the cost model's FLOP predictions


class TinyConv(nn.Module):
    """Two 3×3 convolutions and a linear readout (the issue's small convnet, smaller)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(h.flatten(1))


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    from gdscope.zoo import mlp, preact_resnet
    from gdscope.zoo.transformer import gpt

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "mlp": (mlp([6, 16, 16, 3], dtype=F64, seed=0), torch.randn(7, 6, generator=g, dtype=F64)),
        "mlp_ntk": (
            mlp([6, 16, 16, 3], parameterization="ntk", bias_var=0.3, dtype=F64, seed=0),
            torch.randn(7, 6, generator=g, dtype=F64),
        ),
        "mlp_k32": (mlp([6, 16, 32], dtype=F64, seed=0), torch.randn(4, 6, generator=g, dtype=F64)),
        "convnet": (TinyConv().to(F64), torch.randn(6, 1, 4, 4, generator=g, dtype=F64)),
        "preact_resnet": (
            preact_resnet(1, 3, width=4, depth=(1,), seed=0, dtype=F64).eval(),
            torch.randn(4, 1, 6, 6, generator=g, dtype=F64),
        ),
        "gpt": (
            gpt(5, 4, d_model=8, n_heads=2, n_layers=1, seed=0, dtype=F64).eval(),
            torch.randint(0, 5, (2, 4), generator=g),
        ),
        "gru": _recurrent(nn.GRU, n=5),
    }


CASES = list(_cases())


@pytest.mark.parametrize("name", CASES)
def test_auto_agrees_with_every_route(name):
    from gdscope.kernels.ntk import _prepare, _run

    model, x = _cases()[name]
    x2 = x[: max(1, x.shape[0] - 2)].flip(0)
    if name != "gpt":  # gpt: k = 20 outputs, the oracle is checked on the routes below
        assert_close(gs.ntk(model, x), oracle_ntk(model, x))
    for xx2 in (None, x2):
        ref = gs.ntk(model, x, xx2)
        tr = gs.ntk(model, x, xx2, trace_outputs=True)
        assert_close(tr, torch.diagonal(ref, dim1=2, dim2=3).sum(-1))
        for method in ("jacobian", "vp", "structured"):
            try:
                K = gs.ntk(model, x, xx2, method=method)
            except InvalidArgumentError:
                assert method == "structured"  # tied / recurrent / uncovered parameters
                continue
            assert_close(K, ref)
        # every per-layer route forced inside auto, and every layer by the Jacobian ("fb")
        for force in ("gram", "pair", "jac", "fb"):
            job, out = _prepare(model, x, xx2, "auto", False, None, None, force=force)
            assert_close(_run(job, out), ref)
        # mixed: the first rule by its Jacobian, the rest by their cheapest routes
        job, _ = _prepare(model, x, xx2, "auto", False, None, None)
        if job.plan.rules and job.plan.rules[0].part is None:
            first = job.plan.rules[0].key
            job, out = _prepare(model, x, xx2, "auto", False, None, None, force={first: "fb"})
            assert first in " ".join(job.plan.fallback_why)
            assert_close(_run(job, out), ref)


@pytest.mark.parametrize(
    ("name", "trace"),
    [(c, False) for c in CASES] + [(c, True) for c in ("mlp", "convnet", "preact_resnet")],
)
def test_predicted_flops_order_matches_flop_counter(name, trace, monkeypatch):
    """For each route, the cost model's predicted matmul FLOPs against FlopCounterMode around
    the route itself (structure cache warm, as in every call after the first): the predicted
    order of the routes is the measured order, and each prediction is within 20%. BLAS
    ``syrk`` (scipy, which the counter does not see) is counted from the shapes it is given:
    ``m (m + 1) w`` FLOPs for an ``(m, w)`` block (the triangle's dot products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from gdscope.kernels._ntk_capture import _Triangle

    syrk_flops = []
    real = _Triangle.add

    def counted(self, block):
        syrk_flops.append(self.m * (self.m + 1) * (block.numel() // self.m))
        return real(self, block)

    monkeypatch.setattr(_Triangle, "add", counted)
    model, x = _cases()[name]
    pred, meas = {}, {}
    for method in ("auto", "structured", "jacobian", "vp"):
        try:
            info = _explain(model, x, method=method, trace_outputs=trace)
        except InvalidArgumentError:
            continue
        route = info["route"]
        gs.ntk(model, x, method=method, trace_outputs=trace)
        counter = FlopCounterMode(display=False)
        syrk_flops.clear()
        with counter:
            gs.ntk(model, x, method=method, trace_outputs=trace)
        pred[method] = info["predicted"][route]["flops"]
        meas[method] = counter.get_total_flops() + sum(syrk_flops)
    for m in pred:
        assert abs(pred[m] / meas[m] - 1) < 0.2, (m, pred[m], meas[m])
    order_p = sorted(pred, key=pred.__getitem__)
    order_m = sorted(meas, key=meas.__getitem__)
    # routes within 20% of each other are a tie: compare the order of distinct values only
    distinct = [m for m in order_m if all(abs(meas[m] / meas[o] - 1) > 0.2 for o in meas if o != m)]
    assert [m for m in order_p if m in distinct] == distinct, (pred, meas)


def test_auto_takes_the_cheapest_predicted_route():
    """``auto`` keeps the structured plan unless another route is predicted clearly faster."""
    from gdscope.kernels._ntk_cost import _MARGIN, _MIN_SAVING

    for name, (model, x) in _cases().items():
        info = _explain(model, x)
        secs = {r: c["seconds"] for r, c in info["predicted"].items()}
        best = min(secs, key=secs.__getitem__)
        chosen = info["route"]
        assert chosen == best or not (
            secs[best] * _MARGIN < secs[chosen] and secs[chosen] - secs[best] > _MIN_SAVING
        ), (name, secs, chosen)


def test_rule_check_is_cached_per_structure(monkeypatch):
    """The batching check, FLOP count and rule check run once per model structure: a second
    model of the same structure (other weights) pays none of them; another shape does."""
    ntk_mod = importlib.import_module("gdscope.kernels._ntk_plan")  # checks and cache

    monkeypatch.setattr(ntk_mod, "_CACHE", OrderedDict())
    calls = {"capture": 0, "batching": 0}
    capture, batching = ntk_mod._capture, ntk_mod._batching

    def spy_capture(*a, **kw):
        calls["capture"] += 1
        return capture(*a, **kw)

    def spy_batching(*a, **kw):
        calls["batching"] += 1
        return batching(*a, **kw)

    monkeypatch.setattr(ntk_mod, "_capture", spy_capture)  # the rule check's
    cap_mod = importlib.import_module("gdscope.kernels._ntk_capture")
    monkeypatch.setattr(cap_mod, "_capture", spy_capture)  # the kernel's features
    monkeypatch.setattr(ntk_mod, "_batching", spy_batching)

    def net(width: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(F64)

    x = torch.randn(5, 3, dtype=F64)
    gs.ntk(net(4, 0), x)
    assert calls == {"capture": 2, "batching": 1}  # the rule check's capture, then the kernel's
    other = net(4, 1)
    K = gs.ntk(other, x)
    assert calls == {"capture": 3, "batching": 1}  # cached: only the kernel's capture
    assert_close(K, oracle_ntk(other, x))
    gs.ntk(net(5, 0), x)
    assert calls == {"capture": 5, "batching": 2}  # another structure: checked again


class BatchCoupled(nn.Module):
    """Centres its hidden layer over the batch: the per-sample function (a batch of one, as
    ``vmap`` sees it) differs from the batched one, so the one-pass capture must not be used."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h - 0.5 * h.mean(0, keepdim=True))


def test_one_pass_capture_and_its_guard():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=F64)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    assert _explain(mlp, x)["capture"] == "one batched pass"
    assert_close(gs.ntk(mlp, x), oracle_ntk(mlp, x))
    coupled = BatchCoupled().to(F64)
    info = _explain(coupled, x)
    assert info["capture"] != "one batched pass", info
    # the coupling costs the one-pass capture, not the rules: both layers keep theirs
    assert not any("jacobian" in m for m in info["modules"]), info["modules"]
    assert_close(gs.ntk(coupled, x), oracle_ntk(coupled, x))
    assert _explain(_recurrent(nn.GRU)[0], _recurrent(nn.GRU)[1])["capture"] == "loop over samples"


@pytest.mark.parametrize("syrk", [False, True])
@pytest.mark.parametrize("trace", [False, True])
def test_symmetric_split_and_block_contraction(trace, syrk, monkeypatch):
    """A symmetric kernel with only the upper triangle computed (the rest mirrored): split
    into tile rows, or (``syrk``) the jac group's triangle by BLAS ``syrk`` cut into tiles with
    the diagonal tiles made whole; the jac group in column blocks (a conv layer wide enough for
    its own block plus the concatenated small ones), a gram rule added per tile: exact against
    the oracle in float64."""
    from gdscope.kernels._ntk_capture import _BLOCK_MIN

    if not syrk:
        job_mod = importlib.import_module("gdscope.kernels._ntk_job")
        monkeypatch.setattr(job_mod, "_syrk_ok", lambda dtype, device: False)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 16, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    ).to(F64)  # conv2: 2304 weights per output, its own block
    x = torch.randn(40, 1, 6, 6, dtype=F64)
    info = _explain(model, x, trace_outputs=trace)
    assert info["capture"] == "one batched pass", info
    assert info["syrk"] == syrk, info
    if not syrk:
        assert trace or info["tile"] < 40, info  # the trace's GEMM rows are samples: one tile
        assert trace or info["rows"], info  # each tile row's upper part is one contraction
    assert any("gram" in m for m in info["modules"]), info["modules"]
    assert model[2].weight.numel() >= _BLOCK_MIN
    ref = oracle_ntk(model, x)
    if trace:
        ref = torch.diagonal(ref, dim1=2, dim2=3).sum(-1)
    K = gs.ntk(model, x, trace_outputs=trace)
    assert_close(K, ref)
    # the same tile rows streamed: every tile once, lower ones mirrored, each the kernel's slice
    seen = torch.zeros(40, 40, dtype=torch.int64)
    for i0, i1, j0, j1, blk in gs.ntk_blocks(model, x, trace_outputs=trace, block_size=7):
        assert blk.is_contiguous()
        assert_close(blk, ref[i0:i1, j0:j1])
        seen[i0:i1, j0:j1] += 1
    assert bool((seen == 1).all())


def test_one_pass_needs_a_two_sample_check(monkeypatch):
    """A first call on one sample cannot see batch coupling: the structure never uses the
    one-pass capture then, and a later call on many samples stays exact."""
    ntk_mod = importlib.import_module("gdscope.kernels._ntk_plan")  # checks and cache
    monkeypatch.setattr(ntk_mod, "_CACHE", OrderedDict())
    torch.manual_seed(0)
    coupled = BatchCoupled().to(F64)
    x = torch.randn(6, 3, dtype=F64)
    gs.ntk(coupled, x[:1])
    assert _explain(coupled, x)["capture"] == "vmap over samples"
    assert_close(gs.ntk(coupled, x), oracle_ntk(coupled, x))


def test_rule_check_uses_two_distinct_samples(monkeypatch):
    """Repeated leading samples do not hide batch coupling from the rule check."""
    ntk_mod = importlib.import_module("gdscope.kernels._ntk_plan")  # checks and cache
    monkeypatch.setattr(ntk_mod, "_CACHE", OrderedDict())
    torch.manual_seed(0)
    coupled = BatchCoupled().to(F64)
    x = torch.randn(6, 3, dtype=F64)
    x[1] = x[0]
    assert torch.equal(ntk_mod._two_distinct(x), x[[0, 2]])
    assert torch.equal(ntk_mod._two_distinct(x[:2]), x[:1])
    assert_close(gs.ntk(coupled, x), oracle_ntk(coupled, x))
    assert _explain(coupled, x)["capture"] == "vmap over samples"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("trace", [False, True])
def test_syrk_triangle_streamed_and_chunked(trace, dtype):
    """The jac group's ``J Jᵀ`` by BLAS ``syrk`` (upper triangle): rule columns added as they
    are formed (one capture of all samples) and from chunked captures (``chunk < N``), with a
    wide block, narrow ones concatenated and a parameter on the Jacobian route, against the
    autograd oracle (float64: 1e-10; float32 ``ssyrk``: 1e-5)."""
    from gdscope.kernels._ntk_capture import _sym_features
    from gdscope.kernels._ntk_job import _prepare

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 16, 3),  # 2304 weights per output: its own block
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 16, 3),
    ).to(dtype)
    x = torch.randn(9, 1, 6, 6, dtype=dtype)
    force = {"0": "fb", "2": "jac", "5": "jac"}  # conv 0's parameters on the Jacobian route
    job, _ = _prepare(model, x, None, "auto", trace, None, None, force=force)
    assert job.plan.fb and job.plan.jac_rules and not job.plan.feat_rules, job.plan.describe()
    ref = oracle_ntk(copy.deepcopy(model).to(F64), x.to(F64))
    r = 1 if trace else 3
    ref = torch.diagonal(ref, dim1=2, dim2=3).sum(-1) if trace else ref.permute(0, 2, 1, 3)
    ref = ref.reshape(9 * r, 9 * r)
    for chunk in (9, 4):
        S, F = _sym_features(job.plan, x, trace, chunk)
        assert S.shape == (9 * r, 9 * r) and not F.jac
        upper = torch.triu(torch.ones_like(ref, dtype=torch.bool))
        assert_close(S.to(F64)[upper], ref[upper], RTOL if dtype == F64 else 1e-5)
