"""How many threads torch should use here: the CPUs this process may run on, less those that
other processes keep busy.

PyTorch's intra-op pool (and OpenBLAS under numpy) splits each operation between its threads
and waits at the end of it for all of them. When another process holds one of the cores, a
partner thread is descheduled for whole time slices and every small operation waits for it: 500
full-batch GD steps on the demo's MLP (64-128-128-10, 256 samples) took 6.6 s with 2 threads on
a 2-core machine busy with other work and 0.7 s with 1 thread; the demo (bench/bench_demo.py,
``--quick``) 65 s against 23 s with one core kept busy. So:

* ``allowed``: the CPUs this process may run on (``os.sched_getaffinity``), further limited by a
  cgroup CPU quota (``/sys/fs/cgroup/cpu.max``) where one is set;
* ``busy``: how many of them other processes keep busy: the larger of the busy time of those
  CPUs in ``/proc/stat`` over a short sample (0.25 s; this process sleeps meanwhile) and the
  1-minute load average less this process's own share of it, scaled to the CPUs allowed. A
  machine that other work loads on and off can look idle for a quarter of a second, not for a
  minute: taking two threads at such a moment once made an ``edge`` run on a 2-core machine
  take 883 s;
* ``free = allowed − ⌈busy − 0.25⌉`` (a CPU busy less than a quarter of the time counts as free;
  anything more counts as taken, because a descheduled partner costs far more than a thread
  less);
* ``threads = max(1, min(free, cap))``, where ``cap`` is the most threads the workload gains
  from (the demo's models are small: ``cap=1``; ``None`` for no cap).

:func:`choose_threads` takes ``allowed`` and ``busy`` as arguments (tests inject them) and reads
the machine only for those not given; :func:`apply_threads` sets ``torch.set_num_threads`` and
remembers the choice, which :func:`gdscope.store.environment_info` records with every run created
while it is in force.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gdscope.errors import InvalidArgumentError

__all__ = [
    "BUSY_SLACK",
    "ThreadChoice",
    "allowed_cpus",
    "apply_threads",
    "busy_cpus",
    "choose_threads",
    "current_choice",
    "reset_threads",
]

#: A CPU busy at most this fraction of the time still counts as free.
BUSY_SLACK = 0.25
#: Seconds over which /proc/stat idle times are sampled.
SAMPLE_SECONDS = 0.25

_PROC_STAT = Path("/proc/stat")
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why: ``allowed`` CPUs, ``busy`` of them taken by other processes
    (estimated from ``source``), ``free`` left, the workload's ``cap``, and the result."""

    threads: int
    allowed: int
    busy: float
    free: int
    cap: int | None
    source: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The choice as plain data (JSON-ready)."""
        return asdict(self)

    def describe(self) -> str:
        """One line: ``threads: 1 (2 CPUs allowed, 1.00 busy (…) → 1 free; …)``."""
        return f"threads: {self.threads} ({self.reason})"


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}={value!r} must be an integer >= 1.")
    return value


def allowed_cpus() -> tuple[int, list[int] | None]:
    """The number of CPUs this process may use, and their ids where the affinity mask says.

    The affinity mask (``os.sched_getaffinity``, else ``os.cpu_count()``), limited by a cgroup v2
    CPU quota (``cpu.max``: ``quota period`` → ``⌈quota/period⌉`` CPUs) where one is set.
    """
    ids: list[int] | None
    try:
        ids = sorted(os.sched_getaffinity(0))
        count = len(ids)
    except (AttributeError, OSError):
        ids, count = None, os.cpu_count() or 1
    try:
        quota, period = _CPU_MAX.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count), ids


def _cpu_times(ids: list[int] | None) -> dict[str, tuple[int, int]] | None:
    """``{cpu: (idle, total)}`` jiffies from /proc/stat for ``ids`` (all CPUs when None)."""
    try:
        lines = _PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    wanted = None if ids is None else {f"cpu{i}" for i in ids}
    out = {}
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        if wanted is not None and fields[0] not in wanted:
            continue
        try:
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        except ValueError:
            continue
        if len(ticks) < 5:
            continue
        out[fields[0]] = (ticks[3] + ticks[4], sum(ticks))
    return out or None


def _own_load() -> float:
    """This process's share of the 1-minute load average: its mean CPUs since it started,
    weighted as the kernel's exponential average weights them, ``rate·(1 − e^{−elapsed/60})``.
    0 where /proc does not say when it started."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, clock ticks
        elapsed = float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return 0.0
    if elapsed <= 0:
        return 0.0
    t = os.times()
    return (t.user + t.system) / elapsed * (1.0 - math.exp(-elapsed / 60.0))


