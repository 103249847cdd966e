"""Crash safety under ``kill -9``, many times over: nothing committed is lost or duplicated.

(a) A training loop tracked with :class:`gdscope.Tracker` into a store is killed at random
    points. After each kill the store opens, ``PRAGMA integrity_check`` is ``ok``, every step
    the child printed (it prints a step after ``tracker.step`` returns, when the step is
    committed) is in the store with all of its values, no step is stored twice, at most the
    one step being written when the kill came is there beyond the printed ones, the run is
    *incomplete*, and the runs killed before it are untouched. (``tests/test_store.py`` has the
    single-crash test of the store itself; this is the many-kill version through the Tracker.)
(b) A ``gdscope sweep --executor local`` driver is killed at random points and rerun: in the
    end every point is stored exactly once, the store is intact after every kill, and no
    process of a killed driver (workers, fork server, resource tracker) survives it.

The fast tests kill 3 tracked runs and 2 sweep drivers; the ``slow`` ones 50 tracked runs and
20 sweep drivers, and write their figures (kills, steps checked, orphans found) to
``crash_figures.json`` in their temporary folder, and print them (``pytest -m slow -s``).
Every killed process is forked from a zygote that imported torch and gdscope once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_adv_processes import (
    Zygote,
    alive,
    descendants,
    kill_tree,
    survivors,
    wait_for,
    write_driver,
)

from gdscope.store import Store


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    """Imports torch and gdscope once; each killed process is a fork of it."""
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _start_time(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[19])


# ---------------------------------------------------------------------------- (a) tracked runs
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import gdscope as gs
    from gdscope.probes import default_probes

    path, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    commit = {"commit_seconds": 0} if sys.argv[4] == "per-step" else {}
    torch.manual_seed(seed)
    X = torch.randn(16, 3, dtype=torch.float64)
    Y = torch.randn(16, 1, dtype=torch.float64)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    prob = gs.Problem(model, loss="mse", data=(X, Y))
    opt = gs.GD(model.parameters(), lr=0.05)
    tracker = gs.Tracker(
        prob, probes=default_probes(curvature_every=7), store=path, run_name=name, **commit
    )
    print("ready", flush=True)
    for t in range(1_000_000):
        opt.zero_grad()
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, Y)
        loss.backward()
        opt.step()
        tracker.step(t, opt, loss=loss, outputs=out, targets=Y)
        print(t, flush=True)  # step t is committed (per-step) or buffered (batched)
    """
)
#: Values every tracked step stores, whatever else is scheduled.
EVERY_STEP = {"loss", "grad_norm"}
#: The Tracker's default batch: a kill loses at most this many buffered steps.
COMMIT_STEPS = 100


