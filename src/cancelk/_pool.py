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
"""

from __future__ import annotations

import functools
import logging
import signal
from collections import deque
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple, Protocol

from cancelk import _protocol, _slots, _wire
from cancelk.errors import ProcessDiedError, ProcessTimeoutError, died_error
from cancelk.futures import Future
from cancelk.options import JobOptions, seconds_to_ns

log = logging.getLogger("cancelk")

Completion = Callable[[], object]

INIT_FAILURES_TO_BREAK = 3
_COUNTERS = (
    "submitted",
    "started",
    "finished",
    "timed_out",
    "cancelled",
    "died",
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
        "future",
        "killed_by_cancel",
        "options",
        "payload",
        "placement",
        "seq",
        "settled",
    )

    def __init__(self, future: Future, seq: int, payload: bytes, options: JobOptions) -> None:
        self.future = future
        self.seq = seq
        self.payload = payload
        self.options = options
        self.placement: Placement | None = None
        self.cancel_requested = False  # a graceful cancel was sent to the supervisor
        self.killed_by_cancel = False  # a cancel won the job's word: it ends cancelled
        self.settled = False  # its ending is decided; the runner may still be dying


class Slot:
    """One runner place and what the pool knows of its current runner."""

    __slots__ = (
        "connected",
        "index",
        "job",
        "pid",
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
        self.job: Job | None = None
        self.state_before = 0  # the shared word before the current job began
        self.tasks = 0
        self.retiring = False  # it exits after this job (max_tasks_per_child)


class PoolIO(Protocol):
    """What the pool logic asks of the outside world; never blocks."""

    def send_job(self, slot: int, head: bytes, payload: bytes) -> None: ...

    def send_control(self, message: _protocol.ControlMessage) -> None: ...

    def kill_now(self, placement: Placement) -> None: ...


class Pool:
    """Runner slots, queued jobs and counters of one executor.

    Every method but ``cancel_running`` and ``stats`` is called with the
    manager's lock held.
    """

    def __init__(self, size: int, max_tasks: int | None, io: PoolIO) -> None:
        self.slots = [Slot(i) for i in range(size)]
        self.max_tasks = max_tasks
        self.io = io
        self.words: _slots.SlotWords | None = None
        self.idle: list[Slot] = []
        self.pending: deque[Job] = deque()
        self.shutting_down = False
        self.broken: BaseException | None = None
        self.init_failures = 0
        self.counts = dict.fromkeys(_COUNTERS, 0)

    # -- jobs in ----------------------------------------------------------------
    def accept(self, job: Job, out: list[Completion]) -> None:
        self.counts["submitted"] += 1
        if self.broken is not None:
            out.append(functools.partial(fail, job.future, self.broken))
        elif self.pending or not self._dispatch_to_idle(job):
            self.pending.append(job)  # behind those queued first: jobs start in order

    def count_submitted(self) -> None:
        """A job that failed before it could be accepted (its arguments did not pickle)."""
        self.counts["submitted"] += 1

    def fill_idle(self) -> None:
        while self.idle and self.pending:
            self._dispatch_to_idle(self.pending.popleft())

    def _dispatch_to_idle(self, job: Job) -> bool:
        """True once the job is placed or needs no placing (cancelled meanwhile)."""
        if not self.idle:
            return False
        slot = self.idle.pop()
        if not self._dispatch(slot, job):
            self.idle.append(slot)
        return True

    def _dispatch(self, slot: Slot, job: Job) -> bool:
        # Placed before it turns RUNNING: a cancel that sees RUNNING sees where.
        job.placement = Placement(slot.index, slot.runner_id, slot.pid, slot.state_before)
        if not job.future._start_running(slot.pid):
            return False
        slot.job = job
        head = _protocol.job_frame_head(job.seq, slot.index, len(job.payload))
        self.io.send_job(slot.index, head, job.payload)
        job.payload = b""
        if job.options.timeout is not None:
            limit = seconds_to_ns(job.options.timeout)
            self.io.send_control(_protocol.SetTimeLimit(slot.index, slot.runner_id, job.seq, limit))
        self.counts["started"] += 1
        return True

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
            # Lost: the job finished, or another cancel decided first.
            return flag == _slots.KILL_CANCEL and (
                job.killed_by_cancel
                or self.words.state(placement.slot) == job.seq | _slots.KILL_CANCEL
            )
        job.killed_by_cancel = flag == _slots.KILL_CANCEL
        self.io.kill_now(placement)
        self.io.send_control(_protocol.KillRunner(placement.slot, placement.runner_id))
        log.info("killing job %d (pid %d): %s", job.seq, placement.pid, reason)
        return True

    # -- runners ----------------------------------------------------------------
    def runner_started(self, index: int, runner_id: int, pid: int) -> None:
        slot = self.slots[index]
        slot.runner_id, slot.pid, slot.connected = runner_id, pid, True
        slot.state_before = _slots.FRESH | runner_id
        slot.tasks, slot.retiring, slot.job = 0, False, None
        self.counts["processes_started"] += 1
        if self.broken is None:
            self.idle.append(slot)

    def channel_closed(self, index: int) -> None:
        """The runner's channel reached its end: no job may go there any more."""
        slot = self.slots[index]
        slot.connected = False
        if slot in self.idle:
            self.idle.remove(slot)

    def result_arrived(
        self, index: int, seq: int, outcome: memoryview, out: list[Completion]
    ) -> None:
        slot = self.slots[index]
        if seq == _protocol.INIT_FAILED_SEQ:
            self._initializer_failed(slot, bytes(outcome), out)
            return
        job = slot.job
        if job is None or job.seq != seq:
            return  # a result its kill overtook: the kill decided the ending
        slot.job = None
        slot.state_before = seq | _slots.DONE
        slot.tasks += 1
        self.init_failures = 0
        self.counts["finished"] += 1
        out.append(functools.partial(settle_from_outcome, job.future, bytes(outcome)))
        if self.max_tasks is not None and slot.tasks >= self.max_tasks:
            slot.retiring = True  # it exits by itself; a fresh runner replaces it
        elif slot.connected and slot not in self.idle:
            self.idle.append(slot)

    def _initializer_failed(self, slot: Slot, outcome: bytes, out: list[Completion]) -> None:
        self.channel_closed(slot.index)  # the runner exits; nothing more may go there
        slot.retiring = True
        self.init_failures += 1
        error = _wire.decode_outcome(outcome).exception
        broken = BrokenProcessPool(f"the pool's initializer failed: {error!r}")
        broken.__cause__ = error
        job, slot.job = slot.job, None
        if job is not None:
            job.settled = True
            out.append(functools.partial(fail, job.future, broken))
        if self.init_failures >= INIT_FAILURES_TO_BREAK and self.broken is None:
            self.break_pool(broken, out)

    def runner_exited(
        self,
        index: int,
        runner_id: int,
        status: int,
        state: int,
        out: list[Completion],
        detail: str | None = None,
    ) -> None:
        slot = self.slots[index]
        if slot.runner_id != runner_id:
            return  # a runner of an earlier supervisor
        self.channel_closed(index)
        job, slot.job = slot.job, None
        if job is not None:
            self._settle_stopped(slot, job, state, status, out, detail)

    def job_killed(
        self, index: int, runner_id: int, seq: int, flag: int, out: list[Completion]
    ) -> None:
        """A deadline's kill is final: settle now, before the runner's teardown."""
        slot = self.slots[index]
        job = slot.job
        if slot.runner_id == runner_id and job is not None and job.seq == seq:
            self._settle_stopped(slot, job, seq | flag, 0, out)

    def supervisor_lost(self, pid: int, status: int, out: list[Completion]) -> None:
        """The supervisor died, and every runner with it."""
        assert self.words is not None
        detail = f"the cancelk supervisor (pid {pid}) died, status {status}"
        for slot in self.slots:
            job, slot.job = slot.job, None
            if job is not None:
                state = self.words.state(slot.index)
                self._settle_stopped(slot, job, state, -1, out, detail)
            slot.pid = slot.runner_id = slot.state_before = 0
            slot.connected = False
        self.idle.clear()

    def _settle_stopped(
        self,
        slot: Slot,
        job: Job,
        state: int,
        status: int,
        out: list[Completion],
        detail: str | None = None,
    ) -> None:
        """End the future of a job that was killed or died, once."""
        if job.settled:
            return
        job.settled = True
        ending = _ending(job, state, status, slot.pid, detail)
        self.counts[ending.counter] += 1
        out.append(functools.partial(ending.settle, job.future))

    # -- the pool as a whole ------------------------------------------------------
    def break_pool(self, error: BaseException, out: list[Completion]) -> None:
        """No job can run any more: fail the queued ones with ``error``."""
        self.broken = error
        self.shutting_down = True
        self.idle.clear()
        while self.pending:
            out.append(functools.partial(fail, self.pending.popleft().future, error))

    def begin_shutdown(self, cancel_pending: bool, out: list[Completion]) -> None:
        self.shutting_down = True
        if cancel_pending:
            self._cancel_pending(out)

    def kill_everything(self, reason: str, out: list[Completion]) -> None:
        """Cancel what is queued and kill what runs; the pool then stops."""
        self.shutting_down = True
        self._cancel_pending(out)
        for slot in self.slots:
            job = slot.job
            if job is not None and not job.settled and self.kill(job, _slots.KILL_CANCEL, reason):
                out.append(functools.partial(job.future._mark_cancelled, f"killed: {reason}"))

    def _cancel_pending(self, out: list[Completion]) -> None:
        while self.pending:
            out.append(self.pending.popleft().future.cancel)

    def finished(self) -> bool:
        """Shut down, and nothing is left to run or to end."""
        if not self.shutting_down or self.pending:
            return False
        return all(slot.job is None for slot in self.slots)

    def stats(self) -> dict[str, int]:
        counts = dict(self.counts)
        counts["running"] = sum(1 for slot in self.slots if slot.job is not None)
        counts["pending"] = len(self.pending)
        return counts


class Ending(NamedTuple):
    """How a stopped job ends: the counter it adds to and what its future gets."""

    counter: str
    settle: Callable[[Future], object]


def _ending(job: Job, state: int, status: int, pid: int, detail: str | None) -> Ending:
    if state == job.seq | _slots.KILL_TIMEOUT:
        timeout = job.options.timeout
        log.info("killed job %d (pid %d): timeout after %s s", job.seq, pid, timeout)
        error: BaseException = ProcessTimeoutError(
            f"job process {pid} ran past its time limit of {timeout} s and was killed"
        )
        return Ending("timed_out", functools.partial(fail, exception=error))
    if state == job.seq | _slots.KILL_CANCEL:
        message = "the job was cancelled; its processes were killed"
        return Ending("cancelled", functools.partial(Future._mark_cancelled, reason=message))
    if detail is not None:
        error = ProcessDiedError(pid, signal=signal.SIGKILL, detail=detail)
    else:
        error = died_error(pid, status)
    log.info("job %d died: %s", job.seq, error)
    return Ending("died", functools.partial(fail, exception=error))


def settle_from_outcome(future: Future, outcome: bytes) -> None:
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
