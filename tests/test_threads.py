"""The thread choice: injected CPU counts and loads (no timing), /proc/stat and cgroup parsing,
and its record in the run's environment."""

from __future__ import annotations

import math
import os

import pytest
import torch

from gdscope import threads
from gdscope.errors import InvalidArgumentError
from gdscope.store import Store, environment_info
from gdscope.threads import (
    ThreadChoice,
    apply_threads,
    busy_cpus,
    choose_threads,
    current_choice,
    reset_threads,
)


@pytest.mark.parametrize(
    ("allowed", "busy", "cap", "expected", "free"),
    [
        (2, 0.0, None, 2, 2),  # idle: every CPU
        (2, 0.2, None, 2, 2),  # background noise below the slack counts as free
        (2, 0.3, None, 1, 1),  # a third of a core busy: a partner thread would wait on it
        (2, 1.0, None, 1, 1),  # `while True: pass` on one core
        (2, 2.0, None, 1, 0),  # everything busy: still one thread
        (2, 5.0, None, 1, 0),  # a load above the CPU count
        (8, 3.0, None, 5, 5),
        (8, 0.0, 4, 4, 8),  # capped by the workload
        (2, 0.0, 1, 1, 2),  # the demo: small models, one thread
        (1, 0.0, None, 1, 1),
    ],
)
def test_choice_from_injected_counts(allowed, busy, cap, expected, free):
    choice = choose_threads(allowed=allowed, busy=busy, cap=cap)
    assert choice.threads == expected and choice.free == free
    assert choice.allowed == allowed and choice.source == "given"
    assert f"{allowed} CPU" in choice.reason and f"{free} free" in choice.reason
    assert choice.describe().startswith(f"threads: {expected} (")
    if cap is not None and cap < free:
        assert "capped" in choice.reason
    if free == 0:
        assert "at least one thread" in choice.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allowed": 0, "busy": 0.0},
        {"allowed": True, "busy": 0.0},
        {"allowed": 2, "busy": -1.0},
        {"allowed": 2, "busy": float("nan")},
        {"allowed": 2, "busy": "1"},
        {"allowed": 2, "busy": 0.0, "cap": 0},
    ],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(InvalidArgumentError):
        choose_threads(**kwargs)


def test_busy_from_proc_stat_sample(monkeypatch):
    # cpu0 fully busy over the sample, cpu1 idle; cpu2 is not ours
    samples = iter(
        [
            {"cpu0": (100, 1000), "cpu1": (500, 1000)},
            {"cpu0": (100, 1025), "cpu1": (525, 1025)},
        ]
    )
    monkeypatch.setattr(threads, "_cpu_times", lambda ids: next(samples))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    busy, source = busy_cpus([0, 1], 2, sample=0.0)
    assert busy == pytest.approx(1.0) and "/proc/stat" in source
    assert choose_threads(allowed=2, busy=busy).threads == 1


def _idle_sample(monkeypatch, load: float, own: float, cpus: int = 2) -> None:
    """Both CPUs idle over the sample; the load average and this process's share given."""
    samples = iter([{"cpu0": (0, 100), "cpu1": (0, 100)}, {"cpu0": (25, 125), "cpu1": (25, 125)}])
    monkeypatch.setattr(threads, "_cpu_times", lambda ids: next(samples))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads, "_own_load", lambda: own)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cpus)


def test_an_idle_moment_on_a_loaded_machine_is_not_taken_for_idle(monkeypatch):
    """Work that comes and goes: the quarter-second sample sees idle CPUs, the minute's load
    average says one is busy most of the time: one thread, not two."""
    _idle_sample(monkeypatch, load=1.3, own=0.05)
    busy, source = busy_cpus([0, 1], 2, sample=0.0)
    assert busy == pytest.approx(1.25) and source == "1-minute load average"
    assert choose_threads(allowed=2, busy=busy).threads == 1


def test_this_process_own_load_is_not_counted_as_someone_elses(monkeypatch):
    _idle_sample(monkeypatch, load=1.0, own=0.95)  # only we ran over the last minute
    busy, source = busy_cpus([0, 1], 2, sample=0.0)
    assert busy == pytest.approx(0.05) and source == "1-minute load average"
    assert choose_threads(allowed=2, busy=busy).threads == 2


