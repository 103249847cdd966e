"""Periodic-orbit detector against exact cases and independently computed references.

References never use the detector: fixed points and 2-cycles are closed forms; longer periods
come from iterating the map far longer than the detector sees and checking ``|x_{t+p} − x_t|``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.probes import LossProbe, ThresholdProbe
from gdscope.store import Store
from gdscope.theory.orbits import detect_orbit, gd_orbit, gd_trajectory, orbit_from_store


# ---------------------------------------------------------------------- maps and references
def quartic_gd(eta: float, steps: int, x0: float = 1.05) -> np.ndarray:
    """GD on ``L(x) = (x² − 1)²/4``: ``x ↦ x − η x (x² − 1)``."""
    xs = np.empty(steps)
    x = x0
    for t in range(steps):
        xs[t] = x
        x = x - eta * x * (x * x - 1)
    return xs


def logistic(r: float, steps: int, x0: float = 0.3) -> np.ndarray:
    xs = np.empty(steps)
    x = x0
    for t in range(steps):
        xs[t] = x
        x = r * x * (1 - x)
    return xs


def reference_period(xs: np.ndarray, max_p: int = 32, tol: float = 1e-10) -> int | None:
    """Smallest ``p`` with ``|x_{t+p} − x_t| < tol`` over the last 256 iterates."""
    tailx = xs[-256:]
    for p in range(1, max_p + 1):
        if np.max(np.abs(tailx[p:] - tailx[:-p])) < tol:
            return p
    return None


def quartic_two_cycle(eta: float) -> tuple[float, float, float]:
    """The asymmetric 2-cycle ``{a, b}`` of the quartic's GD map and its multiplier.

    ``G(a) = b, G(b) = a`` with ``a + b ≠ 0`` gives ``a² − ab + b² = 1`` and
    ``a² + ab + b² = 1 + 2/η``: ``ab = 1/η``, ``(a + b)² = 1 + 3/η``. The multiplier
    ``G'(a)G'(b) = 9 − 2(1 + η)²`` lies in ``(−1, 1)`` for ``1 < η < √5 − 1``.
    """
    s = math.sqrt(1 + 3 / eta)
    d = math.sqrt(s * s - 4 / eta)
    return (s + d) / 2, (s - d) / 2, 9 - 2 * (1 + eta) ** 2


# ---------------------------------------------------------------------- quadratic
def test_quadratic_above_threshold_has_no_orbit():
    h = 3.0
    eta = 1.01 * 2 / h  # |1 − ηh| = 1.02: grows
    xs = [1.0]
    for _ in range(400):
        xs.append((1 - eta * h) * xs[-1])
    rep = detect_orbit(np.array(xs), lr=eta)
    assert rep.period is None and rep.kind == "growing" and rep.amplitude is None
    assert rep.lr == eta
    # run long enough to overflow: diverged
    with np.errstate(over="ignore", invalid="ignore"):
        big = np.float64(1 - eta * h) ** np.arange(40_000)
    assert not np.isfinite(big).all()
    rep = detect_orbit(big)
    assert rep.period is None and rep.kind == "diverged" and "not finite" in rep.note


def test_quadratic_gd_on_problem_above_threshold():
    """The same through a Problem: L = h θ²/2 from MSE on one sample (x = √h, y = 0, sum)."""
    h = 4.0
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.3)
    X = torch.tensor([[math.sqrt(h / 2)]], dtype=torch.float64)  # sum-MSE: L = (x θ)² = hθ²/2
    prob = gs.Problem(model, "mse", (X, torch.zeros(1, 1, dtype=torch.float64)), reduction="sum")
    rep = gd_orbit(prob, 1.01 * 2 / h, 300)
    assert rep.period is None and rep.kind == "growing"


def _two_mode_problem(theta0=(0.7, -0.4)) -> gs.Problem:
    """``L = ½ θᵀ diag(4, 1) θ`` exactly: MSE (mean, n = 2, k = 1) with ``X = diag(2, 1)``."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([theta0], dtype=torch.float64))
    X = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    return gs.Problem(model, "mse", (X, torch.zeros(2, 1, dtype=torch.float64)))


