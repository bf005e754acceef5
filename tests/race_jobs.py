"""Job functions for the race tests (I1, I2, I3, I7).

They live in this importable module, not in the test files, so that a
supervisor started by spawn or forkserver finds them by name.

Every job returns (or records) a unique token and the pid of the process that
ran it, so a test can tell exactly which job ran where and how it ended.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import psutil

LONG = 60.0  # how long "endless" jobs would run if nobody stopped them


# -------------------------------------------------------------------------
# jobs that return their token


def token_spin(token, seconds, size=0):
    """Busy for ``seconds`` (no sleep), then return (token, pid, size bytes)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return token, os.getpid(), b"r" * size


def token_sleep(token, seconds):
    time.sleep(seconds)
    return token, os.getpid()


def runner_pid():
    return os.getpid()


def gil_hold(seconds):
    """Sleep inside a C call that holds the GIL (the runner cannot read its channel)."""
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))
    return os.getpid()


def token_len(token, data):
    return token, len(data), os.getpid()


# -------------------------------------------------------------------------
# jobs with every kind of outcome (I3)


class RaceError(Exception):
    """A job's own exception."""


def outcome_job(kind, token):
    if kind == "result":
        return token
    if kind == "raise":
        raise RaceError(token)
    if kind == "exit":
        os._exit(7)
    if kind == "segv":
        import faulthandler

        faulthandler.disable()
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind in ("sleep", "timeout", "cancel"):
        time.sleep(LONG)
    if kind == "spin":
        time.sleep(0.002)
        return token
    raise ValueError(kind)


def init_fail_on_odd_pid(message):
    """An initializer that fails in about half of the runners."""
    if os.getpid() % 2:
        raise RaceError(message)


def init_fail_always(message):
    raise RaceError(message)


# -------------------------------------------------------------------------
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
