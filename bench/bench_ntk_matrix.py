"""Benchmark matrix (issue 13): ``gs.ntk(method="auto")`` against the best peer in every cell.

Cells: model × k (outputs) × full kernel ``(n, n, k, k)`` or trace ``(n, n)`` × n. Models (float32,
eval, seeded; :func:`build`):

- ``mlp512-std`` / ``mlp512-ntk``: ``gdscope.zoo.mlp([64, 512, 512, 512, k], "relu")`` in standard
  and NTK parameterization; ``mlp64-std`` / ``mlp64-ntk``: the same with width 64;
- ``cnn-tiny``: two 3×3 convolutions (1→8, 8→16 stride 2) and a linear readout on 1×8×8 inputs
  (P = 3,818 at k = 10: the convnet of issue 13); ``cnn-mid``: three 3×3 convolutions
  (3→32→64→128, strides 1, 2, 2), global average pool, linear readout, 3×16×16 inputs;
  ``cnn-r18w``: four 3×3 convolutions at ResNet-18's widths (3→64→128→256→512, strides 1, 2, 2, 2),
  pool, readout, 3×16×16 inputs (P ≈ 1.55 M; a plain convnet, not 18 layers deep);
- ``preact``: ``gdscope.zoo.preact_resnet(3, k)`` (width 16, depth (1, 1, 1), BatchNorm in eval
  mode) on 3×16×16; ``preact18``: ``preact_resnet(3, k, width=64, depth=(2, 2, 2, 2))`` (the
  PreAct-ResNet-18, P ≈ 11.2 M) on 3×16×16, k = 1 only;
- ``gpt``: ``gdscope.zoo.gpt(16, 8, d_model=32, n_heads=2, n_layers=2)`` on random token sequences
  of length 8, its NTK taken of the first ``k`` logits of the last position.

Methods:

- ``gdscope``: ``gs.ntk(model, x, method="auto", trace_outputs=...)``; the route ``auto`` took (per
  module) from ``gdscope.kernels.ntk._explain`` is stored with the plan's GEMM FLOP count;
- ``tf-jac``: the torch.func NTK tutorial's ``empirical_ntk_jacobian_contraction`` (``vmap(jacrev)``
  Jacobians, one einsum per parameter tensor, ``"Naf,Maf->NM"`` for the trace) with three edits a
  user would make: the Jacobian of ``x`` is computed once (the tutorial computes it for ``x1`` and
  ``x2``), the per-parameter products are summed as they come (not stacked), and attention runs on
  SDPA's math backend (vmap has no batching rule for the fused CPU kernel and warns that it loops
  over samples: 10–25% slower on the GPT);
- ``tf-vp``: the tutorial's ``empirical_ntk_ntk_vps`` (``vmap`` over sample pairs of a ``vjp`` and a
  ``jvp`` per output), its outer ``vmap`` given a ``chunk_size`` so it fits in memory;
- ``nngeometry``: ``GramMatrix(model, loader, representation=FMatDense)`` (optional:
  ``pip install --no-deps nngeometry``); it always computes the full kernel;
- ``nt``: neural-tangents' ``empirical_kernel_fn(..., implementation=STRUCTURED_DERIVATIVES)``,
  jitted, in JAX on the CPU, run by another interpreter (``--jax-python``, e.g. a venv with
  ``jax==0.4.23 jaxlib==0.4.23 neural-tangents==0.6.5``: newer JAX breaks neural-tangents 0.6.5).
  The JAX model is the *same function with the same weights*: the torch model is exported layer by
  layer (:func:`export`) and re-implemented with ``jax.lax`` (so its checksum is compared too); a
  model the exporter does not know (the GPT) has no ``nt`` row. Its first (compiling) call is
  reported separately and not counted.

Measurement: one subprocess per (model, method) runs that model's cells in increasing size; one
warm-up call (its time is kept as ``first_s``; it includes lazy initialisation and JAX's
compilation), then up to 3 timed calls while they take < 3 s in all (one after a warm-up over
3 s). ``median_s`` is the median wall time, ``cpu_s``
the median process CPU time (with one thread, the better number on a shared machine: it does not
count time the process waited for a core). Peak RSS (``ru_maxrss``) is the running maximum of the
process, so a cell's value includes the earlier (smaller) cells. Load average at the start of every
cell. A cell whose predicted time (CPU seconds of the previous ``n`` of the same series, times
``(n'/n)²``; for ``tf-jac`` and ``tf-vp`` also a FLOP or byte count, :func:`_est_seconds`)
exceeds ``--max-seconds`` (default 12; a call is stopped at twice that, wall), or whose
estimated memory exceeds ``--max-gb``, is skipped with the estimate. Checksums (sum, Frobenius
norm, first and last entries, float64) are compared with ``tf-jac`` of the same cell (or the
first method that ran): ``rel_diff`` = max absolute checksum difference / the reference's norm.

Per cell: ``speedup`` = best peer's time / gdscope's (CPU seconds), and gdscope's achieved FLOP/s:
the plan's GEMM FLOPs per second and the "Jacobian-contraction equivalent" ``2 n² k² P`` (trace:
``2 n² k P``) per second, against this machine's fp32 GEMM rate (``torch.mm`` 4096², same threads,
measured at the start and at the end).

    PYTHONPATH=src .venv/bin/python bench/bench_ntk_matrix.py [--quick] [--threads 1]
        [--jax-python /tmp/ntvenv/bin/python] [--models a,b] [--methods a,b] [--tag TAG]

Writes ``bench/results/ntk_matrix_<date>[_<tag>].json``; prints a Markdown table. ``--limits
model:k:n:full|trace,...`` instead times the two parts of the Jacobian-contraction recipe apart
(:func:`limits_worker`: the bound a Jacobian-based route has against ``tf-jac``) into
``ntk_matrix_<date>_limits[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_ntk import _cpu_name, gemm_rate  # the same GEMM-rate probe and CPU name

ROOT = Path(__file__).resolve().parents[1]
SLOW_S = 3.0  # after a warm-up longer than this, one timed call
REPEAT_BUDGET_S = 3.0  # repeats after the warm-up while they add up to less than this
SHORT_S = 1.0  # ... and, past 3 repeats, up to MAX_REPEATS while they add up to less than this
MAX_REPEATS = 7
METHODS = ("gdscope", "tf-jac", "tf-vp", "nngeometry", "nt")
PEERS = ("tf-jac", "tf-vp", "nngeometry", "nt")

# (model, k, trace) -> sizes n; full mode
FULL_CELLS: dict[str, list[tuple[int, bool, tuple[int, ...]]]] = {
    "mlp512-std": [(10, False, (64, 512)), (1, False, (512, 4096)), (10, True, (512, 2048))],
    "mlp512-ntk": [(10, False, (64, 512)), (1, False, (512, 4096)), (10, True, (512, 2048))],
    "mlp64-std": [(10, False, (64, 512)), (1, False, (512, 4096)), (10, True, (512, 4096))],
    "mlp64-ntk": [(10, False, (64, 512)), (1, False, (512, 4096)), (10, True, (512, 4096))],
    "cnn-tiny": [(10, False, (64, 512)), (1, False, (512, 4096)), (10, True, (512, 4096))],
    "cnn-mid": [(10, False, (64,)), (1, False, (256, 1024)), (10, True, (256,))],
    "cnn-r18w": [(10, False, (64,)), (1, False, (64, 256)), (10, True, (64,))],
    "preact": [(10, False, (64,)), (1, False, (256, 1024)), (10, True, (256,))],
    "preact18": [(1, False, (64,))],
    "gpt": [(10, False, (64, 256)), (1, False, (256, 1024)), (10, True, (256,))],
}
QUICK_CELLS: dict[str, list[tuple[int, bool, tuple[int, ...]]]] = {
    "mlp512-std": [(1, False, (64,))],
    "cnn-tiny": [(10, False, (32,)), (10, True, (128,))],
    "preact": [(10, False, (16,))],
}
IN_SHAPE = {
    "mlp512-std": (64,),
    "mlp512-ntk": (64,),
    "mlp64-std": (64,),
    "mlp64-ntk": (64,),
    "cnn-tiny": (1, 8, 8),
    "cnn-mid": (3, 16, 16),
    "cnn-r18w": (3, 16, 16),
    "preact": (3, 16, 16),
    "preact18": (3, 16, 16),
    "gpt": (8,),
}
GPT_VOCAB = 16


# ---------------------------------------------------------------------------------------------
# Models (torch side)


def build(name: str, k: int):
    """The benchmark's model ``name`` with ``k`` outputs (float32, eval, seed 0)."""
    import torch
    from torch import nn

    from gdscope import zoo

    torch.manual_seed(0)
    if name.startswith("mlp"):
        w = 512 if name.startswith("mlp512") else 64
        par = "ntk" if name.endswith("ntk") else "standard"
        return zoo.mlp([64, w, w, w, k], "relu", seed=0, parameterization=par).eval()
    if name == "cnn-tiny":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, k),
        ).eval()
    if name in ("cnn-mid", "cnn-r18w"):
        chans = (3, 32, 64, 128) if name == "cnn-mid" else (3, 64, 128, 256, 512)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(chans)):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], k)]
        return nn.Sequential(*layers).eval()
    if name == "preact":
        return zoo.preact_resnet(3, k, seed=0).eval()
    if name == "preact18":
        return zoo.preact_resnet(3, k, width=64, depth=(2, 2, 2, 2), seed=0).eval()
    if name == "gpt":
        return last_logits(zoo.gpt(GPT_VOCAB, 8, d_model=32, n_heads=2, n_layers=2, seed=0), k)
    raise KeyError(name)