def test_two_mode_quadratic_just_below_threshold_decays_then_is_fixed():
    """η = 0.99·2/h_max: the top mode flips sign with factor 0.98 and converges.

    Semantics: over a short run it is "decaying" (no period: the oscillation shrinks by more
    than rtol over the window); once the steps fall below ftol·S it is a fixed point."""
    prob = _two_mode_problem()
    eta = 0.99 * 2 / 4.0
    short = gd_orbit(prob, eta, 80)
    assert short.period is None and short.kind == "decaying"
    assert short.residuals[2] > 1e-3  # looks almost 2-periodic step to step ...
    traj = gd_trajectory(prob, eta, 1000)
    long = detect_orbit(traj, lr=eta)
    assert long.period == 1 and long.kind == "fixed_point" and long.amplitude == 0.0
    # onset: the first step from which every step is below ftol·S + round-off (|1 − ηh| = 0.98)
    steps = torch.linalg.vector_norm(traj[1:] - traj[:-1], dim=1)
    S = torch.linalg.vector_norm(traj, dim=1).max().item()
    ok = (steps <= 1e-6 * S + 8 * torch.finfo(torch.float64).eps * S).tolist()
    expected = max(i for i, v in enumerate(ok) if not v) + 1
    assert long.onset == expected and 600 < expected < 1000
    # the model itself was never touched
    assert torch.equal(prob.model.weight.detach(), torch.tensor([[0.7, -0.4]], dtype=torch.float64))


def test_two_mode_quadratic_at_threshold_is_exact_two_cycle_along_top_eigenvector():
    """η = 2/h_max exactly (h_max = 4, η = 0.5): the top mode flips θ₁ ↦ −θ₁ with no error."""
    prob = _two_mode_problem((0.7, -0.4))
    rep = gd_orbit(prob, 0.5, 200)
    assert rep.period == 2 and rep.kind == "cycle" and rep.is_cycle
    assert rep.amplitude == pytest.approx(0.7, rel=1e-8)  # along the top Hessian eigenvector
    assert rep.direction_used
    assert rep.residual < 1e-15 and rep.drift < 1e-15  # mode 2 decays to 0, mode 1 exact
    plain = gd_orbit(prob, 0.5, 200, direction=None)
    assert plain.amplitude == pytest.approx(0.7, rel=1e-12)  # half the diameter 2·0.7
    # along the *other* eigenvector there is no oscillation
    other = gd_orbit(prob, 0.5, 200, direction=torch.tensor([0.0, 1.0]))
    assert other.amplitude < 1e-12


# ---------------------------------------------------------------------- period doubling
@pytest.mark.parametrize(
    ("eta", "expected"), [(0.5, 1), (0.9, 1), (1.1, 2), (1.2, 2), (1.26, 4), (1.4, None)]
)
def test_quartic_gd_periods_match_long_reference(eta, expected):
    reference = reference_period(quartic_gd(eta, 50_000))
    assert reference == expected  # the reference itself (independent of the detector)
    rep = detect_orbit(quartic_gd(eta, 1500), lr=eta)
    assert rep.period == reference
    if expected is None:
        assert rep.kind == "none"
    elif expected == 1:
        assert rep.kind == "fixed_point"
    else:
        assert rep.kind == "cycle" and rep.residual < 1e-3 and rep.drift < 1e-3


@pytest.mark.parametrize("eta", [1.05, 1.1, 1.2])
def test_quartic_two_cycle_matches_closed_form(eta):
    a, b, mult = quartic_two_cycle(eta)
    assert -1 < mult < 1  # stable: GD converges onto it
    xs = quartic_gd(eta, 2000)
    rep = detect_orbit(xs, lr=eta)
    assert rep.period == 2
    assert sorted(xs[-2:]) == pytest.approx([b, a], rel=1e-10)
    assert rep.amplitude == pytest.approx((a - b) / 2, rel=1e-9)
    assert rep.amplitude == pytest.approx(math.sqrt(1 - 1 / eta) / 2, rel=1e-9)
    # the cycle holds from the onset on, and not one step earlier
    tol = 1e-3 * rep.mean_step + 8 * np.finfo(float).eps * np.abs(xs).max()
    mism = np.abs(xs[2:] - xs[:-2])
    assert np.all(mism[rep.onset :] <= tol)
    assert mism[rep.onset - 1] > tol


def test_quartic_period_four_window_is_beyond_two_cycle_stability():
    """Past η = √5 − 1 the 2-cycle's multiplier is below −1: the detector must not find 2."""
    eta = 1.26
    assert quartic_two_cycle(eta)[2] < -1
    rep = detect_orbit(quartic_gd(eta, 1500))
    assert rep.period == 4 and rep.residuals[2] > 0.1  # far above rtol = 1e-3


