"""Benchmark: the full empirical NTK by gdscope's methods and by peers.

Models (float32, eval): an MLP 64-512-512-512-10 and a small CNN (1×16×16 input, conv 16 and
conv 32 stride 2, ReLU, linear head to 10). For n = 128 and 512 (``--quick``: 32 and 64):

- gdscope ``structured``, ``jacobian``, ``auto`` (:func:`gdscope.kernels.ntk.ntk`);
- the torch.func NTK tutorial's Jacobian contraction (``vmap(jacrev)`` twice, then one einsum per
  parameter, written here as the tutorial does);
- nngeometry's ``GramMatrix(..., representation=FMatDense)`` if it imports (optional peer:
  ``pip install --no-deps nngeometry``).

Each configuration runs in its own subprocess so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which sees torch's allocations) is its own;
``baseline`` is a subprocess that only builds the model and data. Reported: median seconds over
the repeats (after one warm-up run for fast configurations), peak RSS, a checksum compared with
``structured``, and the structured contraction's achieved GFLOP/s (its GEMM FLOP count from the
plan, divided by the whole call's time, capture included) against this machine's measured fp32
GEMM rate (``torch.mm`` of 4096², same threads). Methods whose estimated time or memory exceed
the caps are skipped and reported with the estimate. Also: the trace NTK of the MLP for
n = 10,000 (``--quick``: 2,000) and its peak memory (goal: within 8 GB).

    PYTHONPATH=src python bench/bench_ntk.py [--quick] [--threads 2] [--device cpu|cuda]

Writes ``bench/results/ntk_<date>[_<tag>].json`` with the environment; prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K_OUT = 10
SLOW_S = 10.0  # a configuration whose first call takes longer runs once


# ---------------------------------------------------------------------------------------------
# Worker side


def _build(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, K_OUT),
        )
        shape = (64,)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, K_OUT),
        )
        shape = (1, 16, 16)
    else:
        raise KeyError(name)
    return model.eval(), shape


def tutorial_ntk(net, x1, x2):
    """The torch.func NTK tutorial's ``empirical_ntk_jacobian_contraction``, verbatim in spirit."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    einsum_expr = "Naf,Mbf->NMab"
    pairs = zip(jac1, jac2, strict=True)
    result = torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in pairs])
    return result.sum(0)


def nngeometry_ntk(net, x, batch_size):
    from nngeometry import GramMatrix
    from nngeometry.object import FMatDense
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x), batch_size=batch_size)
    G = GramMatrix(net, loader, representation=FMatDense).data  # (k, n, k, n)
    return G.permute(1, 3, 0, 2)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, shape = _build(spec["model"])
    model = model.to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(spec["n"], *shape, generator=gen).to(device)
    method = spec["method"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if method == "baseline":
        fn = None
    elif method in ("structured", "jacobian", "auto"):
        from gdscope.kernels.ntk import ntk

        def fn():
            return ntk(model, x, method=method, trace_outputs=spec.get("trace", False))
    elif method == "tutorial":

        def fn():
            return tutorial_ntk(model, x, x)
    elif method == "nngeometry":

        def fn():
            return nngeometry_ntk(model, x, spec.get("batch_size", spec["n"]))
    else:
        raise KeyError(method)
    times, check = [], None
    if fn is not None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for r in range(spec["warmup"] + spec["reps"]):
            sync()
            t0 = time.perf_counter()
            K = fn()
            sync()
            t = time.perf_counter() - t0
            Kd = K.double()
            check = [float(Kd.sum()), float(Kd.norm()), float(Kd.flatten()[0])]
            del K, Kd
            if r >= spec["warmup"]:
                times.append(t)
            elif t > SLOW_S:  # a slow first call is its own measurement: no repeats
                times.append(t)
                break
    res = {
        "times_s": times,
        "median_s": statistics.median(times) if times else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "check": check,
    }
    if device.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if method == "structured" or (method == "auto" and spec.get("trace")):
        from gdscope.kernels.ntk import _explain

        info = _explain(model, x, method=method, trace_outputs=spec.get("trace", False))
        res["plan"] = info
    return res


# ---------------------------------------------------------------------------------------------
# Parent side


def run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail)}
    return json.loads(p.stdout.strip().splitlines()[-1])


