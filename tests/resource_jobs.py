"""Job functions for the bad-data, resource and lifecycle reliability tests
(test_bad_data.py, test_i10_resources.py, test_lifecycle_faults.py).

They live in this importable module, not in the test files, so that a runner
forked from a supervisor started by fork, forkserver or spawn finds them by
name (pytest puts tests/ on ``sys.path``; cancelk passes it on).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

import psutil

LONG = 60.0


# -------------------------------------------------------------------------
# plain jobs


def getpid():
    return os.getpid()


def add(a, b):
    return a + b


def token_pid(token):
    """Return ``token`` and the pid that ran it (who ran what, for I1 checks)."""
    return token, os.getpid()


def sleep_return(seconds, value=None):
    time.sleep(seconds)
    return value


def exit_with(code):
    os._exit(code)


class MixedJobError(Exception):
    """The exception of the 'raise' kind in the mixed-outcome run."""


def raise_mixed(n):
    raise MixedJobError(n)


def echo_kind(value):
    """Return the type name of the argument the runner received."""
    return type(value).__name__


# -------------------------------------------------------------------------
# bad data: things that do not pickle, or do not unpickle


class Unloadable:
    """Pickles fine, but unpickling calls ``__init__`` one argument short."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __reduce__(self):
        return (Unloadable, (self.a,))


class NeedsTwoError(Exception):
    """An exception whose default pickling drops an argument: unpickling it
    (in the user process) fails with TypeError from ``__init__``."""

    def __init__(self, a, b):
        super().__init__(f"needs two: {a}/{b}")
        self.a, self.b = a, b


class RefusesPicklingError(Exception):
    """An exception whose pickling itself raises (``__reduce__`` raises)."""

    def __reduce__(self):
        raise RuntimeError("RefusesPicklingError refuses to be pickled")


class RefusesPickling:
    """A result whose pickling raises a non-TypeError exception."""

    def __reduce__(self):
        raise RuntimeError("RefusesPickling refuses to be pickled")


class KillsOnUnpickle:
    """An argument whose unpickling (in the runner) ends the runner process."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (os._exit, (self.code,))


def raise_needs_two():
    raise NeedsTwoError("a", "b")


def raise_refuses_pickling():
    raise RefusesPicklingError("boom")


def raise_holding_a_lock():
    err = ValueError("holds a lock")
    err.lock = threading.Lock()
    raise err


def return_lock():
    return threading.Lock()


def return_generator():
    return (i for i in range(3))


def return_unloadable():
    return Unloadable(1, 2)


def return_refuses_pickling():
    return RefusesPickling()


def return_ghost():
    """Return an instance of a class that exists only in the runner: the user
    process cannot find it by name when it unpickles the result."""
    import resource_jobs

    ghost = type("Ghost", (), {"__module__": "resource_jobs"})
    resource_jobs.Ghost = ghost
    return ghost()


# -------------------------------------------------------------------------
# big data


def pattern(size, seed):
    """``size`` bytes that depend on ``seed`` (so a result from another job
    cannot pass for this one)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def digest(data):
    return hashlib.sha256(data).hexdigest()


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


# -------------------------------------------------------------------------
# lifecycle


def sleep_with_child(seconds, path):
    """Start a ``sleep`` child, record both pids in ``path``, sleep, return."""
    child = subprocess.Popen(["sleep", str(int(LONG))])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{os.getpid()} {child.pid}\n")
    os.replace(tmp, path)
    time.sleep(seconds)
    child.kill()
    child.wait()
    return os.getpid()
