"""Executors: where the tasks of an experiment, or the points of a sweep, run.

An executor runs ``fn(*args)`` for each ``args`` and yields ``(index, output)`` as each
finishes (the :class:`~gdscope.experiments.Executor` protocol). Only the driver, the process
that iterates over ``map``, ever writes the user's store; workers return plain data.

- :class:`~gdscope.experiments.SerialExecutor`: this process, in order.
- :class:`LocalExecutor`: a pool of fresh processes on this machine (forked from a clean
  ``forkserver`` that imported torch once; ``spawn`` where there is no fork server).
- :class:`RayExecutor`: Ray core tasks, on a local Ray started for the purpose or on a cluster.

Workers import the modules that registered experiments in the driver before running anything,
so an experiment defined outside gdscope (a user's module, a test) is found by name. An
experiment defined in a script's ``__main__`` reaches :class:`LocalExecutor` workers (which
re-import the script) but not Ray workers: put it in a module.

A task whose worker dies (killed, out of memory, a segfault) is run again, up to ``retries``
more times; only the task that was running on the dead worker is charged a try. An exception
raised by the task itself is not retried: it propagates to the driver. Workers die with their
driver: a driver killed with ``kill -9`` leaves no process of its pool behind.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import sysconfig
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from multiprocessing.process import BaseProcess
from typing import Any

from gdscope.errors import GdscopeError, InvalidArgumentError
from gdscope.experiments import Executor, SerialExecutor, experiment_names, get_experiment

__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "get_executor"]

log = logging.getLogger(__name__)

#: Names :func:`get_executor` accepts.
EXECUTORS = ("serial", "local", "ray")
_RAY_INSTALL = "pip install 'gdscope[ray]'"
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Imported by a worker before its first task. torch imports ``torch._dynamo`` lazily, at the
#: first optimizer built (about 1.5 s of a task's time otherwise).
_WARM_MODULES = ("torch", "torch._dynamo", "gdscope.runner")


def get_executor(name: str, address: str | None = None, workers: int | None = None) -> Executor:
    """The executor called ``name`` (``serial``, ``local`` or ``ray``), as the CLI builds it."""
    if name == "serial":
        if address is not None:
            raise InvalidArgumentError(
                f"address={address!r} applies only to executor='ray'; add --executor ray."
            )
        return SerialExecutor()
    if name == "local":
        if address is not None:
            raise InvalidArgumentError(
                f"address={address!r} applies only to executor='ray'; add --executor ray."
            )
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, workers)
    raise InvalidArgumentError(f"executor={name!r} is unknown: use one of {', '.join(EXECUTORS)}.")


def _experiment_modules() -> list[str]:
    """Modules that registered an experiment in this process (``__main__`` excepted)."""
    modules = {type(get_experiment(name)).__module__ for name in experiment_names()}
    return sorted(modules - {"__main__", "__mp_main__"})


def _prepare_worker(threads: int, modules: Sequence[str]) -> None:
    """Set torch's intra-op threads and import the experiment modules (in a worker)."""
    import torch

    torch.set_num_threads(threads)
    for module in modules:
        importlib.import_module(module)


def _context(modules: Sequence[str]) -> multiprocessing.context.BaseContext:
    """``forkserver`` (``spawn`` where there is none) with torch and gdscope preloaded.

    The server starts once per process and imports torch, gdscope and the experiment modules
    it can; every worker is then a cheap fork of that clean process, never of the driver.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*_WARM_MODULES, *modules])  # used once: when it starts
    return ctx


def _check_count(name: str, value: int | None, minimum: int, optional: bool = True) -> None:
    """Refuse a count that is not an int (``None`` allowed when ``optional``) or too small."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer or None" if optional else "an integer"
        raise InvalidArgumentError(
            f"{name}={value!r} ({type(value).__name__}) must be {kind}: pass "
            f"{name}={minimum} or more."
        )
    if value < minimum:
        raise InvalidArgumentError(
            f"{name}={value!r} must be at least {minimum}: pass {name}={minimum} or more."
        )


def _lost(
    index: int, args: tuple[Any, ...], tries: int, exitcode: int | None = None
) -> GdscopeError:
    what = repr(args)
    what = what if len(what) <= 200 else what[:197] + "..."
    how = "" if exitcode is None else f" (last exit code {exitcode})"
    return GdscopeError(
        f"item {index} {what} lost its worker process {tries} times{how} (killed, out of "
        "memory, crashed or failed to start); nothing of it was kept. Check the memory it "
        "needs and the worker's log, or raise retries."
    )


