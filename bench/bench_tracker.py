"""Tracker overhead against the plain loop (issue 12 item 3), and Cockpit where installed.

Goals: the cheap probes every step (loss, accuracy, gradient norm, distance from init per layer,
lr and threshold; every step stored in SQLite) cost at most 1.05x the plain loop's time on the
demo MLP; cheap probes plus sharpness every 100 steps (warm-started Lanczos, tolerance 1e-3) at
most 1.25x. Cockpit measured 1.74x for its cheapest configuration and 2.09x for HessMaxEV on the
same kind of model (its paper's figures, quoted by the issue).

Models: the demo's standard net (MLP 64-128-128-10 tanh, MSE on one-hot labels, full batch of
256 digits, as ``gdscope demo``) and a bigger one (64-512-512-10 on all 1797 digits).

Modes: ``plain``; ``cheap`` (cheap probes, batches written by the tracker's writer thread,
``background=True``); ``cheap_sync`` (``background=False``, the Tracker's default);
``sharpness`` (cheap probes plus sharpness every 100 steps); ``sharpness_only`` (sharpness every
100 steps alone, Cockpit's HessMaxEV configuration's counterpart); Cockpit ``economy`` and
``HessMaxEV`` (every 100 steps). Two ratios: end to end (building the tracker and its run, the
loop, ``close()``: the last batch and the store's one-off WAL checkpoint) and loop only (the
per-step cost of a long run).

Shared-machine care: every configuration of a model runs once per round, in an order that
rotates from round to round, each time as a fresh run of ``steps`` steps (model, optimizer,
tracker and store new). A configuration's ratio is the median over rounds of its time over
the plain loop's time in the same round; the load average is recorded with each round.

    PYTHONPATH=src python bench/bench_tracker.py [--quick] [--only demo|big] [--threads 1]
        [--cockpit-path DIR]

``--cockpit-path``: a folder holding ``cockpit-for-pytorch`` and ``backpack-for-pytorch``
installed with ``pip install --no-deps --target DIR`` (they require torchvision, which gdscope's
environment does not install; Cockpit's own code does not import it). Writes
``bench/results/tracker_<date>.json`` with the environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

LR = 0.5  # below the edge on both models (2/η = 4 above their sharpness over these steps)


def cheap_probes() -> list:
    """The cheap probes, every step."""
    return [LossProbe(), AccuracyProbe(), GradNormProbe(), DistanceProbe(), ThresholdProbe()]


def _setup(width: int, n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    X, Y = digits(n, seed=0)
    return mlp([64, width, width, 10], "tanh", seed=0), X, Y


def run_gdscope(width: int, n: int, steps: int, mode: str, tmp: str) -> dict[str, Any]:
    """One fresh run: ``mode`` is ``plain``, ``cheap``, ``cheap_sync`` (batches written in the
    loop, ``background=False``) or ``sharpness`` (cheap + sharpness every 100 steps)."""
    model, X, Y = _setup(width, n)
    opt = gs.GD(model.parameters(), lr=LR)
    tracker = None
    t_build = 0.0
    if mode != "plain":
        probes = [] if mode == "sharpness_only" else cheap_probes()
        if mode in ("sharpness", "sharpness_only"):
            probes.append(SharpnessProbe(100, tol=1e-3))
        t0 = time.perf_counter()
        prob = gs.Problem(model, "mse", (X, Y))
        tracker = gs.Tracker(
            prob, probes, store=os.path.join(tmp, f"{mode}.db"), background=mode != "cheap_sync"
        )
        tracker._ensure_run()  # the run's row (environment, config), as the first step would
        t_build = time.perf_counter() - t0
    mse = torch.nn.functional.mse_loss
    c_start = time.process_time()
    t_start = time.perf_counter()
    for t in range(steps):
        opt.zero_grad()
        out = model(X)
        loss = mse(out, Y)
        loss.backward()
        opt.step()
        if tracker is not None:
            tracker.step(t, opt, loss=loss, outputs=out, targets=Y)
    t_loop = time.perf_counter()
    if tracker is not None:
        tracker.close()
    t_end = time.perf_counter()
    c_end = time.process_time()
    row: dict[str, Any] = {
        # end to end: building the tracker and its run, the loop, close() (last batch, the
        # store's WAL checkpoint)
        "total_s": t_build + t_end - t_start,
        "setup_s": t_build,
        "steps": steps,
        "loop_s": t_loop - t_start,  # the steady per-step cost of a long run
        "close_s": t_end - t_loop,
        # CPU seconds of the process (all threads) over the loop and close(): less sensitive
        # than wall time to other processes on a shared machine
        "cpu_s": c_end - c_start,
    }
    if tracker is not None:
        _, sharp = tracker.series("sharpness")
        _, mv = tracker.series("sharpness_matvecs")
        row["sharpness_calls"] = len(sharp)
        row["sharpness_matvecs"] = sum(mv)
        _, st = tracker.series("step_time")
        row["median_loop_step_s"] = statistics.median(st) if st else None
    return row


def run_cockpit(width: int, n: int, steps: int, mode: str) -> dict[str, Any]:
    """Cockpit's cheapest configuration (``economy``) every step, or ``HessMaxEV`` every 100."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)  # backpack's hook notices
    from backpack import extend
    from cockpit import Cockpit, quantities
    from cockpit.utils import configuration, schedules

    model, X, Y = _setup(width, n)
    model = extend(model)
    lossfunc = extend(torch.nn.MSELoss(reduction="mean"))
    individual = torch.nn.MSELoss(reduction="none")
    opt = gs.GD(model.parameters(), lr=LR)
    if mode == "cockpit_economy":
        qs = configuration.configuration("economy")
    else:
        qs = [quantities.HessMaxEV(track_schedule=schedules.linear(100))]
    cp = Cockpit(model.parameters(), quantities=qs)
    t_start = time.perf_counter()
    for t in range(steps):
        opt.zero_grad()
        out = model(X)
        loss = lossfunc(out, Y)
        losses = individual(out, Y).mean(dim=1)
        with cp(
            t, info={"batch_size": n, "individual_losses": losses, "loss": loss, "optimizer": opt}
        ):
            loss.backward(create_graph=cp.create_graph(t))
        opt.step()
    return {"total_s": time.perf_counter() - t_start, "steps": steps}


