"""The pool's logic: which job goes to which runner, and how every job ends.

    under the manager's lock (a submitting thread or the manager thread):
      accept(job) ── an idle runner? ── yes ─► dispatch: a seq, a CLAIM word,
         │                                     PENDING -> RUNNING,
         │                                     io.send_job(head, payload),
         │                                     io.send_control(SetTimeLimit)
         ├── no, but every slot has a runner and one has room behind its job
         │   (and the job has no fixed deadline, memory limit or large payload)
         │         ─► dispatch there too: sent ahead, up to JOBS_PER_SLOT - 1
         │            jobs waiting in the runner's channel; the frames one
         │            wake-up dispatches to a runner go in one write
         └── no ─► pending (FIFO) ─► fill_idle() when a runner has room
      result_arrived / runner_exited / job_killed / supervisor_lost
         ─► the job's ending, as a completion run after the lock is released
         ─► the runner has room again, or is gone until runner_started
      a job its runner never claimed (it died first; or an idle runner
      takes it over): RETURNED on its CLAIM word ─► RUNNING -> PENDING,
         first in the queue again, with a new seq when next dispatched

    from any thread, without the lock (signal handlers and finalizers too):
      cancel_running(job) ─► not claimed yet: TAKEN on its CLAIM word, never runs
                          ─► claimed: CAS of the slot's STATE word (I1)
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

import enum
import functools
import itertools
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
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
# The job a runner runs and those sent ahead of it, each under a CLAIM word.
# Deep enough that a runner works through a burst of short jobs while the
# user process is busy elsewhere (P2), and that a wake-up finds several
# results to read and sends their successors in one write.  Only a runner
# whose last job took under QUICK_S gets more than one job ahead, and none
# more once the job it runs has run past QUICK_S; the jobs already behind
# such a job wait until a runner is idle with nothing older queued
# (_move_from_long_jobs).  With max_pending (whose count of waiting jobs
# leaves out one per runner) it is one job ahead, as where jobs are long.
JOBS_PER_SLOT = _slots.CLAIM_WORDS
QUICK_S = 0.001
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
    word: int  # the slot's CLAIM word the job was offered under
    seq: int


class Job:
    __slots__ = (
        "cancel_requested",
        "counted",
        "deadline_at",
        "future",
        "killed_by_cancel",
        "options",
        "order",
        "payload",
        "placement",
        "seq",
        "taken_back",
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
        self.seq = seq  # given at each dispatch: a slot's jobs have rising seqs
        self.order = 0  # given when the pool accepts it: the order of submits
        self.payload = payload
        self.options = options
        self.deadline_at = deadline_at  # time.monotonic() by which it must be gone
        self.placement: Placement | None = None
        self.cancel_requested = False  # a graceful cancel was sent to the supervisor
        self.killed_by_cancel = False  # a cancel won the job's word: it ends cancelled
        self.counted = False  # its ending is decided and counted; its runner may still be dying
        self.taken_back = False  # cancelled before its runner claimed it: it never runs


class Slot:
    """One runner place and what the pool knows of its current runner."""

    __slots__ = (
        "coming",
        "connected",
        "index",
        "jobs",
        "last_result_at",
        "pid",
        "quick",
        "ready",
        "retiring",
        "runner_id",
        "tasks",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.runner_id = 0
        self.pid = 0
        self.connected = False  # the manager holds an open channel to the runner
        self.ready = False  # the runner's initializer has run: it can take a job now
        self.coming = False  # a runner was asked for (or the dead one's replacement is due)
        # The jobs sent to its runner, oldest first: the one it runs, and
        # those sent ahead; taken-back ones until they are noticed.
        self.jobs: list[Job] = []
        self.last_result_at = 0.0  # time.monotonic() of its runner's last result
        self.quick = False  # that result came within QUICK_S of the one before
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
        self.seqs = itertools.count(1)
        self.orders = itertools.count(1)
        self.idle: list[Slot] = []  # ready runners with no job
        self.roomy: list[Slot] = []  # ready runners with jobs and room for more, in turn
        self.ahead: set[Slot] = set()  # runners with jobs sent ahead of the one they run
        self.up = 0  # slots whose runner is connected and ready
        self.retry_due = False  # a dispatch that found a future's lock busy is tried again
        self.pending: deque[Job] = deque()
        self.shutting_down = False
        self.queue_cancelled = False  # shutdown(cancel_futures=True), or everything killed
        self.broken: BaseException | None = None
        self.init_failures = 0
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.running = 0  # dispatched, ending not counted yet
        self.ended_in_queue = 0  # in ``pending``, but already counted (cancelled, deadline)
        # Jobs of dead runners whose hand-back found their future's lock held:
        # tried again shortly; their CLAIM words stay theirs until then.
        self.limbo: list[Job] = []

    # -- jobs in ----------------------------------------------------------------
    def accept(self, job: Job, out: list[Completion]) -> None:
        """Take a job, or raise PoolFullError (it is then not submitted)."""
        if self.max_pending is not None and self.broken is None and self.full():
            self.counts["refused"] += 1
            raise PoolFullError(
                f"{self.max_pending} jobs already wait for a runner (max_pending): job refused"
            )
        self.counts["submitted"] += 1
        job.order = next(self.orders)
        if self.broken is not None:
            self._count_end(job, "failed")
            out.append(functools.partial(fail, job.future, self.broken))
            return
        if self.pending or not self._place(job):
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
        if self.idle and self.ahead:
            self._move_from_long_jobs()
        pending = self.pending
        while pending and (self.idle or (self.roomy and self._may_send_ahead(pending[0]))):
            job = self._pop_pending()
            if not self._place(job):  # no runner may take it now, or its lock was busy
                pending.appendleft(job)
                if job.counted:
                    self.ended_in_queue += 1
                return

    def _retry_later(self) -> None:
        if not self.retry_due:
            self.retry_due = True
            self.io.add_timer(time.monotonic() + _RETRY_S, self._retry)

    def _retry(self, out: list[Completion]) -> None:
        self.retry_due = False
        self.fill_idle()

    def _roomy_slot(self, job: Job) -> Slot | None:
        """The next runner with room for ``job``, in turn (runners fill
        evenly).  A job waits only behind jobs submitted before it (one
        queued again after its runner died waits for a runner that has no
        later job), so none waits for a later one; and a runner that holds
        a job ahead already takes more only while the job it runs
        is short: none goes deeper behind a job that has run past QUICK_S
        (that runner is listed again at its next result)."""
        for slot in list(self.roomy):
            if len(slot.jobs) >= 2 and self._running_long(slot):
                self.roomy.remove(slot)
            elif slot.jobs[-1].order < job.order:
                self.roomy.remove(slot)
                return slot
        return None

    def _running_long(self, slot: Slot) -> bool:
        """Has the slot's runner been running its job for QUICK_S or more?"""
        assert self.words is not None
        if not slot.jobs or self.words.state(slot.index) != slot.jobs[0].seq:
            return False  # not begun, or ended: the next one follows at once
        return _core.monotonic_ns() - self.words.started_ns(slot.index) >= QUICK_S * 1e9

    def _move_from_long_jobs(self) -> None:
        """Runners idle while others run a job past QUICK_S with jobs sent
        ahead behind it: those of them submitted before the first job still
        queued go first in the queue again, the oldest first, one per idle
        runner, so that fill_idle gives them to the idle runners."""
        moved: list[Job] = []
        first_queued = self.pending[0].order if self.pending else None
        for job, slot in _waiting_behind(s for s in self.ahead if self._running_long(s)):
            if len(moved) == len(self.idle):
                break
            if first_queued is not None and job.order > first_queued:
                break  # the queue's first job is older: the idle runners take that
            if self._take_off(slot, job):
                moved.append(job)
        # _hand_back put each first in the queue: the oldest must come first.
        for job in sorted(moved, key=lambda job: job.order, reverse=True):
            self.pending.remove(job)
            self.pending.appendleft(job)

    def _take_off(self, slot: Slot, job: Job) -> bool:
        """Hand back a job sent ahead to the slot, not claimed yet: True if
        it is queued again."""
        if job.taken_back or job not in slot.jobs:
            return False  # a cancel took it, or an earlier move did
        was = self._hand_back(job)
        if was == _BUSY:
            self._retry_later()  # its future's lock was held: tried again shortly
            return False
        if was == job.seq | _slots.CLAIMED:
            return False  # its runner has it: the next job
        slot.jobs.remove(job)
        self._file(slot)
        return was == job.seq and job.placement is None and not job.counted

    def _may_send_ahead(self, job: Job) -> bool:
        """May the job wait behind another one on a busy runner?  Only once
        every slot has its runner (so none is left unstarted for it); not
        with a fixed deadline or a memory limit, which the supervisor watches
        for the job its runner runs now; and not with a large payload, which
        is let go once sent, so it could not be handed back."""
        return (
            self.up == len(self.slots)
            and job.deadline_at is None
            and job.options.memory_limit is None
            and isinstance(job.payload, bytes)
            and len(job.payload) <= _wire.SMALL
        )

    def take_over_sent_ahead(self) -> None:
        """Idle runners and nothing queued: jobs sent ahead to busy runners,
        not claimed yet, are taken back (the oldest first) and given to
        idle ones."""
        for job, slot in _waiting_behind(self.ahead):
            if not self.idle:
                return
            if self._take_off(slot, job):
                self.fill_idle()

    def _pop_pending(self) -> Job:
        job = self.pending.popleft()
        if job.counted:
            self.ended_in_queue -= 1
        return job

    def queued_job_cancelled(self, job: Job) -> None:
        """Future.cancel() took a queued job: count it now, not when it is reached."""
        if job.placement is None and self._count_end(job, "cancelled"):
            self.ended_in_queue += 1

    def _place(self, job: Job) -> bool:
        """True once the job is placed or needs no placing (cancelled meanwhile);
        False if no runner has room, or its future's lock was busy (tried
        again shortly)."""
        if self.idle:
            slot = self.idle.pop()
        elif self.roomy and self._may_send_ahead(job):
            found = self._roomy_slot(job)
            if found is None:
                return False
            slot = found
        else:
            return False
        started = self._dispatch(slot, job)
        if started:
            return True
        self._file(slot)
        if started is None:
            self._retry_later()
            return False
        self._count_end(job, "cancelled")  # no-op if its cancel was counted
        return True

    def _dispatch(self, slot: Slot, job: Job) -> bool | None:
        """Send the job to the slot's runner: True; False if it was cancelled;
        None if its future's lock was busy and nothing was sent."""
        assert self.words is not None
        seq = job.seq = next(self.seqs)
        word = self._free_claim_word(slot)
        # Offered, then placed, before it turns RUNNING: a cancel that sees
        # RUNNING sees where, and can take it back.
        self.words.offer(slot.index, word, seq)
        job.placement = Placement(slot.index, slot.runner_id, slot.pid, word, seq)
        started = job.future._start_running()
        if not started:
            job.placement = None
            return started
        self.running += 1
        slot.jobs.append(job)
        self._file(slot)
        payload = job.payload
        size = len(payload) if isinstance(payload, bytes) else _wire.parts_size(payload)
        head = _protocol.job_frame_head(seq, slot.index, word, size)
        self.io.send_job(slot.index, head, payload)
        if size > _wire.SMALL:
            job.payload = b""  # not held twice; such a job is not handed back

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
    def cancel_running(self, job: Job) -> bool | None:
        """True once a cancel decided the running job's kill (now or earlier),
        or took it back before it began; None if it is queued again (its
        runner died first): the caller cancels it there."""
        if job.killed_by_cancel:
            return True
        if job.future.done():
            return False
        grace = job.options.cancel_timeout
        if grace is not None and grace <= 0:
            return self.kill(job, _slots.KILL_CANCEL, "cancel")
        taken = self._take_back(job)
        if taken is not _Taken.CLAIMED:
            return _ANSWERS[taken]  # it had not begun: cancelled as a queued job is
        placement = job.placement  # claimed: it stays where it is
        if grace is None or placement is None:
            return False  # unlimited grace: the job is left to finish
        if not job.cancel_requested:
            job.cancel_requested = True
            self.io.send_control(
                _protocol.GraceCancel(
                    placement.slot, placement.runner_id, placement.seq, seconds_to_ns(grace)
                )
            )
        return False  # undecided: it may still finish within its grace

    def claimed_pid(self, job: Job) -> int | None:
        """The pid of the runner that claimed the job, if one did; any thread."""
        placement, words = job.placement, self.words
        if placement is None or words is None:
            return None
        try:
            word = words.claim_word(placement.slot, placement.word)
        except IndexError:  # the pool stopped meanwhile: its words are gone
            return None
        return placement.pid if word == placement.seq | _slots.CLAIMED else None

    def _take_back(self, job: Job) -> _Taken:
        """Cancel a job its runner has not claimed, if it has not."""
        assert self.words is not None
        while True:
            placement = job.placement
            if placement is None:
                if job.future._is_pending():
                    return _Taken.QUEUED
                return _Taken.ENDED if job.future.done() else _Taken.NEVER_RUNS
            slot, word, seq = placement.slot, placement.word, placement.seq
            was = self.words.take_back(slot, word, seq, _slots.TAKEN)
            if was == seq:
                job.taken_back = True
                job.killed_by_cancel = True
                log.info("cancelled job %d before its runner (pid %d) began it", seq, placement.pid)
                return _Taken.NEVER_RUNS
            if was == seq | _slots.CLAIMED:
                return _Taken.CLAIMED
            if was == seq | _slots.TAKEN:
                return _Taken.NEVER_RUNS  # by another cancel
            if was != seq | _slots.RETURNED:
                if job.placement is not placement:
                    continue  # handed back and sent again meanwhile: look once more
                return _Taken.ENDED  # it ended; the word serves a later job now
            if job.placement is placement:
                # Returned, and the hand-back that did it is this thread's
                # own, interrupted (a finalizer): it sees the cancel next.
                return _Taken.ENDED if job.future.done() else _Taken.NEVER_RUNS
            # Returned: queued again, or dispatched again; look once more.

    def kill(self, job: Job, flag: int, reason: str) -> bool | None:
        """Decide the job's kill through its shared words; False if it finished
        first, None if it is queued again."""
        taken = self._take_back(job)
        if taken is not _Taken.CLAIMED:
            answer = _ANSWERS[taken]
            return answer if answer is None else answer and flag == _slots.KILL_CANCEL
        placement = job.placement
        assert placement is not None and self.words is not None
        seq = placement.seq
        if not self.words.decide_kill_claimed(placement.slot, seq, flag, placement.runner_id):
            # Lost: the job finished, or another cancel decided first.  The
            # word is read before the flag: the winner sets the flag before
            # it kills, and only after the kill can the word move on to a
            # new runner, so one of the two reads sees the winner's decision.
            return flag == _slots.KILL_CANCEL and (
                self.words.state(placement.slot) == seq | _slots.KILL_CANCEL or job.killed_by_cancel
            )
        job.killed_by_cancel = flag == _slots.KILL_CANCEL
        if not self.io.kill_now(placement):
            # No pidfd here (posix backend) or it is being closed: the
            # supervisor kills the group (it also does when it reaps).
            self.io.send_control(_protocol.KillRunner(placement.slot, placement.runner_id))
        log.info("killing job %d (pid %d): %s", seq, placement.pid, reason)
        return True

    # -- runners ----------------------------------------------------------------
    def runner_started(self, index: int, runner_id: int, pid: int) -> None:
        """A runner took the slot; it takes jobs once it says it is ready."""
        slot = self.slots[index]
        slot.runner_id, slot.pid, slot.connected, slot.coming = runner_id, pid, True, False
        slot.tasks, slot.retiring, slot.ready, slot.jobs = 0, False, False, []
        slot.quick, slot.last_result_at = False, 0.0  # until it shows its jobs are quick
        self.counts["processes_started"] += 1
        self._file(slot)

    def channel_closed(self, index: int) -> None:
        """The runner's channel reached its end: no job may go there any more."""
        slot = self.slots[index]
        slot.connected = False
        self._file(slot)

    def result_arrived(
        self, index: int, seq: int, kind: int, outcome: memoryview, out: list[Completion]
    ) -> None:
        slot = self.slots[index]
        if seq == _protocol.INIT_SEQ:
            self._initialized(slot, kind, outcome, out)
            return
        for job in slot.jobs:
            if job.seq == seq:
                break
        else:
            return  # a result its kill overtook: the kill decided the ending
        slot.jobs.remove(job)
        slot.tasks += 1
        now = time.monotonic()
        slot.quick, slot.last_result_at = now - slot.last_result_at < QUICK_S, now
        self.init_failures = 0
        self._count_end(job, "failed" if kind == _wire.OUTCOME_ERROR else "finished")
        # The frame's buffer is this job's alone now: no copy of a large result.
        out.append(functools.partial(settle_from_outcome, job.future, outcome))
        if self.max_tasks is not None and slot.tasks >= self.max_tasks:
            slot.retiring = True  # it exits by itself; a fresh runner replaces it
        self._file(slot)

    def _file(self, slot: Slot) -> None:
        """List the slot where dispatch looks: idle (no job), roomy (jobs,
        and room for more) or neither; in ``ahead`` if it holds two or more."""
        jobs = slot.jobs
        if jobs and (jobs[0].taken_back or jobs[-1].taken_back):
            jobs[:] = [job for job in jobs if not job.taken_back]
        if slot in self.idle:
            self.idle.remove(slot)
        if slot in self.roomy:
            self.roomy.remove(slot)
        self.ahead.discard(slot)
        if len(jobs) >= 2:
            self.ahead.add(slot)
        if not (slot.connected and slot.ready) or slot.retiring or self.broken is not None:
            return
        if not jobs:
            self.idle.append(slot)
        elif len(jobs) < self._room(slot) and (
            self.max_tasks is None or slot.tasks + len(jobs) < self.max_tasks
        ):
            self.roomy.append(slot)

    def _free_claim_word(self, slot: Slot) -> int:
        """A CLAIM word no job of the slot holds (nor one in limbo): the job
        that held it last has left, so it is settled (claimed and done,
        taken back, or returned) and no CAS expecting its seq can succeed."""
        if not slot.jobs and not self.limbo:
            return 0  # the usual dispatch, to an idle runner
        used = {job.placement.word for job in slot.jobs if job.placement is not None}
        for job in self.limbo:
            if job.placement is not None and job.placement.slot == slot.index:
                used.add(job.placement.word)
        return next(word for word in range(JOBS_PER_SLOT) if word not in used)

    def _room(self, slot: Slot) -> int:
        """How many jobs the slot may hold: the one it runs and one ahead;
        more while its jobs are quick and no max_pending counts the queue."""
        return JOBS_PER_SLOT if slot.quick and self.max_pending is None else 2

    def _count_up(self) -> None:
        self.up = sum(1 for slot in self.slots if slot.connected and slot.ready)

    def _hand_back(self, job: Job) -> int:
        """Take back a job its runner has not claimed (the runner died, or an
        idle one takes it over) and queue it first again.  Returns its CLAIM
        word as it was: the job's seq if it was handed back (or cancelled
        meanwhile), seq|CLAIMED for a large payload (let go once sent: it
        ends with its runner); _BUSY if its future's lock was held by
        another thread (nothing done: try again)."""
        placement = job.placement
        assert placement is not None and self.words is not None
        words, seq, was = self.words, placement.seq, [0]
        if not job.payload:
            return seq | _slots.CLAIMED  # a large payload was let go: it ends with its runner

        def take_back() -> bool:
            was[0] = words.take_back(placement.slot, placement.word, seq, _slots.RETURNED)
            if was[0] != seq:
                return False
            job.placement = None
            return True

        back = job.future._hand_back(take_back)
        if back is None:  # claimed (it ends with its runner); or the future's lock was busy
            return was[0] or _BUSY
        self.running -= 1
        self.counts["started"] -= 1  # its runner never took it
        if not back:
            self._count_end(job, "cancelled")  # a cancel marked it meanwhile
            return seq
        self.pending.appendleft(job)
        if job.deadline_at is not None:
            self.io.add_timer(job.deadline_at, functools.partial(self._queue_deadline, job))
        return seq

    def _initialized(
        self, slot: Slot, kind: int, outcome: memoryview, out: list[Completion]
    ) -> None:
        if kind == _wire.OUTCOME_VALUE:
            slot.ready = True
            self._count_up()
            self._file(slot)
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
        self._count_up()
        jobs, slot.jobs = slot.jobs, []
        self._file(slot)
        for job in reversed(jobs):  # reversed: returned jobs queue in their order
            if not job.taken_back:
                self._hand_back_from_dead(slot, slot.pid, job, state, status, detail, out)

    def _hand_back_from_dead(
        self,
        slot: Slot,
        pid: int,
        job: Job,
        state: int,
        status: int | None,
        detail: str | None,
        out: list[Completion],
        retried: bool = False,
    ) -> None:
        """A job of a runner that is gone: queued again if the runner never
        claimed it, else settled by how the runner ended."""
        was = self._hand_back(job)
        if was == _BUSY:  # its future's lock was held: never settled as if it ran
            if not retried:
                self.limbo.append(job)
            retry = functools.partial(
                self._hand_back_from_dead, slot, pid, job, state, status, detail, retried=True
            )
            self.io.add_timer(time.monotonic() + _RETRY_S, retry)
            return
        if retried:
            self.limbo.remove(job)
        if was == job.seq | _slots.CLAIMED:
            self._settle_stopped(slot, job, state, status, out, detail, pid=pid)
        elif retried and job.placement is None and not job.counted:
            self._queued_late(job, out)

    def _queued_late(self, job: Job, out: list[Completion]) -> None:
        """A dead runner's job queued again after the death was handled: the
        pool may have broken meanwhile (it then fails as queued jobs did) or
        cancelled its queue (it is cancelled as they were), and runners may
        have to be asked for it."""
        if self.broken is not None or self.queue_cancelled:
            self.pending.remove(job)
            if self.broken is not None and self._count_end(job, "failed"):
                out.append(functools.partial(fail, job.future, self.broken))
            elif self.broken is None and self._count_end(job, "cancelled"):
                out.append(job.future.cancel)
            return
        self.start_runners()  # the wake-up that ran this timer then fills the runners

    def job_killed(
        self, index: int, runner_id: int, seq: int, flag: int, peak: int, out: list[Completion]
    ) -> None:
        """The supervisor's kill is final: settle now, before the runner's teardown."""
        slot = self.slots[index]
        if slot.runner_id != runner_id:
            return
        for job in slot.jobs:
            if job.seq == seq:
                self._settle_stopped(slot, job, seq | flag, None, out, peak=peak)

    def supervisor_lost(self, pid: int, status: int | None, out: list[Completion]) -> None:
        """The supervisor died, and every runner with it."""
        assert self.words is not None
        how = "status unknown" if status is None else f"status {status}"
        detail = f"the cancelk supervisor (pid {pid}) died, {how}"
        lost = [
            (slot, job, self.words.state(slot.index))
            for slot in self.slots
            for job in slot.jobs
            if not job.taken_back
        ]
        for slot in self.slots:
            slot.jobs = []
        # The newest first: each returned job goes first in the queue, so
        # they queue again in the order they were submitted.
        for slot, job, state in sorted(lost, key=lambda lost: lost[1].order, reverse=True):
            self._hand_back_from_dead(slot, slot.pid, job, state, None, detail, out)
        for slot in self.slots:
            slot.pid = slot.runner_id = 0
            slot.connected = slot.ready = slot.coming = False
        self.idle.clear()
        self.roomy.clear()
        self.ahead.clear()
        self.up = 0

    def _settle_stopped(
        self,
        slot: Slot,
        job: Job,
        state: int,
        status: int | None,
        out: list[Completion],
        detail: str | None = None,
        peak: int = 0,
        pid: int | None = None,
    ) -> None:
        """End the future of a job that was killed or died, once (``pid``: its
        runner's, if the slot may have another runner by now)."""
        ending = _ending(job, state, status, slot.pid if pid is None else pid, detail, peak)
        # Unlinked only once settled: a concurrent cancel() that meets the
        # still-RUNNING future must find the job, whose word says how it ended.
        if self._count_end(job, ending.counter, unlink=False):
            out.append(functools.partial(_settle_then_unlink, ending.settle, job.future))

    def count_cancelled(self, job: Job) -> None:
        """A cancel decided the running job's kill (or took it back): it no
        longer counts as running.  One returned to the queue meanwhile ends there."""
        placement = job.placement
        if placement is None:
            self.queued_job_cancelled(job)
            return
        self._count_end(job, "cancelled")
        if job.taken_back:  # no result or exit will come for it: its runner has room now
            self._file(self.slots[placement.slot])
            self.fill_idle()

    def _count_end(self, job: Job, counter: str, unlink: bool = True) -> bool:
        """Count the job's ending once; False if it was counted already."""
        if job.counted:
            return False
        job.counted = True
        if unlink:
            _unlink(job.future)
        self.counts[counter] += 1
        if job.taken_back:
            self.counts["started"] -= 1  # sent, but never taken by its runner
        if job.placement is not None:
            self.running -= 1
        return True

    # -- the pool as a whole ------------------------------------------------------
    def break_pool(self, error: BaseException, out: list[Completion]) -> None:
        """No job can run any more: fail the queued ones with ``error``."""
        self.broken = error
        self.shutting_down = True
        self.idle.clear()
        self.roomy.clear()
        while self.pending:
            job = self._pop_pending()
            if self._count_end(job, "failed"):
                out.append(functools.partial(fail, job.future, error))

    def begin_shutdown(self, cancel_pending: bool, out: list[Completion]) -> None:
        self.shutting_down = True
        if cancel_pending:
            self.queue_cancelled = True
            self._cancel_pending(out, spare=self._free_runners())
            self._cancel_sent_ahead(out)

    def _cancel_sent_ahead(self, out: list[Completion]) -> None:
        """Take back the jobs sent ahead to busy runners that have not taken
        them: they wait as queued jobs do, and are cancelled as those are."""
        for slot in self.slots:
            for job in slot.jobs[1:]:
                if not job.counted and self._take_back(job) is _Taken.NEVER_RUNS:
                    self._count_end(job, "cancelled")
                    reason = "the job was cancelled by shutdown() before its runner began it"
                    out.append(functools.partial(job.future._mark_cancelled, reason))
            self._file(slot)

    def _free_runners(self) -> int:
        """Slots whose runner is up or on its way and has no job: the jobs they
        are about to take are spared by shutdown(cancel_futures=True).  Runners
        start on demand, so right after a burst of submits none may be ready
        yet, and cancelling the whole queue then would run nothing at all.
        The stdlib spares more: the max_workers + 1 jobs in its call queue,
        even while every worker is busy; here a job no runner is about to
        take is cancelled, as the caller asked."""
        return sum(1 for s in self.slots if not s.jobs and (s.connected or s.coming))

    def kill_everything(self, reason: str, out: list[Completion]) -> None:
        """Cancel what is queued and kill what runs; the pool then stops."""
        self.shutting_down = self.queue_cancelled = True
        self._cancel_pending(out)
        for slot in self.slots:
            for job in list(slot.jobs):
                if not job.counted and self.kill(job, _slots.KILL_CANCEL, reason):
                    self._count_end(job, "cancelled")
                    out.append(functools.partial(job.future._mark_cancelled, f"killed: {reason}"))
            self._file(slot)

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
        if not self.shutting_down or len(self.pending) > self.ended_in_queue or self.limbo:
            return False
        return all(all(job.taken_back for job in slot.jobs) for slot in self.slots)

    def stats(self) -> dict[str, int]:
        counts = dict(self.counts)
        counts["running"] = self.running
        counts["pending"] = len(self.pending) - self.ended_in_queue
        return counts


