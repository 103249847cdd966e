"""The attention experiment: smoke run end to end, decision rules on synthetic inputs, and the
singular step sizes of gd_map against a dense, independently computed Hessian."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import gdscope as gs
from gdscope.errors import ConfigError
from gdscope.experiments import _attention_parts as ap
from gdscope.experiments import resolve
from gdscope.store import Store
from gdscope.zoo import load_dataset
from gdscope.zoo.transformer import vit

SMOKE = [
    "data.n=16",
    "d_model=2",
    "n_heads=1",
    "mlp_ratio=1",
    "gd_map_points=[0, 2]",
    "grid_range=[0.5, 2]",
    "grid_points=200",
    "lu_checks=3",
    "adam_lrs=[0.001]",
    "control_lr=1e-6",
    "adam_steps=30",
    "sharpness_every=5",
]


# ------------------------------------------------------------------------- smoke, end to end
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    return gs.run_experiment("attention", SMOKE, out=out), out


def test_smoke_runs_and_stores_verdicts(smoke):
    res, out = smoke
    claims = [v.claim for v in res.verdicts]
    assert len(claims) == 4
    assert claims[0].startswith("The GD map of the softmax-attention network is non-singular")
    assert claims[1].startswith("I − η∇²L is singular exactly at η = 1/h_i")
    assert claims[2].startswith("adaptive edge of stability at η = 0.001")
    assert claims[3].startswith("control at η = 1e-06")
    for v in res.verdicts:
        assert v.theorem and v.section and v.measured and v.reason
    # the GD-map claims are decided on this tiny model, and hold
    assert [v.status for v in res.verdicts[:2]] == ["holds", "holds"]
    assert res.verdicts[3].status == "holds"  # the control stays far below 38/η
    stored = json.loads((out / "verdict.json").read_text())
    assert [v["claim"] for v in stored] == claims
    assert (out / "report.html").stat().st_size > 0
    assert {f.name for f in res.figures} == {"attention_gd_map", "preconditioned-sharpness"}
    with Store(res.paths["store"]) as st:
        runs = {r.name: r.id for r in st.runs()}
        assert set(runs) == {
            "attention/gd/lr0.05",
            "attention/adamw/lr0.001",
            "attention/adamw-control/lr1e-06",
        }
        names = st.metric_names(runs["attention/adamw/lr0.001"])
        assert {"preconditioned_sharpness", "preconditioned_threshold", "loss"} <= set(names)
        _, thr = st.series(runs["attention/adamw/lr0.001"], "preconditioned_threshold")
        assert thr[-1] == pytest.approx(38 / 0.001)


def test_smoke_gd_map_numbers(smoke):
    res, _ = smoke
    points = res.results[0]["points"]
    assert [p["step"] for p in points] == [0, 2]
    for p in points:
        # the walk's set is the dense spectrum's, value by value
        assert len(p["oracle_lrs"]) == sum(p["walk"]["multiplicity"]) >= 1
        assert p["match_rel"] <= 1e-6  # pairs closer than walk_step are found as one
        assert all(
            s <= b for s, b in zip(p["sigma_at_singular"], p["singular_bounds"], strict=True)
        )
        for c in p["lu"]:
            assert c["sign_lu"] == c["sign_walk"] == (-1) ** c["count_oracle"]
            assert c["logabsdet_lu"] == pytest.approx(c["logabsdet_eig"], abs=1e-9)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("patch_size=3", "patch_size"),
        ("eos_band=[1.1, 1.3]", "eos_band"),
        ("grid_range=[2, 1]", "grid_range"),
        ("adam_lrs=[0]", "adam_lrs"),
        ("beta1=1.0", "beta1"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        resolve("attention", [override])


def test_tasks_and_burn_in():
    exp, cfg = resolve("attention", [])
    assert exp.tasks(cfg) == [
        {"kind": "gd_map"},
        {"kind": "adamw", "lr": 1e-4, "control": False},
        {"kind": "adamw", "lr": 3e-4, "control": False},
        {"kind": "adamw", "lr": 3e-5, "control": True},
    ]
    assert cfg.burn == 20  # 2/(1 − β₁)
    assert resolve("attention", ["burn_in=5"])[1].burn == 5


def test_oracle_limit_is_a_config_error():
    exp, cfg = resolve("attention", [*SMOKE, "oracle_limit=10"])
    from gdscope.experiments import run_tasks

    with pytest.raises(ConfigError, match="oracle_limit"):
        run_tasks(exp, cfg)


# ------------------------------------------------------------------ decision rules: GD map
def _point(**kw):
    base = {
        "step": 0,
        "h_max": 10.0,
        "norm": 10.0,
        "P": 100,
        "delta": 1e-12,
        "eig_resolution": 1e-7,
        "factor": 10.0,
        "walk_step": 1e-6,
        "range": [0.05, 0.5],
        "grid_range": [0.5, 5.0],
        "oracle_lrs": [0.1, 0.2],
        "walk": {
            "lrs": [0.1, 0.2],
            "multiplicity": [1, 1],
            "queries": [0.05, 0.1000001, 0.2000002],
            "counts": [0, 1, 2],
            "complete": True,
            "calls": 3,
            "undetermined": 0,
            "matvecs": 100,
            "notes": [],
        },
        "sigma_at_singular": [1e-15, 2e-15],
        "singular_bounds": [1e-7, 2e-7],
        "match_rel": 1e-15,
        "grid_points": 100,
        "grid_away": 100,
        "grid_singular_away": 0,
        "grid_min_away": 1e-3,
        "grid_min_away_lr": 0.1001,
        "grid_min_away_bound": 1e-11,
        "lu": [{"lr": 0.15, "sign_lu": -1, "sign_walk": -1, "count_walk": 1, "count_oracle": 1}],
    }
    return {**base, **kw}


def test_nonsingular_rule():
    assert ap.nonsingular_verdict([_point(), _point(step=5)]).status == "holds"
    bad = _point(grid_singular_away=1, grid_min_away=1e-13)
    v = ap.nonsingular_verdict([_point(), bad])
    assert v.status == "fails" and "singular" in v.reason
    none = {"step": 0, "h_max": -1.0, "note": "no positive Hessian eigenvalue"}
    assert ap.nonsingular_verdict([none]).status == "undetermined"


def test_singular_rule():
    assert ap.singular_verdict([_point()]).status == "holds"
    # a reported singular step size that is not singular: the theorem is contradicted
    v = ap.singular_verdict([_point(sigma_at_singular=[1e-15, 1e-3])])
    assert v.status == "fails" and "not singular" in v.measured
    # gd_map missed one: a measurement problem, not a contradiction
    missed = _point(oracle_lrs=[0.1, 0.15, 0.2], match_rel=None)
    v = ap.singular_verdict([missed])
    assert v.status == "undetermined" and "3" in v.reason
    # a stopped walk, or an LU sign that contradicts the walk's count: undetermined
    walk = {**_point()["walk"], "complete": False, "notes": ["stopped"]}
    assert ap.singular_verdict([_point(walk=walk)]).status == "undetermined"
    lu = [{"lr": 0.15, "sign_lu": 1, "sign_walk": -1, "count_walk": 1, "count_oracle": 2}]
    assert ap.singular_verdict([_point(lu=lu)]).status == "undetermined"
    # values off by more than the resolution
    assert ap.singular_verdict([_point(match_rel=1e-3)]).status == "undetermined"
    assert ap.singular_verdict([_point(match_rel=5e-6)]).status == "holds"  # within walk_step


# ------------------------------------------------------------ decision rules: adaptive EoS
RULE = {"burn_in": 20, "onset_fraction": 0.95, "band": (0.8, 1.25), "min_post_onset": 5}


def _run(ratio, lr=1e-3, **kw):
    steps = np.arange(0, 10 * len(ratio), 10)
    thr = 38 / lr
    base = {
        "lr": lr,
        "threshold": thr,
        "steps": steps.tolist(),
        "psharp": (np.asarray(ratio) * thr).tolist(),
        "diverged": False,
        "control": False,
    }
    return {**base, **kw}


def _rise_then(level, n=60):
    rise = np.linspace(0.05, 1.0, 20)
    rng = np.random.default_rng(0)
    hover = level * (1 + 0.1 * rng.standard_normal(n - 20))
    return [50.0, *rise[1:], *hover]  # the first value (step 0) is inside the burn-in


def test_eos_rule_holds_and_fails():
    assert ap.eos_verdict(_run(_rise_then(1.0)), **RULE).status == "holds"
    v = ap.eos_verdict(_run(_rise_then(2.0)), **RULE)
    assert v.status == "fails" and "outside" in v.reason
    # reaches the threshold, then falls back far below it: contradicts "hovers"
    v = ap.eos_verdict(_run(_rise_then(0.6)), **RULE)
    assert v.status == "fails"


def test_eos_rule_outside_and_undetermined():
    never = ap.eos_verdict(_run(np.linspace(0.01, 0.5, 60)), **RULE)
    assert never.status == "outside" and "reach the threshold" in never.assumption
    above = ap.eos_verdict(_run([50.0, 50.0, 2.0, *[1.0] * 20]), **RULE)
    assert above.status == "outside" and "starts above" in above.assumption
    short = ap.eos_verdict(_run([0.1, 0.1, 0.2, 0.5, 0.99, 1.0]), **RULE)
    assert short.status == "undetermined"
    div = ap.eos_verdict(_run(_rise_then(1.0), diverged=True, diverged_at=7), **RULE)
    assert div.status == "undetermined"


def test_eos_rule_leaves_out_unconverged_values():
    ratio = _rise_then(1.0)
    low = [r if i < 25 else 0.3 for i, r in enumerate(ratio)]  # lower bounds after the onset
    conv = [i < 25 or i % 3 == 0 for i in range(len(ratio))]
    mixed = [r if c else lo for r, lo, c in zip(ratio, low, conv, strict=True)]
    assert ap.eos_verdict(_run(mixed), **RULE).status == "fails"  # counted, they drag it down
    v = ap.eos_verdict(_run(mixed, converged=conv), **RULE)
    assert v.status == "holds" and v.details["unconverged"] == conv.count(False)


def test_control_rule():
    below = ap.control_verdict(_run(np.linspace(0.01, 0.2, 30)), burn_in=20, eos_lrs=[1e-2])
    assert below.status == "holds"
    above = ap.control_verdict(_run([*np.linspace(0.01, 0.9, 20), 1.2]), burn_in=20, eos_lrs=[])
    assert above.status == "fails" and "reached" in above.reason
    # a burn-in value above the threshold does not count
    early = ap.control_verdict(_run([40.0, 0.1, 0.1, 0.2]), burn_in=10, eos_lrs=[])
    assert early.status == "holds"


# ------------------------------------------- gd_map's singular set vs an independent oracle
def _oracle_hessian(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of the mean squared error by torch.func (forward-over-reverse), no
    gdscope code involved."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            params[n] = v[i : i + k].reshape(s)
            i += k
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = functional_call(model, params, (X,))
        return ((out - Y) ** 2).mean()

    g = grad(loss)
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    H = vmap(lambda u: jvp(g, (theta,), (u,))[1])(eye)
    return 0.5 * (H + H.T)


def test_gd_map_walk_matches_dense_oracle_on_attention():
    X, y = load_dataset("digits", n=16, seed=0, one_hot=False, dtype=torch.float64, flatten=True)
    Y = torch.nn.functional.one_hot(y, 10).double()
    model = vit(
        d_model=4, n_heads=1, n_layers=1, mlp_ratio=1, init_std=1.0, seed=1, dtype=torch.float64
    )
    prob = gs.Problem(model, "mse", (X, Y))
    H = _oracle_hessian(model, X, Y)
    h = torch.linalg.eigvalsh(H)
    h_max = h[-1].item()
    lo, hi = 0.5 / h_max, 8.0 / h_max
    walk = ap.walk_singular(
        prob, prob.params, lo, hi, tol=1e-10, max_count=64, walk_step=1e-6, max_calls=60
    )
    assert walk["complete"] and walk["undetermined"] == 0
    expected = sorted(1 / v for v in h.tolist() if v > 0 and lo <= 1 / v <= hi)
    assert len(expected) >= 4
    found = [lr for lr, m in zip(walk["lrs"], walk["multiplicity"], strict=True) for _ in range(m)]
    np.testing.assert_allclose(found, expected, rtol=1e-6)  # walk_step merges closer ones
    # the counts are #{h > 1/η} of the oracle at each query
    for q, c in zip(walk["queries"], walk["counts"], strict=True):
        assert c == int((h > 1 / q).sum())


def test_walk_finds_a_repeated_singular_step_size():
    # L = mean((Xw − y)²) with orthogonal columns: H = 2XᵀX/n = diag(2, 2, 1)
    n = 4
    X = torch.zeros(n, 3, dtype=torch.float64)
    X[0, 0] = X[1, 1] = 2.0
    X[2, 2] = math.sqrt(2.0)
    model = nn.Linear(3, 1, bias=False).double()
    prob = gs.Problem(model, "mse", (X, torch.randn(n, 1, dtype=torch.float64)))
    walk = ap.walk_singular(
        prob, prob.params, 0.3, 1.5, tol=1e-10, max_count=8, walk_step=1e-6, max_calls=10
    )
    assert walk["complete"]
    np.testing.assert_allclose(walk["lrs"], [0.5, 1.0], rtol=1e-9)
    assert walk["multiplicity"] == [2, 1]


# ------------------------------------------ the measurement pipeline can say "fails" as well
def _diag_problem():
    """L = mean((Xw − y)²), H = 2XᵀX/n = diag(2, 2, 1): singular step sizes 0.5 (twice), 1."""
    X = torch.zeros(4, 3, dtype=torch.float64)
    X[0, 0] = X[1, 1] = 2.0
    X[2, 2] = math.sqrt(2.0)
    model = nn.Linear(3, 1, bias=False).double()
    return gs.Problem(model, "mse", (X, torch.randn(4, 1, dtype=torch.float64)))


MEASURE = {
    "grid_points": 50,
    "tol": 1e-10,
    "max_count": 8,
    "walk_step": 1e-6,
    "max_calls": 10,
    "factor": 10.0,
    "oracle_limit": 10,
    "lu_checks": 4,
}


def test_measure_point_holds_on_the_exact_case():
    prob = _diag_problem()
    # grid η ∈ [0.3, 0.95]: 0.5 (multiplicity 2) inside, 1 outside
    p = ap.measure_point(prob, prob.params, 0, grid_range=(0.6, 1.9), **MEASURE)
    assert p["oracle_lrs"] == pytest.approx([0.5, 0.5])
    assert p["walk"]["lrs"] == pytest.approx([0.5]) and p["walk"]["multiplicity"] == [2]
    assert ap.nonsingular_verdict([p]).status == "holds"
    assert ap.singular_verdict([p]).status == "holds"


def test_measure_point_fails_when_the_singular_set_is_wrong(monkeypatch):
    prob = _diag_problem()
    real = ap.walk_singular

    def shifted(*args, **kw):  # a gd_map that reports 1/h a little off: not singular there
        w = real(*args, **kw)
        return {**w, "lrs": [lr * (1 + 1e-4) for lr in w["lrs"]]}

    monkeypatch.setattr(ap, "walk_singular", shifted)
    p = ap.measure_point(prob, prob.params, 0, grid_range=(0.6, 1.9), **MEASURE)
    v = ap.singular_verdict([p])
    assert v.status == "fails" and "not singular" in v.measured

    def missing(*args, **kw):  # a walk that misses η = 1 (the grid's last point is η = 1)
        w = real(*args, **kw)
        keep = [i for i, lr in enumerate(w["lrs"]) if lr < 0.9]
        return {
            **w,
            "lrs": [w["lrs"][i] for i in keep],
            "multiplicity": [w["multiplicity"][i] for i in keep],
        }

    monkeypatch.setattr(ap, "walk_singular", missing)
    p = ap.measure_point(prob, prob.params, 0, grid_range=(0.6, 2.0), **MEASURE)
    assert len(p["oracle_lrs"]) == 3 and sum(p["walk"]["multiplicity"]) == 2
    v = ap.nonsingular_verdict([p])
    assert v.status == "fails" and p["grid_singular_away"] >= 1
    assert ap.singular_verdict([p]).status == "undetermined"  # the set is incomplete


def test_float32_attention_point_holds_at_its_coarser_resolution():
    # in float32 the dense and Lanczos eigenvalues differ by ~10·P·eps·‖H‖: no false "fails"
    X, y = load_dataset("digits", n=16, seed=0, one_hot=False, dtype=torch.float32, flatten=True)
    Y = torch.nn.functional.one_hot(y, 10).float()
    model = vit(d_model=2, n_heads=1, n_layers=1, mlp_ratio=1, init_std=1.0, seed=0)
    prob = gs.Problem(model, "mse", (X, Y))
    kw = {**MEASURE, "grid_points": 400, "oracle_limit": 500, "max_calls": 40, "max_count": 64}
    p = ap.measure_point(prob, prob.params, 0, grid_range=(0.5, 20.0), **kw)
    assert p["walk"]["complete"] and len(p["oracle_lrs"]) >= 3
    assert p["delta"] > 1e3 * 10 * p["P"] * 2.2e-16 * p["norm"]  # float32's resolution
    assert ap.nonsingular_verdict([p]).status == "holds"
    assert ap.singular_verdict([p]).status == "holds"
