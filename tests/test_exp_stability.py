"""The stability experiment (edge of stability, SGD plateaus, orbits, stability of minima)."""

from __future__ import annotations

import json

import pytest
import torch

from gdscope.errors import ConfigError
from gdscope.experiments import resolve, run_tasks
from gdscope.experiments._stability_parts import exact_orbit, polish_minimum
from gdscope.problem import Problem
from gdscope.zoo import load_dataset, mlp

SMOKE = {
    "data": {"n": 32},
    "width": 8,
    "steps": 60,
    "lrs": [2.0, 40.0],
    "batch_sizes": [4, 16],
    "sharpness_every": 5,
    "gd_map_points": 3,
    "orbit_window": 16,
    "lyapunov_steps": 20,
    "exact_limit": 1,
    "orbit_factors": [1.2],
    "orbit_steps": 150,
    "minimum_n": 8,
    "minimum_width": 8,
    "minimum_batch_size": 2,
    "perturb_steps": 60,
    "perturb_sgd_runs": 6,
    "minimum_lyapunov_chains": 4,
    "minimum_lyapunov_steps": 60,
}
SECTIONS = {
    "3-curvature-stability-of-minima-and-the-gd-map",
    "5-reference-measurements",
    "6-periodic-orbits-as-solutions",
}


@pytest.fixture(scope="module")
def smoke():
    exp, cfg = resolve({"experiment": "stability", **SMOKE})
    results = [o.result for o in run_tasks(exp, cfg)]
    return exp, cfg, results, exp.judge(cfg, results)


def _by_lr(results, lr, kind="gd"):
    return next(r for r in results if r["kind"] == kind and r["lr"] == lr)


def _verdict(judgement, text):
    return next(v for v in judgement.verdicts if text in v.claim)


def test_verdicts_and_figures_have_the_documented_structure(smoke):
    exp, cfg, results, judgement = smoke
    kinds = [t["kind"] for t in exp.tasks(cfg)]
    assert kinds == ["gd", "gd", "sgd", "sgd", "orbit", "minimum"]
    claims = [v.claim for v in judgement.verdicts]
    assert len(claims) == 10
    assert claims[0].startswith("Edge of stability at η = 2")
    assert claims[1].startswith("Edge of stability at η = 40")
    for text in (
        "plateaus below 2/η",
        "smaller batches",
        "GD-stable",
        "mean-square stable",
        "Lyapunov",
        "can settle on a periodic orbit",
        "edge of stability GD settles",
        "singular",
    ):
        assert any(text in c for c in claims), text
    for v in judgement.verdicts:
        assert v.holds in (True, False, None)
        assert v.predicted and v.measured and v.reason and v.theorem
        assert v.section in SECTIONS
        assert isinstance(v.details, dict)
        if v.status == "outside":
            assert v.assumption
    assert [f.name for f in judgement.figures] == [
        "stability-sharpness",
        "stability-sgd",
        "stability-verdicts",
        "stability-dynamics",
    ]
    assert all(f.uri.startswith("data:image/png;base64,") for f in judgement.figures)
    json.dumps(results, allow_nan=False)  # JSON-ready, non-finite values as None


def test_sharpness_series_starts_at_the_initial_hessian(smoke, oracle):
    _, cfg, results, _ = smoke
    X, Y = load_dataset("digits", n=32, seed=cfg.seed, flatten=True, dtype=torch.float64)
    model = mlp([64, 8, 8, 10], "tanh", seed=cfg.seed, dtype=torch.float64)
    h = torch.linalg.eigvalsh(oracle.hessian(model, X, Y))
    for r in results:
        if r["kind"] not in ("gd", "sgd"):
            continue
        assert r["sharpness_steps"][0] == 0
        assert r["sharpness_init"] == pytest.approx(h[-1].item(), rel=1e-6)
        # the probe's steps: θ_0, then θ_{t+1} after every sharpness_every-th step
        assert r["sharpness_steps"][1:] == list(range(1, cfg.steps + 1, cfg.sharpness_every))
        assert r["threshold"] == pytest.approx(2 / r["lr"])
    # the GD map's count at θ_0 is the dense count of eigenvalues above 1/η
    gd = _by_lr(results, 2.0)["gd_map"]
    assert gd["steps"][0] == 0
    assert gd["count_above"][0] == int((h > 1 / 2.0).sum())