def gemm_rate(threads: int, device: str) -> float:
    code = f"""
import torch, time, statistics, json
torch.set_num_threads({threads})
dev = torch.device({device!r})
n = 8192 if dev.type == 'cuda' else 4096
a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
ts = []
for _ in range(6):
    if dev.type == 'cuda': torch.cuda.synchronize()
    t = time.perf_counter(); torch.mm(a, b)
    if dev.type == 'cuda': torch.cuda.synchronize()
    ts.append(time.perf_counter() - t)
print(json.dumps(2 * n**3 / statistics.median(ts[1:]) / 1e9))
"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def environment(args) -> dict:
    import numpy
    import torch

    env = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "device": args.device,
        "loadavg_at_start": os.getloadavg(),
        "quick": args.quick,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        from importlib.metadata import PackageNotFoundError, version

        import nngeometry

        try:
            env["nngeometry"] = version("nngeometry")
        except PackageNotFoundError:  # importable from a path without its metadata
            env["nngeometry"] = getattr(nngeometry, "__version__", "unknown version")
    except Exception:  # optional peer: any import failure means absent
        env["nngeometry"] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _num_params(model_name: str) -> int:
    model, _ = _build(model_name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    from gdscope.kernels.ntk import default_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=150.0,
        help="skip a method whose estimated time per call exceeds this",
    )
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    ap.add_argument("--no-trace", action="store_true", help="skip the large trace-NTK run")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out", default=None, help="results path (default bench/results/...)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    env = environment(args)
    gemm = gemm_rate(args.threads, args.device)
    env["gemm_gflops"] = gemm
    print(
        f"# {env['cpu']} | torch {env['torch']} | {args.threads} threads | {args.device} | "
        f"fp32 GEMM {gemm:.1f} GFLOP/s | load {env['loadavg_at_start']}"
    )
    sizes = (32, 64) if args.quick else (128, 512)
    reps = 1 if args.quick else args.reps
    methods = ["structured", "auto", "jacobian", "tutorial"]
    if env["nngeometry"]:
        methods.append("nngeometry")
    rows: list[dict] = []
    base: dict[str, float] = {}
    day = dt.date.today().isoformat()
    out = (
        Path(args.out)
        if args.out
        else (ROOT / "bench" / "results" / f"ntk_{day}{'_' + args.tag if args.tag else ''}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "baseline_rss_mb": base, "rows": rows}

    def save() -> None:  # after every row, so that an interrupted run keeps what it measured
        out.write_text(json.dumps(result, indent=1))

    for model_name in args.models.split(","):
        P = _num_params(model_name)
        spec0 = dict(
            model=model_name,
            n=8,
            threads=args.threads,
            device=args.device,
            method="baseline",
            warmup=0,
            reps=0,
        )
        base[model_name] = run_worker(spec0, 300)["peak_rss_mb"]
        for n in sizes:
            ref = None
            for method in methods:
                spec = dict(
                    model=model_name,
                    n=n,
                    threads=args.threads,
                    device=args.device,
                    method=method,
                    warmup=1,
                    reps=reps,
                )
                row = {"model": model_name, "n": n, "k": K_OUT, "params": P, "method": method}
                jac_flops = 2.0 * (n * K_OUT) ** 2 * P
                if method in ("jacobian", "tutorial"):
                    est = jac_flops * (0.6 if method == "jacobian" else 1.0) / (gemm * 1e9)
                    mem = (2 if method == "tutorial" else 0.5) * n * K_OUT * P * 4
                    row["estimated_s"] = est
                    free_ram = 4 * default_memory("cpu")  # the default budget is 1/4 of it
                    if est > args.max_seconds or mem > 0.7 * free_ram:
                        row["skipped"] = (
                            f"estimated {est:.0f} s (> {args.max_seconds:.0f}) "
                            f"or {mem / 1e9:.1f} GB of Jacobians"
                        )
                        rows.append(row)
                        print(_fmt(row))
                        continue
                res = run_worker(spec, timeout=max(600.0, 6 * args.max_seconds))
                row.update(res)
                if "error" not in res:
                    if ref is None:
                        ref = res["check"]
                    else:
                        pairs = zip(res["check"], ref, strict=True)
                        row["rel_diff_vs_structured"] = max(
                            abs(a - b) / max(abs(b), 1e-30) for a, b in pairs
                        )
                    if "plan" in res:
                        row["gemm_gflop"] = res["plan"]["gemm_flops"] / 1e9
                        row["achieved_gflops"] = row["gemm_gflop"] / res["median_s"]
                        row["fraction_of_gemm"] = row["achieved_gflops"] / gemm
                rows.append(row)
                print(_fmt(row))
                save()
    # Trace NTK at large n: peak memory in a subprocess
    n_tr = 2000 if args.quick else 10_000
    spec = dict(
        model="mlp",
        n=n_tr,
        threads=args.threads,
        device=args.device,
        method="auto",
        trace=True,
        warmup=0,
        reps=1,
    )
    tr = {"model": "mlp", "n": n_tr, "method": "auto", "trace_outputs": True}
    if not args.no_trace:
        tr.update(run_worker(spec, timeout=3000))
        print(_fmt(tr))
        result["trace"] = tr
    result["goals"] = goals = _goals(rows, tr, gemm)
    for g, v in goals.items():
        print(f"goal {g}: {v}")
    save()
    print(f"wrote {out}")


def _get(rows, model, n, method):
    for r in rows:
        if r["model"] == model and r["n"] == n and r["method"] == method:
            return r
    return None


def _goals(rows: list[dict], tr: dict, gemm: float) -> dict:
    goals = {}
    if tr.get("peak_rss_mb") is not None:
        goals[f"trace mlp n={tr['n']} within 8 GB"] = {
            "peak_gb": round(tr["peak_rss_mb"] / 1024, 2),
            "seconds": tr.get("median_s"),
            "met": tr["peak_rss_mb"] / 1024 <= 8,
        }
    if not rows:
        return goals
    n = max(r["n"] for r in rows)
    s_mlp, s_cnn = _get(rows, "mlp", n, "structured"), _get(rows, "cnn", n, "structured")
    g_mlp, g_cnn = _get(rows, "mlp", n, "nngeometry"), _get(rows, "cnn", n, "nngeometry")

    def speed(a, b):
        if a and b and a.get("median_s") and b.get("median_s"):
            return b["median_s"] / a["median_s"]
        return None

    sp = speed(s_mlp, g_mlp)
    goals[f"mlp n={n}: structured >= 3x nngeometry"] = (
        None if sp is None else {"speedup": round(sp, 2), "met": sp >= 3}
    )
    if s_mlp and s_mlp.get("fraction_of_gemm") is not None:
        f = s_mlp["fraction_of_gemm"]
        goals[f"mlp n={n}: structured >= 50% of GEMM rate"] = {
            "fraction": round(f, 3),
            "gflops": round(s_mlp["achieved_gflops"], 1),
            "gemm_gflops": round(gemm, 1),
            "met": f >= 0.5,
        }
    sp = speed(s_cnn, g_cnn)
    goals[f"cnn n={n}: structured >= 2x nngeometry"] = (
        None if sp is None else {"speedup": round(sp, 2), "met": sp >= 2}
    )
    return goals


def _fmt(r: dict) -> str:
    head = f"{r['model']:>4} n={r['n']:<6} {r['method']:<11}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    s = f"{head} {r['median_s']:9.3f} s  peak {r['peak_rss_mb'] / 1024:6.2f} GB"
    if r.get("peak_cuda_mb") is not None:
        s += f"  cuda {r['peak_cuda_mb'] / 1024:6.2f} GB"
    if r.get("achieved_gflops") is not None:
        s += f"  {r['achieved_gflops']:7.1f} GFLOP/s ({100 * r['fraction_of_gemm']:.0f}% GEMM)"
    if r.get("rel_diff_vs_structured") is not None:
        s += f"  diff {r['rel_diff_vs_structured']:.1e}"
    return s


if __name__ == "__main__":
    main()
