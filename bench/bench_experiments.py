"""Wall and CPU time of every built-in experiment at its default size, with its verdicts.

Every registered experiment is on the list (:func:`gdscope.experiments.experiment_names`:
attention, cross_entropy, disparity, edge, optimizers, skips, stability, width); ``--only`` picks
some. For ``edge`` the central flow's work is counted exactly (its derivative passes are wrapped):
Hessian-vector products and third-derivative products (``D³L[u_i, u_j, ·]`` backward passes),
in total and per unit of time (per GD step predicted).
Each experiment runs through :func:`gdscope.run_experiment` with the serial executor (this
process, one intra-op thread unless ``--threads``), into a fresh temporary folder (store,
``verdict.json``, ``report.html``: the pages are timed too). Recorded per experiment: wall
seconds, process CPU seconds, the load average before and after (other work on the machine
inflates the wall time), and the count of verdicts by status. Issue 10's budget: each experiment
at default size in at most 10 minutes on 2 CPU cores.

    PYTHONPATH=src python bench/bench_experiments.py [--only width,skips] [--threads 1]

Writes ``bench/results/experiments_<date>.json`` with the environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import gdscope as gs
import gdscope.experiments.edge  # registers "edge" until base.BUILTIN_MODULES has it
from gdscope.experiments import experiment_names
from gdscope.store import environment_info

# the module (gdscope.theory's attribute of that name is the function)
_cf = importlib.import_module("gdscope.theory.central_flow")


class _CountPasses:
    """Wraps the central flow's ``edge_derivatives``: counts its passes, HVPs (one per column of
    ``U``) and third-derivative products (``m(m+1)/2`` per pass when ``third``)."""

    def __init__(self) -> None:
        self.real = _cf.edge_derivatives
        self.passes = self.hvps = self.thirds = 0

    def __call__(self, prob: Any, U: Any, **kw: Any) -> Any:
        m = 1 if U.ndim == 1 else int(U.shape[1])
        self.passes += 1
        self.hvps += m
        if kw.get("third", True):
            self.thirds += m * (m + 1) // 2
        return self.real(prob, U, **kw)


def run_one(name: str) -> dict[str, Any]:
    """Run ``name`` at its default size; wall and CPU seconds, verdict statuses."""
    load0 = os.getloadavg()
    counter = _CountPasses()
    _cf.edge_derivatives = counter  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            res = gs.run_experiment(name, [], out=Path(tmp) / name)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        _cf.edge_derivatives = counter.real
    statuses = [v.status for v in res.verdicts]
    extra: dict[str, Any] = {}
    if counter.passes:
        steps = sum(len(r.get("cf_loss", ())) - 1 for r in res.results)
        eig = sum(int(r.get("cf_eig_products", 0)) for r in res.results)
        gd = sum(int(r.get("gd_hvps", 0)) for r in res.results)
        extra["central_flow"] = {
            "steps_predicted": steps,
            "derivative_passes": counter.passes,
            "hvps_derivative_passes": counter.hvps,
            "hvps_eigen_tracking": eig,
            "third_derivative_products": counter.thirds,
            "hvps_per_step": (counter.hvps + eig) / max(steps, 1),
            "third_per_step": counter.thirds / max(steps, 1),
            "gd_sharpness_hvps": gd,
            "seconds": [r.get("seconds") for r in res.results],
        }
    return {
        **extra,
        "experiment": name,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_before": load0,
        "load_after": os.getloadavg(),
        "verdicts": {s: statuses.count(s) for s in dict.fromkeys(statuses)},
        "rows": [{"claim": v.claim, "status": v.status, "reason": v.reason} for v in res.verdicts],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated experiment names (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or experiment_names()
    rows = []
    for name in names:
        row = run_one(name)
        rows.append(row)
        print(
            f"{name:15s} wall {row['wall_s']:7.1f} s  cpu {row['cpu_s']:7.1f} s  "
            f"load {row['load_before'][0]:.1f}→{row['load_after'][0]:.1f}  {row['verdicts']}",
            flush=True,
        )
    env = {**environment_info(), "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"experiments_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
