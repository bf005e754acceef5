"""The test suite's job functions, and the constants every test module shares.

Everything here may run in a process other than the test's: a runner forked
from a cancelk supervisor (itself started by fork, forkserver or spawn), a
worker of a stdlib host pool that runs killable_wrapper, a job forked by
killable_wrapper, or the clean interpreter killable_wrapper starts for a
threaded host. Such a process finds a job by its name, ``jobs.<name>``:
pytest puts tests/ on ``sys.path``, and multiprocessing and cancelk pass
``sys.path`` on to the interpreters they start.

A runner of a spawned supervisor imports this module before its first job
(a replacement runner again), so it stays cheap to import: modules that are
not loaded there already (ctypes, json, hashlib, re) are imported by the jobs
that use them. What only the test process runs -- reading records, psutil
checks, pool and script helpers -- lives in procs.py.

Jobs that start processes write a *record* first (see ``record``): a JSON list
of ``[pid, create_time]`` for the job's process and its descendants, written
atomically to a path the test chooses, so that the test can check with psutil
(procs.wait_gone) that every one of them is gone once the job was stopped.
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

IMPORTED_AT = time.monotonic()  # when this process imported the jobs

# --------------------------------------------------------------------------
# constants shared by the test modules

BACKENDS = ("pidfd", "posix")  # cancelk's C backends (CANCELK_BACKEND)
START_METHODS = ("fork", "forkserver", "spawn")
HOST_WORKERS = 2  # workers of each stdlib host pool

LONG = 60.0  # how long "endless" jobs would run if nobody stopped them
RESULT_WAIT = 30.0  # how long a test waits for a future before calling it a hang
GONE = 2.0  # a stopped job's processes must be gone this long after the stop
SLACK = 1.3  # how late a stop may be on a loaded 2-core machine
MB = 2**20


def _dump_json(path: str, data: object) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees all of it or nothing."""
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def _quiet_faults() -> None:
    import faulthandler

    faulthandler.disable()  # no "Fatal Python error" dump on the test's stderr


# --------------------------------------------------------------------------
# host-side set-up (stdlib host pool initializers) and state

# Module state a host can set; a forked job sees it, a clean interpreter does not.
STATE: dict[str, object] = {}


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


def main_thread_only():
    """The job's view: pid and whether a fork copied the test's STATE."""
    return {"pid": os.getpid(), "ppid": os.getppid(), "state": STATE.get("init")}


# --------------------------------------------------------------------------
# cancelk initializers (state per runner process)

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


def init_fail_on_odd_pid(message):
    """An initializer that fails in about half of the runners."""
    if os.getpid() % 2:
        raise RaceError(message)


def init_fail_always(message):
    raise RaceError(message)


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
    _dump_json(path, _descendant_records(me))


# --------------------------------------------------------------------------
# jobs that return


def add(a, b):
    return a + b


def square(x):
    return x * x


def echo(*args, **kwargs):
    return args, kwargs


def echo_kind(value):
    """Return the type name of the argument the runner received."""
    return type(value).__name__


def length(data):
    return len(data)


def getpid():
    """The pid of the process that ran the job (a runner, a host worker)."""
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


def big_bytes(size):
    # Not all the same byte, so a torn or reordered transfer would show.
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


# Every job below returns (or records) a token and the pid of the process
# that ran it, so a test can tell exactly which job ran where and how it ended.


def token_pid(token):
    """Return ``token`` and the pid that ran it (who ran what, for I1 checks)."""
    return token, os.getpid()


def token_spin(token, seconds, size=0):
    """Busy for ``seconds`` (no sleep), then return (token, pid, size bytes)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return token, os.getpid(), b"r" * size


def token_sleep(token, seconds):
    time.sleep(seconds)
    return token, os.getpid()


def token_len(token, data):
    return token, len(data), os.getpid()


def gil_hold(seconds):
    """Sleep inside a C call that holds the GIL (the runner cannot read its channel)."""
    import ctypes

    ctypes.PyDLL(None).usleep(int(seconds * 1e6))
    return os.getpid()


def value(i):
    """The exact result of an untouched job: derived from i, with the pid."""
    return i * 7 + 1, os.getpid()


def work(seconds, i, spin=False):
    """Busy (spin) or idle (sleep) for ``seconds``, then the exact result."""
    if spin:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    else:
        time.sleep(seconds)
    return i * 7 + 1, os.getpid()


# --------------------------------------------------------------------------
# jobs that raise


class JobError(Exception):
    """A job's own exception type."""


