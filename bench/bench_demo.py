"""Wall and CPU time of ``gdscope demo`` at its default size, with and without a busy core.

Goals (issue 10): the demo finishes in at most 60 s of wall time on 2 quiet CPU cores (about
100 s of CPU), and stays fast when another process keeps a core busy (it took 14–20 minutes
with torch's default 2 threads). Each case runs the demo in a fresh process:

* ``auto``: the demo's own thread choice (:func:`gdscope.demo.choose_demo_threads`);
* ``threads=N``: the thread count forced to N (what the choice is measured against).

A busy core is a ``python -c "while True: pass"`` process started before the case and killed
after it. The CPU time is the child's user + system time (``getrusage``), the wall time the
parent's clock. The load of the machine before each case (its 1-minute load average and the
busy CPUs the choice saw) is recorded: on a shared machine "quiet" means only this bench.

    PYTHONPATH=src python bench/bench_demo.py [--quick] [--cases auto,threads=2] [--busy both]

Writes ``bench/results/demo_<date>.json`` with the environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gdscope.store import environment_info

#: ``--quick``: a smaller demo for comparing thread counts (same parts, fewer samples and steps).
QUICK = {"samples": 128, "steps": 300, "kernel_steps": 100}


def worker(case: str, out: str, quick: bool) -> None:
    """Run one demo in this process and print its result as one JSON line."""
    from gdscope.demo import DemoConfig, choose_demo_threads, run_demo
    from gdscope.threads import choose_threads

    config = DemoConfig(**QUICK) if quick else DemoConfig()
    if case == "auto":
        choice = choose_demo_threads()
    else:
        n = int(case.split("=")[1])
        measured = choose_threads()
        choice = type(measured)(
            n, measured.allowed, measured.busy, measured.free, None, measured.source, "forced"
        )
    t0 = time.perf_counter()
    result = run_demo(out, config, threads=choice)
    print(
        json.dumps(
            {
                "seconds_inside": time.perf_counter() - t0,
                "threads": choice.to_dict(),
                "statuses": [v.status for v in result.all_verdicts],
            }
        )
    )


def run_case(case: str, busy: bool, quick: bool, timeout: float) -> dict:
    spinner = None
    if busy:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = [sys.executable, __file__, "--worker", case, "--out", tmp]
            if quick:
                args.append("--quick")
            try:
                proc = subprocess.run(
                    args, capture_output=True, text=True, timeout=timeout, check=False
                )
                # before the spinner is reaped: its CPU time is not counted as the demo's
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
            except subprocess.TimeoutExpired:
                return {"case": case, "busy_core": busy, "timed_out": timeout, "load_1min": load}
    finally:
        wall = time.perf_counter() - t0
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "case": case,
        "busy_core": busy,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_1min_before": load,
        **inner,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default="auto,threads=2")
    ap.add_argument("--busy", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.quick)
        return
    busy = {"no": [False], "yes": [True], "both": [False, True]}[args.busy]
    results = []
    for b in busy:
        for case in args.cases.split(","):
            row = run_case(case, b, args.quick, args.timeout)
            results.append(row)
            if "timed_out" in row:
                print(f"{case:10s} busy core={b!s:5s}: timed out after {args.timeout:.0f} s")
                continue
            cpu = f"{row['cpu_s']:.1f}"
            print(
                f"{case:10s} busy core={b!s:5s}: wall {row['wall_s']:6.1f} s, CPU {cpu} s, "
                f"threads {row['threads']['threads']} ({row['threads']['reason']}); load before "
                f"{row['load_1min_before']:.2f}; verdicts {row['statuses']}"
            )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    path = out / f"demo_{dt.date.today().isoformat()}{suffix}.json"
    payload = {
        "benchmark": "demo",
        "config": QUICK if args.quick else "default",
        "environment": environment_info(),
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
