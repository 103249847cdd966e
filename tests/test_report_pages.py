"""Pages a researcher reads without decoding (gdscope issue 10, items 3 and 5).

The four verdicts with their colours and reasons on every page, details as sentences and small
tables (never JSON), metric names in words, flags drawn as spans, the sharpness band readable,
why each run stopped, and the theory sections behind each claim embedded and linked.
"""

from __future__ import annotations

import html
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.lines import Line2D

from gdscope.report import plots, write_experiment_report, write_report, write_sweep_report
from gdscope.report.summary import stop_reason
from gdscope.report.theory import (
    VERDICT_SECTION,
    appendix,
    markdown_to_html,
    sections,
    slug,
    theory_text,
)
from gdscope.report.verdicts import STATUS_STYLE, format_value, humanize_key
from gdscope.store import MetricRow, Store
from gdscope.verdict import Verdict
from test_report import CHROMIUM_FLAGS, ENV, _chromium, _log

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "1-kernel-certificates"
CURVATURE = "3-curvature-stability-of-minima-and-the-gd-map"
ORBITS = "6-periodic-orbits-as-solutions"

#: One verdict of each status, with dict details (unicode keys, nested fits, rows, points).
VERDICTS = [
    Verdict(
        "the kernel stays put",
        "drift = O(m^-1/2)",
        "slope −0.49",
        True,
        {"η": 0.5, "mean_ratio": 0.987654, "fit": {"slope": -0.4912, "ci": [-0.6, -0.38]}},
        reason="the local exponents approach −1/2",
        theorem="Relative kernel drift is O(m^{-1/2}) under the NTK parameterization.",
        section=KERNEL,
    ),
    Verdict(
        "GD is stable at the minimum",
        "every normal eigenvalue below 2/η",
        "h_max = 4.3 > 2/η = 4",
        False,
        {"points": [[64, 0.1], [128, 0.05]], "λ_max": math.inf, "gap": math.nan, "none": None},
        reason="one normal eigenvalue is above 2/η",
        theorem="GD is linearly stable at a minimum iff 0 < h < 2/η on the normal space.",
        section=CURVATURE,
    ),
    Verdict(
        "the orbit is a 2-cycle",
        "period 2",
        "residual 3e-5",
        None,
        {"tasks": [{"task": "a", "loss": 1e-9}, {"task": "b", "margin": 0.3}]},
        reason="the Newton residual straddles the tolerance",
        theorem="A period-p orbit is a zero of G^p(θ) − θ.",
        section=ORBITS,
    ),
    Verdict(
        "SGD is mean-square stable",
        "ρ(T) ≤ 1",
        "not at a minimum",
        None,
        {"grad_norm": 0.3, "ratios": list(np.linspace(0, 1, 30))},
        reason="the run ended away from a minimum",
        theorem="Mean-square stability of SGD at a minimum.",
        section=CURVATURE,
        assumption="no minimum reached: ‖∇L‖ = 0.3 above the round-off floor",
    ),
]
#: A verdict as stores wrote it before reason/theorem/section/assumption/status existed.
OLD = {"claim": "an old claim", "predicted": "p", "measured": "m", "holds": False, "details": ""}


def _ids(page: str) -> set[str]:
    return set(re.findall(r"\bid='([^']+)'", page))


def _hrefs(page: str) -> set[str]:
    return set(re.findall(r"href='#([^']+)'", page))