def _cockpit_available(path: str | None) -> tuple[bool, str]:
    if path:
        sys.path.insert(0, path)
    try:
        import backpack  # noqa: F401
        import cockpit  # noqa: F401
    except Exception as e:
        return False, f"not importable: {type(e).__name__}: {e}"
    return (
        True,
        f"cockpit {_version('cockpit-for-pytorch')}, backpack {_version('backpack-for-pytorch')}",
    )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def bench_model(
    label: str, width: int, n: int, steps: int, rounds: int, cockpit: bool, economy_steps: int
) -> dict[str, Any]:
    """Ratios of per-step time to the plain loop's (medians over rounds). Cockpit's economy
    configuration runs ``economy_steps`` steps (its per-sample quantities are slow on a CPU;
    0: left out)."""
    modes = ["plain", "cheap", "cheap_sync", "sharpness", "sharpness_only"]
    if cockpit:
        modes += (
            ["cockpit_economy", "cockpit_hessmaxev"] if economy_steps else ["cockpit_hessmaxev"]
        )
    runners: dict[str, Callable[[str], dict[str, Any]]] = {}
    for m in modes:
        if m == "cockpit_economy":
            runners[m] = lambda tmp, m=m: run_cockpit(width, n, economy_steps, m)
        elif m.startswith("cockpit"):
            runners[m] = lambda tmp, m=m: run_cockpit(width, n, steps, m)
        else:
            runners[m] = lambda tmp, m=m: run_gdscope(width, n, steps, m, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        run_gdscope(width, n, min(steps, 50), "cheap", tmp)  # warm up (imports, allocator)
        for f in Path(tmp).glob("*"):
            f.unlink()
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            row: dict[str, Any] = {"order": order, "load_before": os.getloadavg()[0]}
            for m in order:
                with tempfile.TemporaryDirectory(dir=tmp) as sub:
                    row[m] = runners[m](sub)
            row["load_after"] = os.getloadavg()[0]
            per_round.append(row)
            print(
                f"  round {r}: " + ", ".join(f"{m} {row[m]['total_s']:.2f}s" for m in modes),
                flush=True,
            )

    def ratio(row: dict[str, Any], m: str) -> float:
        per_step = row[m]["total_s"] / row[m]["steps"]
        return per_step / (row["plain"]["total_s"] / row["plain"]["steps"])

    def steady(row: dict[str, Any], m: str) -> float:
        return row[m]["loop_s"] / row["plain"]["loop_s"]

    def cpu(row: dict[str, Any], m: str) -> float:
        return row[m]["cpu_s"] / row["plain"]["cpu_s"]

    others = [m for m in modes if m != "plain"]
    ratios = {m: statistics.median(ratio(row, m) for row in per_round) for m in others}
    steady_ratios = {
        m: statistics.median(steady(row, m) for row in per_round)
        for m in others
        if not m.startswith("cockpit")
    }
    cpu_ratios = {
        m: statistics.median(cpu(row, m) for row in per_round)
        for m in others
        if not m.startswith("cockpit")
    }
    spread = {
        m: [min(ratio(r, m) for r in per_round), max(ratio(r, m) for r in per_round)]
        for m in others
    }
    plain_step = statistics.median(row["plain"]["total_s"] / steps for row in per_round)
    return {
        "config": label,
        "steps": steps,
        "rounds": rounds,
        "params": sum(p.numel() for p in _setup(width, n)[0].parameters()),
        "plain_median_step_s": plain_step,
        "ratios_vs_plain": ratios,
        "steady_ratios_vs_plain": steady_ratios,
        "cpu_ratios_vs_plain": cpu_ratios,
        "ratio_min_max": spread,
        "per_round": per_round,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--cockpit-path", default=None)
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument(
        "--only", choices=["demo", "big"], default=None, help="run one of the two models only"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cockpit, cockpit_note = _cockpit_available(args.cockpit_path)
    print(f"Cockpit: {cockpit_note}")
    configs = [
        ("demo MLP 64-128-128-10 tanh, full batch n=256", 128, 256, 1000, 5, 20),
        ("MLP 64-512-512-10 tanh, full batch n=1797", 512, 1797, 300, 3, 0),
    ]
    if args.only:
        configs = [configs[0 if args.only == "demo" else 1]]
    if args.quick:
        configs = [(c[0], c[1], c[2], c[3] // 5, 2, min(c[5], 5)) for c in configs]
    results = []
    for label, width, n, steps, rounds, econ in configs:
        print(label, flush=True)
        res = bench_model(label, width, n, steps, args.rounds or rounds, cockpit, econ)
        results.append(res)
        print(
            f"{label}: plain step {res['plain_median_step_s'] * 1e3:.2f} ms; "
            + "; ".join(f"{m} {v:.3f}x" for m, v in res["ratios_vs_plain"].items())
            + " | loop only: "
            + "; ".join(f"{m} {v:.3f}x" for m, v in res["steady_ratios_vs_plain"].items())
            + " | CPU time: "
            + "; ".join(f"{m} {v:.3f}x" for m, v in res["cpu_ratios_vs_plain"].items()),
            flush=True,
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = dt.date.today().isoformat() + ("_quick" if args.quick else "")
    stamp += f"_{args.tag}" if args.tag else ""
    path = out / f"tracker_{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "environment": environment_info(),
                "threads": args.threads,
                "cpu_count": os.cpu_count(),
                "cockpit": cockpit_note,
                "targets": {"cheap": 1.05, "sharpness": 1.25},
                "cockpit_paper": {"economy": 1.74, "hessmaxev": 2.09},
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
