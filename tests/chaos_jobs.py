"""Job functions for test_chaos.py and test_wrapper_races.py.

They live in this importable module (never in a test file) so that every
process that may run them -- a runner forked from a cancelk supervisor started
with fork or spawn, a stdlib host worker (fork, forkserver, spawn), a job
forked by killable_wrapper -- finds them by name.

Jobs that start processes write a *record* (executor_jobs.record): a JSON list
of ``[pid, create_time]`` for the job's process and its descendants, so the
test can check with psutil that every one of them is gone after the stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

from executor_jobs import record

LONG = 60.0  # how long "endless" jobs would run if nobody stopped them


class ChaosError(Exception):
    """A job's own exception, carrying the job's number."""


def _quiet_faults():
    import faulthandler

    faulthandler.disable()  # no "Fatal Python error" dump on the test's stderr


# -------------------------------------------------------------------------
# jobs with a definite outcome


def value(i):
    """The exact result of an untouched job: derived from i, with the pid."""
    return i * 7 + 1, os.getpid()


def raise_chaos(i):
    raise ChaosError(i)


def exit_code(code):
    os._exit(code)


def segfault():
    _quiet_faults()
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    time.sleep(LONG)


def sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(LONG)


def sleep_forever(path=None):
    """Runs until stopped; with a path, records itself first."""
    if path is not None:
        record(path)
    time.sleep(LONG)


def work(seconds, i, spin=False):
    """Busy (spin) or idle (sleep) for ``seconds``, then the exact result."""
    if spin:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    else:
        time.sleep(seconds)
    return i * 7 + 1, os.getpid()


def work_or_raise(seconds, i):
    """Like work, but ends with the job's own exception."""
    time.sleep(seconds)
    raise ChaosError(i)


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


# -------------------------------------------------------------------------
# for killable_wrapper in a stdlib host pool


def spin_value(seconds, i):
    """Spin for ``seconds`` (no sleep), then the exact result with the pid."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return i * 7 + 1, os.getpid()


def host_pid():
    """The host worker's pid (run it directly, not through killable_wrapper)."""
    return os.getpid()


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