def _status_of_rows(page: str) -> list[str]:
    return re.findall(r"data-status='(\w+)'", page)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """A run page, an experiment page and a sweep page built from :data:`VERDICTS` and OLD."""
    folder = tmp_path_factory.mktemp("pages")
    stored = [v.to_dict() for v in VERDICTS] + [OLD]
    with Store(folder / "runs.db") as store:
        run = store.create_run("gd-η0.5", {"lr": 0.5, "tags": ["a", "b"]}, environment=ENV)
        t = np.arange(12)
        _log(store, run, "loss", 1.0 / (1 + t))
        for m in ("dist_init/0", "dist_init/2", "grad_ratio/0", "grad_ratio/2"):
            _log(store, run, m, np.sqrt(t + 1.0), "after", m.split("/")[0])
        _log(store, run, "sharpness_converged", [1, 1, 0, 1] * 3, "after", "sharpness")
        store.finish_run(run, "completed", {"verdicts": stored})
        exp = store.add_experiment(
            "demo",
            {"n": 8},
            "h1",
            status="completed",
            verdicts=stored,
            results=[],
            figures=[],
            sweep="sw",
        )
        store.add_experiment(
            "demo",
            {"n": 16},
            "h2",
            status="completed",
            verdicts=stored[:2],
            results=[],
            figures=[],
            sweep="sw",
        )
        return {
            "run": write_report(store, [run], folder / "run.html"),
            "experiment": write_experiment_report(store, exp, folder / "exp.html"),
            "sweep": write_sweep_report(store, "sw", folder / "sweep.html"),
        }


# ---------------------------------------------------------------------- the vocabulary
@pytest.mark.parametrize("kind", ["run", "experiment", "sweep"])
def test_every_status_with_its_colour_and_reason(pages, kind):
    page = pages[kind].read_text(encoding="utf-8")
    for v in VERDICTS:
        css, symbol, words, color = STATUS_STYLE[v.status]
        assert f"data-status='{v.status}'" in page
        assert f"<span class='{css}'>{symbol} {words}</span>" in page  # the legend at least
        assert f".{css} {{ color: {color};" in page
        assert html.escape(v.reason) in page and html.escape(v.theorem) in page
    assert "outside the theorem's assumptions" in page
    assert "<b>Assumption not met:</b> no minimum reached: ‖∇L‖ = 0.3" in page
    assert "<details class='theorem'><summary>theorem tested</summary>" in page


def test_each_row_carries_its_own_status(pages):
    page = pages["experiment"].read_text(encoding="utf-8")
    assert _status_of_rows(page) == [*(v.status for v in VERDICTS), "fails"]  # OLD: fails
    sweep = pages["sweep"].read_text(encoding="utf-8")
    matrix = re.search(r"<table class='matrix'>.*?</table>", sweep, re.S)[0]
    # point 1 has all five verdicts; point 2 the first two and "—" (no verdict) for the rest
    first, second = ["holds", "fails", "undetermined", "outside", "fails"], ["holds", "fails"]
    assert _status_of_rows(matrix) == [*first, *second]
    assert matrix.count("title='this point gave no verdict on this claim'>—</td>") == 3
    assert "title='outside — the run ended away from a minimum'" in matrix


def test_old_stored_verdicts_render(pages, tmp_path):
    for kind in ("run", "experiment", "sweep"):
        page = pages[kind].read_text(encoding="utf-8")
        row = re.search(r"<tr><td class='claim'>an old claim.*?</tr>", page, re.S)
        assert row and "data-status='fails'" in row[0] and "✘ fails" in row[0]
    # a malformed dict (claim missing, holds with an assumption) renders instead of raising
    with Store(tmp_path / "runs.db") as store:
        bad = [{"holds": True, "assumption": "x", "details": 3}, {"claim": "ok", "holds": None}]
        exp = store.add_experiment(
            "demo", {}, "h", status="completed", verdicts=bad, results=[], figures=[]
        )
        page = write_experiment_report(store, exp, tmp_path / "p.html").read_text()
    assert _status_of_rows(page) == ["holds", "undetermined"]
    assert "— (no claim text)" in page and "— (no prediction recorded)" in page


