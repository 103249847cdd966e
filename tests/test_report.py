"""The HTML report and the run verdicts."""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gdscope.errors import InvalidArgumentError
from gdscope.report import Verdict, plots, summarize_run, write_report
from gdscope.report.summary import EOS_ONSET_FRACTION, probe_timings
from gdscope.store import MetricRow, Store

ENV = {"python": "3.x", "torch": "2.x", "cuda_available": False, "threads": 1}
EVIL_NAME = "<script>alert(1)</script>"
EVIL_VALUE = '&"<>'
STEPS = 40


def _log(store: Store, run: int, name: str, values, iterate="before", probe="", steps=None):
    """One metric per step: ``values[i]`` at ``steps[i]`` (each its own transaction)."""
    steps = range(len(values)) if steps is None else steps
    for t, v in zip(steps, values, strict=True):
        store.log_step(run, t, [MetricRow(name, v, probe or name.split("/")[0], iterate)])


def _full_run(store: Store, name: str, config: dict) -> int:
    """A run with every metric of the contract; the learning rate halves at step 20."""
    run = store.create_run(name, config, environment=ENV)
    t = np.arange(STEPS)
    lr = np.where(t < 20, 0.5, 0.25)
    sharp_steps = t[::2]
    _log(store, run, "loss", 1.0 / (1 + t))
    _log(store, run, "accuracy", np.minimum(1.0, 0.3 + t / 20))
    _log(store, run, "grad_norm", np.exp(-t / 10))
    for metric in ("dist_init", "dist_init_rel", "dist_init/0", "dist_init_rel/0"):
        _log(store, run, metric, np.sqrt(t + 1.0), "after", "dist_init")
    _log(store, run, "lr", lr, "after", "threshold")
    _log(store, run, "threshold", 2 / lr, "after")
    _log(
        store,
        run,
        "sharpness",
        np.minimum(1 + sharp_steps / 2, 2 / lr[::2]),
        "after",
        steps=sharp_steps,
    )
    _log(
        store,
        run,
        "sharpness_residual",
        1e-4 * np.ones(sharp_steps.size),
        "after",
        "sharpness",
        steps=sharp_steps,
    )
    _log(
        store,
        run,
        "time/sharpness",
        0.02 * np.ones(sharp_steps.size),
        "after",
        "sharpness",
        steps=sharp_steps,
    )
    _log(store, run, "hessian_trace", [10.0, 12.0, 13.0, 13.5], "after", steps=[0, 10, 20, 30])
    _log(
        store,
        run,
        "hessian_trace_se",
        [1.0, 0.5, 0.5, 0.4],
        "after",
        "hessian_trace",
        steps=[0, 10, 20, 30],
    )
    _log(
        store,
        run,
        "step_time",
        0.01 * np.ones(STEPS - 1),
        "before",
        "tracker",
        steps=range(1, STEPS),
    )
    _log(store, run, "time/loss", 1e-4 * np.ones(STEPS), "before", "loss")
    _log(store, run, "ntk_lambda_min", np.logspace(-6, 0, STEPS), "after", "ntk")
    return run


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "runs.db") as s:
        yield s


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, tuple[int, int], Path]:
    """``(store path, run ids, report path)``: two runs, one with hostile strings; built once."""
    folder = tmp_path_factory.mktemp("report")
    with Store(folder / "runs.db") as store:
        evil = _full_run(store, EVIL_NAME, {"note": EVIL_VALUE, "<key>": 1, "lr": 0.5})
        plain = store.create_run("plain-adam", {"optimizer": "adam"}, environment=ENV)
        _log(store, plain, "loss", [1.0, 0.5, math.inf])
        _log(store, plain, "sharpness", [1.0, 2.0, 3.0], "after")
        store.finish_run(evil, "completed")
        store.finish_run(plain, "diverged")
        path = write_report(store, [evil, plain], folder / "report.html", title="t <&>")
    assert path == folder / "report.html"
    return folder / "runs.db", (evil, plain), path


@pytest.fixture
def two_runs(built) -> tuple[int, int]:
    return built[1]


@pytest.fixture
def built_store(built):
    with Store(built[0]) as s:
        yield s


@pytest.fixture
def report(built) -> str:
    return built[2].read_text(encoding="utf-8")


def _figure_names(page: str) -> list[str]:
    return re.findall(r"<figure class='plot' data-name='([^']*)'>", page)


# ---------------------------------------------------------------------- the HTML report
def test_user_strings_are_escaped(report):
    assert "<script>alert" not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert EVIL_VALUE not in report and "&amp;&quot;&lt;&gt;" in report
    assert "<key>" not in report and "&lt;key&gt;" in report
    assert "<title>t &lt;&amp;&gt;</title>" in report
    assert report.count("<script>") == 1  # only the report's own figure check


