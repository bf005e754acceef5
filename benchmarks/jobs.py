"""The jobs the executor benchmark submits, in a module that imports nothing heavy.

Worker processes of every library (also spawned ones) import this module, so it
costs them nothing beyond a few stdlib modules already loaded.

A job that must tell the benchmark when it started writes one line

    <token> <pid> <time.monotonic_ns() at its start>

to a FIFO the benchmark reads (``Reports`` in probes.py).  One line is
a single write shorter than PIPE_BUF, so lines of concurrent jobs never mix.
CLOCK_MONOTONIC is one clock for every process of the machine.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

__all__ = [
    "KINDS",
    "PAYLOADS",
    "PAYLOAD_LABELS",
    "c_sleep",
    "echo_payload",
    "getpid",
    "hold",
    "identity",
    "import_numpy",
    "nap",
    "noop",
    "report",
    "sleep",
    "spin",
    "take_payload",
    "zeros",
]


def noop() -> None:
    return None


def identity(value: object) -> object:
    return value


def nap(seconds: float) -> None:
    """Sleep, saying nothing (the floor's runner kill needs no report)."""
    time.sleep(seconds)


def getpid() -> int:
    return os.getpid()


def import_numpy() -> None:
    """Pool initializer: what a scientific service's workers pay at start."""
    import numpy  # noqa: F401


def report(path: str, token: str) -> int:
    """Record the job's start: pid and monotonic clock, through the FIFO."""
    started = time.monotonic_ns()
    pid = os.getpid()
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, f"{token} {pid} {started}\n".encode())
    finally:
        os.close(fd)
    return pid


def sleep(path: str, token: str, seconds: float) -> None:
    """(a) waits in the kernel, the GIL released."""
    report(path, token)
    time.sleep(seconds)


def spin(path: str, token: str, seconds: float) -> None:
    """(b) pure Python, the GIL taken and released by the interpreter."""
    report(path, token)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def c_sleep(path: str, token: str, seconds: float) -> None:
    """(c) one C call that holds the GIL: no Python code of the process runs."""
    import ctypes

    report(path, token)
    ctypes.PyDLL(None).sleep(int(seconds))


def hold(path: str, token: str, release_path: str, limit_s: float) -> int:
    """Report, then keep this worker busy until the benchmark writes to ``release_path``."""
    pid = report(path, token)
    fd = os.open(release_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(int(limit_s * 1000))
    finally:
        os.close(fd)
    return pid


KINDS = {"sleep": sleep, "spin": spin, "c_sleep": c_sleep}


def zeros(n: int) -> bytes:
    """``bytes(n)``'s value with every page written, as a real payload's would be
    (``bytes(n)`` itself is calloc'ed: untouched zero pages that RSS does not count)."""
    return b"\0" * n


def echo_payload(data: bytes) -> bytes:
    """P9 argument and result: n bytes in, n bytes back."""
    return zeros(len(data))


def take_payload(data: bytes) -> int:
    """P9 argument only."""
    return len(data)


PAYLOADS: dict[str, Callable[..., object]] = {
    "both": echo_payload,
    "arg": take_payload,
    "result": zeros,
}
PAYLOAD_LABELS = {"both": "arg + result", "arg": "arg only", "result": "result only"}
