"""Task functions for the cancelk.dask tests.

They live in an importable module so that Dask ships them by reference: a
worker process (spawned by its nanny with the test's ``sys.path``) and the
cancelk runners under it import this module by name.  Tasks that must be
stopped write a *record* of their processes first (see jobs.record), so
the test can check with psutil that every one of them is gone.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

from jobs import record

LONG = 60  # seconds an "endless" task would run if nobody stopped it


def gil_sleep(seconds, path=None):
    """libc sleep() called while holding the GIL: no Python code of this
    process runs until it returns, so only an outside kill stops it."""
    if path is not None:
        record(path)
    ctypes.PyDLL(None).sleep(int(seconds))
    return seconds


def sleep_with_child(path, seconds=LONG):
    """Start a child process, record both, then wait for it."""
    child = subprocess.Popen(["sleep", str(int(seconds))])
    record(path, expect_descendants=1)
    child.wait()
    return "finished"


def timeout_first_try(marker, seconds=LONG):
    """Hang the first time (the marker file does not exist yet), return the second."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(seconds)
        return "first try"
    return "second try"


def job_facts():
    """Where the task runs, and whether the worker is reachable from there."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError as why:
        worker = f"unavailable: {why}"
    else:
        worker = "available"
    return {"pid": os.getpid(), "ppid": os.getppid(), "get_worker": worker}


class TaskError(Exception):
    """A task's own exception, with a second attribute to check it travels intact."""

    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code


def raise_task_error(message, code):
    raise TaskError(message, code)


def pid():
    return os.getpid()