# ---------------------------------------------------------------------- no decoding
@pytest.mark.parametrize("kind", ["run", "experiment", "sweep"])
def test_no_json_in_verdict_cells(pages, kind):
    page = pages[kind].read_text(encoding="utf-8")
    tables = re.findall(r"<table class='verdicts'>.*?</tbody></table>(?=<)", page, re.S)
    assert tables
    for table in tables:
        assert '{"' not in table and "\\u" not in table and "&quot;" not in table
        assert "{&" not in table and "[[" not in table
    assert "\\u03b7" not in page and "\\u" not in page
    assert "<dt>η</dt><dd>0.5</dd>" in page  # a unicode key, as written
    assert "<dt>mean ratio</dt><dd>0.9877</dd>" in page  # words, 4 significant digits
    assert "<dt>95% CI</dt><dd>−0.6, −0.38</dd>" in page
    assert "(64, 0.1), (128, 0.05)" in page
    assert "<dt>λ_max</dt><dd>∞</dd>" in page and "<dd>NaN</dd>" in page
    assert "<th>task</th><th>loss</th><th>margin</th>" in page  # rows as a small table
    assert "… (30 values)" in page  # a long list shows its first values and the count


@pytest.mark.parametrize("kind", ["run", "experiment", "sweep"])
def test_no_blank_cells(pages, kind):
    page = pages[kind].read_text(encoding="utf-8")
    assert not re.search(r"<td[^>]*>\s*</td>", page)


def test_format_value():
    assert format_value(0.123456) == "0.1235" and format_value(-2e-7) == "−2e−07"
    assert format_value(True) == "yes" and format_value(None) == "<span class='na'>—</span>"
    assert format_value([1, 2.5, 3]) == "1, 2.5, 3" and format_value(12.0, unit="s") == "12 s"
    assert format_value({"a<b": "<i>"}) == "<dl class='kv'><dt>a&lt;b</dt><dd>&lt;i&gt;</dd></dl>"
    assert format_value({}) == "<span class='na'>— (empty)</span>"
    assert humanize_key("sigma_inf") == "σ∞" and humanize_key("pl_factor") == "PL factor"
    assert humanize_key("<k>") == "<k>" and humanize_key("λ_min") == "λ_min"


def test_stop_reasons(tmp_path):
    with Store(tmp_path / "runs.db") as s:
        done = s.create_run("done", {"steps": 3}, environment=ENV)
        _log(s, done, "loss", [1.0, 0.5, 0.2])
        s.finish_run(done, "completed")
        boom = s.create_run("boom", environment=ENV)
        _log(s, boom, "loss", [1.0, 4.0, math.inf, math.nan])
        s.finish_run(boom, "diverged")
        nan_params = s.create_run("nanp", environment=ENV)
        _log(s, nan_params, "loss", [1.0, 2.0])
        s.finish_run(nan_params, "diverged")
        failed = s.create_run("failed", environment=ENV)
        _log(s, failed, "loss", [1.0])
        s.finish_run(failed, "failed", {"error": "RuntimeError: out of memory"})
        killed = s.create_run("killed", environment=ENV)
        s.log_step(killed, 0, [MetricRow("loss", 1.0, "loss", "before")])
        s.log_step(killed, 7, [MetricRow("loss", 0.5, "loss", "before")])
        empty = s.create_run("empty", environment=ENV)
        reasons = {r: stop_reason(s, s.run(r)) for r in (done, boom, nan_params, failed, killed)}
        assert reasons[done] == "completed 3 steps (steps 0–2)"
        assert reasons[boom] == "diverged at step 2 (loss non-finite: inf)"
        assert reasons[nan_params].startswith("diverged after step 1 (the loss or the param")
        assert reasons[failed] == "failed with an error after step 0: RuntimeError: out of memory"
        assert reasons[killed].startswith("incomplete: the run never finished") and (
            reasons[killed].endswith("after step 7")
        )
        assert stop_reason(s, s.run(empty)).endswith("before any step was stored")
        page = write_report(s, [done, boom, killed, empty], tmp_path / "r.html").read_text()
    assert "<th>why it stopped</th>" in page
    assert "diverged at step 2 (loss non-finite: inf)" in page
    assert "— (none)" in page  # steps of the run with none


