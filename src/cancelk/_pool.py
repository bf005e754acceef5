"""The pool's logic: which job goes to which runner, and how every job ends.

    under the manager's lock (a submitting thread or the manager thread):
      accept(job) ── an idle runner? ── yes ─► dispatch: PENDING -> RUNNING,
         │                                     io.send_job(head, payload),
         │                                     io.send_control(SetTimeLimit)
         └── no ─► pending (FIFO) ─► fill_idle() when a runner is free
      fill_idle, while jobs are short and every runner is busy:
         the queue's head ─► sent ahead (slot.next, still PENDING, OFFER word)
      result_arrived / runner_exited / job_killed / supervisor_lost
         ─► the job's ending, as a completion run after the lock is released
         ─► the job sent ahead RUNNING (the runner began it on its own),
            or the runner idle again, or gone until runner_started
         ─► a job sent ahead to a runner that died goes back to the queue's head

    from any thread, without the lock (signal handlers and finalizers too):
      cancel_running(job) ─► CAS of the job's shared word (I1)
                          ─► io.kill_now(placement), io.send_control(KillRunner)
      take_back(job)      ─► CAS of the OFFER word: a job sent ahead is
                             revoked (never runs) or the runner's (it runs)

Nothing here touches a socket, a selector, a thread or the OS: every effect
outside goes through ``PoolIO``, which ``_manager`` implements and the unit
tests fake.  Futures are settled only through completions, so no user
callback runs while the lock is held.

Why one module of this size: every method reads and changes the same few
structures (pending jobs, slots, idle runners, jobs sent ahead, counters)
under the one lock; cut apart, each part would reach into the others (sending
a job ahead, taking it back and every ending all move jobs between the queue
and the slots).  It does no I/O, and
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
# A job is sent ahead to a busy runner only while jobs take less than this
# (there the round trip to this process is a large part of a job's cost)...
AHEAD_WHILE_JOBS_UNDER_S = 0.002
# ...and taken back if the job before it has run this long: it must not wait
# behind a long job while other runners are free.
TAKE_BACK_AFTER_S = 0.005
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
    offer: int  # the OFFER word the runner takes the job by


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
        "started",
        "went_ahead",
    )

    def __init__(
        self,
        future: Future,
        seq: int,
        payload: bytes,
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
        self.started = False  # RUNNING: dispatched to an idle runner, or its turn came
        # Sent ahead once: never again, for its first frame may still be in
        # that runner's channel, and only a word offered once tells it to skip it.
        self.went_ahead = False


class Slot:
    """One runner place and what the pool knows of its current runner."""

    __slots__ = (
        "coming",
        "connected",
        "index",
        "job",
        "next",
        "pid",
        "ready",
        "retiring",
        "runner_id",
        "state_before",
        "tasks",
        "turn_began",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.runner_id = 0
        self.pid = 0
        self.connected = False  # the manager holds an open channel to the runner
        self.ready = False  # the runner's initializer has run: it can take a job now
        self.coming = False  # a runner was asked for (or the dead one's replacement is due)
        self.job: Job | None = None
        self.next: Job | None = None  # sent ahead: it begins when ``job`` ends
        self.turn_began = 0.0  # time.monotonic() when ``job`` was sent or its turn came
        self.state_before = 0  # the shared word before the current job began
        self.tasks = 0
        self.retiring = False  # it exits after this job (max_tasks_per_child)


class PoolIO(Protocol):
    """What the pool logic asks of the outside world; never blocks."""

    def send_job(self, slot: int, head: bytes, payload: bytes) -> None: ...

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
        self.recent_job_s = 0.0  # how long jobs ran lately (a moving average)
        self.ended_in_queue = 0  # in ``pending``, but already counted (cancelled, deadline)

    # -- jobs in ----------------------------------------------------------------
    def accept(self, job: Job, out: list[Completion]) -> None:
        """Take a job, or raise PoolFullError (it is then not submitted)."""
        if self.broken is None and self.full():
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
            first = not self.pending
            self.pending.append(job)  # behind those queued first: jobs start in order
            if job.deadline_at is not None:
                self.io.add_timer(job.deadline_at, functools.partial(self._queue_deadline, job))
            self.start_runners()
            if first and self.max_tasks is None:
                # Now: no event may come before the running job ends.  Behind
                # others, it goes when the manager thread next sends some.
                self._send_ahead()

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
        waiting = self.waiting()
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
        return self.max_pending is not None and self.waiting() >= self.max_pending

    def waiting(self) -> int:
        """Jobs not begun: queued, or sent ahead to a busy runner."""
        ahead = sum(1 for s in self.slots if s.next is not None and not s.next.counted)
        return len(self.pending) - self.ended_in_queue + ahead

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
        """Queued jobs to idle runners; a runner still idle then takes the job
        sent ahead to a busy one; then one job ahead to each busy runner."""
        self._take_back_stuck()
        while self.idle and self.pending:
            self._dispatch_to_idle(self._pop_pending())
        while self.idle:
            job = self._take_back_any()
            if job is None:
                break
            self._dispatch_to_idle(job)
        if self.pending and self.max_tasks is None:
            self._send_ahead()

    def _take_back_stuck(self) -> None:
        """Jobs sent ahead behind a job that turned out long wait in the queue
        again, first: they are not held up behind it while other runners move on."""
        now = 0.0
        for slot in self.slots:
            if slot.next is None:
                continue
            now = now or time.monotonic()
            if now - slot.turn_began > TAKE_BACK_AFTER_S and self._running_long(slot):
                job = self._take_back(slot)
                if job is not None:
                    self.pending.appendleft(job)

    def _running_long(self, slot: Slot) -> bool:
        """The slot's job has begun, and has run for longer than jobs sent ahead may wait.
        (This process may just be late to see it end: its runner's words say.)"""
        job = slot.job
        assert self.words is not None
        if job is None or self.words.state(slot.index) != job.seq:
            return False
        ran_ns = _core.monotonic_ns() - self.words.started_ns(slot.index)
        return ran_ns > TAKE_BACK_AFTER_S * 1e9

    def _send_ahead(self) -> None:
        """The next queued job to each runner busy with one: it begins there as
        soon as the current one ends, without waiting for this process.  Only
        while every slot's runner is busy (an idle one, or one on its way,
        takes the queue's head) and jobs are short (for long ones a round trip
        costs little).  Called at every submit that queues: cheap when every
        runner has its next job already."""
        if self.recent_job_s > AHEAD_WHILE_JOBS_UNDER_S:
            return
        for slot in self.slots:
            if slot.job is None:
                return
        now = 0.0
        for slot in self.slots:
            running = slot.job
            if slot.next is not None or running is None or running.counted:
                continue  # has one; or its runner is being killed
            if not slot.connected or slot.retiring or running.placement is None:
                continue
            now = now or time.monotonic()
            if now - slot.turn_began > TAKE_BACK_AFTER_S:
                continue  # it would be taken back at once
            # never the word of a job sent ahead before it and maybe not taken yet
            offer = 1 - running.placement.offer if running.placement.offer < 2 else 0
            before = running.seq | _slots.DONE
            job = self._next_to_go_ahead(
                Placement(slot.index, slot.runner_id, slot.pid, before, offer)
            )
            if job is None:
                return
            slot.next = job
            self._send(slot, job)

    def _next_to_go_ahead(self, place: Placement) -> Job | None:
        """The queue's head, placed, if it may go ahead (jobs start in order: if
        it may not, none does); queued jobs cancelled meanwhile are counted."""
        while self.pending and _may_go_ahead(self.pending[0]):
            job = self._pop_pending()
            # Placed before it is marked ahead: a cancel that sees it ahead sees where.
            job.placement = place
            if job.future._go_ahead():
                job.went_ahead = True
                return job
            job.placement = None
            self._count_end(job, "cancelled")
        return None

    def _send(self, slot: Slot, job: Job) -> None:
        assert job.placement is not None and self.words is not None
        offer = job.placement.offer
        if offer != _protocol.NO_OFFER:  # sent ahead: the runner takes it by its word
            self.words.offer(slot.index, offer, job.seq)
        head = _protocol.job_frame_head(job.seq, slot.index, offer, len(job.payload))
        self.io.send_job(slot.index, head, job.payload)
        if offer == _protocol.NO_OFFER:
            job.payload = b""  # a job sent ahead keeps it, in case it is taken back

    def _take_back(self, slot: Slot) -> Job | None:
        """Revoke the job sent ahead to the slot's runner; None if it has it
        (or a cancel took the job back first: that cancel counts it)."""
        job = slot.next
        if job is None or job.counted:
            return None
        placement = job.placement
        assert placement is not None and self.words is not None
        if not self.words.revoke(placement.slot, placement.offer, job.seq):
            return None
        job.future._come_back()
        slot.next, job.placement = None, None
        return job

    def _take_back_any(self) -> Job | None:
        for slot in self.slots:
            if slot.next is not None:
                job = self._take_back(slot)
                if job is not None:
                    return job
        return None

    def _hand_back(self, slot: Slot) -> None:
        """A job sent ahead to the slot's runner, unless the runner has it,
        waits again, first in the queue (I1: a kill of its runner never takes
        it along)."""
        job = self._take_back(slot)
        if job is not None:
            self.pending.appendleft(job)

    def _runner_gone(
        self,
        slot: Slot,
        state: int,
        status: int | None,
        out: list[Completion],
        detail: str | None,
    ) -> None:
        """The slot's runner is gone: a job sent ahead is handed back, or, if
        the runner had taken it, ends as the runner did."""
        self._hand_back(slot)
        job, slot.next = slot.next, None
        if job is None or job.counted:
            return  # none, or a cancel took it back and counts it
        placement = job.placement
        assert placement is not None and self.words is not None
        if self.words.claimed(placement.slot, placement.offer, job.seq):
            self._settle_stopped(slot, job, state, status, out, detail)

    def take_back(self, job: Job) -> bool:
        """Future.cancel() of a PENDING job, from any thread without the lock:
        True unless a runner has it (a job sent ahead whose turn came)."""
        placement, words = job.placement, self.words
        if placement is None or placement.offer == _protocol.NO_OFFER or words is None:
            return True  # queued, or being sent to an idle runner: its state decides
        if words.revoke(placement.slot, placement.offer, job.seq):
            return True
        return not words.claimed(placement.slot, placement.offer, job.seq)

    def _pop_pending(self) -> Job:
        job = self.pending.popleft()
        if job.counted:
            self.ended_in_queue -= 1
        return job

    def queued_job_cancelled(self, job: Job) -> None:
        """Future.cancel() took a queued job: count it now, not when it is reached."""
        if job.placement is None:
            if self._count_end(job, "cancelled"):
                self.ended_in_queue += 1
        elif not job.started:  # sent ahead, and taken back by the cancel
            slot = self.slots[job.placement.slot]
            if slot.next is job:
                slot.next = None
            self._count_end(job, "cancelled")

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
        job.placement = Placement(
            slot.index, slot.runner_id, slot.pid, slot.state_before, _protocol.NO_OFFER
        )
        if not job.future._start_running(slot.pid):
            job.placement = None
            return False
        job.started = True
        self.running += 1
        self.counts["started"] += 1
        slot.job, slot.turn_began = job, time.monotonic()
        self._send(slot, job)
        self._send_limits(slot, job)
        return True

    def _count_start(self, job: Job) -> None:
        job.started = True
        if not job.counted:
            self.running += 1
            self.counts["started"] += 1

    def _next_turn(self, slot: Slot) -> bool:
        """The slot's job ended and its runner goes on to the one sent ahead,
        if a cancel did not take that back first; True if it does."""
        job, slot.next = slot.next, None
        if job is None:
            return False
        placement = job.placement
        assert placement is not None and self.words is not None
        if not self.words.commit(placement.slot, placement.offer, job.seq):
            self._count_end(job, "cancelled")  # the cancel that revoked it may not have yet
            return False
        job.payload = b""
        slot.job, slot.turn_began = job, time.monotonic()
        job.future._start_running(slot.pid)  # False: a cancel decided its kill already
        self._count_start(job)
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
        self,
        index: int,
        seq: int,
        kind: int,
        outcome: memoryview,
        out: list[Completion],
        ran_s: float = 0.0,
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
        self.recent_job_s += (ran_s - self.recent_job_s) / 4  # as the runner measured it
        self.init_failures = 0
        self._count_end(job, "failed" if kind == _wire.OUTCOME_ERROR else "finished")
        # The frame's buffer is this job's alone now: no copy of a large result.
        out.append(functools.partial(settle_from_outcome, job.future, outcome))
        if self._next_turn(slot):
            return
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
        self._runner_gone(slot, state, status, out, detail)

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
            state = self.words.state(slot.index)
            if job is not None:
                self._settle_stopped(slot, job, state, None, out, detail)
            self._runner_gone(slot, state, None, out, detail)
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
        if job.started:
            self.running -= 1
        return True

    # -- the pool as a whole ------------------------------------------------------
    def break_pool(self, error: BaseException, out: list[Completion]) -> None:
        """No job can run any more: fail the queued ones with ``error``."""
        self.broken = error
        self.shutting_down = True
        self.idle.clear()
        for slot in self.slots:
            self._hand_back(slot)
        while self.pending:
            job = self._pop_pending()
            if self._count_end(job, "failed"):
                out.append(functools.partial(fail, job.future, error))

    def begin_shutdown(self, cancel_pending: bool, out: list[Completion]) -> None:
        self.shutting_down = True
        if cancel_pending:
            self._cancel_pending(out)

    def kill_everything(self, reason: str, out: list[Completion]) -> None:
        """Cancel what is queued and kill what runs; the pool then stops."""
        self.shutting_down = True
        self._cancel_pending(out)
        for slot in self.slots:
            for job in (slot.job, slot.next):  # one sent ahead and not taken back has begun
                if job is None or job.counted or job.future.done():
                    continue
                if self.kill(job, _slots.KILL_CANCEL, reason):
                    self._count_end(job, "cancelled")
                    out.append(functools.partial(job.future._mark_cancelled, f"killed: {reason}"))

    def _cancel_pending(self, out: list[Completion]) -> None:
        for slot in self.slots:
            self._hand_back(slot)
        while self.pending:
            job = self._pop_pending()
            self._count_end(job, "cancelled")
            out.append(job.future.cancel)

    def finished(self) -> bool:
        """Shut down, and nothing is left to run or to end."""
        if not self.shutting_down or len(self.pending) > self.ended_in_queue:
            return False
        return all(slot.job is None and slot.next is None for slot in self.slots)

    def stats(self) -> dict[str, int]:
        counts = dict(self.counts)
        counts["running"] = self.running
        counts["pending"] = self.waiting()
        return counts


class Ending(NamedTuple):
    """How a stopped job ends: the counter it adds to and what its future gets."""

    counter: str
    settle: Callable[[Future], object]


def _may_go_ahead(job: Job) -> bool:
    """A job may wait in a busy runner only if nothing about it is timed or
    watched from its start (limits are set when a job begins) and a cancel
    needs no grace: then taking it back or killing it is all a cancel does."""
    options = job.options
    return (
        not job.went_ahead
        and options.timeout is None
        and options.memory_limit is None
        and job.deadline_at is None
        and options.cancel_timeout == 0
    )


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