def test_a_learning_rate_far_above_threshold_is_outside_not_raised(smoke):
    _, _, results, judgement = smoke
    r = _by_lr(results, 40.0)
    assert r["sharpness_init"] > 10 * r["threshold"]
    assert r["outcome"] in ("diverged", "unstable")
    assert "stability" not in r  # no end point to analyse
    v = judgement.verdicts[1]
    assert v.status == "outside" and "starts above" in v.assumption
    assert r["outcome"] in v.measured
    ok = _by_lr(results, 2.0)
    assert ok["outcome"] == "trained" and ok["loss_final"] < ok["loss_init"]


def test_sgd_runs_record_plateau_and_stability_report(smoke):
    _, _, results, judgement = smoke
    sgd = [r for r in results if r["kind"] == "sgd"]
    for r in sgd:
        assert r["outcome"] == "trained"
        assert r["plateau_q25"] <= r["plateau_ratio"] <= r["plateau_q75"]
        st = r["stability"]
        assert st["noise_factor"] == pytest.approx((32 - r["batch_size"]) / (r["batch_size"] * 31))
        for key in ("gd_stable", "sgd_mean_square_stable", "wu_ma_e_holds", "at_minimum"):
            assert st[key] in (True, False, None)
        assert st["sgd_lyapunov"]["ci"][0] <= st["sgd_lyapunov"]["value"]
    plateau = _verdict(judgement, "plateaus below")
    assert plateau.holds is True  # at smoke size the small-batch plateaus sit well below 2/η
    assert all(q < 1 for q in plateau.details["plateau_q75"])


def test_minimum_task_polishes_and_tests_each_rule_both_ways(smoke):
    _, cfg, results, judgement = smoke
    m = next(r for r in results if r["kind"] == "minimum")
    assert m["at_minimum"] and m["gradient_ratio"] <= cfg.minimum_grad_floor
    assert [t["gd_stable"] for t in m["gd_tests"]] == [True, False]
    gd_rule = _verdict(judgement, "GD-stable")
    assert gd_rule.holds is True  # below 2/S* the perturbation shrinks, above it grows
    stable, unstable = m["gd_tests"]
    assert max(stable["single_rates"]) < 0 < min(unstable["single_rates"])
    # above 2/S* the top mode dominates: its measured rate approaches log|1 − ηS*|
    assert unstable["single_rate"] == pytest.approx(unstable["mu_top"], rel=0.35)
    assert len(m["sgd_tests"]) == len(cfg.minimum_sgd_factors)
    assert _verdict(judgement, "mean-square").status != "fails"
    assert _verdict(judgement, "Lyapunov").status != "fails"


def test_orbit_rows_only_use_runs_that_trained(smoke):
    _, _, results, judgement = smoke
    orbit = _verdict(judgement, "edge of stability GD settles")
    assert all(run["lr"] != 40.0 for run in orbit.details["runs"])
    gd = _by_lr(results, 2.0)
    assert len(gd["gd_map"]["steps"]) == 3
    assert 0 <= gd["orbit"]["params"]["top_alignment"] <= 1
    exact = _verdict(judgement, "can settle on a periodic orbit")
    assert exact.holds is True


def test_exact_orbit_task_solves_the_cycle_gd_settles_on():
    o = exact_orbit(1.2, 150, tol=1e-10, dtype=torch.float64)
    assert o["minimum_gradient"] < 1e-12 and o["minimum_sharpness"] * o["lr"] / 2 > 1
    assert o["converged"] and o["orbit_kind"] == "cycle" and o["residual"] < 1e-10
    assert o["stable"] is True and o["spectral_radius"] < 1
    assert o["distance_final"] <= 1e-8 * o["diameter"]
    assert o["rate"] == pytest.approx(o["rate_predicted"], rel=0.05)
    # the orbit's points are a 2-cycle of the GD map, checked independently
    from gdscope.experiments._stability_parts import ORBIT_X, ORBIT_Y

    X, Y = torch.tensor(ORBIT_X), torch.tensor(ORBIT_Y)
    lr = o["lr"]

    def step(t):
        t = t.clone().requires_grad_()
        loss = torch.mean((t[1] * torch.tanh(t[0] * X) - Y) ** 2)
        (g,) = torch.autograd.grad(loss, t)
        return (t - lr * g).detach()

    a, b = (torch.tensor(p, dtype=torch.float64) for p in o["points"])
    assert torch.allclose(step(a), b, atol=1e-10) and torch.allclose(step(b), a, atol=1e-10)