def test_sections_and_figures(report):
    for section in ("runs", "verdicts", "figures", "timing", "other", "theory"):
        assert f"<section id='{section}'>" in report
    names = _figure_names(report)
    assert names[:6] == ["loss", "accuracy", "sharpness", "grad_norm", "dist_init", "hessian_trace"]
    others = {n.removeprefix("other:") for n in names[6:]}
    assert others == {
        "dist_init/0",
        "dist_init_rel/0",
        "lr",
        "ntk_lambda_min",
        "sharpness_residual",
    }
    images = re.findall(r"<img src='data:image/png;base64,([^']+)'", report)
    assert len(images) == len(names)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "incomplete" not in report and "diverged" in report
    assert "✔ holds" in report and "✘ fails" in report and "? undetermined" in report


def test_probe_timing_table(report, built_store, two_runs):
    evil, plain = two_runs
    timings = {t.probe: t for t in probe_timings(built_store, evil)}
    assert set(timings) == {"sharpness", "loss"}
    assert timings["sharpness"].calls == STEPS // 2
    assert timings["sharpness"].seconds == pytest.approx(0.02 * STEPS / 2)
    assert timings["sharpness"].share == pytest.approx(0.4 / (0.01 * (STEPS - 1)))
    assert probe_timings(built_store, plain) == []
    assert "<td>sharpness</td><td class='num'>20</td><td class='num'>0.400</td>" in report


def test_report_is_self_contained(report):
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", report, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", report, re.I)
    assert "<link" not in report and "@import" not in report and "<script src" not in report


def test_incomplete_run_and_duplicate_names(store, tmp_path):
    a = store.create_run("same", environment=ENV)
    b = store.create_run("same", environment=ENV)
    _log(store, a, "loss", [1.0, 0.5])
    page = write_report(store, [a, b, a], tmp_path / "r.html").read_text()
    assert f"same #{a}" in page and f"same #{b}" in page
    assert page.split("<section id='verdicts'>")[1].split("</section>")[0].count("<h3>") == 2
    assert "incomplete" in page
    assert _figure_names(page) == ["loss"]
    assert "No run recorded these metrics." in page  # the empty "Other metrics" section


def test_write_report_errors(built_store, two_runs, tmp_path):
    with pytest.raises(InvalidArgumentError, match="at least one run"):
        write_report(built_store, [], tmp_path / "r.html")
    with pytest.raises(InvalidArgumentError, match=r"no run 'nope'.*plain-adam"):
        write_report(built_store, ["nope"], tmp_path / "r.html")
    with pytest.raises(InvalidArgumentError, match="cannot write the report"):
        write_report(built_store, list(two_runs), tmp_path / "missing" / "r.html")


def test_run_colours_and_threshold_lines(built_store, two_runs, monkeypatch):
    """Threshold lines are dashed, per run, in the run's colour; a run without one has none."""
    monkeypatch.setattr(plots, "_render", lambda fig, name, caption: fig)
    runs = {
        built_store.run(r).name: {n: built_store.series(r, n) for n in built_store.metric_names(r)}
        for r in two_runs
    }
    colors = plots.run_colors(list(runs))
    assert len(set(colors.values())) == 2 and plots.run_colors(list(runs)) == colors
    (ax,) = plots.sharpness_figure(runs, colors).axes
    lines = [ln for ln in ax.get_lines() if ln.get_xdata().size]
    dashed = [ln for ln in lines if ln.get_linestyle() == "--"]
    solid = {ln.get_color(): ln for ln in lines if ln.get_linestyle() == "-"}
    assert set(solid) == set(colors.values())
    assert [ln.get_color() for ln in dashed] == [colors[EVIL_NAME]]
    assert sorted(set(dashed[0].get_ydata())) == [4.0, 8.0]  # follows the lr schedule
    (ax,) = plots.trace_figure(runs, colors).axes
    assert len(ax.collections) == 1  # the ±2 se band
    assert plots.accuracy_figure({"plain": runs["plain-adam"]}, colors) is None


# ---------------------------------------------------------------------- verdicts
def _by_claim(store, status="completed", **series) -> dict[str, Verdict]:
    run = store.create_run(environment=ENV)
    for name, spec in series.items():
        _log(store, run, name, spec[0], spec[1], steps=spec[2] if len(spec) > 2 else None)
    store.finish_run(run, status)
    return {v.claim: v for v in summarize_run(store, run)}


ZERO = "training reaches zero training error"
DECREASE = "loss decreases to near zero"
EOS = "sharpness reaches the stability threshold (edge of stability)"
FINITE = "loss stays finite"


def test_edge_of_stability_onset(store):
    v = _by_claim(
        store,
        sharpness=([0.5, 1.0, 1.5, 1.92, 2.0, 1.98], "before"),
        threshold=([2.0] * 6, "before"),
    )[EOS]
    assert v.holds is True
    assert f"onset (≥ {EOS_ONSET_FRACTION:g}·threshold) at step 3" in v.measured
    assert "max sharpness/threshold 1;" in v.measured and "median after onset 0.99" in v.measured
    assert v.predicted == "sharpness rises to threshold (2/η for GD)"
    # 'after' values describe the next iterate: the onset moves to step 4
    v = _by_claim(
        store, sharpness=([0.5, 1.0, 1.5, 1.92], "after"), threshold=([2.0] * 4, "after")
    )[EOS]
    assert "at step 4" in v.measured