# ---------------------------------------------------------------------- figures
def test_metric_names_in_words(pages):
    layers = plots.layer_labels(["dist_init/0", "dist_init/2", "grad_ratio/0", "loss"])
    assert layers == {"0": "layer 1 (module 0)", "2": "layer 2 (module 2)"}
    assert plots.metric_title("dist_init/0", layers) == (
        "distance from initialization, layer 1 (module 0)"
    )
    assert plots.metric_title("dist_init_rel/fc1") == (
        "relative distance from initialization, module 'fc1'"
    )
    assert plots.metric_title("time/sharpness") == "time in probe sharpness (s)"
    assert plots.metric_title("my_metric") == "my_metric"
    builtin = [
        "loss", "accuracy", "grad_norm", "dist_init", "dist_init_rel", "sharpness",
        "sharpness_residual", "sharpness_converged", "sharpness_matvecs", "threshold", "lr",
        "hessian_trace", "hessian_trace_se", "ntk_lambda_min", "ntk_lambda_max",
        "ntk_condition", "ntk_drift", "ntk_alignment", "pl_ratio", "pl_bound",
        "disparity_sigma_min", "disparity_rank", "disparity_full_rank", "local_smoothness",
        "semi_smooth_residual", "semi_smooth_ratio", "step_norm", "step_norm_sq", "grad_ratio",
        "grad_ratio/0", "relu_pattern_change", "relu_pattern_change/0", "data_separation",
        "param_norm", "margin", "normalized_margin", "block_sv_min/layer1", "step_time",
    ]  # fmt: skip
    for name in builtin:
        title = plots.metric_title(name)
        assert title != name, name
        assert not re.search(r"[a-z]{2,}_[a-z]{2,}", title), title  # no snake_case left
    page = pages["run"].read_text(encoding="utf-8")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert "distance from initialization, layer 2 (module 2) (metric dist_init/2)" in captions
    assert any(c.startswith("gradient ratio ‖∇_l L‖²/L, layer 1 (module 0)") for c in captions)


@pytest.fixture
def figures(monkeypatch):
    monkeypatch.setattr(plots, "_render", lambda fig, name, caption: (fig, caption))


def test_flags_are_spans_not_lines(figures):
    x = np.arange(8)
    runs = {"a": {"sharpness_converged": (x, np.array([1, 1, 0, 1, 1, 1, 0, 0.0]))}}
    ((fig, caption),) = plots.other_figures(runs, plots.run_colors(["a"]))
    (ax,) = fig.axes
    assert not [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "none", "")]
    assert len(ax.collections) == 1  # the shaded spans
    assert "shaded where yes" in caption
    assert plots.is_boolean_metric("disparity_full_rank")
    assert not plots.is_boolean_metric("my_converged", np.array([0.0, 0.5]))
    assert not plots.is_boolean_metric("accuracy", np.array([0.0, 1.0]))


def test_sharpness_band_is_not_squashed_and_legend_is_outside(figures):
    x = np.arange(10)
    runs = {
        "ok": {"sharpness": (x, np.linspace(1, 3.9, 10)), "threshold": (x, np.full(10, 4.0))},
        "boom": {"sharpness": (x, np.r_[np.linspace(1, 3, 8), 1e4, 1e6])},
    }
    fig, caption = plots.sharpness_figure(runs, plots.run_colors(list(runs)))
    (ax,) = fig.axes
    lo, hi = ax.get_ylim()
    assert lo == 0 and 4.0 < hi <= 1.25 * 4.0 + 1e-9  # the threshold band fills the axis
    assert "2 value(s) above it" in caption
    assert ax.get_legend() is None and len(fig.legends) == 1  # below the plot, not over it
    tops = [ln for ln in ax.get_lines() if ln.get_marker() == "^"]
    assert len(tops) == 1 and list(tops[0].get_ydata()) == [hi, hi]
    # no spike: the axis is left alone
    fig, caption = plots.sharpness_figure({"ok": runs["ok"]}, plots.run_colors(["ok"]))
    assert "cut" not in caption
    handles = fig.legends[0].legend_handles
    assert any(isinstance(h, Line2D) and h.get_linestyle() == "--" for h in handles)