def test_minimum_polish_reaches_the_gradient_floor():
    X, Y = load_dataset("digits", n=8, seed=0, flatten=True, dtype=torch.float64)
    model = mlp([64, 8, 8, 10], "tanh", seed=0, dtype=torch.float64)
    prob = Problem(model, "mse", (X, Y))
    pol = polish_minimum(prob, prob.flatten(prob.params), gd_lr=0.5, gd_steps=20)
    theta = pol["theta"]
    assert pol["floor_reached"]

    def loss(t):  # independent of gdscope: plain autograd on a hand-written forward pass
        W1, b1 = t[:512].reshape(8, 64), t[512:520]
        W2, b2 = t[520:584].reshape(8, 8), t[584:592]
        W3, b3 = t[592:672].reshape(10, 8), t[672:682]
        out = torch.tanh(torch.tanh(X @ W1.T + b1) @ W2.T + b2) @ W3.T + b3
        return torch.mean((out - Y) ** 2)

    assert theta.numel() == 682
    g = torch.autograd.functional.jacobian(loss, theta)
    assert float(g.norm()) < 1e-13
    assert float(loss(theta)) < 1e-25
    assert pol["gradient_history"][-1] == pytest.approx(float(g.norm()), abs=1e-13)


# ---------------------------------------------------------------- decision rules, synthetic
def _cfg():
    return resolve({"experiment": "stability", **SMOKE})


def _judge(results):
    exp, cfg = _cfg()
    return exp.judge(cfg, results)


def _gd_run(**kw):
    r = {
        "kind": "gd",
        "lr": 1.0,
        "batch_size": None,
        "threshold": 2.0,
        "outcome": "trained",
        "status": "completed",
        "diverged_at": None,
        "loss_init": 1.0,
        "loss_final": 0.1,
        "steps": 100,
        "sharpness_init": 0.5,
        "sharpness_steps": [0, 1, 51],
        "sharpness": [0.5, 1.0, 2.0],
        "loss": [1.0, 0.5],
        "onset": 40,
        "post_onset_ratio": 1.0,
        "post_onset_q25": 0.98,
        "post_onset_q75": 1.02,
        "post_onset_count": 10,
        "max_ratio": 1.05,
        "orbit": {
            "params": {
                "period": None,
                "kind": "none",
                "window": [80, 100],
                "onset": None,
                "amplitude": None,
                "residual_2": 0.3,
                "drift": None,
                "note": "",
                "top_alignment": 0.9,
            },
            "loss": {"kind": "none"},
        },
        "newton": [],
    }
    r.update(kw)
    return r


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({}, "holds"),
        ({"post_onset_ratio": 1.4, "post_onset_q25": 1.3, "post_onset_q75": 1.5}, "fails"),
        ({"onset": None, "max_ratio": 0.6}, "outside"),
        ({"sharpness_init": 3.0}, "outside"),
        ({"post_onset_count": 2}, "undetermined"),
    ],
)
def test_eos_rule(kw, status):
    v = _judge([_gd_run(**kw)]).verdicts[0]
    assert v.status == status
    if status == "outside":
        assert "2/η" in v.assumption


