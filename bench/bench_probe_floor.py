"""The cheap probes' floor on the demo MLP: what computing their values costs at the least.

A measurement for issue 12's goal (cheap probes every step at most 1.05x the plain loop on the
demo MLP), not a gdscope feature. No Tracker and no store: the values the cheap probes give
(the loss, ‖∇L‖, each parameter's distance from θ₀, the accuracy), each by the cheapest
primitive found, timed in the training loop right after ``optimizer.step()``.

Part 1, **primitives**: each way of getting one value, timed alone at every step (the order
rotates from step to step, so no primitive always runs first after the training step, when the
caches are coldest); the median over steps. The floor is the sum of the cheapest primitive per
value: what any implementation pays, with no bookkeeping and nothing stored.

Part 2, **loops**: per-step wall and CPU time against the plain loop, medians over rotated rounds:

- ``snapshot``: only a copy of θ into a preallocated buffer (``np.copyto`` per parameter), the
  least a design that computes the values off the loop (on a worker thread) must do in the loop,
  since the next ``optimizer.step()`` overwrites θ in place;
- ``sync``: the cheapest primitives, in the loop;
- ``async``: the snapshot in the loop, the values on a worker thread (torch's and NumPy's
  kernels release the GIL); includes the wait for the worker at the end.

    PYTHONPATH=src python bench/bench_probe_floor.py [--rounds 5] [--steps 1000] [--tag T]

Writes ``bench/results/probe_floor_<date>[_T].json`` with the environment and the load average.
NumPy's BLAS is held to one thread (``OPENBLAS_NUM_THREADS=1``, set before NumPy loads): with
its default thread pool a ``np.dot`` of 16k floats spins a second thread and costs milliseconds
in this loop.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads (see the docstring)

import argparse
import datetime as dt
import json
import math
import queue
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gdscope as gs
from gdscope.store import environment_info
from gdscope.zoo import digits, mlp

X, Y = digits(256, seed=0)
LABELS = Y.argmax(1)
LABELS_NP = LABELS.numpy()
MSE = torch.nn.functional.mse_loss


class Loop:
    """The demo MLP (64-128-128-10 tanh, MSE, full batch of 256 digits), GD at lr 0.5."""

    def __init__(self) -> None:
        self.model = mlp([64, 128, 128, 10], "tanh", seed=0)
        self.opt = gs.GD(self.model.parameters(), lr=0.5)
        self.params = list(self.model.parameters())
        self.theta0 = [p.detach().clone() for p in self.params]
        self.np_params = [p.detach().numpy() for p in self.params]  # views: θ as it changes
        self.np_theta0 = [t.numpy() for t in self.theta0]
        self.np_theta0_64 = [t.astype(np.float64) for t in self.np_theta0]
        self.buf32 = [np.empty_like(t) for t in self.np_theta0]
        self.buf64 = [np.empty_like(t) for t in self.np_theta0_64]
        self.out = self.loss = None

    def step(self) -> None:
        self.opt.zero_grad()
        self.out = self.model(X)
        self.loss = MSE(self.out, Y)
        self.loss.backward()
        self.opt.step()

    # -------------------------------------------------------------- one value, several ways
    def loss_item(self) -> float:
        return self.loss.item()

    def grad_torch(self) -> float:
        """One fused ``_foreach_norm`` over the gradients, their norm, one read."""
        grads = [p.grad for p in self.params]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def grad_numpy(self) -> float:
        return math.sqrt(
            sum(float(np.dot(g, g)) for g in (p.grad.numpy().ravel() for p in self.params))
        )

    def dist_torch(self) -> list[float]:
        """Per parameter ``‖θ − θ₀‖``: float32 difference, fused norms, one read."""
        with torch.no_grad():
            d = torch._foreach_norm(torch._foreach_sub(self.params, self.theta0))
        return torch.stack(d).tolist()

    def _dist_numpy(self, theta0: list[np.ndarray], bufs: list[np.ndarray]) -> list[float]:
        """``θ − θ₀`` into ``bufs`` (their dtype), then ``√(r·r)`` by ``np.dot`` per parameter."""
        out = []
        for a, a0, b in zip(self.np_params, theta0, bufs, strict=True):
            np.subtract(a, a0, out=b)
            r = b.ravel()
            out.append(math.sqrt(float(np.dot(r, r))))
        return out

    def dist_numpy32(self) -> list[float]:
        return self._dist_numpy(self.np_theta0, self.buf32)

    def dist_numpy64(self) -> list[float]:
        return self._dist_numpy(self.np_theta0_64, self.buf64)

    def acc_torch(self) -> float:
        return int(torch.count_nonzero(self.out.detach().argmax(1) == LABELS)) / len(LABELS)

    def acc_numpy(self) -> float:
        hits = self.out.detach().numpy().argmax(1) == LABELS_NP
        return int(np.count_nonzero(hits)) / len(LABELS_NP)

    def snapshot(self, ring: list[np.ndarray]) -> None:
        for a, b in zip(ring, self.np_params, strict=True):
            np.copyto(a, b)


PRIMITIVES: dict[str, tuple[str, Callable[[Loop], Any]]] = {
    "loss: .item()": ("loss", Loop.loss_item),
    "grad_norm: torch _foreach_norm": ("grad_norm", Loop.grad_torch),
    "grad_norm: numpy dot per tensor": ("grad_norm", Loop.grad_numpy),
    "dist per parameter: torch float32": ("dist_init", Loop.dist_torch),
    "dist per parameter: numpy float32": ("dist_init", Loop.dist_numpy32),
    "dist per parameter: numpy float64": ("dist_init", Loop.dist_numpy64),
    "accuracy: torch argmax": ("accuracy", Loop.acc_torch),
    "accuracy: numpy argmax": ("accuracy", Loop.acc_numpy),
}


def primitives(steps: int) -> dict[str, float]:
    """Median seconds per step of each primitive, timed in the loop."""
    loop = Loop()
    ring = [np.empty_like(t) for t in loop.np_theta0]
    names = [*PRIMITIVES, "snapshot: np.copyto of θ"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for t in range(steps):
        loop.step()
        k = t % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            if name in PRIMITIVES:
                PRIMITIVES[name][1](loop)
            else:
                loop.snapshot(ring)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v[50:]) for n, v in times.items()}


def run_loop(mode: str, steps: int) -> tuple[float, float]:
    """Seconds per step (wall, process CPU) of ``plain``, ``snapshot``, ``sync`` or ``async``."""
    loop = Loop()
    values: list[list[float]] = []
    ring = [[np.empty_like(t) for t in loop.np_theta0] for _ in range(4)]
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def values_of(loss: torch.Tensor, out: torch.Tensor, grads: list, theta: list) -> None:
        g = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        d = []
        for a, a0 in zip(theta, loop.np_theta0, strict=True):
            r = (a - a0).ravel()
            d.append(math.sqrt(float(np.dot(r, r))))
        hits = out.numpy().argmax(1) == LABELS_NP
        values.append([loss.item(), g, int(np.count_nonzero(hits)) / len(LABELS_NP), *d])

    def worker() -> None:
        while (job := jobs.get()) is not None:
            values_of(*job)

    thread = threading.Thread(target=worker, daemon=True) if mode == "async" else None
    if thread is not None:
        thread.start()
    c0, t0 = time.process_time(), time.perf_counter()
    for t in range(steps):
        loop.step()
        if mode == "snapshot":
            loop.snapshot(ring[t % 4])
        elif mode == "sync":
            values.append(
                [loop.loss_item(), loop.grad_torch(), loop.acc_numpy(), *loop.dist_numpy32()]
            )
        elif mode == "async":
            theta = ring[t % 4]
            loop.snapshot(theta)  # gradients and outputs are fresh tensors every step
            jobs.put((loop.loss.detach(), loop.out.detach(), [p.grad for p in loop.params], theta))
    if thread is not None:
        jobs.put(None)
        thread.join()
    assert len(values) == (steps if mode in ("sync", "async") else 0)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = [os.getloadavg()[0]]
    prim = primitives(2 * args.steps)
    best: dict[str, tuple[str, float]] = {}
    for name, sec in prim.items():
        value = PRIMITIVES[name][0] if name in PRIMITIVES else "snapshot"
        if value not in best or sec < best[value][1]:
            best[value] = (name, sec)
    modes = ["plain", "snapshot", "sync", "async"]
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes[r % 4 :] + modes[: r % 4]:
            w, c = run_loop(m, args.steps)
            wall[m].append(w)
            cpu[m].append(c)
        load.append(os.getloadavg()[0])
    plain_w, plain_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    floor = sum(sec for v, (_, sec) in best.items() if v != "snapshot")
    print(
        f"plain step {plain_w * 1e6:.0f} µs wall, {plain_c * 1e6:.0f} µs CPU; 5% = "
        f"{0.05 * plain_w * 1e6:.0f} µs"
    )
    for name, sec in prim.items():
        print(f"  {name:36s} {sec * 1e6:6.1f} µs")
    print(
        f"floor (cheapest per value, nothing stored): {floor * 1e6:.0f} µs = "
        f"{1 + floor / plain_w:.3f}x"
    )
    loops = {}
    for m in modes:
        w, c = statistics.median(wall[m]), statistics.median(cpu[m])
        loops[m] = {"wall_s": w, "cpu_s": c, "wall_ratio": w / plain_w, "cpu_ratio": c / plain_c}
        print(f"  {m:8s} {w * 1e6:7.1f} µs  {w / plain_w:.3f}x wall  {c / plain_c:.3f}x CPU")
    print(f"load average {min(load):.2f}-{max(load):.2f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = (
        out / f"probe_floor_{dt.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.json"
    )
    path.write_text(
        json.dumps(
            {
                "environment": environment_info(),
                "threads": 1,
                "steps": args.steps,
                "rounds": args.rounds,
                "load_average": load,
                "plain_step_s": plain_w,
                "primitives_s": prim,
                "cheapest": {v: {"primitive": n, "s": s} for v, (n, s) in best.items()},
                "floor_s": floor,
                "floor_ratio": 1 + floor / plain_w,
                "loops": loops,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
