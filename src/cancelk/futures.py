"""cancelk's Future: a concurrent.futures.Future whose cancel() reaches a running job.

Future.cancel() --pending--> stdlib behaviour (cancelled, never runs)
                --running--> owner.cancel_running(future)
                               grace 0: kill decided now -> cancelled, True
                               grace g: kill in g seconds unless done -> False
result()/exception() on a cancelled future raise ProcessCancelledError.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, Protocol

from cancelk.errors import ProcessCancelledError

__all__ = ["Future"]


class _Owner(Protocol):
    def cancel_running(self, future: Future) -> bool | None: ...

    def cancelled_in_queue(self, future: Future) -> None: ...

    def claimed_pid(self, future: Future) -> int | None: ...

    def call_soon(self, call: Callable[[], object]) -> None: ...


class Future(concurrent.futures.Future):  # type: ignore[type-arg]
    """A future of a cancelk job: a ``concurrent.futures.Future`` whose
    ``cancel()`` also stops a running job.  ``pid`` is the job's process
    while it runs (once that process has taken it)."""

    def __init__(self, owner: _Owner | None = None) -> None:
        super().__init__()
        self._owner = owner
        self._cancel_reason = "the job was cancelled"

    @property
    def pid(self) -> int | None:
        """The pid of the process running the job, while it runs; else None.

        A job counts as running once it is on its way to a process (as in the
        stdlib), which may still be running the job before it; ``pid`` is
        None until that process has taken it."""
        if self._owner is None or not self.running():
            return None
        return self._owner.claimed_pid(self)

    def cancel(self) -> bool:
        """Cancel the job, even a running one; never blocks on the kill.

        - Queued: it will never run; returns True.
        - Running, with a grace of 0 (the default): every process of the job
          is SIGKILLed now; the future is cancelled at once (callbacks run,
          ``result()`` raises ``ProcessCancelledError``); returns True.
        - Running, with a ``ProcessCancelTimeout(g)`` grace: the job may
          still finish within g seconds (its real result or exception),
          else it is killed and ends cancelled; returns False, since the
          outcome is not decided yet.
        - Already finished: returns False, as in the stdlib.
        """
        if self._owner is None:
            return bool(super().cancel())
        while True:
            with self._condition:
                state = self._state
                if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                    return True
                if state == FINISHED:
                    return False
            if state == RUNNING:
                answer = self._owner.cancel_running(self)
                if answer is not None:
                    return answer
                continue  # its runner died before it began: queued again, cancelled there
            # Queued: cancelled at once, so wait() and as_completed() see it
            # now rather than when the pool would have reached it.  Only while
            # still PENDING: one the pool started meanwhile is cancelled as
            # running (looked at again), never marked as if it had not begun.
            reason = "the job was cancelled before it started"
            if self._mark_cancelled(reason, by_caller=True, queued=True):
                self._owner.cancelled_in_queue(self)
                return True

    def _start_running(self) -> bool | None:
        """The pool starts the job: PENDING -> RUNNING, False if it was
        cancelled (its pid is known once its runner claims it).  None, without
        waiting, if another thread holds this future's lock: the pool holds
        its own lock here, which that thread may be waiting for (a finalizer
        that submits from inside ``wait()``)."""
        if not self._condition.acquire(blocking=False):
            return None
        try:
            if self._state != PENDING:
                return False
            self._state = RUNNING
            return True
        finally:
            self._condition.release()

    def _hand_back(self, take_back: Callable[[], bool]) -> bool | None:
        """The pool takes the job off a runner that never claimed it: under
        this future's lock, ``take_back()`` (False: the runner has it) and
        RUNNING -> PENDING, so cancel() finds the job on its runner or
        queued, never between.  None: not taken back (also, without waiting,
        when another thread holds this future's lock, as _start_running);
        False: taken back, but cancelled meanwhile; True: PENDING again."""
        if not self._condition.acquire(blocking=False):
            return None
        try:
            if not take_back():
                return None
            if self._state != RUNNING:
                return False
            self._state = PENDING
            return True
        finally:
            self._condition.release()

    def _is_pending(self) -> bool:
        with self._condition:
            return bool(self._state == PENDING)

    def result(self, timeout: float | None = None) -> Any:
        """The job's result, waiting up to ``timeout`` seconds.

        Raises what the job raised (its remote traceback as the cause),
        ``ProcessTimeoutError`` if it ran past its ``ProcessTimeout``,
        ``ProcessDiedError`` if its process died, ``ProcessCancelledError``
        if it was cancelled.  A ``timeout`` here is only an alert, as in the
        stdlib: it raises ``TimeoutError`` and leaves the job running.
        """
        try:
            return super().result(timeout)
        except concurrent.futures.CancelledError as why:
            if isinstance(why, ProcessCancelledError):
                raise
            raise ProcessCancelledError(self._cancel_reason) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The job's exception (None if it returned), waiting up to ``timeout``
        seconds; as ``result()`` for timeouts and cancelled jobs."""
        try:
            return super().exception(timeout)
        except concurrent.futures.CancelledError as why:
            if isinstance(why, ProcessCancelledError):
                raise
            raise ProcessCancelledError(self._cancel_reason) from None

    def _mark_cancelled(self, reason: str, by_caller: bool = False, queued: bool = False) -> bool:
        """End a queued or running future as cancelled; False if it already ended
        (or, with ``queued``, if it is no longer PENDING).

        ``by_caller``: from ``cancel()``, which may run in a signal handler or
        a finalizer that interrupted this very thread inside ``wait()`` or
        ``as_completed()``, holding the lock of the waiter they installed.
        Those waiters are then told on the pool's manager thread, as the
        stdlib's pool tells them of a cancel on its own thread.
        """
        with self._condition:
            if self._state != PENDING and (queued or self._state != RUNNING):
                return False
            self._cancel_reason = reason
            later = by_caller and bool(self._waiters) and self._owner is not None
            self._state = CANCELLED if later else CANCELLED_AND_NOTIFIED
            if not later:
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
            self._condition.notify_all()
        if later:
            assert self._owner is not None
            self._owner.call_soon(self._notify_waiters_of_cancel)
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def _notify_waiters_of_cancel(self) -> None:
        with self._condition:
            if self._state != CANCELLED:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
