"""Sweep throughput: one worker against two (process pool and Ray), on this machine's cores.

Each sweep point trains an MLP 64-256-256-10 (float32, tanh, MSE) with full-batch GD on 1,024
random samples for ``--steps`` steps, tracked (loss every step, into the point's store): a
CPU-bound point of a few seconds with one intra-op thread. The same ``--points`` points (seeds
0, 1, ...) run as one :func:`gdscope.run_sweep` each way, every time into a fresh store:

- ``serial``: this process, ``torch.set_num_threads(1)`` (the one-worker baseline);
- ``local-1``, ``local-2``: :class:`~gdscope.executors.LocalExecutor` with 1 and 2 workers;
- ``ray-2``: :class:`~gdscope.executors.RayExecutor` with 2 CPUs on a private local Ray
  (its start-up, warm workers included, is timed apart and not counted: it is paid once per
  session). The process pool's start-up is counted: it is paid per sweep (its fork server,
  which imports torch once, is started by ``local-1``).

Reported: wall seconds per sweep (store writes and pages included), points per minute, and the
speed-up over ``serial`` (goal: ``ray-2`` ≥ 1.7× on 2 cores). The load average before and after
is recorded: other work on the machine lowers the parallel speed-ups.

    PYTHONPATH=src python bench/bench_sweep.py [--quick] [--points 8] [--steps 400]

Writes ``bench/results/sweep_<date>[_quick].json`` with the environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import gdscope as gs
from gdscope.executors import LocalExecutor, RayExecutor
from gdscope.experiments import (
    Experiment,
    ExperimentConfig,
    Judgement,
    SerialExecutor,
    TaskContext,
    register,
)
from gdscope.probes import LossProbe
from gdscope.store import environment_info
from gdscope.verdict import Verdict
from gdscope.zoo import mlp


@dataclass(frozen=True)
class SpinConfig(ExperimentConfig):
    """One point: ``steps`` of full-batch GD on ``n`` random samples."""

    steps: int = 400
    n: int = 1024
    width: int = 256
    lr: float = 0.05
    dtype: Literal["float32", "float64"] = "float32"


@register
class Spin(Experiment):
    """A CPU-bound sweep point for the benchmark (not a claim of the theory)."""

    name = "bench-sweep-spin"
    summary = "Full-batch GD on an MLP: a CPU-bound benchmark point."
    Config = SpinConfig

    def tasks(self, cfg: SpinConfig) -> list[dict[str, Any]]:
        return [{}]

    def run_task(self, cfg: SpinConfig, task: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        g = torch.Generator().manual_seed(cfg.seed)
        X = torch.randn(cfg.n, 64, generator=g, dtype=ctx.dtype)
        Y = torch.randn(cfg.n, 10, generator=g, dtype=ctx.dtype)
        model = mlp([64, cfg.width, cfg.width, 10], "tanh", seed=cfg.seed).to(ctx.dtype)
        prob = gs.Problem(model, "mse", (X, Y))
        with gs.Tracker(prob, [LossProbe()], store=ctx.store, run_name=f"spin-{cfg.seed}") as tr:
            fit = gs.fit(prob, gs.GD(model.parameters(), lr=cfg.lr), cfg.steps, tr)
        return {"first": fit.losses[0], "last": fit.losses[-1], "threads": torch.get_num_threads()}

    def judge(self, cfg: SpinConfig, results: list[dict[str, Any]]) -> Judgement:
        (r,) = results
        return Judgement(
            [Verdict("loss decreases", "last < first", f"{r['last']:.3g}", r["last"] < r["first"])]
        )


def sweep_config(points: int, steps: int) -> dict[str, Any]:
    return {
        "experiment": Spin.name,
        "steps": steps,
        "sweep": {"grid": {"seed": list(range(points))}},
    }


def timed_sweep(label: str, config: dict[str, Any], executor: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = gs.run_sweep(config, out=tmp, executor=executor)
        seconds = time.perf_counter() - t0
    statuses = [p.status for p in result.points]
    if statuses != ["completed"] * len(statuses):
        raise RuntimeError(f"{label}: not every point completed: {statuses}")
    per_point = [p.seconds for p in result.points if p.seconds is not None]
    row = {
        "executor": label,
        "seconds": seconds,
        "points": len(statuses),
        "points_per_minute": 60 * len(statuses) / seconds,
        "mean_point_seconds": sum(per_point) / len(per_point),
    }
    print(
        f"{label:8} {seconds:7.1f} s  {row['points_per_minute']:5.1f} points/min  "
        f"(a point: {row['mean_point_seconds']:.2f} s in its worker)",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4 points of 40 steps")
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--no-ray", action="store_true", help="skip Ray")
    args = ap.parse_args()
    points, steps = (4, 40) if args.quick else (args.points, args.steps)
    config = sweep_config(points, steps)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    print(f"{points} points of {steps} steps; load average {load_before}", flush=True)

    rows = [timed_sweep("serial", config, SerialExecutor())]
    rows.append(timed_sweep("local-1", config, LocalExecutor(workers=1)))
    rows.append(timed_sweep("local-2", config, LocalExecutor(workers=2)))
    ray_start = None
    if not args.no_ray:
        with RayExecutor(workers=2) as ray:
            t0 = time.perf_counter()
            ray.start()
            ray_start = time.perf_counter() - t0
            print(f"ray start {ray_start:.1f} s (not counted)", flush=True)
            rows.append(timed_sweep("ray-2", config, ray))
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_serial"] = base / row["seconds"]
        print(f"{row['executor']:8} speed-up {row['speedup_vs_serial']:.2f}x")
    load_after = os.getloadavg()

    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = dt.date.today().isoformat() + ("_quick" if args.quick else "")
    path = out / f"sweep_{stamp}.json"
    record = {
        "environment": {**environment_info(), "cpu_count": os.cpu_count()},
        "points": points,
        "steps": steps,
        "point": "MLP 64-256-256-10, n=1024, float32, full-batch GD, LossProbe, 1 thread",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "ray_start_seconds": ray_start,
        "results": rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    # Workers find an experiment by importing the module that registered it, and no worker can
    # import a script's __main__: run this file again as the module ``bench_sweep``.
    import bench_sweep

    bench_sweep.main()