# ---------------------------------------------------------------------------- worker side
#: ``prctl`` option: the signal this process gets when its parent dies (``linux/prctl.h``).
_PR_SET_PDEATHSIG = 1
#: Exit code of a worker that ended itself because its driver died.
_ORPHANED = 70
#: Kinds of message a worker sends the driver.
_READY, _DONE, _RAISED, _FAILED = "ready", "done", "raised", "failed"


def _set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent (thread) dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_driver(driver_pid: int, sentinel: int | None, poll: float = 1.0) -> None:
    """Block until the driver is gone, then end this worker at once (a daemon thread's body).

    ``sentinel`` (``multiprocessing.parent_process().sentinel``) is a pipe whose write end
    only the driver holds: it becomes readable (EOF) the moment the driver dies, however it
    dies. The PID is polled as well, in case there is no sentinel.
    """
    while True:
        if sentinel is not None:
            if wait_for([sentinel], timeout=poll):
                break
        else:
            time.sleep(poll)
        if os.getppid() == 1 or not _pid_alive(driver_pid):
            break
    os._exit(_ORPHANED)


def _die_with_driver(driver_pid: int) -> None:
    """Make this worker die within moments of its driver, even a driver killed by SIGKILL.

    A worker's parent is the fork server, not the driver, so the kernel's parent-death
    signal only covers the fork server's death; a daemon thread watches the driver itself.
    Once every worker is gone the fork server and the resource tracker see their last client
    vanish (EOF on their pipes) and exit by themselves.
    """
    if os.getppid() != driver_pid:  # forked by the fork server: die with it too
        _set_pdeathsig()
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None) if parent is not None else None
    threading.Thread(
        target=_watch_driver, args=(driver_pid, sentinel), name="gdscope-watch-driver", daemon=True
    ).start()


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (set as its ``__cause__``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _send_error(conn: Connection, index: int, exc: BaseException) -> None:
    trace = "".join(traceback.format_exception(exc))
    if not isinstance(exc, Exception):  # SystemExit and the like: never re-raised in the driver
        exc = GdscopeError(f"item {index}: the task raised {exc!r}")
    try:
        conn.send((_RAISED, index, exc, trace))
    except Exception as e:  # the exception itself cannot be pickled
        conn.send((_RAISED, index, GdscopeError(f"item {index}: {exc!r} ({e})"), trace))


def _worker_main(
    conn: Connection,
    fn: Callable[..., Any],
    threads: int,
    modules: Sequence[str],
    driver_pid: int,
) -> None:
    """A worker: die with the driver, warm up, then run ``(index, args)`` until told to stop."""
    _die_with_driver(driver_pid)
    try:
        _prepare_worker(threads, modules)
    except BaseException as e:
        conn.send((_FAILED, None, f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    conn.send((_READY, None, None, None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, args = message
        try:
            output = fn(*args)
        except BaseException as e:
            _send_error(conn, index, e)
            continue
        try:
            conn.send((_DONE, index, output, None))
        except Exception as e:  # the output cannot be pickled
            _send_error(conn, index, e)


# ---------------------------------------------------------------------------- driver side


@dataclass
class _Slot:
    """One worker process as the driver sees it."""

    process: BaseProcess
    conn: Connection
    ready: bool = False
    item: int | None = None


class LocalExecutor:
    """A pool of ``workers`` fresh processes, each with ``threads_per_worker`` torch threads.

    Results are yielded as they complete. Each worker runs one item at a time; when a worker
    dies (killed, out of memory, a segfault) only the item it was running is charged a try
    and run again, at most ``retries`` more times, on a new worker; the other workers carry
    on. A worker that dies before its first item charges nothing (but workers that keep dying
    on start-up stop the run). Every worker ends within moments of its driver, even one killed
    by ``kill -9``; the fork server and multiprocessing's resource tracker then exit too.

    Args:
        workers: processes (default: the number of CPUs).
        retries: how often an item lost with its worker is run again.
        threads_per_worker: ``torch.set_num_threads`` in each worker; 1 keeps ``workers``
            processes from oversubscribing the cores.
    """

    def __init__(
        self, workers: int | None = None, retries: int = 2, threads_per_worker: int = 1
    ) -> None:
        _check_count("workers", workers, 1)
        _check_count("retries", retries, 0, optional=False)
        _check_count("threads_per_worker", threads_per_worker, 1, optional=False)
        self.workers = workers or os.cpu_count() or 1
        self.retries = retries
        self.threads_per_worker = threads_per_worker

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]
    ) -> Iterator[tuple[int, Any]]:
        """Run ``fn(*args)`` for each item in the pool; yield ``(index, output)`` as each ends."""
        if not items:
            return
        modules = _experiment_modules()
        ctx = _context(modules)
        tries = [0] * len(items)
        queue: deque[int] = deque(range(len(items)))
        slots: list[_Slot] = []
        start_failures = 0  # workers in a row that died before their first item
        lost: list[tuple[int, int | None]] = []  # items given up: (index, last exit code)
        finished = False
        try:
            while queue or any(s.item is not None for s in slots):
                busy = sum(s.item is not None for s in slots)
                while len(slots) < min(self.workers, busy + len(queue)):
                    slots.append(self._start(ctx, fn, modules))
                for slot in slots:
                    if slot.ready and slot.item is None and queue:
                        i = queue.popleft()
                        try:
                            slot.conn.send((i, items[i]))
                        except OSError:  # the worker just died: its sentinel says so below
                            queue.appendleft(i)
                            continue
                        slot.item = i
                handles: list[Any] = [s.conn for s in slots] + [s.process.sentinel for s in slots]
                ready = set(wait_for(handles))
                for slot in list(slots):
                    dead = slot.process.sentinel in ready
                    if slot.conn in ready:
                        try:
                            while slot.conn.poll():
                                kind, index, payload = self._receive(slot, items)
                                if kind == _READY:
                                    start_failures = 0
                                elif kind == _DONE:
                                    yield index, payload
                        except (EOFError, OSError):
                            dead = True
                    if dead:
                        slots.remove(slot)
                        code = _reap(slot)
                        if slot.item is not None:
                            i = slot.item
                            tries[i] += 1
                            if tries[i] > self.retries:
                                lost.append((i, code))  # reported once the others are done
                                continue
                            log.warning(
                                "the worker running item %d died (exit code %s); running it "
                                "again (try %d of %d)",
                                i,
                                code,
                                tries[i] + 1,
                                self.retries + 1,
                            )
                            queue.appendleft(i)
                        elif not slot.ready:
                            start_failures += 1
                            if start_failures > self.workers * (self.retries + 1):
                                raise GdscopeError(
                                    f"{start_failures} worker processes in a row died before "
                                    f"running anything (last exit code {code}): check the "
                                    "memory available and that the experiment modules import "
                                    "cleanly, or use executor='serial' to see the error."
                                )
            finished = True
        finally:
            _stop(slots, gently=finished)
        if lost:
            i, code = lost[0]
            error = _lost(i, items[i], tries[i], code)
            if len(lost) > 1:
                others = ", ".join(str(j) for j, _ in lost[1:])
                error = GdscopeError(f"{error} Items {others} were lost the same way.")
            raise error

    def _start(self, ctx: Any, fn: Callable[..., Any], modules: Sequence[str]) -> _Slot:
        mine, theirs = ctx.Pipe()
        process = ctx.Process(
            target=_worker_main,
            args=(theirs, fn, self.threads_per_worker, list(modules), os.getpid()),
            name="gdscope-worker",
        )
        process.start()
        theirs.close()  # only the worker holds its end: EOF here when it dies
        return _Slot(process, mine)

    def _receive(self, slot: _Slot, items: Sequence[tuple[Any, ...]]) -> tuple[str, int, Any]:
        """Read one message from a worker: ``(kind, index, output)``; raise a task's error."""
        try:
            kind, index, payload, trace = slot.conn.recv()
        except (EOFError, OSError):
            raise
        except Exception as e:  # a result or an exception that cannot be unpickled here
            what = f"item {slot.item} {items[slot.item]!r}" if slot.item is not None else "a worker"
            raise GdscopeError(
                f"{what}: its result could not be read back in the driver "
                f"({type(e).__name__}: {e}); return plain, picklable data."
            ) from e
        if kind == _READY:
            slot.ready = True
        elif kind == _FAILED:
            raise GdscopeError(
                f"a worker process could not start: {payload}. Check that the experiment "
                f"modules import cleanly (worker traceback below).\n{trace}"
            )
        else:
            slot.item = None
            if kind == _RAISED:
                raise payload from _RemoteTraceback(f"\n'''\n{trace}'''")
        return kind, index, payload

    def __repr__(self) -> str:
        return (
            f"LocalExecutor(workers={self.workers}, retries={self.retries}, "
            f"threads_per_worker={self.threads_per_worker})"
        )


def _reap(slot: _Slot, timeout: float = 5.0) -> int | None:
    """Join a dead worker (its exit code) and release its pipe."""
    slot.process.join(timeout)
    if slot.process.exitcode is None:
        slot.process.kill()
        slot.process.join(timeout)
    slot.conn.close()
    code = slot.process.exitcode
    if code is not None:
        slot.process.close()
    return code


def _stop(slots: Sequence[_Slot], gently: bool, timeout: float = 5.0) -> None:
    """End every worker: ask idle ones to exit (``gently``), kill the rest; join all."""
    for slot in slots:
        if gently and slot.item is None:
            with suppress(OSError):
                slot.conn.send(None)
        else:
            slot.process.kill()
    deadline = time.monotonic() + timeout
    for slot in slots:
        slot.process.join(max(0.0, deadline - time.monotonic()))
        if slot.process.exitcode is None:
            slot.process.kill()
            slot.process.join(timeout)
        slot.conn.close()
        if slot.process.exitcode is not None:
            slot.process.close()


def _ray_call(modules: Sequence[str], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """The body of a Ray task: one thread, the experiment modules, then ``fn(*args)``."""
    _prepare_worker(1, modules)
    return fn(*args)


# A process that outlives the driver and kills what the driver's private Ray started: Ray's own
# agents (DashboardAgent, RuntimeEnvAgent) are grandchildren of the driver that survive its
# ``kill -9``. It records the driver's descendants while the driver lives (pid and start time,
# so a reused pid is never touched) and SIGKILLs the survivors once its stdin (a pipe only the
# driver holds) reaches end of file: the driver died, or closed the executor.
_RAY_WATCHDOG = r"""
import os, select, signal, sys, time
driver, me = int(sys.argv[1]), os.getpid()

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[1]), int(rest[19])  # ppid, start time
    except (OSError, IndexError, ValueError):
        return None

def below(root):
    kids = {}
    for e in os.listdir("/proc"):
        if e.isdigit() and (st := stat(int(e))) is not None:
            kids.setdefault(st[0], []).append(int(e))
    out, todo = {}, list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        st = stat(pid)
        if st is not None and pid not in out and pid != me:
            out[pid] = st[1]
            todo += kids.get(pid, [])
    return out

seen = {}
while True:
    seen.update(below(driver))
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready and not os.read(sys.stdin.fileno(), 1):
        break
time.sleep(1.0)  # let a clean ray.shutdown() finish first
for pid, start in seen.items():
    st = stat(pid)
    if st is not None and st[1] == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _start_ray_watchdog() -> Any:
    """Start the watchdog for this driver's private Ray (Linux); ``None`` elsewhere."""
    if not os.path.isdir("/proc/self"):
        return None
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-c", _RAY_WATCHDOG, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise InvalidArgumentError(
            f"executor='ray' needs Ray, which is not installed: {_RAY_INSTALL}, or use "
            "--executor local."
        ) from e
    return ray


def _user_paths() -> list[str]:
    """Entries of ``sys.path`` outside the interpreter's own (a source tree, a test folder)."""
    own = {os.path.realpath(p) for p in sysconfig.get_paths().values()}
    return [
        p
        for p in sys.path
        if p and os.path.isdir(p) and not any(os.path.realpath(p).startswith(o) for o in own)
    ]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the fix, when ``HOST:PORT`` takes no connection.

    (Ray itself retries an unreachable head for minutes.) ``"auto"`` and other forms Ray
    resolves by itself are left to Ray.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise InvalidArgumentError(
            f"address={address!r}: nothing answers there ({e}). Check the head node's address "
            "(`ray start --head` prints it) and that it is running, or leave out --address to "
            "start a local Ray."
        ) from e


@contextmanager
def _loopback_only(ray: Any) -> Iterator[None]:
    """Start a local Ray on 127.0.0.1 rather than the host's network address.

    On Linux Ray binds a new node to the host's address unless its "single-machine" switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import into ``ray_constants``) is
    off; a private local Ray needs no network, so the switch is turned off while it starts.
    """
    env, key = os.environ.get(_RAY_CLUSTER_ENV), _RAY_CLUSTER_ENV
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    old = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[key] = "0"
    if old is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = env
        if old is not None:
            constants.ENABLE_RAY_CLUSTER = old  # type: ignore[union-attr]


class RayExecutor:
    """Ray core tasks, one CPU each; a task whose worker dies is retried by Ray (``retries``).

    Without ``address`` a private local Ray is started (on loopback only, no dashboard, with
    ``num_cpus=workers``, one worker per CPU warmed up: torch and gdscope imported) and shut
    down by :meth:`close`; with ``address`` (``"auto"``,
    ``"HOST:PORT"`` or ``"ray://HOST:PORT"``) the executor connects to that cluster, whose
    nodes must have gdscope installed. Ray starts on the first :meth:`map` (or :meth:`start`).

    Args:
        address: a running cluster, or ``None`` for a local one.
        workers: on a local Ray, its CPUs; on a cluster, the most tasks in flight at once.
        retries: how often Ray reruns a task whose worker died (``max_retries``).
    """

    def __init__(
        self, address: str | None = None, workers: int | None = None, retries: int = 2
    ) -> None:
        _check_count("workers", workers, 1)
        _check_count("retries", retries, 0, optional=False)
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise InvalidArgumentError(
                f"address={address!r} must be 'auto', 'HOST:PORT' or 'ray://HOST:PORT', or None "
                "to start a local Ray."
            )
        self.address = address
        self.workers = workers
        self.retries = retries
        self._ray: Any = None
        self._owns_ray = False
        self._watchdog: Any = None

    def start(self) -> None:
        """Connect to Ray (or start a local one) now; idempotent."""
        if self._ray is not None:
            return
        ray = _import_ray()
        if ray.is_initialized():
            self._ray = ray  # someone else's Ray, in this process: use it, leave it running
            return
        quiet: dict[str, Any] = {
            "log_to_driver": False,
            "configure_logging": True,
            "logging_level": logging.ERROR,
            "include_dashboard": False,
        }
        if self.address is None:
            paths = _user_paths()
            self._watchdog = _start_ray_watchdog()
            with _loopback_only(ray):
                ray.init(
                    address="local",
                    num_cpus=self.workers or os.cpu_count() or 1,
                    runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
                    if paths
                    else None,
                    **quiet,
                )
            # one worker per CPU imports torch, gdscope and the experiments now, not in a task
            warm = ray.remote(num_cpus=1)(_prepare_worker)
            modules = [*_WARM_MODULES, *_experiment_modules()]
            cpus = int(ray.cluster_resources().get("CPU", 1))
            ray.get([warm.remote(1, modules) for _ in range(cpus)])
        else:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, **quiet)
            except (ConnectionError, TimeoutError, OSError, RuntimeError, ValueError) as e:
                raise InvalidArgumentError(
                    f"address={self.address!r}: cannot connect to a Ray cluster there ({e}). "
                    "Start one (`ray start --head` prints its address), check the address, or "
                    "leave out --address to start a local Ray."
                ) from e
        self._ray = ray
        self._owns_ray = True

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]
    ) -> Iterator[tuple[int, Any]]:
        """Submit ``fn(*args)`` as Ray tasks; yield ``(index, output)`` as each finishes."""
        self.start()
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=self.retries)(_ray_call)
        modules = _experiment_modules()
        limit = self.workers if self.address is not None and self.workers else len(items)
        queue = list(range(len(items)))
        running: dict[Any, int] = {}
        try:
            while queue or running:
                while queue and len(running) < limit:
                    i = queue.pop(0)
                    running[remote.remote(modules, fn, items[i])] = i
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i = running.pop(ref)
                yield i, self._get(ray, ref, i, items[i])
        finally:
            for ref in running:
                ray.cancel(ref, force=True)

    def _get(self, ray: Any, ref: Any, index: int, args: tuple[Any, ...]) -> Any:
        """The task's output; its own exception unwrapped from Ray's."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause() if e.cause is None else e.cause
            raise cause from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
            raise _lost(index, args, self.retries + 1) from e

    def close(self) -> None:
        """Shut down the Ray this executor started (a connection to a cluster is dropped)."""
        if self._ray is not None and self._owns_ray:
            self._ray.shutdown()
        self._ray, self._owns_ray = None, False
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:  # end of its stdin: it kills whatever Ray left behind
            with suppress(OSError):
                watchdog.stdin.close()
            with suppress(Exception):
                watchdog.wait(timeout=10)

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RayExecutor(address={self.address!r}, workers={self.workers}, retries={self.retries})"
        )