def _deep_frame_of_the_job(message):
    raise JobError(message)


def raise_job_error(message):
    _deep_frame_of_the_job(message)


def raise_system_exit(code):
    raise SystemExit(code)


class RaceError(Exception):
    """A race test's job's own exception."""


class ChaosError(Exception):
    """A job's own exception, carrying the job's number."""


def raise_chaos(i):
    raise ChaosError(i)


def work_or_raise(seconds, i):
    """Like work, but ends with the job's own exception."""
    time.sleep(seconds)
    raise ChaosError(i)


class MixedJobError(Exception):
    """The exception of the 'raise' kind in the mixed-outcome run."""


def raise_mixed(n):
    raise MixedJobError(n)


# --------------------------------------------------------------------------
# bad data: results and exceptions that do not pickle, or do not unpickle


def return_lambda():
    return lambda: 1


def return_lock():
    return threading.Lock()


def return_generator():
    return (i for i in range(3))


class UnpicklableError(Exception):
    """Cannot be pickled: its __dict__ holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(message):
    raise UnpicklableError(message)


def raise_holding_a_lock():
    err = ValueError("holds a lock")
    err.lock = threading.Lock()
    raise err


class UnloadableError(Exception):
    """Pickles fine, but unpickling calls __init__ with one argument and fails."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_unloadable():
    raise UnloadableError("a", "b")


class NeedsTwoError(Exception):
    """An exception whose default pickling drops an argument: unpickling it
    (in the user process) fails with TypeError from ``__init__``."""

    def __init__(self, a, b):
        super().__init__(f"needs two: {a}/{b}")
        self.a, self.b = a, b


def raise_needs_two():
    raise NeedsTwoError("a", "b")


class RefusesPicklingError(Exception):
    """An exception whose pickling itself raises (``__reduce__`` raises)."""

    def __reduce__(self):
        raise RuntimeError("RefusesPicklingError refuses to be pickled")


def raise_refuses_pickling():
    raise RefusesPicklingError("boom")


class Unloadable:
    """Pickles fine, but unpickling it fails (``__reduce__`` names a call one
    argument short)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __reduce__(self):
        return (Unloadable, (self.a,))  # one argument short


def return_unloadable():
    return Unloadable(1, 2)


class RefusesPickling:
    """A result whose pickling raises a non-TypeError exception."""

    def __reduce__(self):
        raise RuntimeError("RefusesPickling refuses to be pickled")


def return_refuses_pickling():
    return RefusesPickling()


class KillsOnUnpickle:
    """An argument whose unpickling (in the runner) ends the runner process."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (os._exit, (self.code,))


def return_ghost():
    """Return an instance of a class that exists only in the runner: the user
    process cannot find it by name when it unpickles the result."""
    ghost = type("Ghost", (), {"__module__": __name__})
    globals()["Ghost"] = ghost
    return ghost()


# --------------------------------------------------------------------------
# stdlib parity (test_stdlib_parity)


class Token:
    """A result a test can hold a weak reference to."""

    def __init__(self, i):
        self.i = i


def make_token(i):
    return Token(i)


def read_stdin():
    """What a job reads from its stdin: input() and the raw fd 0."""
    try:
        line = input()
    except EOFError:
        line = "EOFError"
    return line, os.read(0, 100)


def init_log_to_queue(log_queue, fail):
    """An initializer that sends the ``concurrent.futures`` logger's records
    to a multiprocessing Queue (as CPython's test_init does), and fails if asked."""
    import logging
    from logging.handlers import QueueHandler

    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(QueueHandler(log_queue))
    logger.setLevel("CRITICAL")
    logger.propagate = False
    log_queue.put(f"initialized in {os.getpid()}")
    if fail:
        raise InitError("error in initializer")


def put_in(queue_or_event, value=None):
    """Put ``value`` in a multiprocessing (manager) queue, or set an event."""
    if value is None:
        queue_or_event.set()
    else:
        queue_or_event.put(value)
    return os.getpid()


# --------------------------------------------------------------------------
# big data


