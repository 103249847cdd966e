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
more times; an exception raised by the task itself is not retried: it propagates to the driver.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import socket
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
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


def _check_count(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidArgumentError(f"{name}={value!r} must be an integer or None.")
    if value is not None and value < minimum:
        raise InvalidArgumentError(f"{name}={value!r} must be at least {minimum}.")


def _lost(index: int, args: tuple[Any, ...], tries: int) -> GdscopeError:
    what = repr(args)
    what = what if len(what) <= 200 else what[:197] + "..."
    return GdscopeError(
        f"item {index} {what} lost its worker process {tries} times (killed, out of memory, "
        "crashed or failed to start); nothing of it was kept. Check the memory it needs and "
        "the worker's log, or raise retries."
    )


class LocalExecutor:
    """A pool of ``workers`` fresh processes, each with ``threads_per_worker`` torch threads.

    Results are yielded as they complete. When a worker dies the pool breaks and every item it
    held is lost: the pool is rebuilt and those items resubmitted, each at most ``retries``
    more times (an item lost with a broken pool counts one try, whichever worker died).

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
        _check_count("retries", retries, 0)
        _check_count("threads_per_worker", threads_per_worker, 1)
        self.workers = workers or os.cpu_count() or 1
        self.retries = retries
        self.threads_per_worker = threads_per_worker

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]
    ) -> Iterator[tuple[int, Any]]:
        """Run ``fn(*args)`` for each item in the pool; yield ``(index, output)`` as each ends."""
        modules = _experiment_modules()
        tries = [0] * len(items)
        todo = list(range(len(items)))
        while todo:
            pool = ProcessPoolExecutor(
                max_workers=min(self.workers, len(todo)),
                mp_context=_context(modules),
                initializer=_prepare_worker,
                initargs=(self.threads_per_worker, modules),
            )
            futures: dict[Future[Any], int] = {pool.submit(fn, *items[i]): i for i in todo}
            lost: list[int] = []
            finished = False
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in sorted(done, key=futures.__getitem__):
                        i = futures[fut]
                        try:
                            output = fut.result()
                        except BrokenProcessPool:
                            lost.append(i)
                            continue
                        yield i, output
                finished = True
            finally:
                # on an error (or an abandoned generator) do not wait for the running items
                pool.shutdown(wait=finished, cancel_futures=True)
            for i in lost:
                tries[i] += 1
                if tries[i] > self.retries:
                    raise _lost(i, items[i], tries[i])
            if lost:
                log.warning("a worker died; running %d lost item(s) again", len(lost))
            todo = sorted(lost)

    def __repr__(self) -> str:
        return (
            f"LocalExecutor(workers={self.workers}, retries={self.retries}, "
            f"threads_per_worker={self.threads_per_worker})"
        )


def _ray_call(modules: Sequence[str], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """The body of a Ray task: one thread, the experiment modules, then ``fn(*args)``."""
    _prepare_worker(1, modules)
    return fn(*args)


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
        _check_count("retries", retries, 0)
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

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RayExecutor(address={self.address!r}, workers={self.workers}, retries={self.retries})"
        )
