"""Benchmark: the NTK and the Hessian of small transformers, gdscope against the plain recipes.

Models (float32, eval, seeded; defined here so that two attention implementations of the *same*
function can be compared; ``gdscope.zoo.gpt`` is added as a row when it exists):

- **gpt**: a causal GPT (vocab 64, T 16, d 64, 2 heads, 2 pre-LN blocks with a 4d GELU MLP,
  learned positions, final LayerNorm, readout tied to the token embedding, P = 105,216). Its
  NTK is taken of the **last-token logits**: ``k = 64`` outputs per sequence (the full per-token
  kernel has ``k = T·V = 1024`` and does not fit at these n). Full ``(n, n, 64, 64)`` kernel at
  n = 32, trace kernel ``Σ_a Θ[a, a]`` at n = 128 (``--quick``: 16 and 64).
- **vit**: a ViT on scikit-learn digits (1×8×8, patches 4×4 → 4 tokens + CLS, d 64, 2 heads,
  2 blocks, CLS readout to 10 classes). Full ``(n, n, 10, 10)`` kernel at n = 256; and the same
  ViT with d = 256 (P = 1.6 M) at n = 64, where the attention rule's ``gram`` route pays.

Each model in three variants computing the same function (weights copied): ``sdpa`` (``nn.Linear``
q/k/v and out projections around ``F.scaled_dot_product_attention``), ``mha``
(``nn.MultiheadAttention``), ``mha-norule`` (``mha`` with gdscope's MultiheadAttention rule
switched off, i.e. its parameters by the Jacobian route: the behaviour before the rule); and
``untied`` for the GPT (a separate readout ``Linear``, to price the tied embedding's fallback).

NTK methods: ``gs.ntk`` with ``auto``, ``structured`` (where every parameter has a rule),
``jacobian`` and ``vp`` (``--quick`` only: ``n·k`` products are too slow); the planner with its
previous cost weights (``auto-oldcost``); and the torch.func NTK tutorial's recipe
(``vmap(jacrev)`` Jacobians of both inputs, one einsum per parameter: "the twelve lines a user
would write"). Accuracy: every kernel's block on the first 8 samples against the float64
tutorial kernel of those 8 samples.

Hessian (cross-entropy, mean; the GPT on next-token prediction at every position of 128
sequences from a fixed random Markov chain, the ViT on 512 digits; both after 30 AdamW steps):
top-1 and top-10 by ``gs.hessian_eigs`` (tol 1e-3), by PyHessian 0.1 (``eigenvalues(maxIter=100,
tol=1e-3, top_n=k)``; HVPs counted by wrapping its ``hessian_vector_product``, as in
``bench_hessian.py``), and by what a user would write with ``torch.autograd``: a power
iteration (top-1, stop when ``|Δλ| ≤ 1e-3 |λ|``) and SciPy's ``eigsh`` (ARPACK Lanczos,
``tol=1e-3``) on a ``LinearOperator`` of autograd HVPs (top-1 and top-10). Reference: the
float64 Hessian's eigenvalues by ``gs.hessian_eigs(tol=1e-10)`` in float64, cross-checked by
SciPy ``eigsh(tol=1e-12)`` on the float64 operator.

Measuring on a shared 2-core machine (``bench_hessian.py``'s scheme, imported from it): every
timed call waits (time-boxed) for an idle machine and records the CPU share other processes took
meanwhile; the default is one torch thread so that this process's CPU time does not depend on
the other core's load. Configurations rotate between repeats. Wall and CPU seconds are both
stored; tables use CPU seconds.

    PYTHONPATH=src .venv/bin/python bench/bench_transformer.py [--quick] [--threads 1]
        [--reps 2] [--only ntk|routes|hessian] [--tag TAG]

``routes``: each structured rule's contraction timed by each forced route (``gram``, ``pair``,
``jac``) on the untied GPT (n = 32) and the ViT (n = 128), with the planner's cost estimate: the
data its cost weights were fitted to.

Writes ``bench/results/transformer_<date>[_<tag>].json`` (environment, every timing) and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_hessian as bh
import gdscope as gs
from gdscope.curvature.products import curvature_operator
from gdscope.kernels import rules as gd_rules
from gdscope.kernels.ntk import _explain, ntk
from gdscope.problem import math_attention

ROOT = Path(__file__).resolve().parents[1]
N_REF = 8  # samples of the float64 reference kernel

# ---------------------------------------------------------------------------------------------
# models


class Attention(nn.Module):
    """Multi-head self-attention, by ``nn.Linear`` + SDPA or by ``nn.MultiheadAttention``."""

    def __init__(self, d: int, heads: int, causal: bool, mha: bool) -> None:
        super().__init__()
        self.heads, self.causal, self.mha = heads, causal, mha
        if mha:
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        if self.mha:
            mask = None
            if self.causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool, mha: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, causal, mha)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Causal GPT; ``out`` = "last" (last-token logits, N×V) or "all" (N×V×T, class dim 1)."""

    def __init__(
        self, V: int, T: int, d: int, heads: int, layers: int, mha: bool, tied: bool, out: str
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        for e in (self.wte, self.wpe):  # GPT-2's initialisation (N(0, 1) logits are huge)
            nn.init.normal_(e.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads, True, mha) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.tied, self.out = tied, out
        if not tied:
            self.head = nn.Linear(d, V, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        x = self.ln(x)
        if self.out == "last":
            x = x[:, -1]
        y = F.linear(x, self.wte.weight) if self.tied else self.head(x)
        return y if self.out == "last" else y.transpose(1, 2)


class ViT(nn.Module):
    """ViT on 1×8×8 images: 4×4 patches by a Linear, CLS token, learned positions."""

    def __init__(self, d: int, heads: int, layers: int, mha: bool, patch: int = 4) -> None:
        super().__init__()
        self.p = patch
        self.embed = nn.Linear(patch * patch, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (8 // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, False, mha) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, img: Tensor) -> Tensor:
        B, p = img.shape[0], self.p
        x = img.reshape(B, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)
        x = torch.cat([self.cls.expand(B, 1, -1), self.embed(x)], dim=1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x[:, 0]))


def to_mha(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy ``src``'s (SDPA variant) weights into ``dst`` (MHA variant): the same function."""
    sd = {}
    for name, t in src.state_dict().items():
        name = name.replace("attn.qkv.weight", "attn.attn.in_proj_weight")
        name = name.replace("attn.qkv.bias", "attn.attn.in_proj_bias")
        name = name.replace("attn.proj.", "attn.attn.out_proj.")
        sd[name] = t
    dst.load_state_dict(sd)
    return dst


def build(model: str, variant: str, out: str = "last") -> nn.Module:
    """The benchmark's models; every variant of one model computes the same function."""
    torch.manual_seed(0)
    if model == "gpt":
        if variant == "zoo":
            from gdscope import zoo

            inner = zoo.gpt(64, 16, d_model=64, n_heads=2, n_layers=2, seed=0)
            return LastToken(inner).eval() if out == "last" else inner.eval()
        kw = dict(V=64, T=16, d=64, heads=2, layers=2, out=out)
        base = GPT(mha=False, tied=variant != "untied", **kw)
        if variant in ("sdpa", "untied"):
            return base.eval()
        return to_mha(base, GPT(mha=True, tied=True, **kw)).eval()
    d = 256 if model == "vit256" else 64
    base = ViT(d, 2, 2, mha=False)
    if variant == "sdpa":
        return base.eval()
    return to_mha(base, ViT(d, 2, 2, mha=True)).eval()


class LastToken(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, idx: Tensor) -> Tensor:
        return self.inner(idx)[:, -1]


def markov_tokens(n: int, T: int, V: int, seed: int) -> Tensor:
    """``n`` sequences of a fixed random Markov chain (peaked random transition rows)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(3.0 * torch.randn(V, V, generator=g), dim=1)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def digits_images(n: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.as_tensor(d.data[:n], dtype=torch.float32) / 16.0
    return X.reshape(-1, 1, 8, 8), torch.as_tensor(d.target[:n], dtype=torch.long)


def inputs(model: str, n: int) -> Tensor:
    """The first ``n`` of a fixed pool (so the first ``N_REF`` samples never change)."""
    if model == "gpt":
        return markov_tokens(max(n, 1024), 16, 64, seed=1)[:n]
    return digits_images(n)[0]


# ---------------------------------------------------------------------------------------------
# NTK


def tutorial_ntk(net: nn.Module, x1: Tensor, x2: Tensor, trace: bool = False) -> Tensor:
    """The torch.func NTK tutorial's ``empirical_ntk_jacobian_contraction``."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    einsum_expr = "Naf,Maf->NM" if trace else "Naf,Mbf->NMab"
    pairs = zip(jac1, jac2, strict=True)
    result = torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in pairs])
    return result.sum(0)


class OldCost:
    """The planner's cost weights before this benchmark's calibration (strided passes at 4)."""

    def __enter__(self) -> OldCost:
        self.orig = gd_rules._STRIDED
        gd_rules._STRIDED = gd_rules._ELEMENTWISE
        return self

    def __exit__(self, *exc: object) -> None:
        gd_rules._STRIDED = self.orig


class RuleOff:
    """Switch gdscope's MultiheadAttention rule off (the planner then uses the Jacobian)."""

    def __enter__(self) -> RuleOff:
        self.orig = gd_rules._rule_class

        def patched(m: nn.Module):
            return None if isinstance(m, nn.MultiheadAttention) else self.orig(m)

        gd_rules._rule_class = patched
        return self

    def __exit__(self, *exc: object) -> None:
        gd_rules._rule_class = self.orig


def ntk_configs(quick: bool) -> list[dict[str, Any]]:
    cfgs = []
    gpt_full = (16,) if quick else (32,)
    gpt_trace = (64,) if quick else (128,)
    vit_full = (32,) if quick else (256,)
    variants = ["sdpa", "mha", "mha-norule", "untied"]
    try:
        from gdscope import zoo

        if hasattr(zoo, "gpt"):
            variants.append("zoo")
    except ImportError:
        pass
    for n in gpt_full:
        for v in variants:
            cfgs.append(dict(model="gpt", variant=v, n=n, trace=False, method="auto"))
        for m in ("jacobian", "tutorial"):
            cfgs.append(dict(model="gpt", variant="sdpa", n=n, trace=False, method=m))
        cfgs.append(dict(model="gpt", variant="untied", n=n, trace=False, method="structured"))
    if quick:  # n·k NTK-vector products: 14 CPU s already at n = 16 (auto: 3 s)
        cfgs.append(dict(model="gpt", variant="mha", n=gpt_full[0], trace=False, method="vp"))
    for n in gpt_trace:
        for v in ("sdpa", "mha", "mha-norule"):
            cfgs.append(dict(model="gpt", variant=v, n=n, trace=True, method="auto"))
        for m in ("jacobian", "tutorial"):
            cfgs.append(dict(model="gpt", variant="sdpa", n=n, trace=True, method=m))
    for n in gpt_full:
        cfgs.append(dict(model="gpt", variant="sdpa", n=n, trace=False, method="auto-oldcost"))
    for n in vit_full:
        for v in ("sdpa", "mha", "mha-norule"):
            cfgs.append(dict(model="vit", variant=v, n=n, trace=False, method="auto"))
        cfgs.append(dict(model="vit", variant="sdpa", n=n, trace=False, method="auto-oldcost"))
        for m in ("jacobian", "tutorial"):
            cfgs.append(dict(model="vit", variant="sdpa", n=n, trace=False, method=m))
    n = 32 if quick else 64  # d = 256: where the attention rule's gram route pays
    for v in ("sdpa", "mha", "mha-norule"):
        cfgs.append(dict(model="vit256", variant=v, n=n, trace=False, method="auto"))
    cfgs.append(dict(model="vit256", variant="sdpa", n=n, trace=False, method="jacobian"))
    return cfgs


def _label(c: dict[str, Any]) -> str:
    kind = "trace" if c["trace"] else "full"
    return f"{c['model']}/{c['variant']} n={c['n']} {kind} {c['method']}"


def run_ntk(c: dict[str, Any], x: Tensor, model: nn.Module) -> tuple[dict[str, Any], Tensor]:
    method, trace = c["method"], c["trace"]
    ctx = RuleOff() if c["variant"] == "mha-norule" else _Null()
    if method == "auto-oldcost":
        ctx, method = OldCost(), "auto"
    with ctx, bh.Meter() as meter:
        if method == "tutorial":
            with math_attention():
                K = tutorial_ntk(model, x, x, trace)
        else:
            gm = "auto" if method == "auto" else method
            K = ntk(model, x, method=gm, trace_outputs=trace)
    rec = meter.record()
    if method in ("auto", "structured"):
        with ctx:
            info = _explain(model, x, method=method, trace_outputs=trace)
        rec["plan"] = {k: info[k] for k in ("modules", "gemm_flops", "tile", "cached")}
    return rec, K


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def ntk_reference(model: str, variant: str, x: Tensor, trace: bool) -> Tensor:
    """The float64 tutorial kernel of the first ``N_REF`` samples."""
    m = build(model, variant).double()
    xr = x[:N_REF].double() if x.is_floating_point() else x[:N_REF]
    with math_attention():
        return tutorial_ntk(m, xr, xr, trace)


def bench_ntk(
    args: argparse.Namespace, waiter: bh.Waiter, save: Callable[[], None], out: dict[str, Any]
) -> None:
    cfgs = ntk_configs(args.quick)
    refs: dict[tuple, Tensor] = {}
    rows = out.setdefault("ntk", {})
    for rep in range(args.reps):
        order = cfgs[rep % len(cfgs) :] + cfgs[: rep % len(cfgs)] if rep else cfgs
        if rep % 2:
            order = order[::-1]
        for c in order:
            lab = _label(c)
            row = rows.setdefault(lab, {**c, "runs": []})
            if row.get("skipped"):
                continue
            if c["method"] == "vp" and rep > 0:
                continue
            est = row.get("first_cpu_s")
            if est is not None and est > args.max_seconds:
                continue  # one run of a slow configuration is enough
            model = build(c["model"], "mha" if c["variant"] == "mha-norule" else c["variant"])
            x = inputs(c["model"], c["n"])
            fvar = c["variant"] if c["variant"] in ("untied", "zoo") else "sdpa"
            key = (c["model"], fvar, c["trace"])
            if key not in refs:  # every variant but untied/zoo computes the sdpa model's function
                refs[key] = ntk_reference(c["model"], fvar, x, c["trace"])
            waiter()
            try:
                rec, K = run_ntk(c, x, model)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(f"{lab}: ERROR {row['error']}", flush=True)
                row["skipped"] = True
                continue
            ref = refs[key]
            Kb = K[:N_REF, :N_REF].double()
            rec["rel_err_vs_f64"] = float((Kb - ref).norm() / ref.norm())
            rec["k"] = int(K.shape[-1]) if not c["trace"] else None
            del K
            row["runs"].append(rec)
            row.setdefault("first_cpu_s", rec["cpu_seconds"])
            print(
                f"{lab:<42} cpu {rec['cpu_seconds']:8.2f} s  wall {rec['seconds']:8.2f} s  "
                f"interf {rec['interference']:.2f}  err {rec['rel_err_vs_f64']:.1e}",
                flush=True,
            )
            save()


def bench_routes(out: dict[str, Any], save: Callable[[], None]) -> None:
    """CPU time of each structured rule's contraction by each forced route (the planner's data).

    One ``(n, k, n, k)`` contraction per rule and route (best of 2); for ``jac`` the GEMM of a
    ``(n·k × P_l)`` matrix with itself. Also the planner's cost estimate (``Rule.cost``).
    """
    import importlib

    N = importlib.import_module("gdscope.kernels.ntk")
    capture = importlib.import_module("gdscope.kernels._ntk_capture")
    res = out.setdefault("routes", {})
    for model, variant, n, routes in (
        ("gpt", "untied", 32, ("pair", "jac")),  # gram at T = 16, k = 64: ~8x slower than jac
        ("vit", "sdpa", 128, ("gram", "pair", "jac")),
    ):
        m, x = build(model, variant), inputs(model, n)
        table = res.setdefault(f"{model}/{variant} n={n}", {})
        for route in routes:
            with math_attention():
                job, _ = N._prepare(m, x, None, "auto", False, None, None, force=route)
                feats = capture._features(job.plan, x, False, job.layout.chunk)
            k = job.plan.k
            for r in job.plan.rules:
                if r.approach != route or r.part is not None or not hasattr(r, "T"):
                    continue
                ts = []
                for _ in range(2):
                    if route == "jac":
                        J = torch.randn(n * k, r.jac_width())
                        t0 = time.process_time()
                        J @ J.T
                    else:
                        acc = torch.zeros(n, k, n, k)
                        f = feats.rules[r.key]
                        t0 = time.process_time()
                        r.contract(f, f, acc, False, job.layout.ws)
                    ts.append(time.process_time() - t0)
                row = table.setdefault(r.key, {"T": r.T, "d": r.d, "o": r.o, "k": k})
                row[route] = {"cpu_s": min(ts), "cost_estimate": r.cost(route, False, n) * n * n}
                print(f"route {model} {r.key:<20} {route:<5} {min(ts) * 1e3:8.1f} ms", flush=True)
            save()


# ---------------------------------------------------------------------------------------------
# Hessian


def hessian_problem(model: str, quick: bool) -> tuple[nn.Module, Tensor, Tensor, dict]:
    if model == "gpt":
        n = 32 if quick else 128
        seq = markov_tokens(n, 17, 64, seed=2)
        X, Y = seq[:, :16], seq[:, 1:]
        net = build("gpt", "sdpa", out="all")
    else:
        X, Y = digits_images(128 if quick else 512)
        net = build("vit", "sdpa")
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(X), Y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    net.eval().zero_grad(set_to_none=True)
    info = {
        "n": int(X.shape[0]),
        "params": sum(p.numel() for p in net.parameters()),
        "adamw_steps": 30,
        "loss_first_last": [losses[0], float(F.cross_entropy(net(X), Y))],
    }
    return net, X, Y, info


def hessian_reference(net: nn.Module, X: Tensor, Y: Tensor, k: int) -> dict[str, Any]:
    prob64 = gs.Problem(net, "cross_entropy", (X, Y), dtype=torch.float64)
    r = gs.hessian_eigs(prob64, k=k, tol=1e-10)
    op64 = curvature_operator(prob64)
    v0 = np.ones(op64.shape[0])
    vals, _ = spla.eigsh(op64.to_scipy(), k=k, which="LA", tol=1e-12, v0=v0)
    la = np.sort(vals)[::-1]
    gd = r.values.numpy()
    return {
        "values": gd.tolist(),
        "scipy_values": la.tolist(),
        "max_rel_diff_scipy": float(np.max(np.abs(la - gd) / np.abs(la))),
        "converged": bool(r.converged),
    }


class AutogradHVP:
    """What a user writes: the loss's gradient with ``create_graph``, then ``grad(g·v)``."""

    def __init__(self, net: nn.Module, X: Tensor, Y: Tensor) -> None:
        self.params = [p for p in net.parameters() if p.requires_grad]
        with math_attention():
            loss = F.cross_entropy(net(X), Y)
            self.g = torch.autograd.grad(loss, self.params, create_graph=True)
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        vs, off = [], 0
        for p in self.params:
            vs.append(v[off : off + p.numel()].view_as(p))
            off += p.numel()
        with math_attention():
            hv = torch.autograd.grad(self.g, self.params, vs, retain_graph=True)
        self.calls += 1
        return torch.cat([h.reshape(-1) for h in hv])


def user_power(net: nn.Module, X: Tensor, Y: Tensor, seed: int) -> dict[str, Any]:
    hvp = AutogradHVP(net, X, Y)
    P = sum(p.numel() for p in hvp.params)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(P, generator=g)
    v /= v.norm()
    lam = None
    for _ in range(100):
        w = hvp(v)
        new = float(v @ w)
        v = w / w.norm()
        if lam is not None and abs(new - lam) <= 1e-3 * abs(lam):
            lam = new
            break
        lam = new
    return {"values": [lam], "hvps": hvp.calls}


def user_eigsh(net: nn.Module, X: Tensor, Y: Tensor, k: int, seed: int) -> dict[str, Any]:
    hvp = AutogradHVP(net, X, Y)
    P = sum(p.numel() for p in hvp.params)

    def mv(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))
        return hvp(t).double().numpy()

    op = spla.LinearOperator((P, P), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(P)
    vals = spla.eigsh(op, k=k, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)
    return {"values": sorted(vals.tolist(), reverse=True), "hvps": hvp.calls}


def run_pyhessian(net: nn.Module, X: Tensor, Y: Tensor, k: int, seed: int) -> dict[str, Any]:
    from pyhessian import hessian

    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with bh.CountedHVP() as counter, math_attention():
        h = hessian(net, nn.CrossEntropyLoss(), data=(X, Y), cuda=False)
        vals, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
    del h
    net.zero_grad(set_to_none=True)
    return {"values": [float(v) for v in vals], "hvps": counter.calls}


def run_gdscope_h(net: nn.Module, X: Tensor, Y: Tensor, k: int, seed: int) -> dict[str, Any]:
    prob = gs.Problem(net, "cross_entropy", (X, Y))
    r = gs.hessian_eigs(prob, k=k, tol=1e-3, seed=seed)
    return {"values": r.values.tolist(), "hvps": r.matvecs, "converged": bool(r.converged)}


def bench_hessian(
    args: argparse.Namespace, waiter: bh.Waiter, save: Callable[[], None], out: dict[str, Any]
) -> None:
    res = out.setdefault("hessian", {})
    tools: dict[str, Callable[..., dict[str, Any]]] = {
        "gdscope": run_gdscope_h,
        "pyhessian": run_pyhessian,
        "user-eigsh": user_eigsh,
        "user-power": lambda net, X, Y, k, seed: user_power(net, X, Y, seed),
    }
    for model in ("gpt", "vit"):
        net, X, Y, info = hessian_problem(model, args.quick)
        ref = hessian_reference(net, X, Y, 10)
        entry = res.setdefault(model, {"problem": info, "reference": ref, "runs": {}})
        print(
            f"hessian {model}: {info}; ref {ref['values'][:3]}... scipy diff "
            f"{ref['max_rel_diff_scipy']:.1e}",
            flush=True,
        )
        cfgs = [(t, k) for k in (1, 10) for t in tools if not (t == "user-power" and k == 10)]
        for rep in range(args.reps):
            order = cfgs[rep % len(cfgs) :] + cfgs[: rep % len(cfgs)]
            for tool, k in order:
                waiter()
                with bh.Meter() as meter:
                    r = tools[tool](net, X, Y, k, rep)
                rec = {**meter.record(), **r}
                v = np.sort(np.asarray(r["values"], dtype=np.float64))[::-1]
                rv = np.asarray(ref["values"][: len(v)])
                rec["rel_err"] = float(np.max(np.abs(v - rv) / np.abs(rv)))
                entry["runs"].setdefault(f"{tool} k={k}", []).append(rec)
                print(
                    f"  {model} {tool:<10} k={k:<2} cpu {rec['cpu_seconds']:7.2f} s "
                    f"hvps {r['hvps']:4d} err {rec['rel_err']:.1e}",
                    flush=True,
                )
                save()


# ---------------------------------------------------------------------------------------------
# tables


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def tables(out: dict[str, Any]) -> str:
    lines = []
    rows = out.get("ntk", {})
    if rows:
        lines += [
            "| kernel | variant | method | CPU s (median) | wall s | rel. err vs f64 |",
            "|---|---|---|---:|---:|---:|",
        ]
        for row in rows.values():
            kind = f"{row['model']} n={row['n']} {'trace' if row['trace'] else 'full'}"
            if row.get("error"):
                lines.append(
                    f"| {kind} | {row['variant']} | {row['method']} | "
                    f"error: {row['error'][:80]} | | |"
                )
                continue
            c, w = _med(row["runs"], "cpu_seconds"), _med(row["runs"], "seconds")
            e = _med(row["runs"], "rel_err_vs_f64")
            if c is None:
                continue
            lines.append(
                f"| {kind} | {row['variant']} | {row['method']} | {c:.2f} | {w:.2f} | {e:.1e} |"
            )
    for model, entry in out.get("hessian", {}).items():
        lines += [
            "",
            f"Hessian, {model} ({entry['problem']})",
            "",
            "| tool | k | CPU s (median) | HVPs (median) | rel. err (median) |",
            "|---|---:|---:|---:|---:|",
        ]
        for lab, runs in entry["runs"].items():
            tool, k = lab.split(" k=")
            lines.append(
                f"| {tool} | {k} | {_med(runs, 'cpu_seconds'):.2f} | "
                f"{_med(runs, 'hvps'):.0f} | {_med(runs, 'rel_err'):.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", choices=("ntk", "hessian", "routes"), default=None)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="a configuration whose first run took more CPU s runs once",
    )
    ap.add_argument("--max-wait", type=float, default=20.0)
    ap.add_argument("--wait-budget", type=float, default=120.0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    day = dt.date.today().isoformat()
    tag = ("_" + args.tag if args.tag else "") + ("_quick" if args.quick else "")
    path = ROOT / "bench" / "results" / f"transformer_{day}{tag}.json"
    env = bh.environment()
    env["loadavg_at_start"] = list(math.floor(x * 100) / 100 for x in __import__("os").getloadavg())
    env["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    env["args"] = vars(args)
    out: dict[str, Any] = {"environment": env}

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    waiter = bh.Waiter(args.max_wait, args.wait_budget)
    t0 = time.perf_counter()
    if args.only in (None, "ntk"):
        bench_ntk(args, waiter, save, out)
    if args.only in (None, "routes"):
        bench_routes(out, save)
    if args.only in (None, "hessian"):
        bench_hessian(args, waiter, save, out)
    out["total_seconds"] = time.perf_counter() - t0
    out["waited_seconds"] = waiter.total
    save()
    print(tables(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
