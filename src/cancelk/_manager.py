"""The manager: what callers of a pool touch, from any thread or context.

    submit()   ─► Manager.submit: a command into the intake; run at once if
                  the lock is free (the common case: dispatched before submit
                  returns), else by the lock's holder or the manager thread
    cancel()   ─► Manager.cancel_running ─► Pool.cancel_running: no lock at all
    shutdown() ─► a command, then the manager thread is joined
    stats()    ─► read under the lock

    Manager ── owns ──► Pool (_pool: the logic)
                        PoolLock + intake
                        ManagerThread (_manager_thread: the descriptors, the
                          loop, the supervisor), started by the first submit

A signal handler or a finalizer may call submit() or cancel() while its own
thread is inside pool code holding the lock: it finds the lock's depth above
zero and leaves its command to the holder instead of waiting for itself, so
nothing deadlocks (a SIGTERM handler stopping jobs during submit(), a __del__
run by the cyclic GC inside the manager loop).
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import weakref
from collections import deque
from concurrent.futures.process import BrokenProcessPool

from cancelk._manager_thread import Command, ManagerThread, PoolLock, run_completions
from cancelk._pool import Completion, Job, fail
from cancelk.futures import Future
from cancelk.supervisor import SupervisorConfig


class Manager:
    """Everything an executor owns at run time; its ``options()`` views share it."""

    def __init__(self, method: str, config: SupervisorConfig) -> None:
        self.intake: deque[Command] = deque()
        self.lock = PoolLock()
        self.io = ManagerThread(self.lock, self.intake, method, config)
        self.pool = self.io.pool
        self._start_lock = threading.RLock()
        self._starting = False
        self.started = False
        self.closing = False  # shutdown() was called: submit() refuses
        self.forked_away = False
        _live_managers.add(self)

    # -- submitting -------------------------------------------------------------------
    def submit(self, job: Job, module: str | None) -> None:
        """Queue or dispatch a job; raises if the pool takes no more jobs."""
        self.check_usable()
        self._ensure_started()
        refused: list[bool] = []

        def accept(out: list[Completion]) -> None:
            if self.io.stopped:
                refused.append(True)
                out.append(functools.partial(fail, job.future, _after_shutdown()))
                return
            if module is not None:
                self.io.note_module(module)
            self.pool.accept(job, out)

        self._run(accept)
        if refused:
            raise _after_shutdown()

    def count_refused_submit(self) -> None:
        """A submit whose arguments did not pickle still counts as submitted,
        and starts the pool as any submit does (the stdlib's starts its workers)."""
        self._ensure_started()
        self._run(lambda out: self.pool.count_submitted())

    def check_usable(self) -> None:
        self._check_not_forked()
        broken = self.pool.broken
        if broken is not None:
            raise BrokenProcessPool(f"the pool is broken: {broken}") from broken
        if self.closing:
            raise _after_shutdown()

    def _check_not_forked(self) -> None:
        # A forked child holds a copy of the pool: its jobs, words and
        # processes are the parent's, and only the parent may stop them.
        if self.forked_away:
            raise RuntimeError("this cancelk executor belongs to the parent process")

    def _ensure_started(self) -> None:
        if self.started:
            return
        with self._start_lock:
            # Re-entered from a signal handler or finalizer during the start:
            # the outer call finishes it and then runs the intake.
            if self.started or self._starting:
                return
            self._starting = True
            try:
                self.io.open()
                self.io.start()
                self.started = True
            finally:
                self._starting = False

    # -- cancelling, stopping, counting ---------------------------------------------------
    def cancel_running(self, future: Future) -> bool:
        """Future.cancel() of a running job; never takes the lock."""
        self._check_not_forked()
        job: Job | None = getattr(future, "_cancelk_job", None)
        if job is None or not self.pool.cancel_running(job):
            return future.cancelled()
        # Another cancel, or the job's exit seen by the manager thread, may
        # have marked it already: every caller gets the same True.
        reason = "the job was cancelled; its processes were killed"
        return future._mark_cancelled(reason) or future.cancelled()

    def shutdown(self, wait: bool, cancel_futures: bool, timeout: float | None) -> None:
        if self.forked_away:
            return
        self.closing = True
        self._run(functools.partial(self.pool.begin_shutdown, cancel_futures))
        if not self.started:
            return
        self.io.wake()
        if not wait or self.io is threading.current_thread():
            return
        if timeout is not None:
            self.io.join(timeout)
            if self.io.is_alive():
                self.kill_everything("shutdown timeout")
        self.io.join()

    def kill_everything(self, reason: str) -> None:
        """Cancel what is queued and kill what runs; the pool then stops."""
        self._check_not_forked()
        self.closing = True
        self._run(functools.partial(self.pool.kill_everything, reason))
        self.io.wake()

    def stats(self) -> dict[str, int]:
        with self.lock.rlock:  # read-only: safe even when re-entered
            return self.pool.stats()

    # -- the intake -------------------------------------------------------------------------
    def _run(self, command: Command) -> None:
        self.intake.append(command)
        self._drain_intake()

    def _drain_intake(self) -> None:
        """Run queued commands now, unless this thread already holds the lock
        (a signal handler or finalizer inside pool code): its holder runs them."""
        while self.intake:
            out: list[Completion] = []
            with self.lock.rlock:
                if self.lock.depth:
                    self.io.wake()  # the manager thread runs them if the holder does not
                    return
                self.lock.depth += 1
                try:
                    while self.intake:
                        self.intake.popleft()(out)
                finally:
                    self.lock.depth -= 1
            run_completions(out)

    # -- forks ----------------------------------------------------------------------------
    def forget_after_fork(self) -> None:
        """In a forked child: the parent's pool is not ours to use or stop."""
        self.forked_away = True
        self.io.abandon()
        self.lock = PoolLock()  # the parent's may have been held at the fork


def _after_shutdown() -> RuntimeError:
    return RuntimeError("cannot schedule new futures after shutdown")


_live_managers: weakref.WeakSet[Manager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for manager in list(_live_managers):
        manager.forget_after_fork()


def _shutdown_at_exit() -> None:
    for manager in list(_live_managers):
        manager.shutdown(wait=True, cancel_futures=False, timeout=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)
