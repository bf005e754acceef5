"""Compatibility shims: the stdlib pool's private attributes that code in the wild reads.

    executor._processes              {runner pid: RunnerHandle}, a snapshot
    executor._mp_context             the multiprocessing context of the start method
    executor._max_workers            as given (or the default)
    executor._broken                 False, or the message of what broke the pool
    executor._executor_manager_thread  the pool's manager thread (None before the start)
    executor._call_queue             .join_thread(): waits for that thread's end

These are not cancelk's API.  They exist so that code written against
``concurrent.futures.ProcessPoolExecutor`` (and CPython's own tests of it)
keeps working after the import is changed.  A ``RunnerHandle`` stops only
its runner and the job running there (``ProcessDiedError``); the pool
replaces the runner and goes on, unlike the stdlib's, which breaks.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING

from cancelk import _protocol
from cancelk._pool import Placement

if TYPE_CHECKING:
    from cancelk._manager import Manager

_RUNNERS_WAIT = 5.0  # how long _processes waits for a starting pool's runners


class RunnerHandle:
    """One runner of a cancelk pool, seen as a ``multiprocessing.Process``."""

    def __init__(self, manager: Manager, slot: int, runner_id: int, pid: int) -> None:
        self._manager = manager
        self._slot = slot
        self._runner_id = runner_id
        self.pid = pid
        self.name = f"cancelk-runner-{slot}"
        self.daemon = True
        self._status: int | None = None
        self._gone = threading.Event()

    def __repr__(self) -> str:
        state = "started" if self.is_alive() else f"stopped exitcode={self.exitcode}"
        return f"<RunnerHandle name={self.name!r} pid={self.pid} {state}>"

    def is_alive(self) -> bool:
        return not self._gone.is_set()

    @property
    def exitcode(self) -> int | None:
        """None while it runs; then as ``Process.exitcode``: the exit code, or
        minus the signal that ended it."""
        if not self._gone.is_set():
            return None
        if self._status is None:  # it died with its supervisor, or at the pool's stop
            return -signal.SIGKILL
        return os.waitstatus_to_exitcode(self._status)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the runner has been reaped (or ``timeout`` passed)."""
        self._gone.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the runner and its job's tree; that job fails with
        ProcessDiedError, and the pool starts a new runner in its place."""
        if self._gone.is_set():
            return
        io = self._manager.io
        io.handles.stopping(self._runner_id)
        io.kill_now(Placement(self._slot, self._runner_id, self.pid, 0, 0))
        io.send_control(_protocol.KillRunner(self._slot, self._runner_id))

    def terminate(self) -> None:
        """The same as ``kill()``: cancelk stops processes with SIGKILL only."""
        self.kill()

    def _ended(self, status: int | None) -> None:
        self._status = status
        self._gone.set()


class RunnerHandles:
    """The handles given out, by runner id, so the manager thread can tell
    each one when its runner is reaped.  Weak: nothing grows with runners."""

    def __init__(self) -> None:
        self._live: weakref.WeakValueDictionary[int, RunnerHandle] = weakref.WeakValueDictionary()
        self._stopping: set[int] = set()
        self._lock = threading.Lock()

    def get(self, manager: Manager, slot: int, runner_id: int, pid: int) -> RunnerHandle:
        with self._lock:
            handle = self._live.get(runner_id)
            if handle is None:
                handle = RunnerHandle(manager, slot, runner_id, pid)
                self._live[runner_id] = handle
            return handle

    def stopping(self, runner_id: int) -> None:
        with self._lock:
            self._stopping.add(runner_id)

    def exited(self, runner_id: int, status: int | None) -> str | None:
        """The runner was reaped; the detail its job's error should carry."""
        with self._lock:
            handle = self._live.pop(runner_id, None)
            stopped = runner_id in self._stopping
            self._stopping.discard(runner_id)
        if handle is not None:
            handle._ended(status)
        if stopped:
            return "its runner was stopped through executor._processes"
        return None

    def all_exited(self) -> None:
        """Every runner is gone (the supervisor died or was stopped)."""
        with self._lock:
            handles = list(self._live.values())
            self._live.clear()
            self._stopping.clear()
        for handle in handles:
            handle._ended(None)


def wait_until_started(manager: Manager, timeout: float = _RUNNERS_WAIT) -> None:
    """Wait until a pool that was started has its runners (at most ``timeout``
    seconds; at once if it was not started, is stopping or is broken)."""
    if not manager.started or not _may_wait(manager):
        return
    pool, io = manager.pool, manager.io
    deadline = time.monotonic() + timeout
    # Runners start on demand: wait for those asked for, and, while the
    # supervisor is still starting, for those its queue will ask for.
    while (
        (
            any(slot.coming for slot in pool.slots)
            or (not io.supervisor_ready and len(pool.pending) > pool.ended_in_queue)
        )
        and not io.stopped
        and pool.broken is None
        and not pool.shutting_down
        and time.monotonic() < deadline
    ):
        time.sleep(0.001)


def _may_wait(manager: Manager) -> bool:
    """Not on the manager thread (a done-callback), nor where this thread
    holds the pool's lock (a signal handler inside pool code): the runners
    are reported by the manager thread, under that lock."""
    if manager.io is threading.current_thread():
        return False
    owned = getattr(manager.lock.rlock, "_is_owned", None)
    return not (owned is not None and owned())


def processes(manager: Manager) -> dict[int, RunnerHandle]:
    """``executor._processes``: the pool's runners now.

    A pool that is starting has its runners reported a moment after the
    submit that started it; this waits for them (at most a few seconds), as
    the stdlib's pool has its workers started when ``submit`` returns.
    """
    wait_until_started(manager)
    if not manager.started:
        return {}
    pool, io = manager.pool, manager.io
    found = {}
    for slot in list(pool.slots):
        runner_id, pid = slot.runner_id, slot.pid
        if slot.connected and pid and not io.stopped:
            found[pid] = io.handles.get(manager, slot.index, runner_id, pid)
    return found


class CallQueueView:
    """``executor._call_queue``: only what code reaches for after a shutdown."""

    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    def join_thread(self) -> None:
        """Wait until the pool has handed out its last job and stopped (the
        stdlib's waits for the thread that feeds its call queue, which must
        have been closed by a shutdown first)."""
        if not self._manager.closing:
            raise AssertionError("the pool was not shut down: its call queue is not closed")
        if self._manager.started and self._manager.io is not threading.current_thread():
            self._manager.io.join()

    def close(self) -> None:
        """Nothing to close: cancelk has no call queue."""

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: cancelk has no call queue."""
