"""Processes of the local executor: none outlives its driver; a dead worker costs one item a try.

- A ``gdscope sweep --executor local`` driver killed with ``kill -9`` leaves nothing behind:
  its workers, the fork server and multiprocessing's resource tracker all exit within moments
  (before the fix they lived on, about 1.1 GB per killed sweep).
- A worker's death charges a try only to the item it was running; queued items and items on
  other workers are not charged, and an item that always kills its worker is reported lost
  after ``retries + 1`` tries while every other item completes.
- Bad arguments to the executors are refused with the argument, the value and the fix.

The helpers here (the /proc process walk, the driver script) are shared with
``test_adv_crash.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import gdscope
from gdscope.errors import GdscopeError, InvalidArgumentError
from gdscope.executors import LocalExecutor, RayExecutor, get_executor

SRC = Path(gdscope.__file__).resolve().parents[1]
GRACE = 15.0  # seconds a process may take to notice that its driver is gone

# ---------------------------------------------------------------------------- /proc helpers


def _stat(pid: int) -> tuple[int, str, int] | None:
    """``(ppid, state, start time)`` of a process from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], int(fields[19])


def _parent(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every process below ``root`` (ppid links in /proc): ``{pid: (start time, cmdline)}``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
    out: dict[int, tuple[int, str]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        st = _stat(pid)
        if st is not None and pid not in out:
            out[pid] = (st[2], _cmdline(pid))
            todo += children.get(pid, [])
    return out


def alive(pid: int, start: int) -> bool:
    """The process ``pid`` started at ``start`` still runs (a zombie has ended)."""
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] not in ("Z", "X")


def survivors(procs: dict[int, tuple[int, str]], grace: float = GRACE) -> list[str]:
    """The processes of ``procs`` still alive after at most ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        left = [f"{pid}: {cmd[:120]}" for pid, (t, cmd) in procs.items() if alive(pid, t)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kill_tree(procs: dict[int, tuple[int, str]]) -> None:
    """Clean-up: SIGKILL whatever of ``procs`` is still alive (the same processes only)."""
    for pid, (start, _) in procs.items():
        if alive(pid, start):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- a driver
EXPERIMENT = "adv-proc-sleep"
HELPER = textwrap.dedent(
    f'''
    """A sweep point that announces itself, sleeps, then records one small run."""
    import os
    import time
    from dataclasses import dataclass, field
    from pathlib import Path

    from gdscope.experiments import (
        DataConfig, Experiment, ExperimentConfig, Judgement, register,
    )
    from gdscope.store import MetricRow
    from gdscope.verdict import Verdict


    @dataclass(frozen=True)
    class SleepConfig(ExperimentConfig):
        x: float = 1.0
        sleep: float = 0.0
        flags: str = ""
        data: DataConfig = field(default_factory=lambda: DataConfig(n=8))


    @register
    class Sleep(Experiment):
        name = "{EXPERIMENT}"
        summary = "Sleeps, then records one run (a process test)."
        Config = SleepConfig

        def tasks(self, cfg):
            return [{{}}]

        def run_task(self, cfg, task, ctx):
            if cfg.flags:
                Path(cfg.flags, f"started-{{cfg.x}}-{{os.getpid()}}").touch()
            time.sleep(cfg.sleep)
            run = ctx.store.create_run(f"x{{cfg.x}}", {{"x": cfg.x}})
            for step in range(3):
                ctx.store.log_step(run, step, [MetricRow("loss", cfg.x / (step + 1), "loss")])
            ctx.store.finish_run(run, "completed")
            return {{"x": cfg.x}}

        def judge(self, cfg, results):
            return Judgement([Verdict("x is set", "x", f"x = {{cfg.x:g}}", True)])
    '''
)
DRIVER = textwrap.dedent(
    """
    import sys
    import advprocexp  # registers the experiment, in the driver and in its workers
    from gdscope.cli import app

    if __name__ == "__main__":
        app(sys.argv[1:], prog_name="gdscope")
    """
)


def write_driver(folder: Path, points: int, sleep: float) -> tuple[Path, Path, Path]:
    """The driver script, a sweep config of ``points`` points and the flags folder."""
    (folder / "advprocexp.py").write_text(HELPER)
    (folder / "drv.py").write_text(DRIVER)
    flags = folder / "flags"
    flags.mkdir(exist_ok=True)
    xs = ", ".join(f"{x}.0" for x in range(1, points + 1))
    config = folder / "sweep.toml"
    config.write_text(
        f'experiment = "{EXPERIMENT}"\nsleep = {sleep}\nflags = "{flags}"\n'
        f"[sweep]\ngrid = {{ x = [{xs}] }}\n"
    )
    return folder / "drv.py", config, flags


def start_driver(folder: Path, config: Path, out: Path, workers: int = 2) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(folder), str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    args = ["sweep", str(config), "--executor", "local", "--workers", str(workers)]
    return subprocess.Popen(
        [sys.executable, str(folder / "drv.py"), *args, "--out", str(out)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, timeout: float, ended=None) -> bool:
    """Poll ``predicate`` until it holds, ``timeout`` passes or ``ended()`` says to stop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if ended is not None and ended():
            return predicate()
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------- a zygote
ZYGOTE = textwrap.dedent(
    """
    import json
    import os
    import sys


    def child(request):
        out = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = sys.stdout
        code = 0
        try:
            if request["kind"] == "driver":
                from gdscope.cli import app

                app(request["argv"], prog_name="gdscope")
            else:
                sys.argv = ["child", *request["argv"]]
                exec(compile(open(request["script"]).read(), request["script"], "exec"), {})
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        os._exit(code)


    if __name__ == "__main__":
        import torch, torch._dynamo  # noqa: E401,F401  (what every child needs, paid once)
        import gdscope.cli, gdscope.runner, gdscope.tracker  # noqa: E401,F401
        import advprocexp  # noqa: F401
        print(json.dumps({"ready": os.getpid()}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(request)
            print(json.dumps({"pid": pid}), flush=True)
            _, status = os.waitpid(pid, 0)
            print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
    """
)


class Zygote:
    """A process that imports torch and gdscope once, then forks each child the tests kill.

    A forked driver is a real ``gdscope sweep`` process (its fork server, workers and
    resource tracker are started as from a shell); only the interpreter's start-up is shared.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "advprocexp.py").write_text(HELPER)
        (folder / "zygote.py").write_text(ZYGOTE)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(folder), str(SRC), os.environ.get("PYTHONPATH", "")]
            ),
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(folder / "zygote.py")],
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert "ready" in self._read(), "the zygote did not start"

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def start(self, kind: str, argv: list[str], output: Path, script: Path | None = None) -> int:
        """Fork a child (``kind`` ``driver`` or ``script``); its pid. Then call :meth:`wait`."""
        assert self.proc.stdin is not None
        request = {"kind": kind, "argv": argv, "output": str(output), "script": str(script)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(self._read()["pid"])

    def wait(self) -> int:
        """The exit code of the last child (``-9`` when killed), once it has ended."""
        return int(self._read()["status"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


# ---------------------------------------------------------------------------- 1. orphans
def test_a_killed_sweep_driver_leaves_no_process_behind(tmp_path):
    """kill -9 of the driver: workers, fork server and resource tracker all end."""
    _, config, flags = write_driver(tmp_path, points=4, sleep=60.0)
    proc = start_driver(tmp_path, config, tmp_path / "out")
    procs: dict[int, tuple[int, str]] = {}
    try:
        # both workers are inside a (long) task
        started = wait_for(
            lambda: len(list(flags.iterdir())) >= 2, 180, lambda: proc.poll() is not None
        )
        assert started, proc.communicate()
        procs = descendants(proc.pid)
        kinds = " ".join(cmd for _, cmd in procs.values())
        assert "forkserver" in kinds and "resource_tracker" in kinds, kinds
        workers = {int(f.name.rsplit("-", 1)[1]) for f in flags.iterdir()}
        assert workers <= set(procs), (workers, procs)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert survivors(procs) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        kill_tree(procs)


# ---------------------------------------------------------------------------- 2. retries
def _task(i: int, folder: str, die: str) -> int:
    """Record an attempt, then kill this worker on request: ``once`` or ``always``."""
    with open(os.path.join(folder, "attempts"), "a") as f:
        f.write(f"{i}\n")
    marker = os.path.join(folder, f"died-{i}")
    if die == "always" or (die == "once" and not os.path.exists(marker)):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.02)
    return i * i


def _attempts(folder: Path) -> list[int]:
    path = folder / "attempts"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_each_worker_death_charges_only_the_item_it_was_running(tmp_path):
    """Four items each kill their worker once; retries=1 is enough for all of them."""
    dying = {1, 4, 7, 10}
    items = [(i, str(tmp_path), "once" if i in dying else "") for i in range(12)]
    got = dict(LocalExecutor(workers=2, retries=1).map(_task, items))
    assert got == {i: i * i for i in range(12)}
    attempts = _attempts(tmp_path)
    for i in range(12):
        assert attempts.count(i) == (2 if i in dying else 1), (i, attempts)
    assert {p.name for p in tmp_path.glob("died-*")} == {f"died-{i}" for i in dying}


def test_an_item_that_always_kills_its_worker_is_lost_and_the_others_complete(tmp_path):
    items = [(i, str(tmp_path), "always" if i == 2 else "") for i in range(8)]
    got: dict[int, int] = {}
    with pytest.raises(GdscopeError, match=r"item 2 .* lost its worker process 2 times"):
        for i, out in LocalExecutor(workers=2, retries=1).map(_task, items):
            got[i] = out
    assert got == {i: i * i for i in range(8) if i != 2}
    assert _attempts(tmp_path).count(2) == 2  # retries + 1 tries, no more


def test_two_lost_items_are_both_named(tmp_path):
    items = [(i, str(tmp_path), "always" if i in (0, 3) else "") for i in range(5)]
    got: dict[int, int] = {}
    with pytest.raises(GdscopeError, match=r"item 0 .*lost its worker process 1 times.*Items 3"):
        for i, out in LocalExecutor(workers=2, retries=0).map(_task, items):
            got[i] = out
    assert got == {1: 1, 2: 4, 4: 16}


def _raise(i: int) -> int:
    if i == 1:
        raise KeyError(f"bad item {i}")
    return i


def _unpicklable(i: int):
    return (lambda: i) if i == 1 else i


def _exits(i: int) -> int:
    if i == 1:
        sys.exit(3)
    return i


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (_raise, KeyError, "bad item 1"),
        (_unpicklable, Exception, r"(?i)pickle"),
        (_exits, GdscopeError, r"item 1: the task raised SystemExit\(3\)"),
    ],
)
def test_a_task_error_reaches_the_driver_as_itself(fn, error, match):
    """Raised in the task (not a dead worker): not retried, raised in the driver."""
    with pytest.raises(error, match=match) as info:
        dict(LocalExecutor(workers=1, retries=2).map(fn, [(0,), (1,), (2,)]))
    if fn is _raise:
        assert "in _raise" in str(info.value.__cause__)  # the worker's traceback


def test_a_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    import gdscope.executors as executors

    monkeypatch.setattr(executors, "_experiment_modules", lambda: ["gdscope_no_such_module"])
    with pytest.raises(GdscopeError, match=r"could not start: .*gdscope_no_such_module"):
        list(LocalExecutor(workers=1).map(_task, [(0, "/nonexistent", "")]))


def test_abandoning_the_results_ends_the_workers(tmp_path):
    """A consumer that stops early (an exception, a closed generator) leaves no worker."""
    me = os.getpid()
    before = set(descendants(me))
    results = LocalExecutor(workers=2).map(_task, [(i, str(tmp_path), "") for i in range(20)])
    next(results)
    workers = {  # new processes whose parent is not this one: forked by the fork server
        p: v for p, v in descendants(me).items() if p not in before and _parent(p) != me
    }
    assert workers
    results.close()
    assert survivors(workers) == []


def test_an_empty_map_starts_nothing():
    assert list(LocalExecutor(workers=2).map(_task, [])) == []


# ---------------------------------------------------------------------------- bad arguments
BAD_COUNTS = [0, -1, 1.5, "2", True, False, [2], float("nan")]


@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("name", ["workers", "threads_per_worker"])
def test_local_executor_refuses_bad_counts(name, value):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}=") as info:
        LocalExecutor(**{name: value})
    assert "pass" in str(info.value)


@pytest.mark.parametrize("value", [-1, -5, 0.5, "1", True, None, (1,)], ids=repr)
def test_retries_must_be_a_non_negative_int(value):
    with pytest.raises(InvalidArgumentError, match=r"\bretries="):
        LocalExecutor(retries=value)
    with pytest.raises(InvalidArgumentError, match=r"\bretries="):
        RayExecutor(retries=value)


def test_threads_per_worker_none_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"threads_per_worker=None .* must be an int"):
        LocalExecutor(threads_per_worker=None)


@pytest.mark.parametrize("value", [0, -2, 2.0, "4", False], ids=repr)
def test_ray_executor_refuses_bad_workers(value):
    with pytest.raises(InvalidArgumentError, match=r"\bworkers="):
        RayExecutor(workers=value)


@pytest.mark.parametrize("address", ["", "   ", 42, b"auto"], ids=repr)
def test_ray_executor_refuses_bad_addresses(address):
    with pytest.raises(InvalidArgumentError, match=r"\baddress="):
        RayExecutor(address=address)


@pytest.mark.parametrize("name", ["dask", "", "LOCAL", "local ", "threads"])
def test_get_executor_refuses_unknown_names(name):
    with pytest.raises(InvalidArgumentError, match=r"executor=.* is unknown: use one of"):
        get_executor(name)


def test_executor_pickles_its_settings():
    ex = pickle.loads(pickle.dumps(LocalExecutor(workers=3, retries=0, threads_per_worker=2)))
    assert (ex.workers, ex.retries, ex.threads_per_worker) == (3, 0, 2)


# ---------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_ray_executor_close_shuts_down_its_private_ray():
    ray = pytest.importorskip("ray")
    me = os.getpid()
    before = set(descendants(me))
    ex = RayExecutor(workers=1)
    try:
        ex.start()
        started = {p: v for p, v in descendants(me).items() if p not in before}
        assert started and ray.is_initialized()
    finally:
        ex.close()
    assert not ray.is_initialized()
    assert survivors(started, grace=30) == []


RAY_DRIVER = textwrap.dedent(
    """
    import sys, time
    from gdscope.executors import RayExecutor
    ex = RayExecutor(workers=1)
    ex.start()
    print("ready", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_killed_ray_driver_leaves_no_process_behind(tmp_path):
    """Ray's agents outlive a ``kill -9`` of the driver unless the executor's watchdog ends them."""
    pytest.importorskip("ray")
    script = tmp_path / "ray_driver.py"
    script.write_text(RAY_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    procs: dict[int, tuple[int, str]] = {}
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(3.0)  # Ray's agents start after init returns
        procs = descendants(proc.pid)
        assert any("raylet" in cmd for _, cmd in procs.values())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert survivors(procs, grace=30) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tree(procs)