def pattern(size, seed):
    """``size`` bytes that depend on ``seed`` (so a result from another job
    cannot pass for this one)."""
    import hashlib

    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def digest(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def digests(*blocks, nested):
    """The SHA-256 of each block, then of the first block in ``nested``."""
    return [digest(block) for block in blocks] + [digest(nested[0])]


def big_round_trip(data, seed):
    """Check the argument, return ``len(data)`` bytes of another pattern, the
    argument's digest, and the runner's RSS after building the result."""
    received = (len(data), digest(data))
    result = pattern(len(data), seed)
    return received, result, psutil.Process().memory_info().rss


def runner_rss():
    return os.getpid(), psutil.Process().memory_info().rss


def big_after(delay, size, seed):
    """Sleep ``delay`` then return ``size`` bytes of pattern ``seed`` (built
    before the sleep, so the time to produce the result is the sleep)."""
    data = pattern(size, seed)
    time.sleep(delay)
    return seed, data


def spin_big_after(seconds, size, seed):
    """Like big_after but busy (the pickling and the sending then run right
    as the deadline is due)."""
    data = pattern(size, seed)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seed, data


# --------------------------------------------------------------------------
# jobs that must be stopped: each records itself first, then never finishes


def sleep_job(path=None):
    """Runs until stopped; with a path, records itself first."""
    if path is not None:
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
    import ctypes

    record(path)
    ctypes.PyDLL(None).sleep(int(LONG))


def mp_child_job(path):
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(LONG,))
    child.start()
    record(path, expect_descendants=1)
    child.join()


def popen_job(path, count=1):
    procs = [subprocess.Popen(["sleep", str(int(LONG))]) for _ in range(count)]
    record(path, expect_descendants=count)
    for proc in procs:
        proc.wait()


def nested_pool_job(path):
    from concurrent.futures import ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(time.sleep, LONG) for _ in range(2)]
        record(path, expect_descendants=2)
        wait(futures)


def setsid_child_job(path):
    """A grandchild that leaves the job's process group and session."""
    proc = subprocess.Popen(["sleep", str(int(LONG))], start_new_session=True)
    record(path, expect_descendants=1)
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


# by the kind of job, for parametrised tests
STOP_JOBS = {
    "sleep": sleep_job,
    "spin": spin_job,
    "gil_c": gil_c_job,
}
TREE_JOBS = {
    "mp_child": mp_child_job,
    "popen": popen_job,
    "nested_pool": nested_pool_job,
}


def tree(path, detached=False):
    """Start a child (a forked Python sleeper, or a ``sleep`` in its own
    session), record the tree, then run until stopped."""
    if detached:
        proc = subprocess.Popen(["sleep", str(int(LONG))], start_new_session=True)
        proc.returncode = 0  # the kill reaps it, not us; keep Popen.__del__ quiet
    else:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                time.sleep(LONG)
            finally:
                os._exit(0)
    record(path, expect_descendants=1)
    time.sleep(LONG)


def wrapped_tree(path, children=1):
    """A job with ``children`` sleeping subprocesses (one of them in its own
    session when there are two), recorded, then runs until stopped."""
    procs = [
        subprocess.Popen(["sleep", str(int(LONG))], start_new_session=bool(n % 2))
        for n in range(children)
    ]
    record(path, expect_descendants=children)
    for proc in procs:
        proc.wait()


def marked_children(marker, children=2):
    """Start ``children`` subprocesses ``sleep <marker>`` (every second one in
    its own session) as fast as possible, then run until stopped. The test
    finds them by the marker, so even ones started as the kill lands count."""
    procs = [
        subprocess.Popen(["sleep", marker], start_new_session=bool(n % 2)) for n in range(children)
    ]
    for proc in procs:
        proc.wait()
    time.sleep(LONG)


def nested_stdlib_pool_job(path):
    """A job with a stdlib ProcessPoolExecutor whose workers start children."""
    from concurrent.futures import ProcessPoolExecutor

    from procs import read_record

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

    from procs import read_record

    with cancelk.ProcessPoolExecutor(2, mp_context="fork") as pool:
        for i in range(2):
            pool.submit(popen_job, f"{path}.{i}")
        for i in range(2):
            read_record(f"{path}.{i}")
        record(path, expect_descendants=5)  # supervisor, two runners, two sleeps
        time.sleep(LONG)


def record_then(path, seconds, value):
    """Record, then finish after ``seconds`` with ``value``."""
    record(path)
    time.sleep(seconds)
    return value


def leave_detached_child(path):
    """Start a child in its own session and return at once, leaving it running."""
    proc = subprocess.Popen(["sleep", str(int(LONG))], start_new_session=True)
    record(path, expect_descendants=1)
    proc.returncode = 0  # do not let Popen.__del__ warn; the pool must clean it up
    return proc.pid


def signal_parent_job(path, signum):
    """Record, interrupt the process waiting for us, then never finish."""
    record(path)
    os.kill(os.getppid(), signum)
    time.sleep(LONG)


