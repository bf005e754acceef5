"""Job functions and small test helpers for the cancelk.ProcessPoolExecutor tests.

Jobs live in this importable module (not in the test files) so that every
process that may run them -- a runner forked from a supervisor that was forked
from the test process, or from a supervisor in a fresh interpreter (spawn,
forkserver) -- finds them by name: pytest puts this directory on ``sys.path``
and cancelk passes ``sys.path`` on to a spawned supervisor.

Jobs that start processes write a *record* first: a JSON list of
``[pid, create_time]`` for the job's process and its descendants, written
atomically to a path the test chooses, so the test can check with psutil that
every one of them is gone once the job was stopped.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

# Shared with the killable_wrapper tests: how a job records its processes,
# the jobs that must be stopped (each records itself, then never ends), and
# plain jobs that return, raise or die.
from helpers import (  # noqa: F401 - re-exported for the executor tests
    JobError,
    UnloadableError,
    UnpicklableError,
    add,
    echo,
    exit_with,
    gil_c_job,
    kill_self,
    mp_child_job,
    raise_unloadable,
    raise_unpicklable,
    read_record,
    record,
    return_lock,
    same_process,
    sleep_job,
    spin_job,
    wait_for_path,
)
from helpers import big_bytes as big_result  # noqa: F401 - the executor tests' name

IMPORTED_AT = time.monotonic()  # when this process imported the jobs
LONG = 60.0  # how long "endless" jobs would run if nobody stopped them
RESULT_WAIT = 30.0  # how long a test waits for a future before calling it a hang

# -------------------------------------------------------------------------
# initializer state (per runner process)

INIT = {"calls": 0, "pid": None, "args": None}


def init_record(*args):
    INIT["calls"] = INIT["calls"] + 1
    INIT["pid"] = os.getpid()
    INIT["args"] = args


def init_info():
    return {
        "pid": os.getpid(),
        "calls": INIT["calls"],
        "init_pid": INIT["pid"],
        "args": INIT["args"],
    }


class InitError(Exception):
    """Raised by the failing initializer."""


def init_fail(message):
    raise InitError(message)


# -------------------------------------------------------------------------
# jobs that return or raise


def square(x):
    return x * x


def getpid():
    return os.getpid()


def import_age():
    """Seconds since this process imported this module."""
    return time.monotonic() - IMPORTED_AT


def sleep_return(seconds, value=None):
    time.sleep(seconds)
    return value


def sleep_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def spin_return(seconds, value):
    """Busy for ``seconds`` (no sleep), then return ``value`` and the pid."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return value, os.getpid()


def length(data):
    return len(data)


def _deep_frame_of_the_job(message):
    raise JobError(message)


def raise_job_error(message):
    _deep_frame_of_the_job(message)


def raise_system_exit(code):
    raise SystemExit(code)


class Unloadable:
    """Pickles fine, but unpickling it fails (``__reduce__`` names a bad call)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __reduce__(self):
        return (Unloadable, (self.a,))  # one argument short


def return_unloadable():
    return Unloadable(1, 2)


# -------------------------------------------------------------------------
# recording processes


def snapshot(pids):
    """(pid, create_time) of each pid that exists now."""
    found = []
    for pid in pids:
        try:
            found.append((pid, psutil.Process(pid).create_time()))
        except psutil.NoSuchProcess:
            continue
    return found


def still_there(records, zombies_ok=False):
    """Recorded processes that still exist (described); with ``zombies_ok``,
    dead but unreaped ones count as gone (orphans that went to an init which
    never reaps)."""
    left = []
    for pid, created in records:
        proc = same_process(pid, created)
        if proc is None:
            continue
        try:
            status = proc.status()
            ppid = proc.ppid()
            cmd = " ".join(proc.cmdline())[:100]
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            status, ppid, cmd = "?", -1, "?"
        if zombies_ok and status == psutil.STATUS_ZOMBIE:
            continue
        left.append(f"pid {pid} [{status}] ppid {ppid}: {cmd}")
    return left


def wait_gone(records, timeout=2.0, zombies_ok=False):
    """Poll until every recorded process is gone; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = still_there(records, zombies_ok)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.005)