def _minimum(gd_rates, sgd_ci, lyap_ci, **kw):
    m = {
        "kind": "minimum",
        "batch_size": 2,
        "at_minimum": True,
        "sharpness": 1.0,
        "smallest": 1e-3,
        "gradient_norm": 1e-17,
        "gradient_ratio": 1e-17,
        "normal_dim": 10,
        "mean_square_threshold": 0.5,
        "sgd_reference": "mean-square threshold",
        "loss": 1e-33,
        "gd_tests": [
            {
                "factor": 0.9,
                "lr": 1.8,
                "batch_size": None,
                "gd_stable": True,
                "mu_top": -0.2,
                "single_rates": gd_rates[0],
                "single_rate": gd_rates[0][0],
                "steps_run": [300],
                "log_norms": [[0.0, -1.0]],
            },
            {
                "factor": 1.1,
                "lr": 2.2,
                "batch_size": None,
                "gd_stable": False,
                "mu_top": 0.18,
                "single_rates": gd_rates[1],
                "single_rate": gd_rates[1][0],
                "steps_run": [60],
                "log_norms": [[0.0, 1.0]],
            },
        ],
        "sgd_tests": [
            {
                "factor": 0.8,
                "lr": 0.4,
                "batch_size": 2,
                "sgd_mean_square_stable": True,
                "mean_square_rho": 0.99,
                "sgd_lyapunov": {"value": -0.01, "ci": [-0.02, -0.005]},
                "sgd_lyapunov_stable": True,
                "mean_square_rate": sum(sgd_ci[0]) / 2,
                "mean_square_ci": sgd_ci[0],
                "single_rate": sum(lyap_ci[0]) / 2,
                "single_ci": lyap_ci[0],
                "log_norms": [[0.0, -1.0]],
            },
            {
                "factor": 1.25,
                "lr": 0.6,
                "batch_size": 2,
                "sgd_mean_square_stable": False,
                "mean_square_rho": 1.02,
                "sgd_lyapunov": {"value": 0.01, "ci": [0.005, 0.02]},
                "sgd_lyapunov_stable": False,
                "mean_square_rate": sum(sgd_ci[1]) / 2,
                "mean_square_ci": sgd_ci[1],
                "single_rate": sum(lyap_ci[1]) / 2,
                "single_ci": lyap_ci[1],
                "log_norms": [[0.0, 1.0]],
            },
        ],
    }
    m.update(kw)
    return m


GOOD = dict(
    gd_rates=([-0.01, -0.02], [0.15, 0.16]),
    sgd_ci=([-0.02, -0.01], [0.01, 0.02]),
    lyap_ci=([-0.03, -0.01], [0.005, 0.01]),
)


def _rows(m):
    j = _judge([m])
    return {key: _verdict(j, key) for key in ("GD-stable", "mean-square", "Lyapunov")}


def test_minimum_rules_hold_when_every_prediction_matches():
    assert {k: v.status for k, v in _rows(_minimum(**GOOD)).items()} == {
        "GD-stable": "holds",
        "mean-square": "holds",
        "Lyapunov": "holds",
    }


@pytest.mark.parametrize(
    ("change", "row"),
    [
        ({"gd_rates": ([0.01, 0.02], [0.15, 0.16])}, "GD-stable"),  # stable case grew
        ({"gd_rates": ([-0.01, -0.02], [-0.01, -0.02])}, "GD-stable"),  # unstable shrank
        ({"sgd_ci": ([0.01, 0.02], [0.01, 0.02])}, "mean-square"),
        ({"sgd_ci": ([-0.02, -0.01], [-0.02, -0.01])}, "mean-square"),
        ({"lyap_ci": ([0.01, 0.03], [0.005, 0.01])}, "Lyapunov"),
        ({"lyap_ci": ([-0.03, -0.01], [-0.03, -0.01])}, "Lyapunov"),
    ],
)
def test_minimum_rules_fail_on_a_mismatch(change, row):
    rows = _rows(_minimum(**{**GOOD, **change}))
    assert rows[row].status == "fails"
    assert all(v.status == "holds" for k, v in rows.items() if k != row)


def test_minimum_rules_undetermined_when_the_interval_straddles_zero():
    rows = _rows(_minimum(**{**GOOD, "sgd_ci": ([-0.01, 0.01], [0.01, 0.02])}))
    assert rows["mean-square"].status == "undetermined"


def test_minimum_rules_outside_when_not_at_a_minimum():
    rows = _rows(_minimum(**GOOD, at_minimum=False, gradient_ratio=3e-4))
    for v in rows.values():
        assert (
            v.status == "outside" and "not a minimum" in v.assumption and "3.00e-04" in v.assumption
        )


def _orbit_result(**kw):
    o = {
        "kind": "orbit",
        "factor": 1.2,
        "lr": 1.7,
        "threshold": 1.2,
        "minimum_sharpness": 1.4,
        "diverged": False,
        "near_cycle": 0.0,
        "converged": True,
        "orbit_kind": "cycle",
        "residual": 1e-14,
        "iterations": 1,
        "diameter": 0.9,
        "spectral_radius": 0.2,
        "stable": True,
        "distance": [0.5, 1e-3, 0.0],
        "distance_final": 0.0,
        "rate": -0.85,
        "rate_predicted": -0.85,
    }
    o.update(kw)
    o["kind"] = "orbit"
    return o


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({}, "holds"),
        ({"stable": False, "spectral_radius": 1.3}, "fails"),
        ({"distance_final": 0.1}, "outside"),  # GD did not settle on the solved orbit
        ({"minimum_sharpness": 1.0}, "outside"),  # below the threshold
        ({"diverged": True}, "outside"),
    ],
)
def test_exact_orbit_rule(kw, status):
    v = _verdict(_judge([_orbit_result(**kw)]), "can settle on a periodic orbit")
    assert v.status == status


