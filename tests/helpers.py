"""Job functions and process-inspection helpers shared by the tests.

Job functions live here (not in test modules) so that every process that may
run them -- a forked job, a spawn/forkserver host worker, the clean
interpreter killable_wrapper starts for a threaded host -- can import them by
name: pytest puts this directory on ``sys.path`` and multiprocessing passes
``sys.path`` on to spawned interpreters.

Jobs that start processes write a *record*: a JSON list of ``[pid,
create_time]`` for themselves and every descendant, written atomically to a
path the test chooses, so the test can check with psutil that all of them are
gone once the job was stopped.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor, wait

import psutil

# Module state a host can set; a forked job sees it, a clean interpreter does not.
STATE: dict[str, object] = {}

BACKENDS = ("pidfd", "posix")
START_METHODS = ("fork", "forkserver", "spawn")
HOST_WORKERS = 2  # workers of each host pool

LONG = 30.0  # how long "endless" jobs would run if nobody stopped them


# --------------------------------------------------------------------------
# host-side set-up (used as stdlib pool initializers)


def init_host(backend: str, token: object = None) -> None:
    """Initializer of a host pool worker: pick the cancelk backend, set state.

    forkserver workers descend from a server that may have started with
    another environment, so the backend is set here, in the worker itself.
    """
    os.environ["CANCELK_BACKEND"] = backend
    STATE["init"] = token


def host_info() -> dict[str, object]:
    """What a host worker looks like from inside (run it via killable_wrapper
    to see the job's view, or directly to see the host worker's)."""
    from cancelk import _core

    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "backend_env": os.environ.get("CANCELK_BACKEND"),
        "backend": _core.selected_backend(),
        "state": STATE.get("init"),
        "threads": threading.active_count(),
        "pgid": os.getpgid(0),
    }


# --------------------------------------------------------------------------
# recording processes


def _descendant_records(root: psutil.Process) -> list[list[float]]:
    records = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            records.append([proc.pid, proc.create_time()])
        except psutil.NoSuchProcess:
            continue
    return records


def record(path: str, expect_descendants: int = 0, wait: float = 10.0) -> None:
    """Write this process and its descendants to ``path`` (atomically).

    Waits until at least ``expect_descendants`` descendants exist, so the
    record is complete when it appears.
    """
    me = psutil.Process()
    deadline = time.monotonic() + wait
    while len(me.children(recursive=True)) < expect_descendants:
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected {expect_descendants} descendants, never saw them")
        time.sleep(0.005)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_descendant_records(me), f)
    os.replace(tmp, path)


def wait_for_path(
    path: str, wait: float = 10.0, message: str | None = None, poll: float = 0.005
) -> None:
    """Wait up to ``wait`` seconds for ``path`` to exist; AssertionError
    (``message``, or "<path> never appeared") if it does not."""
    deadline = time.monotonic() + wait
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(message or f"{path} never appeared")
        time.sleep(poll)


def read_record(path: str, wait: float = 10.0) -> list[tuple[int, float]]:
    """Read a record, waiting up to ``wait`` seconds for it to appear."""
    wait_for_path(path, wait, f"the job never recorded its processes in {path}")
    with open(path) as f:
        return [(int(pid), float(created)) for pid, created in json.load(f)]


def same_process(pid: int, created: float) -> psutil.Process | None:
    """The process ``pid`` if it is still the one created at ``created``;
    None if it is gone or the pid now names another process."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) > 0.05:
            return None  # the pid was reused by an unrelated process
        return proc
    except psutil.NoSuchProcess:
        return None


def leftovers(records: list[tuple[int, float]], reaped: tuple[int, ...] = ()) -> list[str]:
    """Recorded processes that still exist, described for an assertion message.

    A process in ``reaped`` must not exist at all (not even as a zombie): its
    parent, killable_wrapper, promised to reap it. Other processes count as
    gone once they are dead: a zombie whose parent is pid 1 waits only for
    init to reap it, which some container inits never do; the tree it belonged
    to was killed and released it.
    """
    alive = []
    for pid, created in records:
        proc = same_process(pid, created)
        if proc is None:
            continue
        try:
            status = proc.status()
            ppid = proc.ppid()
            cmd = " ".join(proc.cmdline())[:120]
        except psutil.NoSuchProcess:
            continue
        if pid not in reaped and status == psutil.STATUS_ZOMBIE and ppid == 1:
            continue
        alive.append(f"pid {pid} ({status}, ppid {ppid}): {cmd}")
    return alive


