"""The cheap probes' floor in the demo MLP's loop, in the loop and on a worker thread.

A measurement for a design decision (issue 12), not a gdscope feature. The same values as the
Tracker's cheap probes, with no Tracker and no store: the loss, ‖∇L‖ (one fused norm), the
distance of each parameter from θ₀ and the accuracy.

- ``sync``: computed in the loop after ``optimizer.step()``, as the Tracker does;
- ``async``: the loop keeps references to the step's gradients and outputs (fresh tensors every
  step) and copies θ into a ring of buffers; a worker thread computes the values (torch's
  operations release the GIL, so it runs beside training on another core).

Ratios are per-step times over the plain loop's, medians over rotated rounds; ``async`` includes
waiting for the worker to finish at the end.

    PYTHONPATH=src python bench/bench_async_probes.py [--rounds 5] [--steps 1000]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

import torch

import gdscope as gs
from gdscope.zoo import digits, mlp


def run(mode: str, steps: int) -> tuple[float, int]:
    """Seconds per step (loop plus the worker's tail) and the number of steps measured."""
    X, Y = digits(256, seed=0)
    model = mlp([64, 128, 128, 10], "tanh", seed=0)
    opt = gs.GD(model.parameters(), lr=0.5)
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    labels = Y.argmax(1)
    values: list[list[float]] = []
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def probes(loss: torch.Tensor, out: torch.Tensor, grads: list, theta: list) -> None:
        with torch.no_grad():
            gn = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            dist = torch._foreach_norm(torch._foreach_sub(theta, theta0))
            acc = (out.argmax(1) == labels).sum()
            parts = [loss.double(), gn.double(), acc.double(), *(d.double() for d in dist)]
            values.append(torch.stack(parts).tolist())

    def worker() -> None:
        while (job := jobs.get()) is not None:
            probes(*job)

    thread = threading.Thread(target=worker, daemon=True) if mode == "async" else None
    if thread is not None:
        thread.start()
    ring = [[torch.empty_like(p) for p in params] for _ in range(4)]
    mse = torch.nn.functional.mse_loss
    t0 = time.perf_counter()
    for t in range(steps):
        opt.zero_grad()
        out = model(X)
        loss = mse(out, Y)
        loss.backward()
        grads = [p.grad for p in params]
        opt.step()
        if mode == "sync":
            probes(loss.detach(), out.detach(), grads, [p.detach() for p in params])
        elif mode == "async":
            theta = ring[t % len(ring)]
            torch._foreach_copy_(theta, [p.detach() for p in params])
            jobs.put((loss.detach(), out.detach(), grads, theta))
    if thread is not None:
        jobs.put(None)
        thread.join()
    return (time.perf_counter() - t0) / steps, len(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    modes = ["plain", "sync", "async"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes[r % 3 :] + modes[: r % 3]:
            per_step, n = run(m, args.steps)
            assert n == (0 if m == "plain" else args.steps)
            times[m].append(per_step)
    base = statistics.median(times["plain"])
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:6s} {med * 1e6:8.1f} µs/step  {med / base:.3f}× the plain loop")


if __name__ == "__main__":
    main()