def _newton(**kw):
    t = {
        "period": 2,
        "drift": 0.3,
        "mean_step": 0.01,
        "converged": False,
        "kind": "cycle",
        "residual": 0.5,
        "history": [0.6, 0.5],
        "iterations": 4,
        "hvps": 100,
        "seconds": 1.0,
        "stable": None,
        "spectral_radius": None,
        "multipliers_abs": [],
        "notes": [],
    }
    t.update(kw)
    return t


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({}, "outside"),  # a drifting run: Newton does not converge
        ({"converged": True, "stable": True, "distance_last": 1e-12}, "holds"),
        ({"converged": True, "stable": False, "distance_last": 1e-12}, "fails"),
        ({"converged": True, "stable": False, "distance_last": 0.05}, "outside"),
    ],
)
def test_eos_orbit_rule(kw, status):
    j = _judge([_gd_run(newton=[_newton(**kw)])])
    v = _verdict(j, "edge of stability GD settles")
    assert v.status == status
    if status == "outside":
        assert "drifts" in v.assumption


@pytest.mark.parametrize(
    ("q", "status"), [((0.5, 0.6), "holds"), ((1.05, 1.2), "fails"), ((0.9, 1.1), "undetermined")]
)
def test_plateau_rule(q, status):
    r = _gd_run(
        kind="sgd", batch_size=4, plateau_ratio=sum(q) / 2, plateau_q25=q[0], plateau_q75=q[1]
    )
    assert _verdict(_judge([r]), "plateaus below").status == status


@pytest.mark.parametrize(("ratios", "status"), [((0.5, 0.8), "holds"), ((0.8, 0.5), "fails")])
def test_trend_rule(ratios, status):
    runs = [
        _gd_run(
            kind="sgd", batch_size=b, plateau_ratio=x, plateau_q25=x - 0.01, plateau_q75=x + 0.01
        )
        for b, x in zip((4, 16), ratios, strict=True)
    ]
    assert _verdict(_judge(runs), "smaller batches").status == status


@pytest.mark.parametrize(("count", "status"), [(0, "holds"), (1, "fails")])
def test_gd_map_rule(count, status):
    g = {
        "steps": [0],
        "count_above": [count],
        "sign": [1],
        "singular_lr_below": [None],
        "singular_lr_above": [None],
        "min_factor": [0.5],
        "sign_changes": [],
        "crossings": [],
        "undetermined": [],
        "seconds": 0.0,
    }
    # sharpness 0.5 at step 0, below 1/η = 1: no eigenvalue above 1/η
    r = _gd_run(gd_map=g)
    assert _verdict(_judge([r]), "singular").status == status


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (["data.n=many"], "data.n"),
        (["lrs=[-1.0]"], "lrs"),
        (["batch_sizes=[300]"], "batch_sizes"),
        (["eos_band=[1.1, 0.9]"], "eos_band"),
        (["widht=3"], "widht"),
        (["minimum_batch_size=32"], "minimum_batch_size"),
        (["orbit_factors=[-1.0]"], "orbit_factors"),
        (["perturb_rel=2.0"], "perturb_rel"),
    ],
)
def test_bad_config_fields_are_named(overrides, path):
    with pytest.raises(ConfigError, match=path):
        resolve("stability", overrides)


@pytest.mark.slow
def test_default_size_reaches_the_edge_of_stability():
    exp, cfg = resolve("stability")
    results = [o.result for o in run_tasks(exp, cfg)]
    judgement = exp.judge(cfg, results)
    assert not any(v.status == "fails" for v in judgement.verdicts)
    eos = [v for v in judgement.verdicts if v.claim.startswith("Edge of stability")]
    assert sum(v.holds is True for v in eos) >= 2
    for key in ("plateaus below", "smaller batches", "GD-stable", "can settle on a periodic"):
        assert _verdict(judgement, key).holds is True, key
