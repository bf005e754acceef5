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
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from cancelk._manager_thread import Command, ManagerThread, PoolLock, run_completions
from cancelk._pool import Completion, Job, fail
from cancelk.errors import PoolFullError
from cancelk.futures import Future
from cancelk.supervisor import SupervisorConfig


class Manager:
    """Everything an executor owns at run time; its ``options()`` views share it."""

    def __init__(
        self, method: str, config: SupervisorConfig, max_pending: int | None = None
    ) -> None:
        self.intake: deque[Command] = deque()
        self.lock = PoolLock()
        self.io = ManagerThread(self.lock, self.intake, method, config, max_pending)
        self.pool = self.io.pool
        self._start_lock = threading.RLock()
        self._starting = False
        self.started = False
        self.closing = False  # shutdown() was called: submit() refuses
        self.forked_away = False
        _live_managers.add(self)

    # -- submitting -------------------------------------------------------------------
    def submit(self, job: Job, module: str | None) -> None:
        """Queue or dispatch a job; raises if the pool takes no more jobs.

        If the command runs later (this thread already held the lock), a
        refusal reaches the caller as the future's exception instead."""
        self.check_usable()
        if not self.started:
            self._ensure_started()
        lock = self.lock
        out: list[Completion] = []
        with lock.rlock:
            direct = not lock.depth and not self.intake  # else: through the intake, in order
            if direct:
                lock.depth += 1
                try:
                    refused = self._accept(job, module, out)
                finally:
                    lock.depth -= 1
        if not direct:
            answers: list[Exception | None] = []
            self._run(lambda out: answers.append(self._accept(job, module, out)))
            refused = answers[0] if answers else None
        if out:
            run_completions(out)
        if refused is not None:
            raise refused

    def _accept(self, job: Job, module: str | None, out: list[Completion]) -> Exception | None:
        """Take the job; what refused it, if anything (its future fails with it)."""
        why: Exception
        if self.io.stopped:
            # Broken after this submit's check_usable(): the pool stopped
            # because it broke, not because the caller shut it down.
            broken = self.pool.broken
            why = _after_shutdown() if broken is None else _broken_error(broken)
        else:
            if module is not None:
                self.io.note_module(module)
            try:
                self.pool.accept(job, out)
                return None
            except PoolFullError as full:
                why = full
        out.append(functools.partial(fail, job.future, why))
        return why

    def count_refused_submit(self) -> None:
        """A submit whose arguments did not pickle still counts as submitted (and
        failed), and starts the pool as any submit does (the stdlib's starts its
        workers)."""
        self._ensure_started()
        self._run(lambda out: self.pool.count_refused())

    def check_usable(self) -> None:
        """Raise if no job may be submitted; one test in the usual case (every submit)."""
        broken = self.pool.broken
        if not (self.forked_away or self.closing or broken is not None):
            return
        self._check_not_forked()
        if broken is not None:
            raise _broken_error(broken)
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
    def cancel_running(self, future: Future) -> bool | None:
        """Future.cancel() of a running job; never takes the lock.  None: the
        job is queued again (its runner died before it began)."""
        self._check_not_forked()
        job: Job | None = getattr(future, "_cancelk_job", None)
        if job is None:
            return future.cancelled()
        decided = self.pool.cancel_running(job)
        if decided is None:
            return None
        if not decided:
            return future.cancelled()
        # Marked before it is counted: counting unlinks the job from the
        # future, and a concurrent cancel() that then finds no job answers
        # from the future's state, which must already say cancelled.
        if job.taken_back:
            reason = "the job was cancelled before its runner began it"
        else:
            reason = "the job was cancelled; its processes were killed"
        answer = future._mark_cancelled(reason, by_caller=True) or future.cancelled()
        self._post(lambda out: self.pool.count_cancelled(job))
        return answer

    def claimed_pid(self, future: Future) -> int | None:
        job: Job | None = getattr(future, "_cancelk_job", None)
        return None if job is None else self.pool.claimed_pid(job)

    def call_soon(self, call: Callable[[], object]) -> None:
        """Run ``call`` on the manager thread, outside the lock; from any context."""
        if self.forked_away:
            call()
        else:
            self.io.call_soon(call)

    def cancelled_in_queue(self, future: Future) -> None:
        """Future.cancel() took a queued job: count it now."""
        job: Job | None = getattr(future, "_cancelk_job", None)
        if job is not None and not self.forked_away:
            self._post(lambda out: self.pool.queued_job_cancelled(job))

    def shutdown(self, wait: bool, cancel_futures: bool, timeout: float | None) -> None:
        if self.forked_away:
            return
        self.closing = True
        self._run(functools.partial(self.pool.begin_shutdown, cancel_futures))
        if not self.started:
            return
        if timeout is not None:
            # Kept by the manager thread, so it holds with wait=False too.
            at = time.monotonic() + timeout
            kill = functools.partial(self.pool.kill_everything, "shutdown timeout")
            self._run(lambda out: self.io.add_timer(at, kill))
        self.io.wake()
        if wait and self.io is not threading.current_thread():
            self._join()

    def _join(self) -> None:
        """Wait for the manager thread to stop the pool.  Ctrl-C meanwhile
        kills every job and waits only for the teardown; a second Ctrl-C
        does not wait at all (the processes die with this one anyway)."""
        try:
            self.io.join()
        except KeyboardInterrupt:
            self.kill_everything("KeyboardInterrupt")
            try:
                self.io.join(_TEARDOWN_WAIT)
            except KeyboardInterrupt:
                pass
            raise

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
        self._drain_intake(wait=True)

    def _post(self, command: Command) -> None:
        """Queue ``command``; run it now only if the lock is free: never waits
        (cancel() may run in a signal handler that interrupted this thread
        inside a lock the lock's holder waits for)."""
        self.intake.append(command)
        self._drain_intake(wait=False)

    def _drain_intake(self, wait: bool) -> None:
        """Run queued commands now, unless this thread already holds the lock
        (a signal handler or finalizer inside pool code), or the lock is busy
        and ``wait`` is False: the holder or the manager thread runs them."""
        while self.intake:
            out: list[Completion] = []
            if not self.lock.rlock.acquire(blocking=wait):
                self.io.wake()
                return
            try:
                if self.lock.depth:
                    self.io.wake()  # the manager thread runs them if the holder does not
                    return
                self.lock.depth += 1
                try:
                    while self.intake:
                        self.intake.popleft()(out)
                finally:
                    self.lock.depth -= 1
            finally:
                self.lock.rlock.release()
            run_completions(out)

    # -- forks ----------------------------------------------------------------------------
    def forget_after_fork(self) -> None:
        """In a forked child: the parent's pool is not ours to use or stop."""
        self.forked_away = True
        self.io.abandon()
        self.lock = PoolLock()  # the parent's may have been held at the fork


_TEARDOWN_WAIT = 5.0  # seconds a Ctrl-C'd shutdown waits for killed jobs to be reaped


def _after_shutdown() -> RuntimeError:
    return RuntimeError("cannot schedule new futures after shutdown")


def _broken_error(broken: BaseException) -> BrokenProcessPool:
    error = BrokenProcessPool(f"the pool is broken: {broken}")
    error.__cause__ = broken
    return error


_live_managers: weakref.WeakSet[Manager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for manager in list(_live_managers):
        manager.forget_after_fork()


def _shutdown_at_exit() -> None:
    # A program ended by Ctrl-C does not wait for its jobs: they are killed.
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    for manager in list(_live_managers):
        if interrupted and manager.started and not manager.forked_away:
            manager.kill_everything("KeyboardInterrupt")
        manager.shutdown(wait=True, cancel_futures=False, timeout=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)