def kill_records(records):
    """Clean-up after a failed test: SIGKILL whatever recorded process is left."""
    for pid, created in records:
        proc = same_process(pid, created)
        if proc is not None and proc.pid != os.getpid():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def descendants():
    """(pid, create_time) of every live descendant of this process."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.add((proc.pid, proc.create_time()))
        except psutil.NoSuchProcess:
            continue
    return found


def supervisor_of(job_pid):
    """The supervisor: the child of this process that is an ancestor of the job."""
    me = os.getpid()
    proc = psutil.Process(job_pid)
    while proc is not None:
        parent = proc.parent()
        if parent is not None and parent.pid == me:
            return proc
        proc = parent
    raise AssertionError(f"pid {job_pid} does not descend from the test process")


# -------------------------------------------------------------------------
# jobs that must be stopped: each records itself first, then never finishes


def popen_job(path, count=1):
    procs = [subprocess.Popen(["sleep", str(int(LONG))]) for _ in range(count)]
    record(path, expect_descendants=count)
    for proc in procs:
        proc.wait()


def detached_grandchild_job(path):
    """Double fork: the grandchild leaves the job's session and process group,
    its parent exits, so it is nobody's child in the job's tree any more."""
    child = os.fork()
    if child == 0:  # pragma: no cover - intermediate process
        try:
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", str(int(LONG))])
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    record(path, expect_descendants=1)
    time.sleep(LONG)


def leave_detached_child(path):
    """Start a child in its own session and return at once, leaving it running."""
    proc = subprocess.Popen(["sleep", str(int(LONG))], start_new_session=True)
    record(path, expect_descendants=1)
    proc.returncode = 0  # do not let Popen.__del__ warn; the pool must clean it up
    return proc.pid


def sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(LONG)


# -------------------------------------------------------------------------
# a pool used from a daemonic multiprocessing.Process


def daemon_target(method, conn):
    import cancelk

    report = {}
    try:
        with cancelk.ProcessPoolExecutor(2, mp_context=method) as exe:
            report["square"] = exe.submit(square, 7).result(timeout=RESULT_WAIT)
            future = exe.submit(sleep_return, LONG, None, cancelk.ProcessTimeout(0.2))
            try:
                future.result(timeout=RESULT_WAIT)
            except cancelk.ProcessTimeoutError:
                report["timeout"] = "ProcessTimeoutError"
            pid_future = exe.submit(sleep_pid, LONG)
            deadline = time.monotonic() + RESULT_WAIT
            while pid_future.pid is None and time.monotonic() < deadline:
                time.sleep(0.01)
            job_pid = pid_future.pid
            report["cancel"] = pid_future.cancel()
            report["job_gone"] = not psutil.pid_exists(job_pid) or _wait_pid_gone(job_pid)
    except BaseException as exc:  # report everything to the test
        report["error"] = repr(exc)
    conn.send(report)
    conn.close()


def _wait_pid_gone(pid, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid):
            return True
        time.sleep(0.01)
    return False


# -------------------------------------------------------------------------
# a pool factory whose pools are always shut down


class PoolFactory:
    """Makes executors and shuts every one of them down at teardown."""

    def __init__(self):
        self.pools = []
        self.before = descendants()

    def __call__(self, *args, **kwargs):
        import cancelk

        exe = cancelk.ProcessPoolExecutor(*args, **kwargs)
        self.pools.append(exe)
        return exe

    def close_all(self):
        """shutdown(wait=True, cancel_futures=True, timeout=5) of every pool.

        A pool whose shutdown hangs (a bug) must not hang the test session:
        after 10 s every process started since the factory was made is
        SIGKILLed (the pool then sees its supervisor die) and the test fails.
        """
        hung = []
        for exe in self.pools:
            thread = threading.Thread(
                target=exe.shutdown,
                kwargs={"wait": True, "cancel_futures": True, "timeout": 5},
                daemon=True,
            )
            thread.start()
            thread.join(10)
            if thread.is_alive():
                hung.append(exe)
                kill_records(sorted(descendants() - self.before))
                thread.join(15)
        if hung:
            raise AssertionError(f"shutdown(timeout=5) hung for {len(hung)} pool(s)")


def wait_running(future, timeout=RESULT_WAIT):
    """Wait until the future runs and has a pid; return the pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = future.pid
        if pid is not None:
            return pid
        if future.done():
            raise AssertionError(f"the job ended before it was seen running: {future!r}")
        time.sleep(0.002)
    raise AssertionError("the job never started running")


# -------------------------------------------------------------------------
# a script run as the user program


def run_script(directory, name, text, *args, timeout=40):
    """Write ``text`` to ``directory/name`` and run it to its end with this
    interpreter and ``args``, in ``directory``; return the CompletedProcess
    (stdout and stderr captured as text)."""
    script = directory / name
    script.write_text(text)
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(directory),
    )


def start_script(directory, name, text, *args):
    """Like run_script, but return the running Popen at once (stdout a text
    pipe, stderr not captured); end it with stop_process."""
    script = directory / name
    script.write_text(text)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(directory),
    )


def stop_process(proc):
    """Clean-up of a Popen: SIGKILL and reap it if it still runs, close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


# -------------------------------------------------------------------------
# jobs that run a pool of their own


def nested_stdlib_pool_job(path):
    """A job with a stdlib ProcessPoolExecutor whose workers start children."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        for i in range(2):
            pool.submit(popen_job, f"{path}.{i}")
        for i in range(2):
            read_record(f"{path}.{i}")
        record(path, expect_descendants=4)  # two workers, two sleeps
        time.sleep(LONG)


def nested_cancelk_pool_job(path):
    """A job with a cancelk pool of its own (its supervisor leaves the job's
    process group) whose jobs start children."""
    import cancelk

    with cancelk.ProcessPoolExecutor(2, mp_context="fork") as pool:
        for i in range(2):
            pool.submit(popen_job, f"{path}.{i}")
        for i in range(2):
            read_record(f"{path}.{i}")
        record(path, expect_descendants=5)  # supervisor, two runners, two sleeps
        time.sleep(LONG)


def submit_from_callback(exe, remaining, results, done):
    """Chain: each job's done-callback submits the next one."""

    def callback(future):
        results.append(future.result())
        if remaining[0] > 0:
            remaining[0] -= 1
            exe.submit(add, len(results), 0).add_done_callback(callback)
        else:
            done.set()

    exe.submit(add, 0, 0).add_done_callback(callback)