def test_logistic_period_eight_and_unlisted_period_three():
    xs = logistic(3.56, 5000)  # period 8 for 3.5441 < r < 3.5644
    assert reference_period(logistic(3.56, 60_000)) == 8
    assert detect_orbit(xs).period == 8
    # the period-3 window (r = 1 + √8 ≈ 3.8284 .. 3.8415): 3 is not a power of two
    xs3 = logistic(3.835, 5000)
    assert reference_period(logistic(3.835, 60_000)) == 3
    assert detect_orbit(xs3).period is None
    assert detect_orbit(xs3, periods=range(1, 17)).period == 3
    assert detect_orbit(xs3, periods=(6, 12)).period == 6  # smallest *listed* period


# ---------------------------------------------------------------------- semantics
def test_onset_of_a_switched_series_and_step_labels():
    series = np.concatenate([np.ones(50), np.tile([1.1, 0.9], 100)])
    rep = detect_orbit(series, start=100)
    assert rep.period == 2 and rep.onset == 150
    assert rep.window == (100 + 250 - 128, 100 + 249)
    assert rep.amplitude == pytest.approx(0.1)
    assert rep.source == "series"


def test_parameter_dicts_and_constant_history():
    hist = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)} for _ in range(10)]
    rep = detect_orbit(hist)
    assert rep.period == 1 and rep.onset == 0 and rep.residual == 0.0 and rep.source == "params"
    flip = [{"w": torch.tensor([1.0, (-1.0) ** t]), "b": torch.tensor(0.0)} for t in range(40)]
    rep = detect_orbit(flip, direction={"w": torch.tensor([0.0, 2.0]), "b": torch.tensor(0.0)})
    assert rep.period == 2 and rep.amplitude == pytest.approx(1.0)


def test_slow_decay_below_rtol_is_a_cycle_and_tighter_rtol_rejects_it():
    """A 2-periodic oscillation decaying by 1e-6 per step: within rtol=1e-3 over 128 steps."""
    t = np.arange(400)
    xs = (-1.0) ** t * (1 - 1e-6) ** t
    assert detect_orbit(xs).period == 2
    rep = detect_orbit(xs, rtol=1e-6)
    assert rep.period is None and rep.kind == "decaying"
    # decaying by 1e-4 per step: each period matches within rtol (residual ≈ 1e-4), but over
    # the 128-step window the amplitude falls by ~1.3%: the accumulated drift rejects it
    xs = (-1.0) ** t * (1 - 1e-4) ** t
    rep = detect_orbit(xs)
    assert rep.residuals[2] < 1e-3
    assert rep.period is None and rep.kind == "decaying"


def test_bad_inputs():
    with pytest.raises(InvalidArgumentError):
        detect_orbit(np.ones(1))
    with pytest.raises(InvalidArgumentError):
        detect_orbit(np.ones(10), steps=[0, 2, 4, 6, 8, 10, 12, 14, 16, 18])
    with pytest.raises(ShapeMismatchError):
        detect_orbit(np.ones((10, 3)), direction=np.ones(2))
    with pytest.raises(InvalidArgumentError):
        detect_orbit(np.ones(10), periods=(0, 2))
    with pytest.raises(InvalidArgumentError):
        detect_orbit(np.ones(10), rtol=-1.0)


# ---------------------------------------------------------------------- stored runs
class _Quartic(nn.Module):
    def __init__(self, x0: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([x0], dtype=torch.float64))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.x * inp


def test_orbit_from_store_on_a_real_run(tmp_path):
    """GD through gs.fit on L = (x² − 1)²/4; the stored loss is 2-periodic at η = 1.1."""
    eta = 1.1
    model = _Quartic(1.05)
    prob = gs.Problem(
        model,
        lambda o, t: ((o**2 - 1) ** 2 / 4).mean(),
        (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)),
    )
    store = Store(tmp_path / "runs.db")
    with gs.Tracker(prob, [LossProbe(), ThresholdProbe()], store=store) as tracker:
        gs.fit(prob, gs.GD(model.parameters(), lr=eta), 300, tracker=tracker)
    rep = orbit_from_store(store, tracker.run_id)
    a, b, _ = quartic_two_cycle(eta)
    assert rep.period == 2 and rep.lr == eta
    la, lb = (a * a - 1) ** 2 / 4, (b * b - 1) ** 2 / 4
    assert rep.amplitude == pytest.approx(abs(la - lb) / 2, rel=1e-8)
    assert rep.window[1] == 299 and rep.onset is not None and 0 < rep.onset < 200
    store.close()
