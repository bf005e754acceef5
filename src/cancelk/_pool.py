"""The pool's logic: which job goes to which runner, and how every job ends.

    under the manager's lock (a submitting thread or the manager thread):
      accept(job) ── an idle runner? ── yes ─► dispatch: PENDING -> RUNNING,
         │                                     io.send_job(head, payload),
         │                                     io.send_control(SetTimeLimit)
         └── no ─► pending (FIFO) ─► fill_idle() when a runner is free
      result_arrived / runner_exited / job_killed / supervisor_lost
         ─► the job's ending, as a completion run after the lock is released
         ─► the runner idle again, or gone until runner_started

    from any thread, without the lock (signal handlers and finalizers too):
      cancel_running(job) ─► CAS of the job's shared word (I1)
                          ─► io.kill_now(placement), io.send_control(KillRunner)

Nothing here touches a socket, a selector, a thread or the OS: every effect
outside goes through ``PoolIO``, which ``_manager`` implements and the unit
tests fake.  Futures are settled only through completions, so no user
callback runs while the lock is held.

Why one module of this size: every method reads and changes the same few
structures (pending jobs, slots, idle runners, counters) under the one lock;
cut apart, each part would reach into the others.  It does no I/O, and
tests/unit/test_pool_logic.py drives all of it through a fake PoolIO.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple, Protocol

from cancelk import _core, _protocol, _slots, _wire
from cancelk._memwatch import SAMPLE_NS
from cancelk.errors import (
    PoolFullError,
    ProcessDiedError,
    ProcessMemoryError,
    ProcessTimeoutError,
    died_error,
)
from cancelk.futures import Future
from cancelk.options import JobOptions, seconds_to_ns

log = logging.getLogger("cancelk")
MEMORY_WATCH = "rss-sampling"  # the mechanism behind memory limits (no cgroup v2 here)

Completion = Callable[[], object]

INIT_FAILURES_TO_BREAK = 3
# Every submitted job is, at every moment, in exactly one of: pending,
# running, or one of the endings below (stats() adds the first two).
ENDINGS = ("finished", "failed", "timed_out", "cancelled", "memory_exceeded", "died")
_COUNTERS = (
    "submitted",
    "started",
    *ENDINGS,
    "refused",  # by max_pending: never submitted
    "processes_started",
    "supervisors_started",
)


class Placement(NamedTuple):
    """Where a job was sent: fixed once, so a cancel needs no lock to read it."""

    slot: int
    runner_id: int
    pid: int
    state_before: int  # the slot's shared word before the job began


class Job:
    __slots__ = (
        "cancel_requested",
        "counted",
        "deadline_at",
        "future",
        "killed_by_cancel",
        "options",
        "payload",
        "placement",
        "seq",
    )

    def __init__(
        self,
        future: Future,
        seq: int,
        payload: _wire.Payload,
        options: JobOptions,
        deadline_at: float | None = None,
    ) -> None:
        self.future = future
        self.seq = seq
        self.payload = payload
        self.options = options
        self.deadline_at = deadline_at  # time.monotonic() by which it must be gone
        self.placement: Placement | None = None
        self.cancel_requested = False  # a graceful cancel was sent to the supervisor
        self.killed_by_cancel = False  # a cancel won the job's word: it ends cancelled
        self.counted = False  # its ending is decided and counted; its runner may still be dying


class Slot:
    """One runner place and what the pool knows of its current runner."""

    __slots__ = (
        "coming",
        "connected",
        "index",
        "job",
        "pid",
        "ready",
        "retiring",
        "runner_id",
        "state_before",
        "tasks",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.runner_id = 0
        self.pid = 0
        self.connected = False  # the manager holds an open channel to the runner
        self.ready = False  # the runner's initializer has run: it can take a job now
        self.coming = False  # a runner was asked for (or the dead one's replacement is due)
        self.job: Job | None = None
        self.state_before = 0  # the shared word before the current job began
        self.tasks = 0
        self.retiring = False  # it exits after this job (max_tasks_per_child)


class PoolIO(Protocol):
    """What the pool logic asks of the outside world; never blocks."""

    def send_job(self, slot: int, head: bytes, payload: _wire.Payload) -> None: ...

    def send_control(self, message: _protocol.ControlMessage) -> None: ...

    def kill_now(self, placement: Placement) -> bool: ...

    def add_timer(self, at: float, command: Callable[[list[Completion]], None]) -> None: ...


class Pool:
    """Runner slots, queued jobs and counters of one executor.

    Every method but ``cancel_running`` and ``stats`` is called with the
    manager's lock held.
    """

    def __init__(
        self, size: int, max_tasks: int | None, io: PoolIO, max_pending: int | None = None
    ) -> None:
        self.slots = [Slot(i) for i in range(size)]
        self.max_tasks = max_tasks
        self.max_pending = max_pending
        self.memory_watch_told = False  # the log said how memory limits are enforced
        self.io = io
        self.words: _slots.SlotWords | None = None
        self.idle: list[Slot] = []
        self.pending: deque[Job] = deque()
        self.shutting_down = False
        self.broken: BaseException | None = None
        self.init_failures = 0
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.running = 0  # dispatched, ending not counted yet
        self.ended_in_queue = 0  # in ``pending``, but already counted (cancelled, deadline)

    # -- jobs in ----------------------------------------------------------------
    def accept(self, job: Job, out: list[Completion]) -> None:
        """Take a job, or raise PoolFullError (it is then not submitted)."""
        if self.max_pending is not None and self.broken is None and self.full():
            self.counts["refused"] += 1
            raise PoolFullError(
                f"{self.max_pending} jobs already wait for a runner (max_pending): job refused"
            )
        self.counts["submitted"] += 1
        if self.broken is not None:
            self._count_end(job, "failed")
            out.append(functools.partial(fail, job.future, self.broken))
            return
        if self.pending or not self._dispatch_to_idle(job):
            self.pending.append(job)  # behind those queued first: jobs start in order
            if job.deadline_at is not None:
                self.io.add_timer(job.deadline_at, functools.partial(self._queue_deadline, job))
            self.start_runners()

    def start_runners(self) -> None:
        """Ask for a runner per queued job that no runner on its way will take,
        while slots have none: runners start on demand, as the stdlib's
        workers do, so a big pool that runs one job at a time holds one."""
        if self.broken is not None or (self.shutting_down and not self.pending):
            return
        for slot in self.slots:
            if not slot.connected and not slot.coming:
                break
        else:
            return  # every slot has its runner, or one on its way (once per queued job)
        waiting = len(self.pending) - self.ended_in_queue
        on_their_way = sum(1 for s in self.slots if s.coming or (s.connected and not s.ready))
        for slot in self.slots:
            if waiting <= on_their_way:
                return
            if not slot.connected and not slot.coming:
                slot.coming = True
                on_their_way += 1
                self.io.send_control(_protocol.StartRunner(slot.index))

    def supervisor_started(self) -> None:
        """A new supervisor has no runners: ask for those the queue needs."""
        for slot in self.slots:
            slot.coming = False
        self.start_runners()

    def full(self) -> bool:
        waiting = len(self.pending) - self.ended_in_queue
        return self.max_pending is not None and waiting >= self.max_pending

    def _queue_deadline(self, job: Job, out: list[Completion]) -> None:
        """A queued job's deadline passed: it never starts."""
        if job.placement is None and self._count_end(job, "timed_out"):
            self.ended_in_queue += 1
            error = ProcessTimeoutError("the job's deadline passed while it waited for a runner")
            out.append(functools.partial(fail, job.future, error))

    def count_refused(self) -> None:
        """A job that failed before it could be accepted (its arguments did not pickle)."""
        self.counts["submitted"] += 1
        self.counts["failed"] += 1

    def fill_idle(self) -> None:
        while self.idle and self.pending:
            self._dispatch_to_idle(self._pop_pending())

    def _pop_pending(self) -> Job:
        job = self.pending.popleft()
        if job.counted:
            self.ended_in_queue -= 1
        return job

    def queued_job_cancelled(self, job: Job) -> None:
        """Future.cancel() took a queued job: count it now, not when it is reached."""
        if job.placement is None and self._count_end(job, "cancelled"):
            self.ended_in_queue += 1

    def _dispatch_to_idle(self, job: Job) -> bool:
        """True once the job is placed or needs no placing (cancelled meanwhile)."""
        if not self.idle:
            return False
        slot = self.idle.pop()
        if not self._dispatch(slot, job):
            self.idle.append(slot)
            self._count_end(job, "cancelled")  # no-op if its cancel was counted
        return True

    def _dispatch(self, slot: Slot, job: Job) -> bool:
        # Placed before it turns RUNNING: a cancel that sees RUNNING sees where.
        job.placement = Placement(slot.index, slot.runner_id, slot.pid, slot.state_before)
        if not job.future._start_running(slot.pid):
            job.placement = None
            return False
        self.running += 1
        slot.job = job
        payload = job.payload
        size = len(payload) if isinstance(payload, bytes) else _wire.parts_size(payload)
        head = _protocol.job_frame_head(job.seq, slot.index, size)
        self.io.send_job(slot.index, head, payload)
        job.payload = b""
        options = job.options
        if (
            options.timeout is not None
            or options.memory_limit is not None
            or job.deadline_at is not None
        ):
            self._send_limits(slot, job)  # most jobs have none: no call
        self.counts["started"] += 1
        return True

    def _send_limits(self, slot: Slot, job: Job) -> None:
        options, where = job.options, (slot.index, slot.runner_id, job.seq)
        if options.timeout is not None:
            limit = seconds_to_ns(options.timeout)
            self.io.send_control(_protocol.SetTimeLimit(*where, limit))
        if job.deadline_at is not None:
            # The supervisor keeps CLOCK_MONOTONIC in ns, as the C core reads it.
            left = seconds_to_ns(max(0.0, job.deadline_at - time.monotonic()))
            self.io.send_control(_protocol.SetDeadline(*where, _core.monotonic_ns() + left))
        if options.memory_limit is not None:
            self.io.send_control(_protocol.SetMemoryLimit(*where, options.memory_limit))
            self._tell_memory_watch()

    def _tell_memory_watch(self) -> None:
        if not self.memory_watch_told:
            self.memory_watch_told = True
            log.info(
                "memory limits are enforced by %s: the supervisor samples the resident "
                "memory of each limited job's process tree every %.0f ms or more",
                MEMORY_WATCH,
                SAMPLE_NS / 1e6,
            )

    # -- cancelling (any thread, no lock) ----------------------------------------
    def cancel_running(self, job: Job) -> bool:
        """True once a cancel decided the running job's kill (now or earlier)."""
        if job.killed_by_cancel:
            return True
        placement = job.placement
        if placement is None or job.future.done():
            return False
        grace = job.options.cancel_timeout
        if grace is None:
            return False  # unlimited grace: the job is left to finish
        if grace > 0:
            if not job.cancel_requested:
                job.cancel_requested = True
                self.io.send_control(
                    _protocol.GraceCancel(
                        placement.slot, placement.runner_id, job.seq, seconds_to_ns(grace)
                    )
                )
            return False  # undecided: it may still finish within its grace
        return self.kill(job, _slots.KILL_CANCEL, "cancel")

    def kill(self, job: Job, flag: int, reason: str) -> bool:
        """Decide the job's kill through its shared word; False if it finished first."""
        placement = job.placement
        assert placement is not None and self.words is not None
        if not self.words.decide_kill(placement.slot, job.seq, flag, placement.state_before):
            # Lost: the job finished, or another cancel decided first.  The
            # word is read before the flag: the winner sets the flag before
            # it kills, and only after the kill can the word move on to a
            # new runner, so one of the two reads sees the winner's decision.
            return flag == _slots.KILL_CANCEL and (
                self.words.state(placement.slot) == job.seq | _slots.KILL_CANCEL
                or job.killed_by_cancel
            )
        job.killed_by_cancel = flag == _slots.KILL_CANCEL
        if not self.io.kill_now(placement):
            # No pidfd here (posix backend) or it is being closed: the
            # supervisor kills the group (it also does when it reaps).
            self.io.send_control(_protocol.KillRunner(placement.slot, placement.runner_id))
        log.info("killing job %d (pid %d): %s", job.seq, placement.pid, reason)
        return True

    # -- runners ----------------------------------------------------------------
    def runner_started(self, index: int, runner_id: int, pid: int) -> None:
        """A runner took the slot; it takes jobs once it says it is ready."""
        slot = self.slots[index]
        slot.runner_id, slot.pid, slot.connected, slot.coming = runner_id, pid, True, False
        slot.state_before = _slots.FRESH | runner_id
        slot.tasks, slot.retiring, slot.ready, slot.job = 0, False, False, None
        self.counts["processes_started"] += 1

    def channel_closed(self, index: int) -> None:
        """The runner's channel reached its end: no job may go there any more."""
        slot = self.slots[index]
        slot.connected = False
        if slot in self.idle:
            self.idle.remove(slot)

    def result_arrived(
        self, index: int, seq: int, kind: int, outcome: memoryview, out: list[Completion]
    ) -> None:
        slot = self.slots[index]
        if seq == _protocol.INIT_SEQ:
            self._initialized(slot, kind, outcome, out)
            return
        job = slot.job
        if job is None or job.seq != seq:
            return  # a result its kill overtook: the kill decided the ending
        slot.job = None
        slot.state_before = seq | _slots.DONE
        slot.tasks += 1
        self.init_failures = 0
        self._count_end(job, "failed" if kind == _wire.OUTCOME_ERROR else "finished")
        # The frame's buffer is this job's alone now: no copy of a large result.
        out.append(functools.partial(settle_from_outcome, job.future, outcome))
        if self.max_tasks is not None and slot.tasks >= self.max_tasks:
            slot.retiring = True  # it exits by itself; a fresh runner replaces it
        else:
            self._now_idle(slot)

    def _now_idle(self, slot: Slot) -> None:
        if slot.connected and slot.ready and self.broken is None and slot not in self.idle:
            self.idle.append(slot)

    def _initialized(
        self, slot: Slot, kind: int, outcome: memoryview, out: list[Completion]
    ) -> None:
        if kind == _wire.OUTCOME_VALUE:
            slot.ready = True
            self._now_idle(slot)
            return
        error = _wire.decode_outcome(bytes(outcome)).exception
        self._initializer_failed(slot, f"the pool's initializer failed: {error!r}", error, out)

    def _initializer_failed(
        self, slot: Slot, message: str, cause: BaseException | None, out: list[Completion]
    ) -> None:
        """The runner will never take a job; a third such runner in a row breaks
        the pool, rather than forking runners for ever."""
        self.channel_closed(slot.index)  # the runner exits; nothing more may go there
        slot.retiring = True
        self.init_failures += 1
        if self.init_failures >= INIT_FAILURES_TO_BREAK and self.broken is None:
            broken = BrokenProcessPool(message)
            broken.__cause__ = cause
            self.break_pool(broken, out)

    def runner_exited(
        self,
        index: int,
        runner_id: int,
        status: int | None,
        state: int,
        detail: str | None,
        out: list[Completion],
    ) -> None:
        slot = self.slots[index]
        if slot.runner_id != runner_id:
            return  # a runner of an earlier supervisor
        if not slot.ready and not slot.retiring and status is not None:
            died = died_error(slot.pid, status, detail)
            message = f"a runner exited before the pool's initializer returned: {died}"
            self._initializer_failed(slot, message, died, out)
        self.channel_closed(index)
        slot.ready = False
        slot.coming = True  # the supervisor replaces a runner that exits
        job, slot.job = slot.job, None
        if job is not None:
            self._settle_stopped(slot, job, state, status, out, detail)

    def job_killed(
        self, index: int, runner_id: int, seq: int, flag: int, peak: int, out: list[Completion]
    ) -> None:
        """The supervisor's kill is final: settle now, before the runner's teardown."""
        slot = self.slots[index]
        job = slot.job
        if slot.runner_id == runner_id and job is not None and job.seq == seq:
            self._settle_stopped(slot, job, seq | flag, None, out, peak=peak)

    def supervisor_lost(self, pid: int, status: int | None, out: list[Completion]) -> None:
        """The supervisor died, and every runner with it."""
        assert self.words is not None
        how = "status unknown" if status is None else f"status {status}"
        detail = f"the cancelk supervisor (pid {pid}) died, {how}"
        for slot in self.slots:
            job, slot.job = slot.job, None
            if job is not None:
                state = self.words.state(slot.index)
                self._settle_stopped(slot, job, state, None, out, detail)
            slot.pid = slot.runner_id = slot.state_before = 0
            slot.connected = slot.ready = slot.coming = False
        self.idle.clear()

    def _settle_stopped(
        self,
        slot: Slot,
        job: Job,
        state: int,
        status: int | None,
        out: list[Completion],
        detail: str | None = None,
        peak: int = 0,
    ) -> None:
        """End the future of a job that was killed or died, once."""
        ending = _ending(job, state, status, slot.pid, detail, peak)
        # Unlinked only once settled: a concurrent cancel() that meets the
        # still-RUNNING future must find the job, whose word says how it ended.
        if self._count_end(job, ending.counter, unlink=False):
            out.append(functools.partial(_settle_then_unlink, ending.settle, job.future))

    def count_cancelled(self, job: Job) -> None:
        """A cancel decided the running job's kill: it no longer counts as running."""
        self._count_end(job, "cancelled")

    def _count_end(self, job: Job, counter: str, unlink: bool = True) -> bool:
        """Count the job's ending once; False if it was counted already."""
        if job.counted:
            return False
        job.counted = True
        if unlink:
            _unlink(job.future)
        self.counts[counter] += 1
        if job.placement is not None:
            self.running -= 1
        return True

    # -- the pool as a whole ------------------------------------------------------
    def break_pool(self, error: BaseException, out: list[Completion]) -> None:
        """No job can run any more: fail the queued ones with ``error``."""
        self.broken = error
        self.shutting_down = True
        self.idle.clear()
        while self.pending:
            job = self._pop_pending()
            if self._count_end(job, "failed"):
                out.append(functools.partial(fail, job.future, error))

    def begin_shutdown(self, cancel_pending: bool, out: list[Completion]) -> None:
        self.shutting_down = True
        if cancel_pending:
            self._cancel_pending(out, spare=self._free_runners())

    def _free_runners(self) -> int:
        """Slots whose runner is up or on its way and has no job: the jobs they
        are about to take are spared by shutdown(cancel_futures=True).  Runners
        start on demand, so right after a burst of submits none may be ready
        yet, and cancelling the whole queue then would run nothing at all.
        The stdlib spares more: the max_workers + 1 jobs in its call queue,
        even while every worker is busy; here a job no runner is about to
        take is cancelled, as the caller asked."""
        return sum(1 for s in self.slots if s.job is None and (s.connected or s.coming))

    def kill_everything(self, reason: str, out: list[Completion]) -> None:
        """Cancel what is queued and kill what runs; the pool then stops."""
        self.shutting_down = True
        self._cancel_pending(out)
        for slot in self.slots:
            job = slot.job
            if job is not None and not job.counted and self.kill(job, _slots.KILL_CANCEL, reason):
                self._count_end(job, "cancelled")
                out.append(functools.partial(job.future._mark_cancelled, f"killed: {reason}"))

    def _cancel_pending(self, out: list[Completion], spare: int = 0) -> None:
        """Cancel the queued jobs but the first ``spare`` still to run."""
        kept: deque[Job] = deque()
        while self.pending:
            job = self._pop_pending()
            if len(kept) < spare and not job.counted:
                kept.append(job)
                continue
            self._count_end(job, "cancelled")
            out.append(job.future.cancel)
        self.pending = kept

    def finished(self) -> bool:
        """Shut down, and nothing is left to run or to end."""
        if not self.shutting_down or len(self.pending) > self.ended_in_queue:
            return False
        return all(slot.job is None for slot in self.slots)

    def stats(self) -> dict[str, int]:
        counts = dict(self.counts)
        counts["running"] = self.running
        counts["pending"] = len(self.pending) - self.ended_in_queue
        return counts


