"""Clocks and probes of the executor benchmark: when a job started, when it was gone.

    Reports   a FIFO through which jobs write ``token pid monotonic_ns`` at their start
    Release   a FIFO that ``jobs.hold`` jobs wait on until the benchmark writes to it
    Gone      when a process exited: its pidfd became readable (zombie counts as gone),
              else /proc polled
    DoneClock a done-callback stamping when a future completed

CLOCK_MONOTONIC is one clock for every process of the machine, so a job's own
stamp and the benchmark's can be subtracted.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import math
import os
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["DoneClock", "Gone", "Release", "Reports", "now_ns", "outcome_name"]


def now_ns() -> int:
    return time.monotonic_ns()


class Reports:
    """The FIFO through which jobs report ``token pid start_ns``."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cancelk-bench-")
        self.path = os.path.join(self.dir, "starts")
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer keeps the FIFO from reporting hang-up between jobs.
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)
        self._partial = b""
        self.seen: dict[str, tuple[int, int]] = {}
        self._tokens = itertools.count(1)
        self._releases = itertools.count(1)

    def token(self) -> str:
        return f"t{next(self._tokens)}"

    def _pump(self, timeout_ms: int) -> None:
        if not self._poller.poll(timeout_ms):
            return
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            token, pid, started = line.decode().split()
            self.seen[token] = (int(pid), int(started))

    def collect(self, tokens: Sequence[str], timeout_s: float) -> dict[str, tuple[int, int]]:
        """Wait until every token reported (or the timeout); what was seen."""
        until = now_ns() + int(timeout_s * 1e9)
        while True:
            missing = [token for token in tokens if token not in self.seen]
            left_ms = (until - now_ns()) / 1e6
            if not missing or left_ms <= 0:
                return {token: self.seen[token] for token in tokens if token in self.seen}
            self._pump(max(1, math.ceil(left_ms)))

    def wait(self, token: str, timeout_s: float) -> tuple[int, int] | None:
        """(pid, start ns) of the job with ``token``; None if it did not start in time."""
        return self.collect([token], timeout_s).get(token)

    def release_channel(self) -> Release:
        return Release(os.path.join(self.dir, f"release{next(self._releases)}"))

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._keep)
        shutil.rmtree(self.dir, ignore_errors=True)


class Release:
    """A FIFO that ``jobs.hold`` jobs wait on until one byte is written to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.mkfifo(path)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._write = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

    def open(self) -> None:
        os.write(self._write, b"x")  # stays in the pipe: every waiting job sees POLLIN

    def close(self) -> None:
        os.close(self._write)
        os.close(self._read)
        os.unlink(self.path)


def _proc_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return not fields or fields[0] in (b"Z", b"X")


class Gone:
    """When a process exited (zombie or reaped): pidfd readiness, else /proc polling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        self.at: int | None = None
        self.already = False
        try:
            self.fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
        except ProcessLookupError:
            self.at, self.already = now_ns(), True
        except (AttributeError, OSError):
            self.fd = None

    def wait(self, until_ns: int) -> int | None:
        """Monotonic ns at which the process was seen gone; None if alive at ``until_ns``."""
        if self.at is not None:
            return self.at
        if self.fd is not None:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            while True:
                left_ms = (until_ns - now_ns()) / 1e6
                if poller.poll(max(0, math.ceil(left_ms))):
                    self.at = now_ns()
                    return self.at
                if left_ms <= 0:
                    return None
        while now_ns() < until_ns:
            if _proc_gone(self.pid):
                self.at = now_ns()
                return self.at
            time.sleep(0.0001)
        return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class DoneClock:
    """A done-callback that stamps when the future completed."""

    def __init__(self) -> None:
        self.at: int | None = None
        self._event = threading.Event()

    def __call__(self, _future: Any) -> None:
        if self.at is None:
            self.at = now_ns()
        self._event.set()

    def wait(self, until_ns: int) -> int | None:
        self._event.wait(max(0.0, (until_ns - now_ns()) / 1e9))
        return self.at


def outcome_name(future: cf.Future[Any]) -> str:
    if future.cancelled():
        return "cancelled"
    try:
        error = future.exception(timeout=0)
    except BaseException as why:  # cancelk raises ProcessCancelledError here
        return type(why).__name__
    return "result" if error is None else type(error).__name__