def test_thresholds_far_apart_share_one_relative_axis(figures):
    """2/η at η = 0.25 (8) and at η = 2 (1): drawn as sharpness/threshold with one line at 1;
    thresholds within THRESHOLD_SPREAD stay absolute."""
    x = np.arange(0, 100, 10)
    runs = {
        "lr0.25": {"sharpness": (x, np.linspace(0.5, 1.4, 10)), "threshold": (x, np.full(10, 8.0))},
        "lr2": {"sharpness": (x, np.linspace(0.5, 1.05, 10)), "threshold": (x, np.full(10, 1.0))},
    }
    fig, caption = plots.sharpness_figure(runs, plots.run_colors(list(runs)))
    (ax,) = fig.axes
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    np.testing.assert_allclose(solid[0].get_ydata(), np.linspace(0.5, 1.4, 10) / 8)
    np.testing.assert_allclose(solid[1].get_ydata(), np.linspace(0.5, 1.05, 10))
    assert "divided by each run's own stability threshold" in caption
    assert ax.get_ylim()[1] < 2  # the band near 1 fills the axis, not a line at 8
    # a threshold that changes mid-run (a schedule) divides each value by the one in force
    sched = {
        "s": {
            "sharpness": (x, np.full(10, 2.0)),
            "threshold": (np.array([0, 50]), np.array([4, 1.0])),
        }
    }
    both = {**sched, "lr0.25": runs["lr0.25"]}
    fig, _ = plots.sharpness_figure(both, plots.run_colors(list(both)))
    first = next(ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "-")
    np.testing.assert_allclose(first.get_ydata(), [0.5] * 5 + [2.0] * 5)
    near = {"a": runs["lr2"], "b": {**runs["lr2"], "threshold": (x, np.full(10, 2.0))}}
    fig, caption = plots.sharpness_figure(near, plots.run_colors(list(near)))
    assert "divided" not in caption and "dashed: the optimizer's stability threshold" in caption


def test_legend_columns_fit_long_run_names(figures):
    x = np.arange(5)
    short = {n: {"loss": (x, 1.0 / (1 + x))} for n in "abcd"}
    long = {f"attention/adamw-control/lr{i}e-05": short["a"] for i in range(4)}
    ncols = [
        plots.loss_figure(r, plots.run_colors(list(r)))[0].legends[0]._ncols for r in (short, long)
    ]
    assert ncols == [4, 2]


def test_adam_preconditioned_sharpness_drawn_against_its_threshold(figures):
    x = np.arange(0, 50, 5)
    runs = {
        "adamw": {
            "preconditioned_sharpness": (x, np.linspace(100, 370, 10)),
            "preconditioned_threshold": (x, np.full(10, 380.0)),
            "loss": (x, 1.0 / (1 + x)),
        }
    }
    made = [p for f in plots.FIGURES if (p := f(runs, plots.run_colors(["adamw"]))) is not None]
    assert "preconditioned_sharpness" not in plots.other_metric_names(runs)
    (fig, caption) = plots.preconditioned_sharpness_figure(runs, plots.run_colors(["adamw"]))
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(made) == 2 and [set(d.get_ydata()) for d in dashed] == [{380.0}]
    assert "(2 + 2β₁)/((1 − β₁)η) for Adam" in caption


def test_experiment_page_does_not_repeat_its_own_figures(tmp_path):
    """A figure the experiment stored as ``sharpness`` replaces the run figure of that name."""
    with Store(tmp_path / "runs.db") as store:
        run = store.create_run("r", environment=ENV)
        t = np.arange(12)
        _log(store, run, "loss", 1.0 / (1 + t))
        _log(store, run, "sharpness", 1 + 0.1 * t)
        store.finish_run(run, "completed")
        payload = store.export_run(run)
        own = plots.sharpness_figure(
            {"r": {"sharpness": store.series(run, "sharpness")}}, plots.run_colors(["r"])
        )
        fig = {"name": own.name, "caption": "the figure drawn by the experiment", "uri": own.uri}
        pages = {}
        for key, figs in (("own", [fig]), ("none", [])):
            exp = store.add_experiment(
                "x",
                {},
                key,
                status="completed",
                verdicts=[],
                results=[],
                figures=figs,
                runs=[payload],
            )
            pages[key] = write_experiment_report(store, exp, tmp_path / f"{key}.html").read_text()
    run_caption = "Sharpness λ_max(∇²L); dashed"
    assert (
        run_caption in pages["none"] and "the figure drawn by the experiment" not in pages["none"]
    )
    own_page = pages["own"]
    assert run_caption not in own_page and "the figure drawn by the experiment" in own_page
    assert own_page.count("<img") == pages["none"].count("<img")  # one sharpness, not two
    assert "The experiment&#x27;s own figures above draw sharpness." in own_page