# --------------------------------------------------------------------------
# whole trees (I4, I6): every shape of process a job may start
#
# Each process of the tree reports its own pid over a pipe, so a process that
# left the job's tree (setsid, double fork) is recorded too, whoever its
# parent is now.

TREE_KINDS = (
    "child",  # a plain forked child
    "grandchild",  # a child that forks a grandchild
    "own_group",  # a child that moved to its own process group (setpgid)
    "setsid",  # a child that started its own session
    "daemon",  # double fork: fork, setsid, fork, the middle process exits
    "popen_new_session",  # a child whose subprocess.Popen(start_new_session=True) grandchild
    "multiprocessing",  # a multiprocessing (fork) child
)
TREE_SIZE = {  # processes each kind leaves running, besides the job itself
    "child": 1,
    "grandchild": 2,
    "own_group": 1,
    "setsid": 1,
    "daemon": 1,
    "popen_new_session": 2,
    "multiprocessing": 1,
}


def _report(fd: int, pid: int | None = None) -> None:
    os.write(fd, f"{os.getpid() if pid is None else pid}\n".encode())


def _sleep_forever() -> None:  # pragma: no cover - runs in a forked child
    try:
        time.sleep(LONG)
    finally:
        os._exit(0)


def _forked(body) -> int:
    """Fork a child that runs ``body()`` and never returns to the caller's code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            body()
        finally:
            os._exit(0)
    return pid


def _start(kind: str, fd: int) -> None:
    if kind == "child":
        _forked(lambda: (_report(fd), _sleep_forever()))
    elif kind == "grandchild":

        def middle():
            _report(fd)
            _forked(lambda: (_report(fd), _sleep_forever()))
            _sleep_forever()

        _forked(middle)
    elif kind == "own_group":
        _forked(lambda: (os.setpgid(0, 0), _report(fd), _sleep_forever()))
    elif kind == "setsid":
        _forked(lambda: (os.setsid(), _report(fd), _sleep_forever()))
    elif kind == "daemon":

        def middle():
            os.setsid()
            _forked(lambda: (_report(fd), _sleep_forever()))
            os._exit(0)

        os.waitpid(_forked(middle), 0)
    elif kind == "popen_new_session":

        def middle():
            _report(fd)
            proc = subprocess.Popen(["sleep", str(int(LONG))], start_new_session=True)
            _report(fd, proc.pid)
            _sleep_forever()

        _forked(middle)
    elif kind == "multiprocessing":
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(LONG,))
        child.start()
        _report(fd, child.pid)
    else:
        raise ValueError(kind)


def build_tree(path: str, kinds=TREE_KINDS) -> list[list[float]]:
    """Start every kind of process in ``kinds``; record them and the job in ``path``."""
    read_fd, write_fd = os.pipe()
    expected = sum(TREE_SIZE[k] for k in kinds)
    try:
        for kind in kinds:
            _start(kind, write_fd)
        data = b""
        deadline = time.monotonic() + 20
        while data.count(b"\n") < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {data!r} of {expected} processes reported")
            data += os.read(read_fd, 4096)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    pids = [os.getpid()] + [int(x) for x in data.split()]
    found = []
    for pid in pids:
        found.append([pid, psutil.Process(pid).create_time()])
    _dump_json(path, found)
    return found


def tree_job(path: str, kinds=TREE_KINDS) -> None:
    """Start a whole tree of processes, record it, then sleep."""
    build_tree(path, kinds)
    time.sleep(LONG)


def tree_spin_job(path: str, kinds=TREE_KINDS) -> None:
    """Start a whole tree, record it, then spin (no sleep) until stopped."""
    build_tree(path, kinds)
    while True:
        pass


def tree_then_return(path: str, seconds: float, kinds=TREE_KINDS) -> str:
    """Start a whole tree, record it, sleep ``seconds`` and return, leaving it running."""
    build_tree(path, kinds)
    time.sleep(seconds)
    return "returned"


# --------------------------------------------------------------------------
# I5: jobs that hold their GIL, stamped with the wall-clock time they started


def _stamp(path: str) -> None:
    created = psutil.Process().create_time()
    _dump_json(path, {"pid": os.getpid(), "created": created, "started": time.time()})


def stamped_job(path: str, kind: str) -> None:
    """Write ``{"pid", "started"}`` to ``path``, then never finish:
    ``sleep`` in time.sleep, ``c_sleep`` in a C sleep that holds the GIL,
    ``c_busy`` in a CPU-bound C loop (regex backtracking) that holds the GIL."""
    _stamp(path)
    if kind == "sleep":
        time.sleep(LONG)
    elif kind == "c_sleep":
        import ctypes

        ctypes.PyDLL(None).sleep(int(LONG))
    elif kind == "c_busy":
        import re

        re.match(r"(a+)+$", "a" * 64 + "b")  # exponential: years, all in C
    else:
        raise ValueError(kind)


# --------------------------------------------------------------------------
# jobs that die, or whose children die


def exit_with(code):
    os._exit(code)


def kill_self(signum):
    if signum == signal.SIGSEGV:
        _quiet_faults()
    os.kill(os.getpid(), signum)
    time.sleep(LONG)


def abort_job() -> None:
    _quiet_faults()
    os.abort()


def segfault_job() -> None:
    import ctypes

    _quiet_faults()
    ctypes.string_at(0)  # a real SIGSEGV (reads address 0), not a signal sent by kill


def sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(LONG)


def outcome_job(kind, token):
    """A job with every kind of outcome (I3), as ``kind`` says."""
    if kind == "result":
        return token
    if kind == "raise":
        raise RaceError(token)
    if kind == "exit":
        os._exit(7)
    if kind == "segv":
        _quiet_faults()
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind in ("sleep", "timeout", "cancel"):
        time.sleep(LONG)
    if kind == "spin":
        time.sleep(0.002)
        return token
    raise ValueError(kind)


def child_then_wait(path: str) -> int:
    """Start a child, record it, and return the child's exit status once it ends
    (the test SIGKILLs the child: the job itself must live on)."""
    proc = subprocess.Popen(["sleep", str(int(LONG))])
    record(path, expect_descendants=1)
    return proc.wait()


# --------------------------------------------------------------------------
# I9: jobs whose processes send signals around them


def sigterm_own_group() -> None:
    """SIGTERM to the job's whole process group (the job included)."""
    os.killpg(0, signal.SIGTERM)
    time.sleep(LONG)