def _integrity(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        return ";".join(row[0] for row in con.execute("PRAGMA integrity_check"))
    finally:
        con.close()


def _duplicates(path: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(
            "SELECT run_id, step, name, COUNT(*) FROM metrics GROUP BY run_id, step, name "
            "HAVING COUNT(*) > 1"
        ).fetchall()
    finally:
        con.close()


def _steps(store: Store, run_id: int) -> dict[int, set[str]]:
    """``{step: names of the values stored at it}`` of one run."""
    out: dict[int, set[str]] = {}
    for step, name, *_ in store.metrics(run_id):
        out.setdefault(int(step), set()).add(name)
    return out


def tracked_run_kills(
    kills: int, folder: Path, rng: random.Random, zygote: Zygote, commits: str = "per-step"
) -> dict:
    """Kill a tracked training loop ``kills`` times (one store); check the store after each.

    ``commits="per-step"`` (``commit_seconds=0``): every printed step is stored. ``"batched"``
    (the Tracker's default): a prefix of the printed steps, at most ``COMMIT_STEPS`` short.
    """
    path = folder / "runs.db"
    script = folder / "child.py"
    script.write_text(CHILD)
    figures = {"kills": 0, "committed_steps_checked": 0, "uncommitted_steps_found": 0}
    earlier: dict[str, int] = {}  # run name -> steps stored, for the runs killed before
    for k in range(kills):
        name = f"killed-{k}"
        output = folder / f"{name}.out"
        pid = zygote.start("script", [str(path), name, str(k), commits], output, script)
        try:
            ready = wait_for(lambda: "ready\n" in _text(output), 120)  # noqa: B023
            assert ready, _text(output)
            time.sleep(rng.uniform(0.0, 0.8))
        finally:
            os.kill(pid, signal.SIGKILL)  # not reaped before zygote.wait(): still ours
            code = zygote.wait()
        text = _text(output)
        assert code == -signal.SIGKILL, text
        # the steps printed after "ready", whole lines only (other lines are warnings)
        lines = text.split("ready\n", 1)[1].splitlines(keepends=True)
        printed = [int(x) for x in lines if x.endswith("\n") and x.strip().isdigit()]
        figures["kills"] += 1
        assert printed == list(range(len(printed)))  # the child itself ran in order

        assert _integrity(path) == "ok"
        assert _duplicates(path) == []
        with Store(path) as store:
            names = {r.name: r for r in store.runs()}
            if not printed and name not in names:
                continue  # killed before its first step was committed: nothing to keep
            info = names[name]
            assert info.status_label == "incomplete" and not info.complete
            assert info.finished_at is None
            steps = _steps(store, info.id)
            stored = sorted(steps)
            assert stored == list(range(len(stored)))  # a prefix: no holes, no partial step
            # per step: every printed step, and at most the one being committed at the kill;
            # batched: at most the last unflushed batch is lost
            lost = 0 if commits == "per-step" else COMMIT_STEPS
            ends = (printed[-3:], stored[-3:])
            assert len(printed) - lost <= len(stored) <= len(printed) + 1, ends
            for step, got in steps.items():
                assert got >= EVERY_STEP, (step, got)  # a step is all there or not at all
            figures["committed_steps_checked"] += min(len(printed), len(stored))
            figures["uncommitted_steps_found"] += max(0, len(stored) - len(printed))
            figures["buffered_steps_lost"] = figures.get("buffered_steps_lost", 0) + max(
                0, len(printed) - len(stored)
            )
            for old, count in earlier.items():
                assert len(_steps(store, names[old].id)) == count, old
            earlier[name] = len(stored)
    return figures


@pytest.mark.parametrize("commits", ["per-step", "batched"])
def test_killed_tracked_runs_keep_every_committed_step(tmp_path, zygote, commits):
    figures = tracked_run_kills(3, tmp_path, random.Random(0), zygote, commits)
    assert figures["kills"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("commits", ["per-step", "batched"])
def test_many_killed_tracked_runs(tmp_path, zygote, commits):
    figures = tracked_run_kills(50, tmp_path, random.Random(1), zygote, commits)
    _report(tmp_path, f"tracked_runs_{commits}", figures)
    assert figures["kills"] == 50


# ---------------------------------------------------------------------------- (b) sweep drivers
def _check_sweep_store(path: Path, points: int | None) -> int:
    """Integrity, no point twice; with ``points``, every point stored: the points stored."""
    assert _integrity(path) == "ok"
    with Store(path) as store:
        infos = store.experiments()
        hashes = [i.config_hash for i in infos]
        assert len(hashes) == len(set(hashes)), "a point was stored twice"
        runs = store.runs()
        assert len(runs) == len(infos)  # one run per point, stored with its point
        assert {int(i.config["x"]) for i in infos} == {int(r.config["x"]) for r in runs}
        if points is not None:
            assert sorted(int(i.config["x"]) for i in infos) == list(range(1, points + 1))
            assert {r.status for r in runs} == {"completed"}
        return len(infos)


def sweep_driver_kills(
    kills: int,
    folder: Path,
    rng: random.Random,
    zygote: Zygote,
    points: int = 10,
    sleep: float = 0.3,
) -> dict[str, Any]:
    """Kill a sweep driver ``kills`` times, rerunning it; check store and processes."""
    figures = {"kills": 0, "rounds_completed": 0, "processes_checked": 0, "orphans": 0}
    rnd = 0
    while figures["kills"] < kills:
        here = folder / f"round-{rnd}"
        here.mkdir()
        _, config, flags = write_driver(here, points, sleep)
        out = here / "out"
        argv = ["sweep", str(config), "--executor", "local", "--workers", "2", "--out", str(out)]
        stored = 0
        while figures["kills"] < kills:
            seen = len(list(flags.iterdir()))
            log = here / f"driver-{figures['kills']}.log"
            pid = zygote.start("driver", argv, log)
            procs: dict[int, tuple[int, str]] = {}
            code: int | None = None
            try:
                born = _start_time(pid)
                started = wait_for(
                    lambda: len(list(flags.iterdir())) > seen,  # noqa: B023
                    120,
                    lambda: not alive(pid, born),  # noqa: B023
                )
                if alive(pid, born):
                    assert started, "no point started"
                    time.sleep(rng.uniform(0.0, 2.0 * sleep))
                    procs = descendants(pid)
                    os.kill(pid, signal.SIGKILL)  # not reaped before zygote.wait(): still ours
                code = zygote.wait()
                if code != -signal.SIGKILL:  # the sweep finished before the kill
                    assert code == 0, log.read_text()
                    break
                left = survivors(procs)
            finally:
                if code is None:
                    os.kill(pid, signal.SIGKILL)
                    zygote.wait()
                kill_tree(procs)
            figures["kills"] += 1
            figures["processes_checked"] += len(procs)
            figures["orphans"] += len(left)
            assert left == [], left
            if (out / "runs.db").exists():
                now = _check_sweep_store(out / "runs.db", None)
                assert now >= stored  # nothing stored was lost
                stored = now
        # finish the round: a rerun without a kill stores the rest, each point once
        pid = zygote.start("driver", argv, here / "driver-last.log")
        code = zygote.wait()
        assert code == 0, (here / "driver-last.log").read_text()
        _check_sweep_store(out / "runs.db", points)
        figures["rounds_completed"] += 1
        rnd += 1
    return figures


def test_killed_sweep_drivers_store_each_point_once_and_leave_no_process(tmp_path, zygote):
    figures = sweep_driver_kills(2, tmp_path, random.Random(0), zygote, points=6)
    assert figures["kills"] == 2 and figures["orphans"] == 0


@pytest.mark.slow
def test_many_killed_sweep_drivers(tmp_path, zygote):
    figures = sweep_driver_kills(20, tmp_path, random.Random(1), zygote)
    _report(tmp_path, "sweep_drivers", figures)
    assert figures["kills"] == 20 and figures["orphans"] == 0


def _report(folder: Path, what: str, figures: dict[str, Any]) -> None:
    path = folder / "crash_figures.json"
    path.write_text(json.dumps({what: figures}, indent=2) + "\n")
    print(f"\n{what}: {json.dumps(figures)} (written to {path})")
