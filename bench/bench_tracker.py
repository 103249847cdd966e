"""Tracker overhead: cheap probes every step, and warm-started sharpness every 100 steps.

Goals (issue 2): the cheap probes (loss, accuracy, gradient norm, distance from init, threshold,
each step committed to SQLite) cost under 5% of a training step; sharpness every 100 steps
(Lanczos, tolerance 1e-3, warm-started) costs under 25% of total training time.

    PYTHONPATH=src python bench/bench_tracker.py [--quick]

Writes ``bench/results/tracker_<date>.json`` with the environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gdscope as gs
from gdscope.probes import (
    AccuracyProbe,
    DistanceProbe,
    GradNormProbe,
    LossProbe,
    SharpnessProbe,
    ThresholdProbe,
)
from gdscope.store import environment_info
from gdscope.zoo import digits, mlp


def cheap_probes() -> list:
    return [LossProbe(), AccuracyProbe(), GradNormProbe(), DistanceProbe(), ThresholdProbe()]


def train(width: int, n: int, steps: int, probes, store: str | None, lr: float) -> dict:
    X, Y = digits(n, seed=0)
    model = mlp([64, width, width, 10], "tanh", seed=0)
    prob = gs.Problem(model, "mse", (X, Y))
    opt = gs.GD(model.parameters(), lr=lr)
    tracker = gs.Tracker(prob, probes, store=store) if probes is not None else None
    step_times, probe_times = [], []
    t_start = time.perf_counter()
    for t in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, Y)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        if tracker is not None:
            tracker.step(t, opt, loss=loss, outputs=out, targets=Y)
        t2 = time.perf_counter()
        step_times.append(t1 - t0)
        probe_times.append(t2 - t1)
    total = time.perf_counter() - t_start
    if tracker is not None:
        tracker.close()
    return {
        "total_s": total,
        "median_step_s": statistics.median(step_times),
        "median_tracker_s": statistics.median(probe_times),
        "tracker_total_s": sum(probe_times),
        "train_total_s": sum(step_times),
        "params": prob.num_params,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = 200 if args.quick else 1000
    configs = [
        ("demo MLP 64-128-128-10, n=512", 128, 512),
        ("MLP 64-512-512-10, n=1797", 512, 1797),
    ]
    results = []
    for label, width, n in configs:
        train(width, n, 20, None, None, 0.5)  # warm up
        with tempfile.TemporaryDirectory() as tmp:
            base = train(width, n, steps, None, None, 0.5)
            cheap = train(width, n, steps, cheap_probes(), f"{tmp}/a.db", 0.5)
            sharp = train(
                width,
                n,
                steps,
                [*cheap_probes(), SharpnessProbe(100, tol=1e-3)],
                f"{tmp}/b.db",
                0.5,
            )
        row = {
            "config": label,
            "steps": steps,
            "params": base["params"],
            "baseline": base,
            "cheap": cheap,
            "cheap_plus_sharpness": sharp,
            "cheap_overhead_per_step": cheap["median_tracker_s"] / cheap["median_step_s"],
            "sharpness_share_of_total": (sharp["tracker_total_s"] - cheap["tracker_total_s"])
            / sharp["total_s"],
            "all_probes_share_of_total": sharp["tracker_total_s"] / sharp["total_s"],
        }
        results.append(row)
        print(
            f"{label}: step {base['median_step_s'] * 1e3:.2f} ms; cheap probes "
            f"{cheap['median_tracker_s'] * 1e3:.3f} ms/step = "
            f"{100 * row['cheap_overhead_per_step']:.1f}% of a step; sharpness every 100 "
            f"steps = {100 * row['sharpness_share_of_total']:.1f}% of total; all probes "
            f"{100 * row['all_probes_share_of_total']:.1f}% of total"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = dt.date.today().isoformat() + ("_quick" if args.quick else "")
    path = out / f"tracker_{stamp}.json"
    path.write_text(
        json.dumps(
            {"environment": environment_info(), "threads": args.threads, "results": results},
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
