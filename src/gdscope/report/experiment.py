"""HTML pages of stored experiments and sweeps, self-contained like the run report.

- :func:`write_experiment_report`: one experiment run: verdicts (claim, prediction, measurement,
  verdict), its figures, config, runs and the standard figures of those runs.
- :func:`write_sweep_report`: every point of a sweep in one table (the config values that vary
  × one column per claim), then each point's verdicts and figures under an anchor
  ``#point-<experiment id>``.

Both reuse the run report's style, escaping and figure check (``data-figures-ok``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from gdscope import __version__
from gdscope.errors import ConfigError
from gdscope.report import plots
from gdscope.report.html import (
    _CSS,
    _check_out,
    _e,
    _figures_section,
    _img,
    _kv,
    _labels,
    _steps,
    _swatch,
    _table,
    _write_page,
)
from gdscope.report.summary import stop_reason
from gdscope.report.theory import appendix
from gdscope.report.verdicts import (
    STATUS_STYLE,
    as_verdict,
    cited_sections,
    format_value,
    status_legend,
    verdict_row,
    verdicts_table,
)
from gdscope.store import ExperimentInfo, Store

__all__ = ["write_experiment_report", "write_sweep_report"]

#: The standard run figures are drawn for experiments with at most this many runs.
RUN_FIGURES_MAX_RUNS = 20

_EXTRA_CSS = """
.matrix td.holds, .matrix td.fails, .matrix td.unknown, .matrix td.outside { text-align: center; }
.matrix th.claim { max-width: 14em; font-weight: 500; font-size: 0.85em; }
.matrix td a { color: inherit; text-decoration: none; display: block; }
section.point { border-top: 1px solid #ddd; margin-top: 1.5em; }
pre.error { background: #fbeaea; padding: 0.5em; white-space: pre-wrap; font-size: 0.85em; }
"""


def write_experiment_report(
    store: Store, experiment_id: int, path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Write the page of stored experiment ``experiment_id`` to ``path`` (a new file or a page
    gdscope wrote; never the store or another file)."""
    out = _check_out(path, store)
    info = store.experiment(experiment_id)
    figs = [f for f in info.figures if isinstance(f, Mapping)]
    summary = _summary(info.name)
    head = f"{info.name}: {summary}" if summary else info.name
    sections = [
        _header(title or f"gdscope · {info.name} (experiment {info.id})", head),
        _verdicts_section(info),
        _figures_section(
            "figures", "Figures", "The figures the experiment drew.", _plots(info.figures)
        ),
        _config_section(info),
        *_runs_sections(store, info.run_ids, skip={str(f.get("name", "")) for f in figs}),
        appendix(cited_sections(info.verdicts)),
    ]
    return _write_page(
        out, title or f"gdscope · {info.name}", sections, _CSS + _EXTRA_CSS, store=store
    )


def write_sweep_report(
    store: Store,
    sweep: str,
    path: str | os.PathLike[str],
    failures: Sequence[Mapping[str, Any]] = (),
    title: str | None = None,
) -> Path:
    """Write the page of sweep ``sweep`` to ``path``: every stored point, compared.

    A sweep with no stored point yet gets a page that says so.
    ``failures`` are points that failed (not stored), as mappings with ``values`` (the dotted
    fields the sweep set), ``error`` and, optionally, the full ``config``; they are listed with
    their errors.
    """
    out = _check_out(path, store)
    infos = store.experiments(sweep)
    names = sorted({i.name for i in infos})
    configs = {i.id: _flatten(i.config) for i in infos}
    failed = [_flatten(f.get("config") or f.get("values", {})) for f in failures]
    varied = _varied([*configs.values(), *failed])
    claims: list[str] = []
    for info in infos:
        claims += [c for c in (as_verdict(v).claim for v in info.verdicts) if c not in claims]
    complete = sum(all(as_verdict(v).status == "holds" for v in i.verdicts) for i in infos)
    intro = (
        f"{len(infos)} point(s) stored, {len(failures)} failed in the last run; "
        f"every claim holds at {complete} of them."
    )
    sections = [
        _header(title or f"gdscope · sweep {sweep}", f"{', '.join(names) or '?'}: {intro}"),
        _matrix_section(infos, configs, varied, claims),
    ]
    if failures:
        sections.append(_failures_section(failures))
    sections += [_point_section(info, configs[info.id], varied) for info in infos]
    sections.append(appendix([s for i in infos for s in cited_sections(i.verdicts)]))
    return _write_page(
        out, title or f"gdscope · sweep {sweep}", sections, _CSS + _EXTRA_CSS, store=store
    )


# ---------------------------------------------------------------------------------- pieces
def _header(title: str, subtitle: str) -> str:
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        f"<header><h1>{_e(title)}</h1><p class='generated'>{_e(subtitle)}<br>Generated "
        f"{_e(generated)} by gdscope {_e(__version__)}</p></header>"
    )


def _summary(name: str) -> str:
    """The experiment's one-line summary, if it is registered in this process (or the demo's)."""
    from gdscope.experiments import get_experiment

    if name == "demo":
        from gdscope.demo import SUMMARY

        return SUMMARY
    try:
        return get_experiment(name).summary
    except (ConfigError, AttributeError):
        return ""


def _plots(figures: Sequence[Mapping[str, str]]) -> list[plots.Plot]:
    """Stored figure dicts as plots (a malformed entry gets an empty, refused ``uri``)."""
    return [
        plots.Plot(str(f.get("name", "")), str(f.get("caption", "")), f.get("uri", ""))
        if isinstance(f, Mapping)
        else plots.Plot("", "", "")
        for f in figures
    ]


def _verdict_rows(verdicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Table rows of stored verdict dicts (read by ``Verdict.from_dict``: one vocabulary)."""
    return [verdict_row(as_verdict(v)) for v in verdicts]


def _verdicts_table(verdicts: Sequence[Mapping[str, Any]]) -> str:
    if not verdicts:
        return "<p class='note'>The experiment gave no verdicts.</p>"
    return verdicts_table(verdicts)


def _verdicts_section(info: ExperimentInfo) -> str:
    return (
        f"<section id='verdicts'><h2>Verdicts</h2>{status_legend()}"
        f"{_verdicts_table(info.verdicts)}</section>"
    )


def _flatten(table: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _config_section(info: ExperimentInfo) -> str:
    seconds = "" if info.seconds is None else f"{info.seconds:.1f} s"  # omitted when unknown
    created = datetime.fromtimestamp(info.created_at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    meta = {
        "experiment id": str(info.id),
        "config hash": info.config_hash,
        "sweep": info.sweep or "",
        "wall time": seconds,
        "stored": created,
    }
    return (
        f"<section id='config'><h2>Config</h2>{_kv(_flatten(info.config))}"
        f"<h3>Run</h3>{_kv({k: v for k, v in meta.items() if v})}</section>"
    )


def _runs_sections(store: Store, run_ids: Sequence[int], skip: Collection[str] = ()) -> list[str]:
    """The runs table and their standard figures, without those named in ``skip`` (figures the
    experiment drew under the same name, e.g. its own ``sharpness``)."""
    infos = [store.run(r) for r in run_ids]
    if not infos:
        return ["<section id='runs'><h2>Runs</h2><p class='note'>No runs recorded.</p></section>"]
    labels = _labels(infos)
    colors = plots.run_colors(labels)
    rows = [
        f"<tr><td>{_swatch(label, colors)}</td><td class='num'>{info.id}</td>"
        f"<td>{_e(info.status_label)}</td><td class='num'>{_steps(info)}</td>"
        f"<td class='stopped'>{_e(stop_reason(store, info))}</td></tr>"
        for info, label in zip(infos, labels, strict=True)
    ]
    runs = (
        "<section id='runs'><h2>Runs</h2><p class='note'>Each run's metrics are in the store: "
        "<code>gdscope report ID</code> draws all of them.</p>"
        f"{_table(('run', 'id', 'status', 'steps', 'why it stopped'), rows)}</section>"
    )
    if len(infos) > RUN_FIGURES_MAX_RUNS:
        figures: list[plots.Plot] = []
        intro = f"More than {RUN_FIGURES_MAX_RUNS} runs: see gdscope report for their figures."
    else:
        data = {
            label: {name: store.series(info.id, name) for name in store.metric_names(info.id)}
            for label, info in zip(labels, infos, strict=True)
        }
        figures = plots.standard_figures(data, colors, skip=skip)
        intro = "The x axis counts the optimizer updates applied to the parameters measured."
        shown = sorted(set(skip) & {"loss", "sharpness", "preconditioned-sharpness"})
        if shown:
            intro += f" The experiment's own figures above draw {', '.join(shown)}."
    return [runs, _figures_section("run-figures", "Run figures", intro, figures)]


def _varied(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted fields whose values differ between the configs, in first-seen order."""
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys]
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _value(config: Mapping[str, Any], key: str) -> str:
    """A config value as readable text ("—" when the point does not set it)."""
    if key not in config:
        return "<span class='na'>— (not set)</span>"
    value = config[key]
    if isinstance(value, (list, tuple)) and not value:
        return "[]"
    return format_value(value, depth=2)


def _matrix_section(
    infos: Sequence[ExperimentInfo],
    configs: Mapping[int, Mapping[str, Any]],
    varied: Sequence[str],
    claims: Sequence[str],
) -> str:
    rows = []
    timed = any(info.seconds is not None for info in infos)  # else no "seconds" column
    for info in infos:
        by_claim = {as_verdict(v).claim: v for v in info.verdicts}
        cells = []
        for claim in claims:
            v = by_claim.get(claim)
            if v is None:
                cells.append(
                    "<td class='na' title='this point gave no verdict on this claim'>—</td>"
                )
                continue
            ver = as_verdict(v)
            css, symbol = STATUS_STYLE[ver.status][:2]
            tip = " — ".join(t for t in (ver.status, ver.reason or ver.measured) if t)
            cells.append(
                f"<td class='{css} v-{css}' data-status='{ver.status}' title='{_e(tip)}'>"
                f"<a href='#point-{info.id}'>{symbol}</a></td>"
            )
        seconds = (
            ""
            if not timed
            else "<td class='num'><span class='na'>—</span></td>"
            if info.seconds is None
            else f"<td class='num'>{info.seconds:.1f}</td>"
        )
        rows.append(
            f"<tr id='row-{info.id}'><td><a href='#point-{info.id}'>{info.id}</a></td>"
            + "".join(f"<td>{_value(configs[info.id], k)}</td>" for k in varied)
            + "".join(cells)
            + f"{seconds}</tr>"
        )
    header = (
        "<th>point</th>"
        + "".join(f"<th>{_e(k)}</th>" for k in varied)
        + "".join(f"<th class='claim'>{_e(c)}</th>" for c in claims)
        + ("<th>seconds</th>" if timed else "")
    )
    if not infos:
        return (
            "<section id='points'><h2>Points</h2><p class='note'>No point of this sweep is "
            "stored yet.</p></section>"
        )
    note = (
        "<p class='note'>One row per stored point (its experiment id and each mark link to its "
        "verdicts); the columns after the config values that vary are the claims, each marked "
        "by its verdict (hover for the reason; — where the point gave no verdict on the "
        "claim).</p>" + status_legend()
    )
    table = (
        f"<table class='matrix'><thead><tr>{header}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return f"<section id='points'><h2>Points</h2>{note}{table}</section>"


def _failures_section(failures: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        f"<tr><td>{_kv(dict(f.get('values', {})))}</td>"
        f"<td><pre class='error'>{_e(f.get('error', ''))}</pre></td></tr>"
        for f in failures
    ]
    return (
        "<section id='failures'><h2>Failed points</h2><p class='note'>Nothing of these is "
        "stored; run the sweep again to retry them.</p>"
        f"{_table(('point', 'error'), rows)}</section>"
    )


def _point_section(info: ExperimentInfo, config: Mapping[str, Any], varied: Sequence[str]) -> str:
    label = ", ".join(f"{_e(k)} = {_value(config, k)}" for k in varied)
    figures = "".join(_img(p) for p in _plots(info.figures))
    return (
        f"<section class='point' id='point-{info.id}'><h3>Point {info.id}"
        f"{': ' + label if label else ''}</h3>{_verdicts_table(info.verdicts)}{figures}</section>"
    )