def _load_busy(allowed: int | None) -> float | None:
    """CPUs of ours that the 1-minute load average says others keep busy: ``(load − own)``
    spread evenly over the machine's CPUs, times the CPUs allowed; ``None`` without it."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    total = os.cpu_count() or 1
    others = max(0.0, load - _own_load())
    if allowed is None:
        return others
    return min(float(allowed), others * min(allowed, total) / total)


def busy_cpus(
    ids: list[int] | None = None, allowed: int | None = None, sample: float = SAMPLE_SECONDS
) -> tuple[float, str]:
    """How many CPUs other processes keep busy, and how that was measured.

    The larger of: ``1 − idle/elapsed`` summed over the CPUs ``ids`` in ``/proc/stat`` across
    ``sample`` seconds (this process sleeps meanwhile, so what is busy is someone else; steal
    time counts as busy), and the 1-minute load average less this process's share, scaled to
    the ``allowed`` CPUs (:func:`_load_busy`). Either alone where the other is missing; else 0.
    """
    sampled = None
    first = _cpu_times(ids)
    if first is not None:
        time.sleep(sample)
        second = _cpu_times(ids)
        if second is not None:
            sampled = 0.0
            for cpu, (idle1, total1) in second.items():
                if cpu not in first:
                    continue
                idle0, total0 = first[cpu]
                elapsed = total1 - total0
                if elapsed > 0:
                    sampled += min(1.0, max(0.0, 1.0 - (idle1 - idle0) / elapsed))
    loaded = _load_busy(allowed)
    if sampled is not None and (loaded is None or sampled >= loaded):
        return sampled, f"/proc/stat over {sample:g} s"
    if loaded is not None:
        return loaded, "1-minute load average"
    return 0.0, "no load information"


def choose_threads(
    *,
    allowed: int | None = None,
    busy: float | None = None,
    cap: int | None = None,
    sample: float = SAMPLE_SECONDS,
) -> ThreadChoice:
    """Choose torch's intra-op thread count from the CPUs actually free (module docstring).

    ``allowed`` (CPUs this process may use) and ``busy`` (CPUs other processes keep busy) are
    read from the machine unless given; ``cap`` is the most threads the workload gains from.

    >>> choose_threads(allowed=2, busy=1.0).threads
    1
    >>> choose_threads(allowed=8, busy=0.1, cap=4).threads
    4
    """
    if cap is not None:
        cap = _count(cap, "cap")
    ids = None
    if allowed is None:
        allowed, ids = allowed_cpus()
    else:
        allowed = _count(allowed, "allowed")
    if busy is None:
        busy, source = busy_cpus(ids, allowed, sample)
    else:
        if isinstance(busy, bool) or not isinstance(busy, (int, float)) or not busy >= 0:
            raise InvalidArgumentError(f"busy={busy!r} must be a number >= 0 (CPUs kept busy).")
        busy, source = float(busy), "given"
    taken = min(allowed, max(0, math.ceil(busy - BUSY_SLACK)))
    free = allowed - taken
    threads = max(1, free if cap is None else min(free, cap))
    why = f"{allowed} CPU{'s' * (allowed != 1)} allowed, {busy:.2f} busy ({source}) → {free} free"
    if free < 1:
        why += "; at least one thread"
    elif cap is not None and cap < free:
        why += f"; capped at {cap} (the workload gains nothing from more)"
    return ThreadChoice(threads, allowed, round(busy, 3), free, cap, source, why)


_current: ThreadChoice | None = None
_previous: int | None = None
_blas_limiter: Any = None


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    """Use ``choice.threads`` threads: ``torch.set_num_threads`` and the BLAS pools of numpy and
    scipy (OpenBLAS spins at its barriers like torch's pool: a 2560² ``eigh`` took 4.8 s on one
    thread and 13.9 s on two with the other core busy), through ``threadpoolctl`` (installed with
    scikit-learn) where present. The choice is recorded with runs created from now on
    (:func:`gdscope.store.environment_info`) until :func:`reset_threads` restores the previous
    counts."""
    import torch

    global _current, _previous, _blas_limiter
    if _current is None:
        _previous = torch.get_num_threads()
    if _blas_limiter is not None:
        _blas_limiter.restore_original_limits()
        _blas_limiter = None
    try:
        import numpy.linalg  # noqa: F401  (load the BLAS libraries so the limit reaches them)
        import scipy.linalg  # noqa: F401
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        _blas_limiter = threadpool_limits(limits=choice.threads, user_api="blas")
    # torch last: an OpenMP-backed BLAS shares torch's OpenMP pool, so a BLAS limit set or
    # restored after torch.set_num_threads would change torch's count too
    torch.set_num_threads(choice.threads)
    _current = choice
    return choice


def reset_threads() -> None:
    """Restore the thread counts from before :func:`apply_threads` and forget the choice."""
    import torch

    global _current, _previous, _blas_limiter
    if _blas_limiter is not None:
        _blas_limiter.restore_original_limits()
    if _current is not None and _previous is not None:
        torch.set_num_threads(_previous)  # after the BLAS limits (see apply_threads)
    _current = _previous = _blas_limiter = None


def current_choice() -> ThreadChoice | None:
    """The choice applied by :func:`apply_threads` (None if none is in force)."""
    return _current