class Ending(NamedTuple):
    """How a stopped job ends: the counter it adds to and what its future gets."""

    counter: str
    settle: Callable[[Future], object]


def _unlink(future: Future) -> None:
    # Future and job refer to each other: unlinked, a dropped future (with
    # its 100 MB result) goes at once, not at the next cyclic GC.
    future._cancelk_job = None  # type: ignore[attr-defined]


def _settle_then_unlink(settle: Callable[[Future], object], future: Future) -> None:
    try:
        settle(future)
    finally:
        _unlink(future)


def _ending(
    job: Job, state: int, status: int | None, pid: int, detail: str | None, peak: int = 0
) -> Ending:
    if state == job.seq | _slots.KILL_TIMEOUT:
        log.info("killed job %d (pid %d): %s", job.seq, pid, _limit_passed(job))
        error: BaseException = ProcessTimeoutError(
            f"job process {pid} ran past {_limit_passed(job)} and was killed"
        )
        return Ending("timed_out", functools.partial(fail, exception=error))
    if state == job.seq | _slots.KILL_MEMORY:
        limit = job.options.memory_limit
        seen = f"{peak} bytes were seen" if peak else "its peak was not seen"
        log.info("killed job %d (pid %d): memory over %s bytes", job.seq, pid, limit)
        error = ProcessMemoryError(
            f"job process {pid} and its children held more than {limit} bytes resident "
            f"and were killed ({seen})",
            limit,
            peak or None,
        )
        return Ending("memory_exceeded", functools.partial(fail, exception=error))
    if state == job.seq | _slots.KILL_CANCEL:
        message = "the job was cancelled; its processes were killed"
        return Ending("cancelled", functools.partial(Future._mark_cancelled, reason=message))
    if status is None:  # the supervisor died, or somebody else reaped the runner
        error = ProcessDiedError(pid, signal=signal.SIGKILL, detail=detail)
    else:
        error = died_error(pid, status, detail)
    log.info("job %d died: %s", job.seq, error)
    return Ending("died", functools.partial(fail, exception=error))


def _limit_passed(job: Job) -> str:
    """Which of the job's time limits it ran past: the earlier one."""
    deadline, timeout = job.deadline_at, job.options.timeout
    if deadline is not None and (timeout is None or time.monotonic() >= deadline - 0.001):
        return "its deadline"
    return f"its time limit of {timeout} s"


def settle_from_outcome(future: Future, outcome: bytes | memoryview) -> None:
    """Decode a job's outcome and settle its future; a bad outcome fails only it."""
    decoded = _wire.decode_outcome(outcome)
    if decoded.exception is not None:
        fail(future, decoded.exception)
        return
    try:
        future.set_result(decoded.value)
    except InvalidStateError:
        pass  # cancelled while the result was on its way


def fail(future: Future, exception: BaseException) -> None:
    try:
        future.set_exception(exception)
    except InvalidStateError:
        pass