def test_edge_of_stability_follows_a_varying_threshold(store):
    # threshold 4 until step 5, then 8 (lr halved); sharpness every 3 steps stays at 3.9:
    # at 0.975·threshold up to step 3, at 0.49 afterwards
    v = _by_claim(
        store,
        sharpness=([3.0, 3.9, 3.9, 3.9], "before", [0, 3, 6, 9]),
        threshold=([4.0] * 5 + [8.0] * 5, "before"),
    )[EOS]
    assert v.holds is True and "at step 3" in v.measured
    assert "median after onset 0.487" in v.measured and "from 4 to 8" in v.details
    v = _by_claim(
        store,
        sharpness=([3.0, 3.9, 3.9], "before", [0, 6, 9]),
        threshold=([4.0] * 5 + [8.0] * 5, "before"),
    )[EOS]
    assert (
        v.holds is False
        and "never" in v.measured
        and "max sharpness/threshold 0.75" in (v.measured)
    )


def test_edge_of_stability_undetermined(store):
    assert _by_claim(store, sharpness=([1.0], "after"))[EOS].holds is None
    assert _by_claim(store, threshold=([1.0], "after"))[EOS].holds is None
    v = _by_claim(store, sharpness=([math.nan], "after"), threshold=([1.0], "after"))[EOS]
    assert v.holds is None


def test_zero_training_error(store):
    v = _by_claim(store, accuracy=([0.5, 1.0, 0.9, 1.0], "before"))[ZERO]
    assert v.holds is True and v.measured == "final accuracy 1; first 100% at step 1"
    v = _by_claim(store, accuracy=([0.5, 1.0, 0.9], "before"))[ZERO]
    assert v.holds is False and "first 100% at step 1" in v.measured
    v = _by_claim(store, accuracy=([0.5, 0.7], "before"))[ZERO]
    assert v.holds is False and "never 100%" in v.measured
    assert _by_claim(store, loss=([1.0], "before"))[ZERO].holds is None


def test_loss_decrease_and_finiteness(store):
    verdicts = _by_claim(store, loss=([2.0, 1.0, 0.002], "before"))
    assert (
        verdicts[DECREASE].holds is True and "final/initial = 0.001" in verdicts[DECREASE].measured
    )
    assert verdicts[FINITE].holds is True and "all 3 values finite" in verdicts[FINITE].measured
    assert _by_claim(store, loss=([2.0, 1.0], "before"))[DECREASE].holds is False
    assert _by_claim(store, loss=([2.0], "before"))[DECREASE].holds is None
    verdicts = _by_claim(store, "diverged", loss=([2.0, math.inf, math.nan], "before"))
    assert verdicts[DECREASE].holds is False
    assert verdicts[FINITE].holds is False and verdicts[FINITE].measured == "loss inf at step 1"
    verdicts = _by_claim(store, "diverged", loss=([2.0, 1.0], "before"))
    assert verdicts[FINITE].holds is False and "diverged" in verdicts[FINITE].measured
    verdicts = _by_claim(store)
    assert verdicts[FINITE].holds is None and verdicts[DECREASE].holds is None
    assert {
        k: v
        for k, v in verdicts[FINITE].to_dict().items()
        if k in ("claim", "predicted", "measured", "holds", "details")
    } == {
        "claim": FINITE,
        "predicted": "finite loss at every step",
        "measured": "no loss metric",
        "holds": None,
        "details": "",
    }


# ---------------------------------------------------------------------- in a browser
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
)


def _chromium() -> str:
    exe = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium is missing: .ci/run must install Debian's chromium "
                "(apt-get install -y chromium)."
            )
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


@pytest.mark.browser
def test_report_renders_in_chromium(built, tmp_path):
    exe = _chromium()
    page = built[2]
    url = page.resolve().as_uri()
    flags = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    total = len(_figure_names(page.read_text()))
    match = re.search(r'data-figures-ok="(\d+)/(\d+)"', dom.stdout)
    assert match, "the report's load script did not run: " + dom.stdout[:500]
    assert (int(match[1]), int(match[2])) == (total, total) and total > 0
    # every in-page link (claims to their theory sections) lands on an element of the page
    ids = set(re.findall(r'\bid="([^"]+)"', dom.stdout))
    hrefs = set(re.findall(r'href="#([^"]+)"', dom.stdout))
    assert hrefs and hrefs <= ids, hrefs - ids
    assert "8-from-a-theorem-to-a-verdict" in ids

    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [*flags, "--window-size=1280,3000", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = Path(shot).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page is ~10 KB
