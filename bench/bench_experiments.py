"""Wall and CPU time of every built-in experiment at its default size, with its verdicts.

Every registered experiment is on the list (:func:`gdscope.experiments.experiment_names`:
attention, cross_entropy, disparity, optimizers, skips, stability, width); ``--only`` picks some.
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
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import gdscope as gs
from gdscope.experiments import experiment_names
from gdscope.store import environment_info


def run_one(name: str) -> dict[str, Any]:
    """Run ``name`` at its default size; wall and CPU seconds, verdict statuses."""
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        res = gs.run_experiment(name, [], out=Path(tmp) / name)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    statuses = [v.status for v in res.verdicts]
    return {
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