def child_sigterms_its_parent() -> None:
    """A child of the job sends SIGTERM to its parent (the job)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.kill(os.getppid(), signal.SIGTERM)
        finally:
            os._exit(0)
    time.sleep(LONG)


def children_then_exit(count: int) -> None:
    """Start short-lived children (each a SIGCHLD for the job), then die."""
    procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(count)]
    for proc in procs:
        proc.wait()
    os._exit(5)


# --------------------------------------------------------------------------
# I2: a job checks, as it starts, that the runners before it were reaped


def _line(pid, created, alive_before):
    return f"{pid} {created!r} {' '.join(alive_before) or '-'}\n".encode()


def log_predecessors(path, seconds=0.0, check_last=6):
    """Append "pid create_time <earlier runners still present>" to ``path``.

    Earlier runners are the distinct pids of the last ``check_last`` lines
    (other than this process). One still present -- alive *or* a zombie, that
    is not reaped -- is written as "pid:status". Then sleep ``seconds`` and
    return this pid.
    """
    me = psutil.Process()
    seen = []
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in reversed(lines):
        pid_s, created_s = line.split()[:2]
        pid, created = int(pid_s), float(created_s)
        if pid == me.pid or any(pid == p for p, _ in seen):
            continue
        seen.append((pid, created))
        if len(seen) >= check_last:
            break
    alive = []
    for pid, created in seen:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.05:
                continue  # the pid names another process now
            alive.append(f"{pid}:{proc.status()}")
        except psutil.NoSuchProcess:
            continue
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, _line(me.pid, me.create_time(), alive))
    finally:
        os.close(fd)
    if seconds:
        time.sleep(seconds)
    return me.pid


def log_then(path, kind):
    """log_predecessors, then end as ``kind`` says."""
    pid = log_predecessors(path)
    if kind == "exit":
        os._exit(5)
    if kind in ("cancel", "timeout", "sigkill"):
        time.sleep(LONG)
    return pid


# --------------------------------------------------------------------------
# lifecycle


def sleep_with_child(seconds, path):
    """Start a ``sleep`` child, write both pids to ``path``, sleep, return."""
    child = subprocess.Popen(["sleep", str(int(LONG))])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{os.getpid()} {child.pid}\n")
    os.replace(tmp, path)
    time.sleep(seconds)
    child.kill()
    child.wait()
    return os.getpid()


def daemon_target(method, conn):
    """A pool used from a daemonic multiprocessing.Process: report to ``conn``."""
    import cancelk

    from procs import wait_pid_gone

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
            report["job_gone"] = not psutil.pid_exists(job_pid) or wait_pid_gone(job_pid)
    except BaseException as exc:  # report everything to the test
        report["error"] = repr(exc)
    conn.send(report)
    conn.close()


# --------------------------------------------------------------------------
# memory and deadlines (test_limits)


def grow(step_mb, steps, pause):
    """Touch ``step_mb`` more MB every ``pause`` seconds; the total reached."""
    held = []
    for _ in range(steps):
        held.append(b"\x01" * (step_mb * MB))  # written: resident, not just reserved
        time.sleep(pause)
    return sum(len(block) for block in held) // MB


def grow_in_child(step_mb, steps, pause):
    """The growth happens in a child process of the job: its tree counts."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=grow, args=(step_mb, steps, pause))
    child.start()
    child.join()
    return child.exitcode


