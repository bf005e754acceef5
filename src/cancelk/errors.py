"""Public exceptions of cancelk, and the remote-traceback carrier.

    job process --(pickled exception + formatted traceback)--> parent
    parent: raise job_exception from RemoteTraceback(text)

Every exception here pickles, so a runner can send it to the user process.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal as _signal
import traceback
from typing import Any

__all__ = [
    "PoolFullError",
    "ProcessCancelledError",
    "ProcessDiedError",
    "ProcessMemoryError",
    "ProcessTimeoutError",
    "RemoteTraceback",
    "ResultPicklingError",
]


class ProcessTimeoutError(concurrent.futures.TimeoutError):
    """The job ran past its time limit; every process of the job was killed."""


class ProcessCancelledError(concurrent.futures.CancelledError):
    """The job was cancelled; if it was running, every process of it was killed."""


class ProcessMemoryError(MemoryError):
    """The job's process tree held more resident memory than its limit; every
    process of the job was killed.  ``limit`` and ``peak`` are in bytes
    (``peak``: the most seen, None if unknown)."""

    def __init__(self, message: str, limit: int | None = None, peak: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.peak = peak

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.limit, self.peak))


class PoolFullError(RuntimeError):
    """``submit`` refused a job: ``max_pending`` jobs already wait for a runner."""


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class ProcessDiedError(Exception):
    """The job's process ended without delivering a result.

    ``signal`` is set when a signal ended it, ``exitcode`` when it exited.
    """

    def __init__(
        self,
        pid: int,
        exitcode: int | None = None,
        signal: int | None = None,
        detail: str | None = None,
    ) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.detail = detail
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.signal is not None:
            what = (
                f"job process {self.pid} was killed by {signal_name(self.signal)} "
                f"(signal {self.signal})"
            )
            if self.signal == _signal.SIGKILL and not self.detail:
                what += "; cancelk did not send it: it came from outside cancelk"
        elif self.exitcode is not None:
            what = f"job process {self.pid} exited with code {self.exitcode} without a result"
        else:
            what = f"job process {self.pid} ended without a result"
        if self.detail:
            what += f" ({self.detail})"
        return what

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pid, self.exitcode, self.signal, self.detail))


def oom_detail(kills: int) -> str | None:
    """What to say of the OOM killer, given how many processes it killed
    meanwhile (-1: unknown): only evidence makes it a likely cause."""
    if kills <= 0:
        return None
    return f"the kernel's OOM killer killed {kills} process(es) meanwhile: the likely cause"


def died_error(pid: int, status: int, detail: str | None = None) -> ProcessDiedError:
    """The error of a job whose process ended with wait status ``status``
    without delivering a result."""
    if os.WIFSIGNALED(status):
        return ProcessDiedError(pid, signal=os.WTERMSIG(status), detail=detail)
    return ProcessDiedError(pid, exitcode=os.WEXITSTATUS(status), detail=detail)


class ResultPicklingError(Exception):
    """The job's result or exception could not be pickled to send it back."""


class RemoteTraceback(Exception):
    """Carries the job's formatted traceback; attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def format_remote(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f'\n"""\n{text}"""'