def last_logits(inner, k: int):
    """``inner`` (a causal LM ``(N, T) -> (N, T, V)``) read out at its last position's first ``k``
    logits: ``(N, T) -> (N, k)``. (A class defined here: the JAX worker imports no torch.)"""
    from torch import Tensor, nn

    class LastLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, idx: Tensor) -> Tensor:
            return self.inner(idx)[:, -1, :k]

    net = LastLogits().eval()
    net.k = k
    return net


def inputs(name: str, n: int):
    import torch

    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        return torch.randint(0, GPT_VOCAB, (n, IN_SHAPE[name][0]), generator=g)
    return torch.randn(n, *IN_SHAPE[name], generator=g)


def num_params(name: str, k: int) -> int:
    return sum(p.numel() for p in build(name, k).parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Peers (torch side), written as a user would from the torch.func NTK tutorial


def tf_jac(net, x, trace: bool):
    """Tutorial ``empirical_ntk_jacobian_contraction(fnet_single, params, x, x, compute)``."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # (edit 3) vmap has no batching rule for fused CPU SDPA
        jac = vmap(jacrev(fnet_single), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]  # x1 is x2: one Jacobian (edit 1)
    expr = "Naf,Maf->NM" if trace else "Naf,Mbf->NMab"
    out = None
    for j in jac:  # summed as they come (edit 2; the tutorial stacks, then sums)
        t = torch.einsum(expr, j, j)
        out = t if out is None else out.add_(t)
    return out


def tf_vp(net, x, trace: bool, chunk: int | None):
    """Tutorial ``empirical_ntk_ntk_vps(fnet_single, params, x, x, compute)``."""
    import torch
    from torch.func import functional_call, jvp, vjp, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}

    def func(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        return vmap(get_ntk_slice)(basis.view(output.numel(), -1))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # fused CPU attention has no forward-mode AD
        result = vmap(vmap(get_ntk, (None, 0)), (0, None), chunk_size=chunk)(x, x)
    if trace:
        return torch.einsum("NMKK->NM", result)
    return result


def nngeometry_ntk(net, x, trace: bool):
    import torch
    from nngeometry import GramMatrix
    from nngeometry.object import FMatDense
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x), batch_size=min(len(x), 512))
    G = GramMatrix(net, loader, representation=FMatDense).data  # (k, n, k, n)
    if trace:
        return torch.einsum("anam->nm", G)
    return G.permute(1, 3, 0, 2)


# ---------------------------------------------------------------------------------------------
# Export of a torch model to a spec that the JAX worker rebuilds with the same weights


def export(model) -> tuple[dict, dict]:
    """``(spec, arrays)``: a nested layer spec and its float32 arrays (trainable ones ``p:``)."""
    import math as _m

    from torch import nn

    from gdscope import zoo
    from gdscope.zoo.resnet import IdentityShortcut, PreActBlock, PreActResNet

    arrays: dict = {}

    def arr(name: str, t, trainable: bool = True) -> str:
        key = ("p:" if trainable else "c:") + name
        arrays[key] = t.detach().float().numpy().copy()
        return key

    def ln(m, name: str) -> dict:
        return {"g": arr(name + ".g", m.weight), "b": arr(name + ".b", m.bias), "eps": m.eps}

    def lin(m, name: str) -> dict:
        return {"w": arr(name + ".w", m.weight), "b": arr(name + ".b", m.bias)}

    def go(m, name: str) -> dict:
        inner = getattr(m, "inner", None)
        if isinstance(inner, zoo.GPT):  # last_logits(zoo.gpt(...), k)
            if inner.head is not None:
                raise NotImplementedError("export: untied GPT")
            blocks = []
            for i, b in enumerate(inner.blocks):
                q = f"{name}.blk{i}"
                blocks.append(
                    {
                        "ln1": ln(b.ln1, q + ".ln1"),
                        "qkv": lin(b.attn.qkv, q + ".qkv"),
                        "proj": lin(b.attn.proj, q + ".proj"),
                        "ln2": ln(b.ln2, q + ".ln2"),
                        "fc1": lin(b.mlp[0], q + ".fc1"),
                        "fc2": lin(b.mlp[2], q + ".fc2"),
                        "heads": b.attn.n_heads,
                    }
                )
            return {
                "t": "gpt",
                "tok": arr(name + ".tok", inner.tok.weight),
                "pos": arr(name + ".pos", inner.pos.weight),
                "blocks": blocks,
                "ln_f": ln(inner.ln_f, name + ".ln_f"),
                "k": m.k,
            }
        if isinstance(m, nn.Sequential):
            return {"t": "seq", "c": [go(c, f"{name}.{i}") for i, c in enumerate(m)]}
        if isinstance(m, PreActResNet):
            kids = [go(m.stem, name + ".stem")]
            kids += [go(b, f"{name}.b{i}") for i, b in enumerate(m.blocks)]
            return {"t": "seq", "c": [*kids, go(m.head, name + ".head")]}
        if isinstance(m, PreActBlock):
            r = {
                "t": "seq",
                "c": [
                    go(m.norm1, name + ".n1"),
                    go(m.act, name + ".a"),
                    go(m.conv1, name + ".c1"),
                    go(m.norm2, name + ".n2"),
                    go(m.act, name + ".a"),
                    go(m.conv2, name + ".c2"),
                ],
            }
            s = None if m.shortcut is None else go(m.shortcut, name + ".s")
            return {"t": "block", "r": r, "s": s}
        if isinstance(m, IdentityShortcut):
            return {"t": "idshort", "stride": m.stride, "cout": m.out_channels}
        if isinstance(m, zoo.NTKLinear):
            return {
                "t": "linear",
                "w": arr(name + ".w", m.weight),
                "b": None if m.bias is None else arr(name + ".b", m.bias),
                "ws": _m.sqrt(m.weight_var / m.in_features),
                "bs": _m.sqrt(m.bias_var),
            }
        if isinstance(m, nn.Linear):
            b = None if m.bias is None else arr(name + ".b", m.bias)
            return {"t": "linear", "w": arr(name + ".w", m.weight), "b": b, "ws": 1.0, "bs": 1.0}
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.dilation != (1, 1) or not isinstance(m.padding, tuple):
                raise NotImplementedError(f"export: {m}")
            return {
                "t": "conv",
                "w": arr(name + ".w", m.weight),
                "b": None if m.bias is None else arr(name + ".b", m.bias),
                "stride": list(m.stride),
                "pad": list(m.padding),
            }
        if isinstance(m, nn.BatchNorm2d):
            if m.training or not m.affine:
                raise NotImplementedError(f"export: {m} (eval, affine only)")
            return {
                "t": "bn",
                "g": arr(name + ".g", m.weight),
                "b": arr(name + ".b", m.bias),
                "mean": arr(name + ".mean", m.running_mean, False),
                "var": arr(name + ".var", m.running_var, False),
                "eps": m.eps,
            }
        if isinstance(m, nn.ReLU):
            return {"t": "relu"}
        if isinstance(m, nn.Flatten):
            return {"t": "flatten"}
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return {"t": "gap"}
        if isinstance(m, nn.Identity):
            return {"t": "id"}
        raise NotImplementedError(f"export: no JAX version of {type(m).__name__}")

    return go(model, "m"), arrays


# ---------------------------------------------------------------------------------------------
# Workers


def _checksum(K) -> list[float]:
    """Sum, Frobenius norm, first and last entries in float64 (``K`` or ``(K, scale)``)."""
    import numpy as np

    scale = 1.0
    if isinstance(K, tuple):
        K, scale = K
    Kd = K.detach().double().numpy() if hasattr(K, "detach") else np.asarray(K, np.float64)
    Kd = Kd * scale
    flat = Kd.reshape(-1)
    return [float(Kd.sum()), float(np.sqrt((Kd * Kd).sum())), float(flat[0]), float(flat[-1])]


def _est_bytes(method: str, n: int, k: int, P: int, trace: bool) -> float:
    """Rough peak memory of a peer's call: its Jacobian (``n k P`` floats) and the output."""
    out = 4.0 * n * n * (1 if trace else k * k)
    if method in ("tf-jac", "nt"):  # the Jacobian, vmap(jacrev) intermediates, one product
        return 4.0 * n * k * P * 1.5 + 2 * out
    if method == "nngeometry":  # per-layer Grams from hooked activations: the (k, n, k, n) Gram
        return 4.0 * n * n * k * k * 3
    return 2 * out


def _est_seconds(method: str, n: int, k: int, P: int, trace: bool, gemm: float) -> float:
    """A priori time of the calls that can take minutes (0 where unknown).

    ``tf-jac``: its einsums, ``2 n² k² P`` FLOPs (trace ``2 n² k P``) at 70% of the GEMM rate.
    ``tf-vp``: memory-bound: each of the ``n² k`` sample pairs writes and reads a ``P``-vector
    (about 16 bytes per parameter) at 2.5 GB/s (measured: 13 s for the 512-wide MLP, k = 1,
    n = 64, one thread).
    """
    if method == "tf-jac":
        return 2.0 * n * n * (k if trace else k * k) * P / (0.7 * gemm * 1e9)
    if method == "tf-vp":
        return 16.0 * n * n * k * P / 2.5e9
    return 0.0


class CallTimeout(Exception):
    """A call ran past the worker's per-call limit (raised from a SIGALRM handler)."""


def _time_calls(fn, limit: float) -> dict:
    """Warm-up call, then up to 3 timed calls while they add up to < REPEAT_BUDGET_S (one if
    the warm-up took over SLOW_S), and up to MAX_REPEATS while they add up to < SHORT_S: calls
    under ~0.15 s get 7 (their medians moved by ±10-20% from run to run with 3).

    Each call is interrupted after ``limit`` seconds (SIGALRM; it lands between two torch
    operations, so a single long kernel overruns it).
    """
    import signal

    def on_alarm(signum, frame):
        raise CallTimeout(f"call ran past {limit:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    walls: list[float] = []
    cpus: list[float] = []
    first: dict[str, float] = {}
    check = None
    spent = 0.0
    for r in range(1 + MAX_REPEATS):
        w0, c0 = time.perf_counter(), time.process_time()
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            K = fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        check = _checksum(K)
        del K
        if r == 0:  # warm-up (lazy initialisation, JIT compilation): kept, not counted
            first = {"wall": w, "cpu": c}
            continue
        walls.append(w)
        cpus.append(c)
        spent += w
        if spent > REPEAT_BUDGET_S or first["wall"] > SLOW_S:  # a slow cell: one timed call
            break
        if len(walls) >= 3 and spent > SHORT_S:
            break
    return {
        "first_s": first["wall"],
        "first_cpu_s": first["cpu"],
        "times_s": walls,
        "median_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "check": check,
    }


def _series(cells: list[dict]) -> list[list[dict]]:
    """Group cells by (k, trace), each series in increasing n."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["k"], c["trace"]), []).append(c)
    return [sorted(g, key=lambda c: c["n"]) for g in groups.values()]


def _run_series(series, make_fn, spec, emit) -> None:
    """Run one (k, trace) series of cells in increasing n; skip what will not fit."""
    prev = None  # (n, seconds) of the last measured cell of this series
    err = None
    method = spec["method"]
    for c in series:
        row = dict(c, loadavg=os.getloadavg(), started=dt.datetime.now().isoformat("T", "seconds"))
        P = spec["P"][str(c["k"])]
        mem = _est_bytes(method, c["n"], c["k"], P, c["trace"])
        est = _est_seconds(method, c["n"], c["k"], P, c["trace"], spec["gemm"])
        if err is not None:
            row["skipped"] = f"earlier cell failed: {err}"
        elif mem > spec["max_gb"] * 1e9:
            row["skipped"] = f"estimated {mem / 1e9:.1f} GB > {spec['max_gb']} GB"
            row["estimated_gb"] = mem / 1e9
        elif est > spec["max_s"]:
            row["skipped"] = f"estimated {est:.0f} s > {spec['max_s']:.0f} s"
            row["predicted_s"] = est
        elif prev is not None and prev[1] * (c["n"] / prev[0]) ** 2 > spec["max_s"]:
            est = prev[1] * (c["n"] / prev[0]) ** 2
            row["skipped"] = f"predicted {est:.0f} s > {spec['max_s']:.0f} s"
            row["predicted_s"] = est
        if "skipped" in row:
            emit(row)
            continue
        try:
            fn, extra = make_fn(c)
            row.update(_time_calls(fn, 2 * spec["max_s"]))
            row.update(extra() if callable(extra) else extra)
            prev = (c["n"], row["cpu_s"])
        except CallTimeout as e:  # too slow here; a larger n would be slower still
            err = str(e)
            row["error"] = err
        except Exception as e:  # a peer that cannot do this model: record why
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row["error"] = err
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        emit(row)


def _emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def torch_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    method = spec["method"]
    name = spec["model"]
    models: dict[int, Any] = {}

    def model(k):
        if k not in models:
            models[k] = build(name, k)
        return models[k]

    def make_fn(c):
        m, x, tr = model(c["k"]), inputs(name, c["n"]), c["trace"]
        if method == "gdscope":
            import gdscope as gs
            from gdscope.kernels.ntk import _explain

            def fn():
                return gs.ntk(m, x, method="auto", trace_outputs=tr)

            def extra():
                info = _explain(m, x, method="auto", trace_outputs=tr)
                return {"route": info["method"], "modules": info["modules"], "plan": info}

            return fn, extra
        if method == "tf-jac":
            return (lambda: tf_jac(m, x, tr)), {}
        if method == "tf-vp":
            P = sum(p.numel() for p in m.parameters())
            chunk = max(1, int(spec["max_gb"] * 1e9 / 4 / (4.0 * c["n"] * c["k"] * P)))
            chunk = min(chunk, c["n"])
            return (lambda: tf_vp(m, x, tr, chunk)), {"chunk_size": chunk}
        if method == "nngeometry":
            return (lambda: nngeometry_ntk(m, x, tr)), {}
        raise KeyError(method)

    for series in _series(spec["cells"]):
        _run_series(series, make_fn, spec, _emit)


def jax_worker(spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt
    import numpy as np

    jax.config.update("jax_platform_name", "cpu")

    def apply_spec(s, p, c, x):
        t = s["t"]
        if t == "seq":
            for ch in s["c"]:
                x = apply_spec(ch, p, c, x)
            return x
        if t == "block":
            r = apply_spec(s["r"], p, c, x)
            return r if s["s"] is None else r + apply_spec(s["s"], p, c, x)
        if t == "idshort":
            st = s["stride"]
            x = x[:, :, ::st, ::st]
            extra = s["cout"] - x.shape[1]
            return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x
        if t == "linear":
            z = (x @ p[s["w"]].T) * s["ws"]
            return z if s["b"] is None else z + s["bs"] * p[s["b"]]
        if t == "conv":
            z = jax.lax.conv_general_dilated(
                x,
                p[s["w"]],
                tuple(s["stride"]),
                [(q, q) for q in s["pad"]],
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
            )
            return z if s["b"] is None else z + p[s["b"]][None, :, None, None]
        if t == "bn":
            scale = p[s["g"]] / jnp.sqrt(c[s["var"]] + s["eps"])
            shift = p[s["b"]] - c[s["mean"]] * scale
            return x * scale[None, :, None, None] + shift[None, :, None, None]
        if t == "relu":
            return jnp.maximum(x, 0)
        if t == "flatten":
            return x.reshape(x.shape[0], -1)
        if t == "gap":
            return x.mean(axis=(2, 3)).reshape(x.shape[0], x.shape[1], 1, 1)
        if t == "id":
            return x
        if t == "gpt":
            return gpt_apply(s, p, x)
        raise KeyError(t)

    def layer_norm(q, p, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + q["eps"]) * p[q["g"]] + p[q["b"]]

    def dense(q, p, x):
        return x @ p[q["w"]].T + p[q["b"]]

    def gpt_apply(s, p, ids):
        """zoo.GPT's forward (pre-LN blocks, causal softmax attention, exact GELU, tied
        readout), then the first k logits of the last position."""
        N, T = ids.shape
        x = p[s["tok"]][ids] + p[s["pos"]][:T]
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        for b in s["blocks"]:
            h = layer_norm(b["ln1"], p, x)
            d, H = h.shape[-1], b["heads"]
            qkv = dense(b["qkv"], p, h).reshape(N, T, 3, H, d // H).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            att = (q @ k.transpose(0, 1, 3, 2)) / jnp.sqrt(d // H)
            att = jax.nn.softmax(jnp.where(causal, att, -jnp.inf), axis=-1)
            y = (att @ v).transpose(0, 2, 1, 3).reshape(N, T, d)
            x = x + dense(b["proj"], p, y)
            h = jax.nn.gelu(dense(b["fc1"], p, layer_norm(b["ln2"], p, x)), approximate=False)
            x = x + dense(b["fc2"], p, h)
        x = layer_norm(s["ln_f"], p, x)
        return (x @ p[s["tok"]].T)[:, -1, : s["k"]]

    impl = nt.NtkImplementation.STRUCTURED_DERIVATIVES
    fns: dict = {}

    def make_fn(c):
        k, tr = c["k"], c["trace"]
        if k not in fns:
            with open(spec["export"][str(k)]["spec"]) as fh:
                sp = json.load(fh)
            data = np.load(spec["export"][str(k)]["arrays"])
            params = {kk: jnp.asarray(data[kk]) for kk in data.files if kk.startswith("p:")}
            consts = {kk: jnp.asarray(data[kk]) for kk in data.files if kk.startswith("c:")}

            def apply_fn(params, x):
                return apply_spec(sp, params, consts, x)

            fns[k] = (apply_fn, params)
        apply_fn, params = fns[k]
        x = jnp.asarray(np.load(spec["inputs"][str(c["n"])]))
        kern = nt.empirical_kernel_fn(
            apply_fn, trace_axes=(-1,) if tr else (), vmap_axes=0, implementation=impl
        )
        kfn = jax.jit(lambda x, params: kern(x, None, "ntk", params))
        scale = float(k) if tr else 1.0  # neural-tangents' trace is the mean over outputs

        def fn():
            return kfn(x, params).block_until_ready(), scale

        return fn, {"implementation": "STRUCTURED_DERIVATIVES", "jax": jax.__version__}

    for series in _series(spec["cells"]):
        _run_series(series, make_fn, spec, _emit)


def limits_worker(spec: dict) -> None:
    """The two parts of the Jacobian-contraction recipe of one cell, timed apart (CPU seconds).

    ``jac_s``: forming the per-sample Jacobian as ``tf-jac`` does (``vmap(jacrev)``, math SDPA);
    ``gemm_s``: one ``torch.mm(J, J.T)`` of the flattened ``(n k, P)`` Jacobian (trace:
    ``(n, k P)``). Any method that forms this Jacobian (or an equally costly per-sample weight
    Jacobian) and contracts it with the symmetric half of that GEMM costs at least
    ``jac_s + gemm_s / 2``: the bound on its speed-up over ``tf-jac`` is
    ``(jac_s + gemm_s) / (jac_s + gemm_s / 2)``.
    """
    import torch
    from torch.func import functional_call, jacrev, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(spec["threads"])
    for c in spec["cells"]:
        net, x, k, n = build(c["model"], c["k"]), inputs(c["model"], c["n"]), c["k"], c["n"]
        params = {kk: v.detach() for kk, v in net.named_parameters()}

        def f1(p, xx, net=net):
            return functional_call(net, p, (xx.unsqueeze(0),)).squeeze(0)

        def jac(params=params, f1=f1, x=x):
            with sdpa_kernel(SDPBackend.MATH):
                return [j.flatten(2) for j in vmap(jacrev(f1), (None, 0))(params, x).values()]

        J = torch.cat(jac(), dim=2)
        J = J.reshape(n, -1) if c["trace"] else J.reshape(n * k, -1)

        def best(fn) -> float:
            fn()
            ts = []
            for _ in range(2):
                c0 = time.process_time()
                fn()
                ts.append(time.process_time() - c0)
            return min(ts)

        tj = best(jac)
        tg = best(lambda J=J: J @ J.T)
        row = dict(
            c, jac_s=tj, gemm_s=tg, gemm_gflops=2.0 * J.shape[0] ** 2 * J.shape[1] / tg / 1e9
        )
        row["bound_half_gemm"] = (tj + tg) / (tj + tg / 2)
        row["bound_free_gemm"] = (tj + tg) / tj
        _emit(row)


# ---------------------------------------------------------------------------------------------
# Parent side


def run_group(
    spec: dict, timeout: float, python: str, src: Path = ROOT / "src"
) -> tuple[list[dict], str | None]:
    env = dict(os.environ)
    t = str(spec["threads"])
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = t
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=" + t
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    flag = "--jax-worker" if spec["method"] == "nt" else "--worker"
    cmd = [python, str(Path(__file__).resolve()), flag, json.dumps(spec)]
    err = None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out = p.stdout
        if p.returncode != 0:
            tail = (p.stderr or "").strip().splitlines()[-2:]
            err = f"exit {p.returncode}: " + " | ".join(tail)
    except subprocess.TimeoutExpired as e:
        raw = e.stdout or b""
        out = raw.decode() if isinstance(raw, bytes) else raw
        err = f"timeout after {timeout:.0f} s"
    rows = [json.loads(ln[4:]) for ln in out.splitlines() if ln.startswith("ROW ")]
    return rows, err


def environment(args) -> dict:
    import numpy
    import torch

    env: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "loadavg_at_start": os.getloadavg(),
        "quick": args.quick,
        "git_head": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "src": str(args.src),
        "src_uncommitted_changes": subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        if Path(args.src).resolve() == (ROOT / "src").resolve()
        else "a snapshot: see --src",
    }
    try:
        from importlib.metadata import version

        env["nngeometry"] = version("nngeometry")
    except Exception:  # optional peer
        env["nngeometry"] = None
    if args.jax_python:
        code = (
            "import jax, neural_tangents as nt, jaxlib; print(jax.__version__, jaxlib.__version__)"
        )
        p = subprocess.run(
            [args.jax_python, "-c", code],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        env["jax"] = p.stdout.strip() if p.returncode == 0 else None
        env["jax_error"] = None if p.returncode == 0 else p.stderr.strip().splitlines()[-1:]
        q = subprocess.run(
            [args.jax_python, "-m", "pip", "show", "neural-tangents"],
            capture_output=True,
            text=True,
        )
        env["neural_tangents"] = next(
            (ln.split(":", 1)[1].strip() for ln in q.stdout.splitlines() if "Version" in ln),
            None,
        )
    return env


def _prepare_jax(name: str, ks: set[int], ns: set[int], tmp: Path) -> dict:
    """Export the model (per k) and the inputs (per n) for the JAX worker."""
    import numpy as np

    out: dict[str, Any] = {"export": {}, "inputs": {}}
    for k in ks:
        spec, arrays = export(build(name, k))
        sp, ar = tmp / f"{name}_k{k}.json", tmp / f"{name}_k{k}.npz"
        sp.write_text(json.dumps(spec))
        np.savez(ar, **arrays)
        out["export"][str(k)] = {"spec": str(sp), "arrays": str(ar)}
    for n in ns:
        path = tmp / f"{name}_x{n}.npy"
        np.save(path, inputs(name, n).numpy())
        out["inputs"][str(n)] = str(path)
    return out


def _key(r: dict) -> tuple:
    return (r["model"], r["k"], r["trace"], r["n"])


def summarize(rows: list[dict], gemm: float) -> list[dict]:
    """One entry per cell: gdscope, the best peer, speed-up, FLOP/s, checksum agreement."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault(_key(r), {})[r["method"]] = r
    out = []
    for key, by in sorted(cells.items(), key=lambda kv: kv[0]):
        model, k, trace, n = key
        g = by.get("gdscope", {})
        s: dict[str, Any] = {"model": model, "k": k, "trace": trace, "n": n}
        s["P"] = g.get("P") or next((r.get("P") for r in by.values() if r.get("P")), None)
        ok = {m: r for m, r in by.items() if r.get("cpu_s") is not None}
        peers = {m: r["cpu_s"] for m, r in ok.items() if m in PEERS}
        s["peer_cpu_s"] = peers
        s["peer_status"] = {
            m: (r.get("skipped") or r.get("error")) for m, r in by.items() if m in PEERS
        }
        s["peer_status"] = {m: v for m, v in s["peer_status"].items() if v}
        ref = next((ok[m] for m in ("tf-jac", "nngeometry", "nt", "tf-vp") if m in ok), None)
        if "gdscope" in ok:
            s["gdscope_cpu_s"] = g["cpu_s"]
            s["gdscope_wall_s"] = g["median_s"]
            s["gdscope_first_s"] = g["first_s"]
            s["route"] = g.get("route")
            s["modules"] = g.get("modules")
            s["loadavg"] = g.get("loadavg")
            plan = g.get("plan") or {}
            if plan.get("gemm_flops"):
                s["plan_gflops_per_s"] = plan["gemm_flops"] / g["cpu_s"] / 1e9
                s["plan_fraction_of_gemm"] = s["plan_gflops_per_s"] / gemm
            if s["P"]:
                eq = 2.0 * n * n * (k if trace else k * k) * s["P"]
                s["jc_equiv_gflops_per_s"] = eq / g["cpu_s"] / 1e9
                s["jc_equiv_fraction_of_gemm"] = s["jc_equiv_gflops_per_s"] / gemm
            if peers:
                best = min(peers, key=peers.get)
                s["best_peer"] = best
                s["speedup"] = peers[best] / g["cpu_s"]
                s["speedup_wall"] = ok[best]["median_s"] / g["median_s"]
            else:  # no peer ran: the fastest predicted one (memory-skipped peers have none)
                pred = {m: r["predicted_s"] for m, r in by.items() if r.get("predicted_s")}
                if pred:
                    best = min(pred, key=pred.get)
                    s["predicted_best_peer"] = best
                    s["predicted_speedup"] = pred[best] / g["cpu_s"]
            if ref is not None:
                scale = max(abs(ref["check"][1]), 1e-300)
                s["rel_diff"] = (
                    max(abs(a - b) for a, b in zip(g["check"], ref["check"], strict=True)) / scale
                )
                s["rel_diff_vs"] = next(m for m, r in ok.items() if r is ref)
            if "nt" in ok and "tf-jac" in ok:
                scale = max(abs(ok["tf-jac"]["check"][1]), 1e-300)
                s["nt_rel_diff"] = (
                    max(
                        abs(a - b)
                        for a, b in zip(ok["nt"]["check"], ok["tf-jac"]["check"], strict=True)
                    )
                    / scale
                )
        else:
            s["gdscope_status"] = g.get("skipped") or g.get("error") or "not run"
        out.append(s)
    return out


def table(summary: list[dict], gemm: float) -> str:
    lines = [
        f"fp32 GEMM rate {gemm:.1f} GFLOP/s (1 thread). Times: median CPU seconds.",
        "",
        "| model | P | k | kernel | n | gdscope s | route | best peer s | speed-up | "
        "plan GFLOP/s (% GEMM) | rel diff | other peers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        kind = "trace" if s["trace"] else "full"
        if "gdscope_cpu_s" not in s:
            lines.append(
                f"| {s['model']} | {s['P']} | {s['k']} | {kind} | {s['n']} | "
                f"{s.get('gdscope_status')} | | | | | | |"
            )
            continue
        best = s.get("best_peer")
        bp = f"{s['peer_cpu_s'][best]:.3g} ({best})" if best else "none ran"
        sp = f"{s['speedup']:.2f}×" if best else "–"
        if not best and "predicted_speedup" in s:
            bp = f"none ran (predicted: {s['predicted_best_peer']})"
            sp = f"≈{s['predicted_speedup']:.0f}× (predicted)"
        fl = (
            f"{s['plan_gflops_per_s']:.1f} ({100 * s['plan_fraction_of_gemm']:.0f}%)"
            if "plan_gflops_per_s" in s
            else "–"
        )
        rd = f"{s['rel_diff']:.1e} ({s['rel_diff_vs']})" if "rel_diff" in s else "–"
        others = ", ".join(f"{m} {t:.3g}" for m, t in sorted(s["peer_cpu_s"].items()) if m != best)
        skipped = "; ".join(f"{m}: {v[:40]}" for m, v in s["peer_status"].items())
        if skipped:
            others = (others + "; " if others else "") + skipped
        lines.append(
            f"| {s['model']} | {s['P']} | {s['k']} | {kind} | {s['n']} | "
            f"{s['gdscope_cpu_s']:.3g} | {_route(s)} | {bp} | {sp} | {fl} | {rd} | {others} |"
        )
    return "\n".join(lines)


def _route(s: dict) -> str:
    mods = s.get("modules") or []
    counts: dict[str, int] = {}
    for m in mods:
        r = m.split(": ", 1)[-1].split()[0] if isinstance(m, str) else str(m)
        counts[r] = counts.get(r, 0) + 1
    inner = ",".join(f"{r}×{c}" for r, c in sorted(counts.items()))
    return f"{s.get('route')} [{inner}]" if inner else str(s.get("route"))


def run_limits(args) -> None:
    """``--limits``: J formation and GEMM timed apart, per cell, in one subprocess."""
    cells = []
    for item in args.limits.split(","):
        name, k, n, kind = item.split(":")
        cells.append({"model": name, "k": int(k), "n": int(n), "trace": kind == "trace"})
    spec = {"method": "limits", "threads": args.threads, "cells": cells}
    env = environment(args)
    env["gemm_gflops_start"] = gemm_rate(args.threads, "cpu")
    rows, err = run_group(spec, args.group_timeout, sys.executable, Path(args.src))
    day = dt.date.today().isoformat()
    suffix = f"_{args.tag}" if args.tag else ""
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / f"ntk_matrix_{day}_limits{suffix}.json"
    )
    out.write_text(json.dumps({"environment": env, "rows": rows, "error": err}, indent=1))
    for r in rows:
        kind = "trace" if r["trace"] else "full"
        print(
            f"{r['model']} k={r['k']} {kind} n={r['n']}: J formation {r['jac_s']:.3f} s, "
            f"J Jᵀ {r['gemm_s']:.3f} s ({r['gemm_gflops']:.0f} GFLOP/s); bound with a half GEMM "
            f"{r['bound_half_gemm']:.2f}×, with a free GEMM {r['bound_free_gemm']:.2f}×"
        )
    print(f"wrote {out}" + (f" ({err})" if err else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small cells (~2 min)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=12.0, help="skip a call predicted longer")
    ap.add_argument("--max-gb", type=float, default=6.0, help="skip a call estimated larger")
    ap.add_argument("--group-timeout", type=float, default=600.0)
    ap.add_argument("--models", default=None, help="comma-separated subset of the models")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jax-python", default=None, help="interpreter with jax + neural-tangents")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--reuse-peers",
        default=None,
        help="a previous result file: take the peers' rows from it (they do not depend on "
        "gdscope's code) and run only gdscope",
    )
    ap.add_argument(
        "--src",
        default=str(ROOT / "src"),
        help="the gdscope source the workers import (e.g. a `git archive HEAD src` snapshot, "
        "so that edits in the working tree during the run do not mix in)",
    )
    ap.add_argument(
        "--limits",
        default=None,
        help="instead of the matrix: time J formation and the J Jᵀ GEMM apart for cells "
        "model:k:n:full|trace,... (limits_worker)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jax-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        (limits_worker if spec["method"] == "limits" else torch_worker)(spec)
        return
    if args.jax_worker:
        jax_worker(json.loads(args.jax_worker))
        return

    import tempfile

    if args.limits:
        run_limits(args)
        return
    cells_by_model = QUICK_CELLS if args.quick else FULL_CELLS
    models = args.models.split(",") if args.models else list(cells_by_model)
    methods = [m for m in args.methods.split(",") if m]
    env = environment(args)
    if not env["nngeometry"]:
        methods = [m for m in methods if m != "nngeometry"]
    if not (args.jax_python and env.get("jax")):
        methods = [m for m in methods if m != "nt"]
    gemm = gemm_rate(args.threads, "cpu")
    env["gemm_gflops_start"] = gemm
    print(
        f"# {env['cpu']} | torch {env['torch']} | {args.threads} thread(s) | fp32 GEMM "
        f"{gemm:.1f} GFLOP/s | load {env['loadavg_at_start']} | methods {methods}",
        flush=True,
    )
    day = dt.date.today().isoformat()
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / f"ntk_matrix_{day}{suffix}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    result: dict[str, Any] = {"environment": env, "rows": rows, "group_errors": []}
    if args.reuse_peers:
        old = json.loads(Path(args.reuse_peers).read_text())
        wanted = {
            (name, k, tr, n) for name in models for k, tr, ns in cells_by_model[name] for n in ns
        }
        reused = [r for r in old["rows"] if r["method"] != "gdscope" and _key(r) in wanted]
        for r in reused:
            r["reused_from"] = str(args.reuse_peers)
        rows.extend(reused)
        methods = [m for m in methods if m == "gdscope"]
        env["peers_reused_from"] = {
            "file": str(args.reuse_peers),
            "environment": old["environment"],
            "rows": len(reused),
        }

    def save() -> None:
        result["summary"] = summarize(rows, gemm)
        out.write_text(json.dumps(result, indent=1))

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in models:
            series = cells_by_model[name]
            ks = {k for k, _, _ in series}
            P = {str(k): num_params(name, k) for k in ks}
            cells = [
                {"model": name, "k": k, "trace": tr, "n": n, "P": P[str(k)]}
                for k, tr, ns in series
                for n in ns
            ]
            for method in methods:
                spec: dict[str, Any] = {
                    "model": name,
                    "method": method,
                    "cells": [dict(c, method=method) for c in cells],
                    "threads": args.threads,
                    "max_s": args.max_seconds,
                    "max_gb": args.max_gb,
                    "P": P,
                    "gemm": gemm,
                }
                python = sys.executable
                if method == "nt":
                    try:
                        spec.update(_prepare_jax(name, ks, {c["n"] for c in cells}, Path(tmpdir)))
                    except NotImplementedError as e:
                        for c in cells:
                            rows.append(dict(c, method=method, error=f"not built: {e}"))
                        continue
                    python = args.jax_python
                t0 = time.perf_counter()
                got, err = run_group(spec, args.group_timeout, python, Path(args.src))
                seen = {_key(r) for r in got}
                for c in cells:
                    if _key(c) not in seen:
                        got.append(dict(c, method=method, error=err or "no result"))
                if err:
                    result["group_errors"].append({"model": name, "method": method, "error": err})
                rows.extend(got)
                for r in got:
                    print(_fmt(r), flush=True)
                print(f"#   {name} {method}: {time.perf_counter() - t0:.0f} s", flush=True)
                save()
    env["gemm_gflops_end"] = gemm_end = gemm_rate(args.threads, "cpu")
    env["loadavg_at_end"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - t_all
    save()
    print()
    print(table(result["summary"], gemm))
    below = [x for x in result["summary"] if x.get("speedup") is not None and x["speedup"] < 1.5]
    print(f"\n{len(below)} cells below 1.5x the best peer:")
    for x in below:
        kind = "trace" if x["trace"] else "full"
        print(
            f"  {x['model']} k={x['k']} {kind} n={x['n']}: {x['speedup']:.2f}x vs "
            f"{x['best_peer']} ({x['peer_cpu_s'][x['best_peer']]:.3g} s vs "
            f"{x['gdscope_cpu_s']:.3g} s); route {_route(x)}"
        )
    print(f"\nGEMM at the end {gemm_end:.1f} GFLOP/s; total {env['total_s']:.0f} s; wrote {out}")


def _fmt(r: dict) -> str:
    head = (
        f"{r['model']:>10} k={r['k']:<2} {'trace' if r['trace'] else 'full ':5} n={r['n']:<5} "
        f"{r['method']:<10}"
    )
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    return (
        f"{head} {r['median_s']:8.3f} s  cpu {r['cpu_s']:8.3f} s  first {r['first_s']:7.3f} s  "
        f"rss {r['peak_rss_mb'] / 1024:5.2f} GB  load {r['loadavg'][0]:.1f}"
    )


if __name__ == "__main__":
    main()