def reserve_untouched(gigabytes):
    """Map ``gigabytes`` of address space without touching it; its length."""
    import mmap

    area = mmap.mmap(-1, gigabytes << 30)
    try:
        time.sleep(0.3)  # long enough for the memory watch to look
        return len(area) >> 30
    finally:
        area.close()


def mark_then_sleep(path, seconds):
    """Write ``path`` (proof that the job ran), then sleep."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return seconds


# --------------------------------------------------------------------------
# killable_wrapper's standby processes (the template and its idle standby)


def stop_standby_in_worker(directory: str, workers: int) -> int:
    """In a host worker: stop its killable_wrapper standby processes, then
    check in under ``directory`` and wait until ``workers`` workers did.
    Each worker blocks here, so ``workers`` such calls reach every worker."""
    from cancelk import wrapper

    getattr(wrapper, "stop_standby", lambda: None)()
    open(os.path.join(directory, str(os.getpid())), "w").close()
    deadline = time.monotonic() + RESULT_WAIT
    while len(os.listdir(directory)) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {os.listdir(directory)} of {workers} workers checked in")
        time.sleep(0.002)
    return os.getpid()


def standby_pids() -> dict[str, object]:
    """In a host: the pids of its template and of the idle standbys it knows of."""
    from cancelk import _standby

    template = _standby._template
    if template is None:
        return {"template": None, "ready": []}
    template.read_records(block=False)
    return {"template": template.pid, "ready": [pid for pid, _, _ in template.ready]}


def set_state(key: str, value: object) -> int:
    """A plain (unwrapped) function run by a host: it changes the host's memory."""
    STATE[key] = value
    return os.getpid()


def get_state(key: str) -> dict[str, object]:
    """The job's view of STATE[key], with its pid and parent."""
    return {"value": STATE.get(key), "pid": os.getpid(), "ppid": os.getppid()}


def import_in_host(name: str) -> bool:
    """A plain function run by a host: imports a module there (it was not, before)."""
    import importlib

    fresh = name not in sys.modules
    importlib.import_module(name)
    return fresh


def define_late_job(value: object) -> int:
    """A plain function run by a host: defines ``jobs.late_job`` there (after any
    standby template was forked, so the template's jobs module lacks it)."""

    def late_job():
        return value, os.getppid()

    late_job.__qualname__ = late_job.__name__ = "late_job"
    globals()["late_job"] = late_job
    return os.getpid()


def write_fd(fd: int, data: bytes) -> int:
    """Write to a descriptor the host opened: the job sees the host's fd table."""
    os.write(fd, data)
    return os.getpid()


def open_fds_of_job() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


def change_cwd(path: str) -> str:
    """A plain function run by a host: changes its working directory."""
    previous = os.getcwd()
    os.chdir(path)
    return previous


def cwd() -> str:
    return os.getcwd()


def fork_and_return(path):
    """Fork, and let the child *return* from the job's function first (no
    os._exit): only the job process's own return may become the result.
    The child's pid and start time are written to ``path``."""
    child = os.fork()
    if child == 0:
        with open(path, "w") as f:
            f.write(f"{os.getpid()} {psutil.Process().create_time()}")
        return "child"
    time.sleep(0.2)  # the child's return comes first
    return "parent"


def count_run(path, token, seconds=0.0):
    """Append ``token`` to the file at ``path`` (one line a run), sleep, return it."""
    with open(path, "a") as file:
        file.write(f"{token}\n")
    time.sleep(seconds)
    return token, os.getpid()


def exit_after(seconds, code):
    time.sleep(seconds)
    os._exit(code)
