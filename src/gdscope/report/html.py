"""One self-contained HTML report of stored runs: runs, verdicts, figures, timings, other metrics.

The file needs nothing else (inline CSS, figures as ``data:`` URIs, no external resources).
Every string that comes from the store (run names, config, metric names, details) is escaped.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from gdscope import __version__
from gdscope.errors import GdscopeError, InvalidArgumentError
from gdscope.report import plots
from gdscope.report.summary import (
    Verdict,
    probe_timings,
    rate_row,
    stop_reason,
    stored_prediction,
    summarize_run,
)
from gdscope.report.theory import appendix, section_link
from gdscope.report.verdicts import (
    STATUS_STYLE,
    VERDICT_CSS,
    as_verdict,
    cited_sections,
    format_value,
    mark,
    status_legend,
    verdict_row,
    verdicts_table,
)
from gdscope.store import HTML_MARKER, RunInfo, Store, check_output, write_output
from gdscope.theory import orbit_from_store

__all__ = ["write_report"]

_ENVIRONMENT_KEYS = ("python", "torch", "numpy", "device", "threads", "hostname", "gdscope")

_CSS = (
    """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1200px; margin: 0 auto; padding: 1em 2em 3em; }
h1 { margin-bottom: 0.1em; } .generated { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px;
          margin-right: 0.4em; vertical-align: -0.1em; }
dl.kv { display: grid; grid-template-columns: auto 1fr; gap: 0 0.8em; margin: 0;
        font-size: 0.9em; }
