"""The skips experiment (shortcut variants: training speed, block-Jacobian singular values)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.func import jacrev

from gdscope.errors import ConfigError
from gdscope.experiments import resolve, run_tasks
from gdscope.experiments.skips import _compare
from gdscope.zoo import load_dataset, preact_resnet

SMOKE = {
    "data": {"n": 64},
    "trials": 2,
    "epochs": 3,
    "width": 4,
    "jacobian_samples": 8,
    "batch_size": 16,
}


@pytest.fixture(scope="module")
def smoke():
    exp, cfg = resolve({"experiment": "skips", **SMOKE})
    results = [o.result for o in run_tasks(exp, cfg)]
    return exp, cfg, results, exp.judge(cfg, results)


def test_verdicts_and_figures_have_the_documented_structure(smoke):
    exp, cfg, results, judgement = smoke
    tasks = exp.tasks(cfg)
    assert len(tasks) == 8
    # identical initialization: every variant of a trial is built from the same seed
    for trial in range(cfg.trials):
        assert {t["seed"] for t in tasks if t["trial"] == trial} == {cfg.seed + trial}
    claims = [v.claim for v in judgement.verdicts]
    assert claims == [
        "The modified shortcut trains fastest",
        "Skip connections train faster than no shortcut",
        "With skips the block-Jacobian singular values are closer to 1",
        "With skips the block Jacobian's smallest singular value stays away from 0",
    ]
    for v in judgement.verdicts:
        assert v.holds in (True, False, None)
        assert "mean ± std over 2 trials" in v.measured
        assert {"metric", "values", "comparisons"} <= set(v.details)
        assert v.theorem and v.reason and v.section.startswith("4-")
    assert [f.name for f in judgement.figures] == ["skips-training", "skips-jacobian-histograms"]
    json.dumps(results, allow_nan=False)
    for r in results:
        assert len(r["epoch_loss"]) == cfg.epochs
        assert r["jacobian_epochs"] == list(range(cfg.epochs + 1))
        # 8 samples × min(k = 10 logits, m) singular values in every histogram
        assert all(sum(j["counts"]) == 8 * 10 for j in r["jacobian"])


def test_initial_block_jacobian_matches_a_direct_computation(smoke):
    _, cfg, results, _ = smoke
    X, _ = load_dataset("digits", n=64, seed=cfg.seed, one_hot=False, dtype=torch.float64)
    X = X.reshape(-1, 1, 8, 8)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(cfg.seed))[:8]
    for shortcut in ("none", "modified"):
        r = next(r for r in results if r["shortcut"] == shortcut and r["trial"] == 0)
        net = preact_resnet(
            1, 10, width=4, shortcut=shortcut, norm="none", seed=cfg.seed, dtype=torch.float64
        )

        def logits(z, net=net):
            return net.from_block_output(z, 0).reshape(-1)

        with torch.no_grad():
            hs = [net.block_output(x[None], 0) for x in X[idx]]
        sv = torch.stack([torch.linalg.svdvals(jacrev(logits)(h).reshape(10, -1)) for h in hs])
        sv = sv.detach()
        j0 = r["jacobian"][0]
        assert j0["max"] == pytest.approx(sv.max().item(), rel=1e-9)
        assert j0["min"] == pytest.approx(sv.min().item(), rel=1e-9)
        cond = np.median(torch.log10(sv.max(1).values / sv.min(1).values).numpy())
        assert j0["log_cond"] == pytest.approx(cond, rel=1e-9)
        smin = np.median(torch.log10(sv.min(1).values).numpy())
        assert j0["log_smin"] == pytest.approx(smin, rel=1e-9)
        assert j0["log_dev"] == pytest.approx(np.median(torch.log10(sv).abs().numpy()), rel=1e-9)


def test_without_skips_the_block_jacobian_vanishes(smoke):
    _, _, results, judgement = smoke
    none = [r["jacobian"][0]["log_dev"] for r in results if r["shortcut"] == "none"]
    modified = [r["jacobian"][0]["log_dev"] for r in results if r["shortcut"] == "modified"]
    # at init σ ≈ 1e-2.5 without shortcuts; the modified shortcut keeps them within a decade
    assert min(none) > 2 and max(modified) < 1.2
    assert judgement.verdicts[2].holds is True
    # and their smallest singular value is orders of magnitude below the modified shortcut's
    smin = {
        sc: [r["jacobian"][0]["log_smin"] for r in results if r["shortcut"] == sc]
        for sc in ("none", "modified")
    }
    assert max(smin["none"]) < min(smin["modified"]) - 1
    assert judgement.verdicts[3].holds is True


def test_compare_needs_the_difference_to_exceed_the_combined_spread():
    worse, better = [2.0, 2.1, 1.9], [1.0, 1.1, 0.9]
    d, s, holds = _compare(worse, better)
    assert d == pytest.approx(1.0) and s == pytest.approx(math.sqrt(0.02)) and holds is True
    assert _compare(better, worse)[2] is False
    assert _compare([1.0, 1.3], [1.1, 0.9])[2] is None  # within the spread
    assert _compare([2.0], [1.0])[2] is None  # one trial: no spread
    assert _compare([math.inf, 1.0], [1.0, 1.1])[2] is True  # a diverged trial is worst
    assert _compare([1.0, 1.1], [math.inf, 1.0])[2] is False


def test_batch_norm_variant_trains_with_eval_mode_probes():
    exp, cfg = resolve(
        {
            "experiment": "skips",
            **SMOKE,
            "norm": "batch",
            "shortcuts": ["modified"],
            "trials": 1,
            "epochs": 1,
        }
    )
    (out,) = run_tasks(exp, cfg)
    r = out.result
    assert r["status"] == "completed"
    assert all(np.isfinite(j["log_dev"]) for j in r["jacobian"])
    judgement = exp.judge(cfg, [r])
    assert judgement.verdicts == []  # one variant: nothing to compare
    assert len(judgement.figures) == 2


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (["data.n=many"], "data.n"),
        (["shortcuts=['bogus']"], "shortcuts"),
        (["block=7"], "block"),
        (["batch_size=1000"], "batch_size"),
        (["trials=0"], "trials"),
        (["norm=layer"], "norm"),
    ],
)
def test_bad_config_fields_are_named(overrides, path):
    with pytest.raises(ConfigError, match=path):
        resolve("skips", overrides)


@pytest.mark.slow
def test_default_size_modified_shortcut_trains_fastest():
    exp, cfg = resolve("skips")
    judgement = exp.judge(cfg, [o.result for o in run_tasks(exp, cfg)])
    rows = {v.claim: v.holds for v in judgement.verdicts}
    assert rows["The modified shortcut trains fastest"] is True
    assert rows["Skip connections train faster than no shortcut"] is True
    assert rows["With skips the block-Jacobian singular values are closer to 1"] is True