def test_the_load_average_is_spread_over_the_whole_machine(monkeypatch):
    # 4 of 16 CPUs are ours; a load of 8 keeps half the machine, so 2 of ours, busy
    _idle_sample(monkeypatch, load=8.0, own=0.0, cpus=16)
    assert busy_cpus([0, 1], 4, sample=0.0) == (2.0, "1-minute load average")


def test_own_load_follows_the_kernel_average(monkeypatch, tmp_path):
    """rate·(1 − e^{−t/60}): a process that used 1 CPU for 60 s adds 1 − 1/e to the load."""
    stat = "123 (py thon) R " + " ".join(["0"] * 18) + " 1000 0 0\n"  # started at tick 1000
    files = {"/proc/self/stat": stat, "/proc/uptime": "70.0 5.0\n"}  # 10 s at 100 ticks/s
    monkeypatch.setattr(threads.Path, "read_text", lambda self: files[str(self)])
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(threads.os, "times", lambda: os.times_result((40.0, 20.0, 0, 0, 0)))
    assert threads._own_load() == pytest.approx(1.0 * (1 - math.exp(-1.0)))


def test_proc_stat_parsing(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  10 0 10 100 0 0 0 0 0 0\n"
        "cpu0 5 0 5 50 2 0 0 1 0 0\n"
        "cpu1 5 0 5 50 0 0 0 0 0 0\n"
        "cpu2 1 0 1 1 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
    )
    monkeypatch.setattr(threads, "_PROC_STAT", stat)
    times = threads._cpu_times([0, 1])
    assert times == {"cpu0": (52, 63), "cpu1": (50, 60)}  # idle + iowait, total with steal


def test_without_proc_stat_the_load_average_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_PROC_STAT", tmp_path / "missing")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.5, 1.0, 1.0))
    monkeypatch.setattr(threads, "_own_load", lambda: 0.0)
    busy, source = busy_cpus(None, 2, sample=0.0)
    assert busy == 2.0 and source == "1-minute load average"  # capped at the CPUs allowed


def test_cgroup_quota_limits_allowed(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "_CPU_MAX", cpu_max)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max.write_text("150000 100000\n")
    assert threads.allowed_cpus() == (2, [0, 1, 2, 3])
    cpu_max.write_text("max 100000\n")
    assert threads.allowed_cpus()[0] == 4


def test_machine_choice_is_sane():
    choice = choose_threads(sample=0.05)
    assert 1 <= choice.threads <= choice.allowed and choice.busy >= 0


def test_apply_records_choice_in_environment_and_reset_restores(tmp_path):
    before = torch.get_num_threads()
    choice = ThreadChoice(1, 2, 1.0, 1, None, "given", "2 CPUs allowed, 1.00 busy → 1 free")
    try:
        apply_threads(choice)
        assert torch.get_num_threads() == 1 and current_choice() is choice
        env = environment_info()
        assert env["threads"] == 1 and env["thread_choice"]["reason"] == choice.reason
        with Store(tmp_path / "r.db") as store:
            run = store.create_run("r")
            assert store.run(run).environment["thread_choice"]["threads"] == 1
    finally:
        reset_threads()
    assert torch.get_num_threads() == before and current_choice() is None
    assert environment_info()["thread_choice"] is None


def test_reset_restores_torch_threads_after_the_blas_limits():
    """torch's count set before apply_threads comes back after reset, also when the BLAS limit
    (threadpoolctl) shares torch's OpenMP pool: restoring it last used to leave torch at the
    BLAS pool's original count."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        apply_threads(ThreadChoice(2, 2, 0.0, 2, None, "given", "2 free"))
        assert torch.get_num_threads() == 2
        apply_threads(ThreadChoice(1, 2, 1.0, 1, None, "given", "1 free"))  # re-applied
        assert torch.get_num_threads() == 1
        apply_threads(ThreadChoice(2, 2, 0.0, 2, None, "given", "2 free"))
        reset_threads()
        assert torch.get_num_threads() == 1 and current_choice() is None
    finally:
        reset_threads()
        torch.set_num_threads(before)