dl.kv dt { color: #555; } dl.kv dd { margin: 0; word-break: break-word; }
td.env dd { white-space: nowrap; }
figure.plot { margin: 0 0 1.5em; } figure.plot img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
.small-multiples { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
                   gap: 0.5em 1.5em; }
.note { color: #666; } td.stopped { max-width: 22em; }
"""
    + VERDICT_CSS
)

# Sets <body data-figures-ok="loaded/total"> once images have loaded (read by the browser test).
_SCRIPT = """
window.addEventListener("load", function () {
  var figures = document.querySelectorAll("figure.plot"), ok = 0;
  figures.forEach(function (f) {
    var img = f.querySelector("img");
    if (img && img.complete && img.naturalWidth > 0) { ok++; }
  });
  document.body.dataset.figuresOk = ok + "/" + figures.length;
});
"""


def write_report(
    store: Store,
    runs: Sequence[int | str],
    path: str | os.PathLike[str],
    title: str = "gdscope report",
) -> Path:
    """Write one self-contained HTML report of ``runs`` (ids or names) to ``path``.

    ``path`` may be a new file or a page gdscope wrote; the store and any other file are
    refused (:func:`gdscope.store.check_output`).
    """
    out = _check_out(path, store)
    infos = list({info.id: info for info in (store.run(r) for r in runs)}.values())
    if not infos:
        raise InvalidArgumentError("runs is empty: pass at least one run id or name.")
    labels = _labels(infos)
    colors = plots.run_colors(labels)
    data = {
        label: {name: store.series(info.id, name) for name in store.metric_names(info.id)}
        for label, info in zip(labels, infos, strict=True)
    }
    predictions = {
        label: pred
        for label, info in zip(labels, infos, strict=True)
        if (pred := stored_prediction(store, info.id)) is not None
    }
    orbits = {
        label: rep
        for label, info in zip(labels, infos, strict=True)
        if (rep := _loss_orbit(store, info.id, data[label])) is not None
    }
    cycles = {label: (r.period, r.onset) for label, r in orbits.items() if r.is_cycle}
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    verdicts = {
        label: summarize_run(store, info.id) for label, info in zip(labels, infos, strict=True)
    }
    cited = [s for vs in verdicts.values() for s in cited_sections(vs)]
    sections = [
        f"<header><h1>{_e(title)}</h1><p class='generated'>Generated {_e(generated)} by "
        f"gdscope {_e(__version__)}</p></header>",
        _runs_section(store, infos, labels, colors),
        _verdicts_section(verdicts, colors),
        _figures_section(
            "figures",
            "Figures",
            "The x axis counts the optimizer updates applied to the parameters measured.",
            plots.standard_figures(data, colors, cycles, predictions=predictions),
        ),
        _prediction_section(store, infos, labels, colors, data, predictions),
        _stability_section(infos, labels, colors, orbits),
        _timing_section(store, infos, labels, colors),
        _figures_section(
            "other",
            "Other metrics",
            "Metrics no figure above shows.",
            plots.other_figures(data, colors),
            small=True,
        ),
        appendix([*cited, _SEC_DYNAMICS, _SEC_CURVATURE]),
    ]
    return _write_page(out, title, sections, store=store)


_SEC_DYNAMICS = "2-optimizer-dynamics-in-the-kernel-regime"
_SEC_CURVATURE = "3-curvature-stability-of-minima-and-the-gd-map"


def _protect(store: Store | None) -> list[Path]:
    return [store.path] if store is not None and isinstance(store.path, Path) else []


def _check_out(path: str | os.PathLike[str], store: Store | None = None) -> Path:
    """``path`` as a Path, if a page may be written there (never over ``store``); else refuse.

    The one output-path check of every page (run, experiment, sweep): see
    :func:`gdscope.store.check_output`.
    """
    return check_output(path, "html", protect=_protect(store), arg="out")


def _write_page(
    out: Path,
    title: str,
    sections: Sequence[str],
    css: str = _CSS,
    *,
    store: Store | None = None,
) -> Path:
    """Write one self-contained page of ``sections`` (inline ``css`` and the figure check).

    The page carries :data:`~gdscope.store.HTML_MARKER`, so a later report may replace it.
    """
    page = (
        f"<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n{HTML_MARKER}\n"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{_e(title)}</title>\n<style>{css}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + f"\n<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )
    return write_output(out, page, "html", protect=_protect(store), arg="out")


def _status(v: Any) -> str:
    """A verdict's status from a :class:`Verdict`, its stored dict (read by
    :meth:`Verdict.from_dict`, the one vocabulary), or a bare ``holds`` value."""
    if isinstance(v, (Verdict, Mapping)):
        return as_verdict(v).status
    return {True: "holds", False: "fails"}.get(v, "undetermined")


def _mark(v: Any) -> tuple[str, str]:
    """The CSS class and mark of a verdict (or a bare ``holds``: True, False, None)."""
    status = _status(v)
    return STATUS_STYLE[status][0], mark(status)  # type: ignore[index]


def _e(value: Any) -> str:
    return html.escape(str(value))


#: The only figure URIs a page embeds: inline PNG (what gdscope draws) and SVG images.
IMAGE_URI_PREFIXES = ("data:image/png;base64,", "data:image/svg+xml")


def _img(p: plots.Plot) -> str:
    """A figure's ``<figure>``: its ``uri`` checked (inline PNG or SVG only) and escaped."""
    uri = p.uri
    if not isinstance(uri, str) or not uri.startswith(IMAGE_URI_PREFIXES):
        shown = repr(uri[:60] + ("…" if len(uri) > 60 else "")) if isinstance(uri, str) else uri
        raise InvalidArgumentError(
            f"figure {str(p.name)!r}: uri={shown} is not an inline image; a page embeds only "
            f"{' or '.join(IMAGE_URI_PREFIXES)} URIs (what gdscope draws). Draw the figure "
            "with gdscope (gdscope.experiments.Figure.of) or remove it."
        )
    return (
        f"<figure class='plot' data-name='{_e(p.name)}'><img src='{_e(uri)}' "
        f"alt='{_e(p.caption)}'><figcaption>{_e(p.caption)}</figcaption></figure>"
    )


def _labels(infos: Sequence[RunInfo]) -> list[str]:
    """Run names, with the id appended where names repeat."""
    names = [i.name for i in infos]
    return [i.name if names.count(i.name) == 1 else f"{i.name} #{i.id}" for i in infos]


def _swatch(label: str, colors: Mapping[str, str]) -> str:
    return f"<span class='swatch' style='background:{colors[label]}'></span>{_e(label)}"


def _kv(items: Mapping[str, Any]) -> str:
    """A definition list of ``items`` (keys as stored, values readable: no JSON)."""
    if not items:
        return "<span class='na'>— (none recorded)</span>"
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{format_value(v)}</dd>" for k, v in items.items())
    return f"<dl class='kv'>{rows}</dl>"


def _table(header: Sequence[str], rows: Sequence[str]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _runs_section(
    store: Store, infos: Sequence[RunInfo], labels: Sequence[str], colors: Mapping[str, str]
) -> str:
    rows = []
    for info, label in zip(infos, labels, strict=True):
        env = _environment_summary(info.environment)
        rows.append(
            f"<tr><td>{_swatch(label, colors)}</td><td class='num'>{info.id}</td>"
            f"<td>{_e(info.status_label)}</td><td class='num'>{_steps(info)}</td>"
            f"<td class='stopped'>{_e(stop_reason(store, info))}</td>"
            f"<td>{_kv(info.config)}</td><td class='env'>{_kv(env)}</td></tr>"
        )
    header = ("run", "id", "status", "steps", "why it stopped", "config", "environment")
    return f"<section id='runs'><h2>Runs</h2>{_table(header, rows)}</section>"


def _steps(info: RunInfo) -> str:
    """Steps stored (last step + 1), or "—" for a run with none."""
    return "<span class='na'>— (none)</span>" if info.last_step is None else str(info.last_step + 1)


def _environment_summary(env: Mapping[str, Any]) -> dict[str, Any]:
    """Versions, ``device`` (the CUDA device name, or ``cpu``), threads, host."""
    if "cuda_available" in env:
        env = {**env, "device": env.get("cuda_device") or "cpu"}
    return {k: env[k] for k in _ENVIRONMENT_KEYS if k in env}


def _verdict_row(v: Verdict | Mapping[str, Any]) -> str:
    """One verdict's table row (:func:`gdscope.report.verdicts.verdict_row`)."""
    return verdict_row(as_verdict(v))


def _verdicts_section(verdicts: Mapping[str, Sequence[Verdict]], colors: Mapping[str, str]) -> str:
    parts = ["<section id='verdicts'><h2>Verdicts</h2>", status_legend()]
    for label, vs in verdicts.items():
        parts.append(f"<h3>{_swatch(label, colors)}</h3>")
        parts.append(verdicts_table(vs))
    return "".join(parts) + "</section>"


def _figures_section(
    section_id: str,
    heading: str,
    intro: str,
    figures: Sequence[plots.Plot],
    small: bool = False,
    empty: str = "No run recorded these metrics.",
) -> str:
    body = "".join(_img(p) for p in figures)
    if small:
        body = f"<div class='small-multiples'>{body}</div>"
    note = _e(intro) if figures else _e(empty)
    return (
        f"<section id='{section_id}'><h2>{heading}</h2><p class='note'>{note}</p>{body}</section>"
    )


def _prediction_section(
    store: Store,
    infos: Sequence[RunInfo],
    labels: Sequence[str],
    colors: Mapping[str, str],
    data: plots.Runs,
    predictions: Mapping[str, Mapping[str, Any]],
) -> str:
    rows = []
    fits = [rate_row(store, info.id) for info in infos]
    # the "predicted ρ" column only when some run recorded a prediction
    any_prediction = any(r.predicted_loss_rate is not None for r in fits)
    for row, label in zip(fits, labels, strict=True):
        predicted = (
            ""
            if not any_prediction
            else "<td class='num'>" + _NA.format("no prediction recorded") + "</td>"
            if row.predicted_loss_rate is None
            else f"<td class='num'>{row.predicted_loss_rate:.6g}</td>"
        )
        if row.fit is None:
            rows.append(
                f"<tr><td>{_swatch(label, colors)}</td><td colspan='4' class='note'>"
                f"no rate fit: {_e(row.note)}</td>{predicted}</tr>"
            )
            continue
        f = row.fit
        lo, hi = f.exponential_rate_ci
        plo, phi = f.power_exponent_ci
        rows.append(
            f"<tr><td>{_swatch(label, colors)}</td><td class='num'>{f.window[0]:g}–{f.window[1]:g}"
            f"</td><td class='num'>{f.exponential_rate:.6g} [{lo:.6g}, {hi:.6g}]</td>"
            f"<td class='num'>{f.power_exponent:.3g} [{plo:.3g}, {phi:.3g}]</td>"
            f"<td>{_e(f.preferred)} (ΔAIC {f.delta_aic:.3g}"
            f"{', decisive' if f.decisive else ''})</td>{predicted}</tr>"
        )
    header = (
        "run",
        "fit window (steps)",
        "loss factor per step ρ [95% CI]",
        "power-law exponent p [95% CI]",
        "preferred",
        *(["predicted ρ"] if any_prediction else []),
    )
    intro = (
        "<p class='note'>Rates fitted to the last half of each loss curve: L ≈ Cρ<sup>t</sup> "
        f"and L ≈ Ct<sup>−p</sup> ({section_link(_SEC_DYNAMICS)}). The predicted ρ is the "
        "recorded prediction's asymptotic loss factor per step (the square of its slowest mode's "
        "residual rate).</p>"
    )
    figure = plots.prediction_figure(data, predictions, colors)
    body = _figures_section(
        "prediction",
        "Predicted vs measured",
        "",
        [figure] if figure else [],
        empty="No run recorded a prediction (Tracker.record_prediction): the rates below are "
        "fitted to the measured loss only.",
    )
    return body.replace("</section>", intro + _table(header, rows) + "</section>")


def _loss_orbit(store: Store, run_id: int, series: Mapping[str, plots.Series]) -> Any:
    """A periodic-orbit report on the loss, when it was recorded at every step (else None)."""
    if "loss" not in series:
        return None
    x, v = series["loss"]
    if x.size < 16 or np.any(np.diff(x) != 1) or not np.all(np.isfinite(v)):
        return None
    try:  # a float32 loss carries ~1e-7 relative noise: do not call that a cycle's mismatch
        return orbit_from_store(store, run_id, "loss", atol=1e-6 * float(np.abs(v[-64:]).max()))
    except GdscopeError:
        return None


def _stability_section(
    infos: Sequence[RunInfo],
    labels: Sequence[str],
    colors: Mapping[str, str],
    orbits: Mapping[str, Any],
) -> str:
    rows = []
    for info, label in zip(infos, labels, strict=True):
        rep = info.summary.get("stability")
        if rep and isinstance(rep, Mapping):
            cells = (
                rep.get("lr"),
                rep.get("sharpness"),
                rep.get("threshold"),
                rep.get("count_above"),
                rep.get("smallest"),
            )
            nums = "".join(f"<td class='num'>{_num(c)}</td>" for c in cells)
            rows.append(
                f"<tr><td>{_swatch(label, colors)}</td>{nums}"
                f"<td>{_e(_yes_no(rep.get('gd_stable')))}</td>"
                f"<td>{_e(_yes_no(rep.get('is_saddle')))}</td></tr>"
            )
    stability = (
        _table(
            (
                "run",
                "η",
                "sharpness",
                "threshold",
                "# eigenvalues above",
                "λ_min",
                "GD-stable",
                "saddle",
            ),
            rows,
        )
        if rows
        else "<p class='note'>No run recorded a stability analysis (gs.stability).</p>"
    )
    orbit_rows = []
    for label, rep in orbits.items():
        found = f"period {rep.period} from step {rep.onset}" if rep.is_cycle else _e(rep.kind)
        orbit_rows.append(
            f"<tr><td>{_swatch(label, colors)}</td><td>{found}</td>"
            f"<td class='num'>{rep.window[0]}–{rep.window[1]}</td>"
            f"<td class='num'>{_num(rep.amplitude, 'no cycle')}</td></tr>"
        )
    orbit_table = (
        _table(("run", "loss orbit", "window", "amplitude"), orbit_rows) if orbit_rows else ""
    )
    intro = (
        "<p class='note'>Stability of the point each run ended at (gs.stability, "
        f"{section_link(_SEC_CURVATURE)}) and periodic orbits of the loss over the last steps: a "
        "cycle is marked on the sharpness figure. GD-stable and saddle are yes, no or "
        "undetermined (the eigenvalues could not be separated from the threshold).</p>"
    )
    return (
        f"<section id='stability'><h2>Stability and orbits</h2>{intro}{stability}{orbit_table}"
        "</section>"
    )


_NA = "<span class='na'>— ({})</span>"


def _num(value: Any, missing: str = "not recorded") -> str:
    """A stored number to 4 significant digits, escaped; anything else as escaped text; None
    as "—" with ``missing`` (why there is no value)."""
    if value is None:
        return _NA.format(_e(missing))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _e(f"{value:.4g}")
    return _e(value)


def _yes_no(value: bool | None) -> str:
    return "undetermined" if value is None else ("yes" if value else "no")


def _timing_section(
    store: Store, infos: Sequence[RunInfo], labels: Sequence[str], colors: Mapping[str, str]
) -> str:
    rows = []
    for info, label in zip(infos, labels, strict=True):
        for t in probe_timings(store, info.id):
            share = _NA.format("no step_time") if t.share is None else f"{100 * t.share:.1f}%"
            rows.append(
                f"<tr><td>{_swatch(label, colors)}</td><td>{_e(t.probe)}</td>"
                f"<td class='num'>{t.calls}</td><td class='num'>{t.seconds:.3f}</td>"
                f"<td class='num'>{share}</td></tr>"
            )
    header = ("run", "probe", "calls", "total seconds", "vs. training loop time")
    body = _table(header, rows) if rows else "<p class='note'>No probe timings recorded.</p>"
    intro = (
        "<p class='note'>Wall time spent in each probe, and as a share of the training loop's "
        "own time (<code>step_time</code>, which excludes the probes).</p>"
    )
    return f"<section id='timing'><h2>Probe timing</h2>{intro}{body}</section>"
