"""Job functions for the fault-injection tests (I4, I5, I6, I8, I9).

They live in an importable module (not in the test files) so that runners of
spawn and forkserver supervisors find them by name.

Jobs that start processes write a *record* first: a JSON list of
``[pid, create_time]`` for the job and every process of its tree (see
``executor_jobs.read_record``). Each process of the tree reports its own pid
over a pipe, so a process that left the job's tree (setsid, double fork) is
recorded too, whoever its parent is now.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import psutil

LONG = 60.0  # how long "endless" processes would live if nobody stopped them

# The shapes of process a job may start (see tree_job).
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
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(found, handle)
    os.replace(tmp, path)
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


# -------------------------------------------------------------------------
# I5: jobs that hold their GIL, stamped with the wall-clock time they started


def _stamp(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        created = psutil.Process().create_time()
        json.dump({"pid": os.getpid(), "created": created, "started": time.time()}, handle)
    os.replace(tmp, path)


def stamped_job(path: str, kind: str) -> None:
    """Write ``{"pid", "started"}`` to ``path``, then never finish:
    ``sleep`` in time.sleep, ``c_sleep`` in a C sleep that holds the GIL,
    ``c_busy`` in a CPU-bound C loop (regex backtracking) that holds the GIL."""
    _stamp(path)
    if kind == "sleep":
        time.sleep(LONG)
    elif kind == "c_sleep":
        ctypes.PyDLL(None).sleep(int(LONG))
    elif kind == "c_busy":
        re.match(r"(a+)+$", "a" * 64 + "b")  # exponential: years, all in C
    else:
        raise ValueError(kind)


WATCHER = r"""
import json, os, sys, time
path, out = sys.argv[1], sys.argv[2]
print("ready", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(path):
    if time.monotonic() > deadline:
        sys.exit("no record")
    time.sleep(0.0002)
while True:
    try:
        with open(path) as f:
            pid = json.load(f)["pid"]
        break
    except ValueError:
        time.sleep(0.0002)
seen = time.time()
stat = f"/proc/{pid}/stat"
while True:
    try:
        with open(stat) as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        break
    if state in ("Z", "X"):
        break
    if time.monotonic() > deadline:
        sys.exit("never died")
    time.sleep(0.0002)
with open(out + ".tmp", "w") as f:
    json.dump({"pid": pid, "seen": seen, "gone": time.time()}, f)
os.replace(out + ".tmp", out)
"""


# -------------------------------------------------------------------------
# I8: jobs that die, or whose children die


def abort_job() -> None:
    import faulthandler

    faulthandler.disable()
    os.abort()


def segfault_job() -> None:
    import faulthandler

    faulthandler.disable()
    ctypes.string_at(0)  # a real SIGSEGV, not a signal sent by kill


def exit_job(code: int) -> None:
    os._exit(code)


def child_then_wait(path: str) -> int:
    """Start a child, record it, and return the child's exit status once it ends
    (the test SIGKILLs the child: the job itself must live on)."""
    proc = subprocess.Popen(["sleep", str(int(LONG))])
    found = [[os.getpid(), psutil.Process().create_time()], [proc.pid, 0.0]]
    found[1][1] = psutil.Process(proc.pid).create_time()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(found, handle)
    os.replace(tmp, path)
    return proc.wait()


def record_self_then_sleep(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump([[os.getpid(), psutil.Process().create_time()]], handle)
    os.replace(tmp, path)
    time.sleep(LONG)


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


# -------------------------------------------------------------------------
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


# -------------------------------------------------------------------------
# I6: a watcher process that kills the user process and times the deaths
#
# argv: a JSON file {"user": pid, "starts": {pid: start time in ticks}}, the
# output path, and "SIGKILL", "SIGTERM" or "exit" (wait for the user process
# to end by itself). It raises its own priority (SCHED_FIFO where allowed, a
# lower nice value otherwise) so that on a loaded machine its ~1 ms polling is
# not late itself; the processes it watches keep their normal priority.

DEATH_WATCHER = r"""
import json, os, signal, sys, time
spec_path, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
with open(spec_path) as f:
    spec = json.load(f)
user = spec["user"]
starts = {int(k): v for k, v in spec["starts"].items()}
priority = "normal"
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    priority = "SCHED_FIFO"
except (OSError, AttributeError):
    try:
        os.nice(-10)
        priority = "nice -10"
    except OSError:
        pass

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0].decode(), fields[19].decode()

def dead(pid, start):
    s = stat(pid)
    return s is None or s[0] in ("Z", "X") or s[1] != start

print("ready", flush=True)
sys.stdin.readline()
user_start = stat(user)[1]
if mode == "exit":
    while not dead(user, user_start):
        time.sleep(0.0005)
    t0 = time.monotonic()
    died = {user: 0.0}
else:
    starts[user] = user_start
    died = {}
    t0 = time.monotonic()
    os.kill(user, getattr(signal, mode))
limit = t0 + 5.0
while len(died) < len(starts | {user: 0}) and time.monotonic() < limit:
    now = time.monotonic() - t0
    for pid, start in starts.items():
        if pid not in died and dead(pid, start):
            died[pid] = now
    time.sleep(0.001)
with open(out + ".tmp", "w") as f:
    json.dump({"priority": priority, "died": {str(k): v for k, v in died.items()}}, f)
os.replace(out + ".tmp", out)
"""
