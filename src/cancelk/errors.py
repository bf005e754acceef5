"""Public exceptions of cancelk, and the remote-traceback carrier.

    job process --(pickled exception + formatted traceback)--> parent
    parent: raise job_exception from RemoteTraceback(text)

``RemoteTraceback`` is the stdlib pool's own ``_RemoteTraceback``, so code that
checks the cause's type keeps working.  Every exception here pickles, so a
runner can send it to the user process.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import functools
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
    """The job's result or exception could not be pickled, or not unpickled.

    The error is also an instance of the exception pickle raised (``TypeError``
    for a lock, ``pickle.PicklingError``, ``AttributeError`` for a local
    function...), so code written for the stdlib pool, where that exception
    itself reaches the future, still catches it.
    """

    def __str__(self) -> str:
        if len(self.args) == 1:
            return str(self.args[0])  # KeyError and friends would quote it
        return super().__str__()

    def __reduce__(self) -> tuple[Any, ...]:
        kind = type(self)
        base = kind.__bases__[1] if kind is not ResultPicklingError else None
        return (_rebuild_pickling_error, (base, str(self)))


def pickling_error(message: str, raised: BaseException) -> ResultPicklingError:
    """A ResultPicklingError that is also of the type of ``raised`` (what pickle
    raised), where such a type can be made; a plain one otherwise."""
    return _rebuild_pickling_error(type(raised), message)


def _rebuild_pickling_error(base: type | None, message: str) -> ResultPicklingError:
    kind = _with_base(base) if base is not None else None
    if kind is not None:
        try:
            error: ResultPicklingError = kind(message)
            if str(error) == message:
                return error
        except Exception:
            pass  # a base whose constructor wants other arguments
    return ResultPicklingError(message)


@functools.lru_cache(maxsize=64)
def _with_base(base: type) -> type[ResultPicklingError] | None:
    if not issubclass(base, Exception) or issubclass(base, ResultPicklingError):
        return None
    try:
        kind = type("ResultPicklingError", (ResultPicklingError, base), {})
    except TypeError:
        return None  # an incompatible layout or a final class
    kind.__module__ = __name__
    kind.__doc__ = ResultPicklingError.__doc__
    return kind


# The stdlib pool's carrier of the job's formatted traceback, attached as
# ``__cause__``: the same class, so ``isinstance(exc.__cause__,
# concurrent.futures.process._RemoteTraceback)`` holds for cancelk's jobs too.
_StdlibRemoteTraceback: Any = getattr(concurrent.futures.process, "_RemoteTraceback", None)


class _OwnRemoteTraceback(Exception):
    """Carries the job's formatted traceback; attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


RemoteTraceback: type[Exception] = _StdlibRemoteTraceback or _OwnRemoteTraceback


def format_remote(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f'\n"""\n{text}"""'
