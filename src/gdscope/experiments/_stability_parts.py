"""Parts of the stability experiment that test claims where their assumptions hold.

* :func:`polish_minimum`: full-batch GD at a small step, then Gauss–Newton on the residual
  ``r(θ) = F(θ) − Y`` (MSE) with minimum-norm steps (LSMR on ``J`` matrix-free: ``Jv`` by
  :func:`torch.func.jvp`, ``Jᵀu`` by :func:`torch.func.vjp`) until the gradient norm sits at its
  round-off floor: the point where statements about minima are judged (docs/theory.md §8).
* :func:`perturbation_run`: GD or SGD from ``θ* + δ`` at a minimum ``θ*``; the measured growth rate
  of the residual ``‖r(θ_t)‖`` (``r ≈ J δ``: the perturbation's normal component, which is what
  the linear stability criteria of §3 decide) per step, single runs (Lyapunov) and the mean square
  over runs, with intervals.
* :func:`two_parameter_orbit`: the net ``v·tanh(w x)`` on two points, trained by GD above its
  threshold until it settles on a 2-cycle, which Newton's method then solves exactly
  (:func:`gdscope.theory.orbit_solver.solve_orbit`, §6).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, lsmr
from torch import Tensor, nn

from gdscope.problem import Problem

__all__ = [
    "TwoParamNet",
    "exact_orbit",
    "growth_rate",
    "perturbation_run",
    "polish_minimum",
    "residual_fn",
]


def residual_fn(prob: Problem):
    """``θ ↦ F(θ) − Y`` on flat parameters (all samples, sample-major), for tensor data."""
    data = prob.full_batch
    if data is None:
        raise ValueError("the minimum polish needs (X, Y) tensor data")
    X, Y = data
    y = Y.reshape(-1)

    def r(theta: Tensor) -> Tensor:
        return prob.forward(prob.unflatten(theta), X).reshape(-1) - y

    return r


def _grad_ratio(prob: Problem, theta: Tensor, h_max: float) -> tuple[float, float]:
    g = prob.gradient(prob.unflatten(theta)).detach()
    gn = float(torch.linalg.vector_norm(g))
    return gn, gn / max(h_max * float(torch.linalg.vector_norm(theta)), 1e-300)


def polish_minimum(
    prob: Problem,
    theta0: Tensor,
    *,
    gd_lr: float,
    gd_steps: int,
    max_newton: int = 30,
    lsmr_iter: int = 200,
    dense_limit: int = 2_000_000,
) -> dict[str, Any]:
    """GD at ``gd_lr`` for ``gd_steps`` steps from ``theta0``, then Gauss–Newton to the floor.

    Each Gauss–Newton step is the minimum-norm solution of ``J δ = −r`` (LSMR, at most
    ``lsmr_iter`` iterations of one ``jvp`` and one ``vjp``), halved until ``‖r‖`` decreases; the
    polish stops when no step decreases ``‖r‖`` any more (the round-off floor) or after
    ``max_newton`` steps. Returns the point (flat tensor), the loss and gradient-norm histories,
    the products counted and the seconds.
    """
    t0 = time.perf_counter()
    theta = theta0.detach().clone()
    for _ in range(gd_steps):
        theta = theta - gd_lr * prob.gradient(prob.unflatten(theta)).detach()
    res = residual_fn(prob)
    dtype, device = theta.dtype, theta.device
    products = 0

    def rnorm(t: Tensor) -> float:
        with torch.no_grad():
            return float(torch.linalg.vector_norm(res(t)))

    losses = [float(prob.loss(prob.unflatten(theta)))]
    grads = [float(torch.linalg.vector_norm(prob.gradient(prob.unflatten(theta))))]
    r_now = rnorm(theta)
    steps = 0
    stalled = False
    for _ in range(max_newton):
        point = theta.clone()
        r0 = res(point).detach()
        if r0.numel() * theta.numel() <= dense_limit:  # dense J (one jacrev), SVD least squares
            J = torch.func.jacrev(res)(point).detach().double().cpu()
            products += r0.numel()
            delta = torch.linalg.lstsq(J, -r0.double().cpu().unsqueeze(1), driver="gelsd")
            delta = delta.solution.squeeze(1).numpy()
        else:
            _, vjp_fn = torch.func.vjp(res, point)

            def jv(v: np.ndarray, point: Tensor = point) -> np.ndarray:
                nonlocal products
                products += 1
                vt = torch.as_tensor(v, dtype=dtype, device=device).reshape(-1)
                return torch.func.jvp(res, (point,), (vt,))[1].detach().double().cpu().numpy()

            def jtu(u: np.ndarray, vjp_fn: Any = vjp_fn) -> np.ndarray:
                nonlocal products
                products += 1
                ut = torch.as_tensor(u, dtype=dtype, device=device).reshape(-1)
                return vjp_fn(ut)[0].detach().double().cpu().numpy()

            op = LinearOperator(
                (r0.numel(), theta.numel()), matvec=jv, rmatvec=jtu, dtype=np.float64
            )
            b = -r0.double().cpu().numpy()
            delta = lsmr(op, b, atol=1e-15, btol=1e-15, maxiter=lsmr_iter)[0]
        d = torch.as_tensor(delta, dtype=dtype, device=device)
        step, accepted = 1.0, False
        while step > 1e-4:
            cand = theta + step * d
            rc = rnorm(cand)
            if math.isfinite(rc) and rc < r_now:
                theta, r_now, accepted = cand, rc, True
                break
            step /= 2
        if not accepted:
            stalled = True
            break
        steps += 1
        losses.append(float(prob.loss(prob.unflatten(theta))))
        grads.append(float(torch.linalg.vector_norm(prob.gradient(prob.unflatten(theta)))))
    return {
        "theta": theta,
        "gd_lr": gd_lr,
        "gd_steps": gd_steps,
        "newton_steps": steps,
        "floor_reached": stalled,
        "loss_history": losses,
        "gradient_history": grads,
        "products": products,
        "seconds": time.perf_counter() - t0,
    }


def growth_rate(logs: np.ndarray, start: int = 0) -> tuple[float, float]:
    """Least-squares slope of ``logs[start:]`` against the step, and its standard error."""
    y = np.asarray(logs[start:], dtype=np.float64)
    if y.size < 3:
        return math.nan, math.nan
    x = np.arange(y.size, dtype=np.float64)
    A = np.column_stack([x, np.ones_like(x)])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    s2 = float(resid @ resid) / (y.size - 2)
    se = math.sqrt(s2 / float(((x - x.mean()) ** 2).sum()))
    return float(coef[0]), se


def perturbation_run(
    prob: Problem,
    theta_star: Tensor,
    lr: float,
    *,
    batch_size: int | None,
    runs: int,
    steps: int,
    rel: float,
    bound: float,
    seed: int,
) -> dict[str, Any]:
    """GD (``batch_size=None``) or SGD with fresh batches from ``θ* + δ``; residual growth.

    ``δ`` is random with ``‖δ‖ = rel·‖θ*‖`` (one per run). Every run records ``‖r(θ_t)‖`` each
    step and stops early when it has grown or shrunk by the factor ``bound`` (the linear regime
    ends, or the round-off floor nears). Per run, the growth rate is
    ``log(‖r_end‖/‖r_0‖)/steps`` (single-run rate: the Lyapunov exponent's estimate for SGD,
    ``log max|1 − ηh|`` for GD); the mean-square rate is the slope of ``log mean_runs ‖r_t‖²``
    over the common horizon, halved, with a bootstrap interval over runs.
    """
    data = prob.full_batch
    assert data is not None
    X, Y = data
    n = X.shape[0]
    res = residual_fn(prob)
    gen = torch.Generator().manual_seed(seed)
    scale = rel * float(torch.linalg.vector_norm(theta_star))
    curves: list[np.ndarray] = []
    t0 = time.perf_counter()

    def batch_grad(theta: Tensor, idx: Tensor | None) -> Tensor:
        params = prob.unflatten(theta)
        if idx is None:
            return prob.gradient(params).detach()
        x, y = X[idx], Y[idx]
        g = torch.func.grad(lambda p: prob.batch_loss(p, x, y))(params)
        return prob.flatten(g).detach()

    for _ in range(runs):
        d = torch.randn(theta_star.shape, generator=gen, dtype=theta_star.dtype)
        theta = theta_star + scale * d.to(theta_star.device) / torch.linalg.vector_norm(d)
        with torch.no_grad():
            norms = [float(torch.linalg.vector_norm(res(theta)))]
        for _ in range(steps):
            idx = None if batch_size is None else torch.randperm(n, generator=gen)[:batch_size]
            theta = theta - lr * batch_grad(theta, idx)
            with torch.no_grad():
                norms.append(float(torch.linalg.vector_norm(res(theta))))
            ratio = norms[-1] / norms[0]
            if not math.isfinite(ratio) or ratio > bound or ratio < 1 / bound:
                break
        curves.append(np.log(np.asarray(norms)))
    horizon = min(c.size for c in curves) - 1
    single = np.array([(c[-1] - c[0]) / (c.size - 1) for c in curves])
    mean_t = np.mean(single)
    half = 1.96 * float(np.std(single, ddof=1)) / math.sqrt(runs) if runs >= 2 else 0.0
    out: dict[str, Any] = {
        "lr": lr,
        "batch_size": batch_size,
        "runs": runs,
        "steps_run": [int(c.size - 1) for c in curves],
        "rel": rel,
        "single_rate": float(mean_t),
        "single_ci": [float(mean_t - half), float(mean_t + half)],
        "single_rates": single.tolist(),
        "horizon": int(horizon),
        "log_norms": [c.tolist() for c in curves[: min(runs, 4)]],
    }
    if batch_size is not None and horizon >= 2:
        sq = np.stack([np.exp(2 * (c[: horizon + 1] - c[0])) for c in curves])
        ms = float(math.log(sq[:, -1].mean()) / (2 * horizon))
        rng = np.random.default_rng(seed)
        boot = [
            math.log(sq[rng.integers(0, runs, runs), -1].mean()) / (2 * horizon) for _ in range(400)
        ]
        out["mean_square_rate"] = ms
        out["mean_square_ci"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
        out["mean_square_curve"] = np.log(sq.mean(axis=0)).tolist()
    out["seconds"] = time.perf_counter() - t0
    return out


class TwoParamNet(nn.Module):
    """``f(x) = v·tanh(w x)``: the smallest network with exact GD 2-cycles (docs/theory.md §6)."""

    def __init__(self, w: float = 1.5, v: float = 0.5, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=dtype))
        self.v = nn.Parameter(torch.tensor([v], dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.v * torch.tanh(self.w * x)


#: The two points of :func:`exact_orbit`: ``v·tanh(w x)`` fits them exactly at one minimum.
ORBIT_X = ((1.0,), (-0.5,))
ORBIT_Y = ((1.0,), (-0.6,))


def exact_orbit(factor: float, steps: int, *, tol: float, dtype: torch.dtype) -> dict[str, Any]:
    """GD on ``v·tanh(w x)`` at ``η = factor·2/S*``, then Newton on ``G²(θ) = θ`` from its end.

    ``S*`` is the sharpness of the minimum (found by GD and Gauss–Newton from the same
    initialization): with ``factor > 1`` GD cannot converge to it. Returns the minimum, the
    trajectory's distance to the solved orbit at every step, its measured
    contraction rate per step (least-squares slope of ``log dist`` above the round-off floor)
    against the rate the Floquet multipliers predict (``log ρ / 2``, ``ρ`` the largest normal
    ``|μ|``), and the solution (residual history, multipliers, HVPs, seconds).
    """
    from gdscope.theory.orbit_solver import solve_orbit

    X = torch.tensor(ORBIT_X, dtype=dtype)
    Y = torch.tensor(ORBIT_Y, dtype=dtype)
    prob = Problem(TwoParamNet(dtype=dtype), "mse", (X, Y))
    theta0 = prob.flatten(prob.params).detach().clone()

    def hess_eigs(theta: Tensor) -> list[float]:
        H = torch.autograd.functional.hessian(lambda t: prob.loss(prob.unflatten(t)), theta)
        return torch.linalg.eigvalsh(H).tolist()

    mini = polish_minimum(prob, theta0, gd_lr=0.3, gd_steps=300)
    at_min = hess_eigs(mini["theta"])
    grad_min = float(torch.linalg.vector_norm(prob.gradient(prob.unflatten(mini["theta"]))))
    lr = factor * 2 / max(at_min)
    traj = [theta0]
    theta = theta0
    for _ in range(steps):
        theta = theta - lr * prob.gradient(prob.unflatten(theta)).detach()
        traj.append(theta)
        if not bool(torch.isfinite(theta).all()):
            break
    out: dict[str, Any] = {
        "factor": factor,
        "lr": lr,
        "threshold": 2 / lr,
        "minimum": mini["theta"].tolist(),
        "minimum_loss": mini["loss_history"][-1],
        "minimum_gradient": grad_min,
        "minimum_hessian": at_min,
        "minimum_sharpness": max(at_min),
        "steps": len(traj) - 1,
        "diverged": not bool(torch.isfinite(theta).all()),
    }
    if out["diverged"]:
        return out
    step1 = float(torch.linalg.vector_norm(traj[-1] - traj[-2]))
    step2 = float(torch.linalg.vector_norm(traj[-1] - traj[-3]))
    out["near_cycle"] = step2 / max(step1, 1e-300)  # ‖θ_T − θ_{T−2}‖ / ‖θ_T − θ_{T−1}‖
    sol = solve_orbit(prob, lr, 2, start=traj[-1], tol=tol)
    pts = torch.as_tensor(sol.points, dtype=dtype)
    dist = np.array([float(torch.cdist(t.reshape(1, -1), pts).min()) for t in traj])
    floor = 1e3 * torch.finfo(dtype).eps * max(float(torch.linalg.vector_norm(pts[0])), 1.0)
    above = np.nonzero(dist > floor)[0]
    last = int(above[-1]) if above.size else 0
    first = min(10, last)  # skip the first steps (the transient toward the orbit)
    rate, se = growth_rate(np.log(dist[first : last + 1])) if last - first >= 3 else (math.nan,) * 2
    rho = sol.spectral_radius
    out.update(
        {
            "converged": sol.converged,
            "orbit_kind": sol.kind,
            "residual": sol.residual,
            "history": list(sol.history),
            "iterations": sol.iterations,
            "points": sol.points.tolist(),
            "diameter": sol.diameter,
            "multipliers_re": sol.multipliers.real.tolist(),
            "multipliers_im": sol.multipliers.imag.tolist(),
            "tangent": sol.tangent,
            "spectral_radius": None if math.isnan(rho) else rho,
            "stable": sol.stable,
            "hvps": sol.hvps,
            "seconds": sol.seconds,
            "notes": list(sol.notes),
            "orbit_hessian": [hess_eigs(p) for p in pts],
            "distance": dist.tolist(),
            "distance_floor": floor,
            "distance_final": float(dist[-1]),
            "settled_at": None if last + 1 >= dist.size else last + 1,
            "rate": None if math.isnan(rate) else rate,
            "rate_se": None if math.isnan(se) else se,
            "rate_predicted": None if math.isnan(rho) or rho == 0 else math.log(rho) / 2,
        }
    )
    return out
