"""cancelk's Future: a concurrent.futures.Future whose cancel() reaches a running job.

Future.cancel() --pending--> stdlib behaviour (cancelled, never runs)
                --running--> owner.cancel_running(future)
                               grace 0: kill decided now -> cancelled, True
                               grace g: kill in g seconds unless done -> False
result()/exception() on a cancelled future raise ProcessCancelledError.
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, RUNNING
from typing import Any, Protocol

from cancelk.errors import ProcessCancelledError

__all__ = ["Future"]


class _Owner(Protocol):
    def cancel_running(self, future: Future) -> bool: ...


class Future(concurrent.futures.Future):  # type: ignore[type-arg]
    """A future of a cancelk job; ``pid`` is the job's process while it runs."""

    def __init__(self, owner: _Owner | None = None) -> None:
        super().__init__()
        self._owner = owner
        self._job_pid: int | None = None
        self._cancel_reason = "the job was cancelled"

    @property
    def pid(self) -> int | None:
        return self._job_pid if self.running() else None

    def cancel(self) -> bool:
        with self._condition:
            state = self._state
        if state == RUNNING and self._owner is not None:
            return self._owner.cancel_running(self)
        return bool(super().cancel())

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        except concurrent.futures.CancelledError as why:
            if isinstance(why, ProcessCancelledError):
                raise
            raise ProcessCancelledError(self._cancel_reason) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except concurrent.futures.CancelledError as why:
            if isinstance(why, ProcessCancelledError):
                raise
            raise ProcessCancelledError(self._cancel_reason) from None

    def mark_cancelled(self, reason: str) -> bool:
        """End a running future as cancelled (its job was killed); False if already done."""
        with self._condition:
            if self._state in (FINISHED, CANCELLED_AND_NOTIFIED) or self.cancelled():
                return False
            self._cancel_reason = reason
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True