# A dispatch whose future's lock another thread holds is tried again this
# much later, rather than waited for: that thread may be waiting for the
# pool's lock (a finalizer inside wait() that submits).
_RETRY_S = 0.001
_BUSY = -1  # _hand_back: the job's future was locked by another thread; nothing done


class _Taken(enum.Enum):
    """What a cancel found of a job sent to a runner."""

    NEVER_RUNS = "taken back before its runner claimed it (here or by another cancel)"
    ENDED = "it ended; its CLAIM word may serve a later job"
    QUEUED = "its runner died first: it is queued again"
    CLAIMED = "its runner claimed it: it runs, or begins now"


# cancel_running's answer for each: decided, lost, look again.
_ANSWERS = {_Taken.NEVER_RUNS: True, _Taken.ENDED: False, _Taken.QUEUED: None}


class Ending(NamedTuple):
    """How a stopped job ends: the counter it adds to and what its future gets."""

    counter: str
    settle: Callable[[Future], object]


def _waiting_behind(slots: Iterable[Slot]) -> list[tuple[Job, Slot]]:
    """The jobs sent ahead to these slots, each with its slot, oldest first."""
    waiting = [(job, slot) for slot in slots for job in slot.jobs[1:]]
    waiting.sort(key=lambda pair: pair[0].order)
    return waiting


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
