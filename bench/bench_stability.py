"""Benchmark: ``stability`` (THEORY §3) on a ~100k-parameter MLP, and THEORY §3's reproduction.

Part 1, the MLP. scikit-learn's digits (``--n`` = 1,000 samples, standardized, one-hot), an MLP
64-300-256-10 with tanh (P = 99,126), PyTorch's ``mse_loss`` (mean), float32, ``--threads`` (2)
intra-op threads. Brought near a minimum by ``--adam-steps`` full-batch Adam steps (lr 1e-3) and
then ``--gd-steps`` full-batch GD steps at ``lr = 1/h_max``. Then
``stability(prob, lr, batch_size=B)`` at ``lr = --lr-factor · 2/h_max`` with ``B = --batch``:
P is beyond ``exact_limit``, so the SGD verdict comes from the Wu–Ma–E (sufficient) and necessary
conditions, and the Lyapunov exponents from mini-batch HVPs. Recorded: time, HVP count and method
of every part, every verdict, and the Lyapunov estimates' CI half-widths (goal ±0.01 for the
stiff exponent after a few hundred mini-batch HVPs per chain); then the stiff exponent's
half-width as a function of the number of steps (``--lyap-steps`` list), through the same
machinery (``lyapunov_hvp``).

Part 2, THEORY §3's reproduction: least squares, ``n = 24``, ``d = 60`` (Gaussian inputs, one
output, min-norm interpolating minimum, float64), ``B = 4``, for ``--seeds`` data draws: the
step size (in units of ``2/h_max``) at which Wu–Ma–E's sufficient condition, the exact ``ρ(T)``
and the Lyapunov exponent switch. The first two are exact (generalized eigenvalues); the
Lyapunov switch is found by bisection on the normal-space exponent with common random numbers
(same batches at every step size), ``--theory-chains`` chains of ``--theory-steps`` steps.

    PYTHONPATH=src .venv/bin/python bench/bench_stability.py [--quick] [--threads 2]

Writes ``bench/results/stability_<date>[_quick].json`` with ``gdscope.store.environment_info()``
and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gdscope as gs
from gdscope.store import environment_info
from gdscope.theory.sgd_stability import (
    SampleCurvature,
    lyapunov_estimate,
    lyapunov_hvp,
)
from gdscope.theory.stability import stability
from gdscope.zoo import digits, mlp

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 300, 256, 10)


def _est(e: Any) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "value": e.value,
        "ci": list(e.ci),
        "half_width": e.half_width,
        "stderr": e.stderr,
        "chains": e.chains,
        "steps": e.steps,
        "burn_in": e.burn_in,
        "subspace": e.subspace,
        "dim": e.dim,
        "method": e.method,
    }


def train_near_minimum(n: int, adam_steps: int, gd_steps: int) -> tuple[gs.Problem, dict]:
    X, Y = digits(n)
    model = mlp(SIZES, seed=0)
    prob = gs.Problem(model, "mse", (X, Y))
    loss_fn = nn.functional.mse_loss
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(adam_steps):
        opt.zero_grad()
        loss_fn(model(X), Y).backward()
        opt.step()
    h = gs.hessian_eigs(prob, tol=1e-3).values[0].item()
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / h)
    for _ in range(gd_steps):
        opt.zero_grad()
        loss_fn(model(X), Y).backward()
        opt.step()
    with torch.no_grad():
        loss = loss_fn(model(X), Y).item()
    info = {
        "adam_steps": adam_steps,
        "gd_steps": gd_steps,
        "gd_lr": 1.0 / h,
        "final_loss": loss,
        "train_seconds": time.perf_counter() - t0,
    }
    return prob, info


def mlp_part(args: argparse.Namespace) -> dict[str, Any]:
    prob, info = train_near_minimum(args.n, args.adam_steps, args.gd_steps)
    P = prob.num_params
    h = gs.hessian_eigs(prob, tol=1e-4).values[0].item()
    lr = args.lr_factor * 2 / h
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = stability(
            prob,
            lr,
            batch_size=args.batch,
            chains=args.chains,
            lyapunov_steps=args.steps,
            seed=0,
        )
    total = time.perf_counter() - t0
    print(rep)
    out: dict[str, Any] = {
        "model": f"MLP {'-'.join(map(str, SIZES))} tanh",
        "num_params": P,
        "n": prob.n,
        "dtype": str(prob.dtype),
        "training": info,
        "lr": lr,
        "lr_times_hmax_over_2": lr * h / 2,
        "batch_size": args.batch,
        "seconds_total": total,
        "seconds": dict(rep.seconds),
        "matvecs": dict(rep.matvecs),
        "method": dict(rep.method),
        "warnings": [str(w.message) for w in caught],
        "report": {
            k: getattr(rep, k)
            for k in (
                "sharpness",
                "sharpness_residual",
                "threshold",
                "gd_stable",
                "mu_top",
                "count_above",
                "smallest",
                "smallest_residual",
                "is_saddle",
                "gradient_norm",
                "gradient_ratio",
                "noise_factor",
                "sgd_mean_square_stable",
                "mean_square_lower",
                "wu_ma_e",
                "wu_ma_e_holds",
                "nonuniformity",
                "sgd_lyapunov_stable",
                "stiff_cutoff",
            )
        },
        "sgd_lyapunov": _est(rep.sgd_lyapunov),
        "sgd_lyapunov_stiff": _est(rep.sgd_lyapunov_stiff),
        "notes": list(rep.notes),
    }
    # stiff exponent: CI half-width against the number of steps per chain
    stiff = rep.sgd_lyapunov_stiff
    if stiff is not None:
        res = gs.hessian_eigs(prob, k=stiff.dim, tol=1e-4, return_vectors=True, block_size=2)
        U = res.vectors
        curv = SampleCurvature(prob)
        conv = []
        for steps in args.lyap_steps:
            gen = torch.Generator().manual_seed(1)
            starts = torch.randn(1, args.chains, P, generator=gen).to(U)
            t0 = time.perf_counter()
            before = curv.hvps
            (est,) = lyapunov_hvp(
                curv,
                lr,
                args.batch,
                starts,
                projectors=[U],
                labels=["stiff"],
                chains=args.chains,
                steps=steps,
                burn_in=steps // 4,
                seed=1,
            )
            conv.append(
                {
                    "steps": steps,
                    "burn_in": steps // 4,
                    "hvps_per_chain": (curv.hvps - before) // args.chains,
                    "value": est.value,
                    "half_width": est.half_width,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"  stiff Lyapunov, {steps} steps: {est.value:.4f} ± {est.half_width:.4f}")
        out["stiff_convergence"] = conv
    return out


def _linreg(seed: int) -> tuple[gs.Problem, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(24, 60, generator=g, dtype=torch.float64)
    y = X @ torch.randn(60, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(60, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_((torch.linalg.pinv(X) @ y).T)
    return gs.Problem(model, "mse", (X, y)), X


def theory_part(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for seed in range(args.seeds):
        prob, X = _linreg(seed)
        rep = stability(prob, 1e-3, batch_size=4, chains=2, lyapunov_steps=10)
        unit = 2 / rep.sharpness
        Hs = 2 * torch.einsum("ia,ib->iab", X, X)
        U = torch.linalg.svd(X, full_matrices=False).Vh.T
        Hr = U.T @ Hs @ U

        def lyap(f: float, Hr: torch.Tensor = Hr, unit: float = unit) -> Any:
            return lyapunov_estimate(
                Hr,
                f * unit,
                4,
                chains=args.theory_chains,
                steps=args.theory_steps,
                burn_in=args.theory_steps // 5,
                seed=123,
            )

        lo, hi = rep.mean_square_threshold / unit, 1.0
        if lyap(lo).value > 0:  # never seen (Jensen: λ ≤ ½ log ρ(T) = 0 there)
            lo = 0.0
        for _ in range(args.bisect):
            mid = 0.5 * (lo + hi)
            if lyap(mid).value > 0:
                hi = mid
            else:
                lo = mid
        cross = 0.5 * (lo + hi)
        at = lyap(cross)
        row = {
            "seed": seed,
            "h_max": rep.sharpness,
            "wu_ma_e": rep.wu_ma_e_threshold / unit,
            "mean_square": rep.mean_square_threshold / unit,
            "lyapunov": cross,
            "lyapunov_stderr_at_switch": at.stderr,
        }
        rows.append(row)
        print(
            f"  seed {seed}: Wu–Ma–E {row['wu_ma_e']:.3f}, ρ(T) {row['mean_square']:.3f}, "
            f"Lyapunov {row['lyapunov']:.3f}  (× 2/h_max)"
        )
    summary = {
        k: {
            "mean": statistics.fmean(r[k] for r in rows),
            "min": min(r[k] for r in rows),
            "max": max(r[k] for r in rows),
        }
        for k in ("wu_ma_e", "mean_square", "lyapunov")
    }
    ordered = all(r["wu_ma_e"] < r["mean_square"] < r["lyapunov"] for r in rows)
    print(f"  ordered Wu–Ma–E < ρ(T) < Lyapunov in every draw: {ordered}")
    return {
        "setup": "least squares n=24, d=60, B=4, Gaussian X, min-norm interpolating minimum",
        "theory_md": {"wu_ma_e": 0.32, "mean_square": 0.355, "lyapunov": 0.38},
        "rows": rows,
        "summary": summary,
        "ordered_in_every_draw": ordered,
        "lyapunov_chains": args.theory_chains,
        "lyapunov_steps": args.theory_steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr-factor", type=float, default=0.8)
    ap.add_argument("--adam-steps", type=int, default=2000)
    ap.add_argument("--gd-steps", type=int, default=300)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lyap-steps", type=int, nargs="*", default=[100, 200, 400, 800])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--theory-chains", type=int, default=8)
    ap.add_argument("--theory-steps", type=int, default=4000)
    ap.add_argument("--bisect", type=int, default=12)
    ap.add_argument("--skip-mlp", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.adam_steps, args.gd_steps = 300, 500, 100
        args.chains, args.steps, args.lyap_steps = 4, 100, [100]
        args.seeds, args.theory_steps, args.bisect = 2, 1000, 6
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {
        "benchmark": "stability",
        "date": dt.date.today().isoformat(),
        "quick": args.quick,
        "args": vars(args),
        "environment": environment_info(),
    }
    if not args.skip_mlp:
        print("MLP near a minimum:")
        out["mlp"] = mlp_part(args)
    print("THEORY §3 reproduction:")
    out["theory_reproduction"] = theory_part(args)
    name = f"stability_{out['date']}{'_quick' if args.quick else ''}.json"
    path = ROOT / "bench" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=_json_default))
    print(f"wrote {path.relative_to(ROOT)}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


if __name__ == "__main__":
    main()