# ---------------------------------------------------------------------- theory
def test_theory_ships_with_the_package_and_docs_links_to_it():
    doc = ROOT / "docs" / "theory.md"
    assert doc.is_symlink() and os.readlink(doc) == "../src/gdscope/report/theory.md"
    assert doc.read_text(encoding="utf-8") == theory_text()
    assert "theory.md" in (ROOT / "pyproject.toml").read_text().split("package-data]")[1]
    assert list(sections())[:4] == [
        "0-notation-and-conventions",
        KERNEL,
        "2-optimizer-dynamics-in-the-kernel-regime",
        CURVATURE,
    ]
    assert VERDICT_SECTION in sections()
    assert slug("4. Regularity, skip connections, cross-entropy at infinity") == (
        "4-regularity-skip-connections-cross-entropy-at-infinity"
    )


def test_markdown_subset():
    text = (
        "Intro with `a<b` and **bold** and *it*, PL\\* too.\n\n"
        "- one\n  continued\n  - nested `x`\n- two\n\n"
        "| a | b |\n| --- | --- |\n| **1** | <i> |\n"
    )
    out = markdown_to_html(text)
    assert out.startswith("<p>Intro with <code>a&lt;b</code> and <strong>bold</strong> and ")
    assert "<em>it</em>, PL* too.</p>" in out
    assert "<ul><li>one continued<ul><li>nested <code>x</code></li></ul></li><li>two</li></ul>" in (
        out
    )
    assert "<td><strong>1</strong></td><td>&lt;i&gt;</td>" in out and "---" not in out
    assert "<" not in re.sub(r"</?(p|code|strong|em|ul|li|table|thead|tbody|tr|th|td)>", "", out)
    # every section of theory.md converts without leftover Markdown outside code
    for sec in sections().values():
        body = re.sub(r"<code>.*?</code>", "", markdown_to_html(sec.body))
        assert "**" not in body and "`" not in body and "\n- " not in body, sec.anchor


@pytest.mark.parametrize("kind", ["run", "experiment", "sweep"])
def test_theory_appendix_and_links_resolve(pages, kind):
    page = pages[kind].read_text(encoding="utf-8")
    ids = _ids(page)
    for anchor in (KERNEL, CURVATURE, ORBITS, VERDICT_SECTION):
        assert anchor in ids and f"href='#{anchor}'" in page
    assert _hrefs(page) <= ids  # every in-page link lands on the page
    assert "<section id='theory'><h2>Theory</h2>" in page
    assert "<th>verdict</th><th>meaning</th>" in page  # §8's table, rendered
    assert "docs/theory.md#" not in page.split("<section id='theory'>")[0]


def test_unknown_section_is_named_not_linked():
    html_ = appendix(["no-such-section"])
    assert "Cited but not in this version of theory.md: no-such-section" in html_
    assert "id='no-such-section'" not in html_


# ---------------------------------------------------------------------- in a browser
@pytest.mark.browser
def test_links_resolve_in_chromium(pages, tmp_path):
    exe = _chromium()
    for kind, page in pages.items():
        flags = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / kind}"]
        dom = subprocess.run(
            [*flags, "--dump-dom", page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert dom.returncode == 0, dom.stderr[-2000:]
        ids = set(re.findall(r'\bid="([^"]+)"', dom.stdout))
        hrefs = set(re.findall(r'href="#([^"]+)"', dom.stdout))
        assert hrefs and hrefs <= ids, (kind, hrefs - ids)
        assert {KERNEL, CURVATURE, VERDICT_SECTION} <= ids