def wait_gone(
    records: list[tuple[int, float]], reaped: tuple[int, ...] = (), timeout: float = 2.0
) -> list[str]:
    """Poll until every recorded process is gone; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        alive = leftovers(records, reaped)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def kill_records(records: list[tuple[int, float]]) -> None:
    """Clean-up after a failed test: SIGKILL whatever recorded process is left."""
    for pid, created in records:
        proc = same_process(pid, created)
        if proc is None:
            continue
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
        try:
            os.waitpid(pid, 0)  # reap it if it is our own child (it was just killed)
        except ChildProcessError:
            pass


# --------------------------------------------------------------------------
# jobs that return or raise


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return args, kwargs


def sleep_then_return(seconds, value):
    time.sleep(seconds)
    return value


def big_bytes(size):
    # Not all the same byte, so a torn or reordered transfer would show.
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


class JobError(Exception):
    """A job's own exception type."""


def raise_job_error(message):
    raise JobError(message)


def return_lambda():
    return lambda: 1


def return_lock():
    return threading.Lock()


class UnpicklableError(Exception):
    """Cannot be pickled: its __dict__ holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(message):
    raise UnpicklableError(message)


class UnloadableError(Exception):
    """Pickles fine, but unpickling calls __init__ with one argument and fails."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_unloadable():
    raise UnloadableError("a", "b")


def read_state():
    return STATE.get("init")


def main_thread_only():
    """The job's view: pid and whether a fork copied the test's STATE."""
    return {"pid": os.getpid(), "ppid": os.getppid(), "state": STATE.get("init")}


# --------------------------------------------------------------------------
# jobs that must be stopped: each records itself first, then never finishes


def sleep_job(path):
    record(path)
    time.sleep(LONG)


def spin_job(path):
    record(path)
    deadline = time.monotonic() + LONG
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return n


def gil_c_job(path):
    """Sleep inside a C call that holds the GIL: no Python code runs, no signal
    handler, no thread of this process can do anything."""
    record(path)
    ctypes.PyDLL(None).sleep(int(LONG))


def mp_child_job(path):
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(LONG,))
    child.start()
    record(path, expect_descendants=1)
    child.join()


def popen_job(path):
    proc = subprocess.Popen(["sleep", str(int(LONG))])
    record(path, expect_descendants=1)
    proc.wait()


def nested_pool_job(path):
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(time.sleep, LONG) for _ in range(2)]
        record(path, expect_descendants=2)
        wait(futures)


def setsid_child_job(path):
    """A grandchild that leaves the job's process group and session."""
    proc = subprocess.Popen(["sleep", str(int(LONG))], start_new_session=True)
    record(path, expect_descendants=1)
    proc.wait()


JOBS = {
    "sleep": sleep_job,
    "spin": spin_job,
    "gil_c": gil_c_job,
}
TREE_JOBS = {
    "mp_child": mp_child_job,
    "popen": popen_job,
    "nested_pool": nested_pool_job,
}


def record_then(path, seconds, value):
    """Record, then finish after ``seconds`` with ``value``."""
    record(path)
    time.sleep(seconds)
    return value


def signal_parent_job(path, signum):
    """Record, interrupt the process waiting for us, then never finish."""
    record(path)
    os.kill(os.getppid(), signum)
    time.sleep(LONG)


# --------------------------------------------------------------------------
# jobs that die


def exit_with(code):
    os._exit(code)


def kill_self(signum):
    if signum == signal.SIGSEGV:
        import faulthandler

        faulthandler.disable()  # no "Fatal Python error" dump on the test's stderr
    os.kill(os.getpid(), signum)
    time.sleep(LONG)
