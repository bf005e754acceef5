"""The pool's logic (cancelk._pool) driven through a fake of its I/O: no
processes, sockets or threads; the shared words are real (in this process)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from cancelk import _core, _pool, _protocol, _slots, _wire
from cancelk._pool import ENDINGS, JOBS_PER_SLOT, Job, Pool
from cancelk._slots import FRESH, KILL_CANCEL, KILL_MEMORY, KILL_TIMEOUT, SlotWords
from cancelk.errors import (
    PoolFullError,
    ProcessCancelledError,
    ProcessDiedError,
    ProcessMemoryError,
    ProcessTimeoutError,
)
from cancelk.futures import Future
from cancelk.options import JobOptions

pytestmark = pytest.mark.timeout(10)


class FakeIO:
    def __init__(self) -> None:
        self.jobs: list[tuple[int, int, bytes]] = []  # (slot, seq, payload)
        self.claim_words: dict[int, int] = {}  # seq: the CLAIM word it was offered under
        self.control: list[_protocol.ControlMessage] = []
        self.killed: list[int] = []  # slots killed through a pidfd
        self.timers: list = []  # (time.monotonic() time, command)

    def send_job(self, slot: int, head: bytes, payload: bytes) -> None:
        seq, job_slot, word, body = _protocol.parse_job((head + payload)[8:])
        assert job_slot == slot
        self.jobs.append((slot, seq, bytes(body)))
        self.claim_words[seq] = word

    def send_control(self, message: _protocol.ControlMessage) -> None:
        self.control.append(message)

    def kill_now(self, placement) -> bool:
        self.killed.append(placement.slot)
        return False  # as without pidfds: the supervisor is asked to kill

    def add_timer(self, at, command) -> None:
        self.timers.append((at, command))


class Harness:
    """A pool of ``size`` slots, its fake I/O, and a runner's view of the words."""

    def __init__(self, size: int = 2, max_tasks: int | None = None) -> None:
        self.io = FakeIO()
        self.pool = Pool(size, max_tasks, self.io)
        fd = _slots.create_fd(size)
        self.words = SlotWords(fd, size)
        os.close(fd)
        self.pool.words = self.words
        self.out: list = []
        self.next_runner = 1

    def close(self) -> None:
        self.words.close()

    def begin(self, slot: int, before: int, seq: int) -> bool:
        """The runner claims job ``seq`` and begins it; False if either failed."""
        word = self.io.claim_words[seq]
        return self.words.claim(slot, word, seq) and self.words.begin(slot, before, seq)

    def start_runner(self, slot: int, ready: bool = True) -> int:
        runner_id = self.next_runner
        self.next_runner += 1
        self.words.give(slot, runner_id)
        self.pool.runner_started(slot, runner_id, 1000 + runner_id)
        if ready:
            self.runner_ready(slot)
        return runner_id

    def runner_ready(self, slot: int) -> None:
        _kind, ready = _wire.encode_result(None)
        self.pool.result_arrived(
            slot, _protocol.INIT_SEQ, _wire.OUTCOME_VALUE, memoryview(ready), self.out
        )

    def exited(self, slot: int, runner_id: int, status: int) -> None:
        self.pool.runner_exited(slot, runner_id, status, self.words.state(slot), None, self.out)
        self.settle()

    def submit(self, options: JobOptions | None = None, payload: bytes = b"payload") -> Future:
        future = Future(self)
        options = options or JobOptions()
        job = Job(future, 0, payload, options)
        future._cancelk_job = job
        self.pool.accept(job, self.out)
        return future

    # Future's owner, as the manager is
    def cancel_running(self, future: Future) -> bool | None:
        job = future._cancelk_job
        decided = None if job is None else self.pool.cancel_running(job)
        if job is not None and decided is None:
            return None  # queued again: Future.cancel() looks once more
        if job is None or not decided:
            return future.cancelled()
        reason = "cancelled before it began" if job.taken_back else "cancelled"
        answer = future._mark_cancelled(reason) or future.cancelled()
        self.pool.count_cancelled(job)
        return answer

    def claimed_pid(self, future: Future) -> int | None:
        job = future._cancelk_job
        return None if job is None else self.pool.claimed_pid(job)

    def cancelled_in_queue(self, future: Future) -> None:
        if future._cancelk_job is not None:
            self.pool.queued_job_cancelled(future._cancelk_job)

    def check_counts(self) -> dict:
        stats = self.pool.stats()
        parts = ("pending", "running", *ENDINGS)
        assert stats["submitted"] == sum(stats[k] for k in parts), stats
        return stats

    def settle(self) -> None:
        for complete in self.out:
            complete()
        self.out.clear()

    def begin_job(self, future: Future) -> int:
        """The runner of the future's job claims and begins it; its seq."""
        placement = future._cancelk_job.placement
        assert self.begin(placement.slot, self.words.state(placement.slot), placement.seq)
        return placement.seq

    def run_to_end(self, future: Future, value: object, outcome=None) -> None:
        """The future's job runs on its runner and returns ``value``."""
        seq = self.begin_job(future)
        slot = future._cancelk_job.placement.slot
        assert self.words.finish(slot, seq)
        kind, encoded = outcome or _wire.encode_result(value)
        self.pool.result_arrived(slot, seq, kind, memoryview(encoded), self.out)
        self.settle()

    def runner_finishes(self, slot: int, seq: int, value: object) -> None:
        kind, outcome = _wire.encode_result(value)
        self.pool.result_arrived(slot, seq, kind, memoryview(outcome), self.out)
        self.settle()


@contextlib.contextmanager
def lock_held_elsewhere(future: Future):
    """Another thread holds the future's lock meanwhile (as one inside wait())."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with future._condition:
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(5)
        yield
    finally:
        release.set()
        thread.join(5)


@pytest.fixture(autouse=True)
def one_ahead(monkeypatch):
    """No runner counts as quick unless a test says so (``quick``): how deep
    jobs are sent ahead must not hang on how fast this test runs."""
    monkeypatch.setattr(_pool, "QUICK_S", 0.0)


@pytest.fixture
def quick(monkeypatch):
    """Every runner that has returned a result counts as quick."""
    monkeypatch.setattr(_pool, "QUICK_S", float("inf"))


@pytest.fixture
def h():
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def h1():
    """A pool of one slot whose runner is up."""
    harness = Harness(size=1)
    try:
        harness.start_runner(0)
        yield harness
    finally:
        harness.close()


def test_a_job_waits_for_a_runner_then_is_dispatched(h):
    future = h.submit()
    assert list(h.pool.pending) and not h.io.jobs
    assert not future.running()
    h.start_runner(0)
    h.pool.fill_idle()
    assert h.io.jobs == [(0, 1, b"payload")]
    assert future.running() and future.pid is None, "its runner has not taken it yet"
    assert h.begin(0, FRESH | 1, 1)
    assert future.pid == 1001
    assert h.pool.stats()["running"] == 1 and h.pool.stats()["pending"] == 0


def test_a_result_settles_the_future_and_frees_the_runner(h):
    h.start_runner(0)
    future = h.submit()
    h.begin(0, FRESH | 1, 1)
    h.words.finish(0, 1)
    h.runner_finishes(0, 1, {"answer": 42})
    assert future.result(0) == {"answer": 42}
    second = h.submit()
    assert second.running(), "the runner is idle again"
    stats = h.pool.stats()
    assert (stats["submitted"], stats["started"], stats["finished"]) == (2, 2, 1)


def test_a_stale_result_is_ignored(h):
    h.start_runner(0)
    future = h.submit()
    h.runner_finishes(0, 99, "not mine")
    assert future.running()


def test_a_time_limit_is_sent_with_the_job(h):
    h.start_runner(1)
    h.submit(JobOptions(timeout=0.25))
    assert h.io.control == [_protocol.SetTimeLimit(1, 1, 1, 250_000_000)]


def test_a_queued_job_cancelled_is_never_dispatched(h):
    future = h.submit()
    assert future.cancel() and future.cancelled()
    h.start_runner(0)
    h.pool.fill_idle()
    assert not h.io.jobs
    with pytest.raises(ProcessCancelledError):
        future.result(0)


def test_cancel_of_a_running_job_decides_its_kill(h):
    h.start_runner(0)
    future = h.submit()
    h.begin(0, FRESH | 1, 1)
    assert future.cancel() is True
    assert future.cancelled()
    assert h.io.killed == [0]
    assert h.io.control == [_protocol.KillRunner(0, 1)]
    assert h.words.state(0) == 1 | KILL_CANCEL
    assert future.cancel() is True, "a second cancel agrees"
    assert h.io.killed == [0], "and kills nothing more"
    # the runner's exit reports the cancel
    h.pool.runner_exited(0, 1, signal.SIGKILL, h.words.state(0), None, h.out)
    h.settle()
    assert h.pool.stats()["cancelled"] == 1 and h.pool.stats()["running"] == 0


def test_cancel_before_the_runner_began_the_job_still_wins(h):
    h.start_runner(0)
    future = h.submit()  # sent, but the runner has not called begin()
    assert future.cancel()
    assert not h.begin(0, FRESH | 1, 1), "the runner must not start it"


def test_cancel_after_the_job_finished_loses(h):
    h.start_runner(0)
    future = h.submit()
    h.begin(0, FRESH | 1, 1)
    h.words.finish(0, 1)  # finished; the result is on its way
    assert future.cancel() is False
    assert not h.io.killed
    h.runner_finishes(0, 1, "done")
    assert future.result(0) == "done"


def test_a_cancel_with_grace_asks_the_supervisor_once(h):
    h.start_runner(0)
    future = h.submit(JobOptions(cancel_timeout=0.5))
    h.begin(0, FRESH | 1, 1)
    assert future.cancel() is False
    assert future.cancel() is False
    assert h.io.control == [_protocol.GraceCancel(0, 1, 1, 500_000_000)]
    assert not h.io.killed and future.running()


def test_an_unlimited_grace_never_kills(h):
    h.start_runner(0)
    future = h.submit(JobOptions(cancel_timeout=None))
    h.begin(0, FRESH | 1, 1)
    assert future.cancel() is False
    assert not h.io.control and not h.io.killed


def test_a_timeout_kill_ends_with_process_timeout_error_once(h):
    h.start_runner(0)
    future = h.submit(JobOptions(timeout=0.05))
    h.begin(0, FRESH | 1, 1)
    assert h.words.decide_kill(0, 1, KILL_TIMEOUT)  # as the supervisor does
    h.pool.job_killed(0, 1, 1, KILL_TIMEOUT, 0, h.out)
    h.settle()
    with pytest.raises(ProcessTimeoutError, match=r"time limit of 0\.05 s"):
        future.result(0)
    assert h.pool.stats()["running"] == 0, "killed: no longer running, though being torn down"
    h.pool.runner_exited(0, 1, signal.SIGKILL, h.words.state(0), None, h.out)
    h.settle()
    stats = h.pool.stats()
    assert stats["timed_out"] == 1 and stats["running"] == 0 and stats["died"] == 0


def test_a_runner_death_fails_only_its_job(h):
    h.start_runner(0)
    h.start_runner(1)
    doomed, fine = h.submit(), h.submit()
    h.begin(1, FRESH | 2, 1)  # idle.pop() took slot 1 first
    h.pool.runner_exited(1, 2, signal.SIGSEGV, h.words.state(1), None, h.out)
    h.settle()
    error = doomed.exception(0)
    assert isinstance(error, ProcessDiedError) and error.signal == signal.SIGSEGV
    assert fine.running()
    assert h.pool.stats()["died"] == 1


def test_an_exit_code_death_names_the_code(h):
    h.start_runner(0)
    future = h.submit()
    h.begin(0, FRESH | 1, 1)
    status = 3 << 8  # exited with code 3
    h.pool.runner_exited(0, 1, status, h.words.state(0), None, h.out)
    h.settle()
    assert future.exception(0).exitcode == 3


def test_an_exit_of_an_older_runner_is_ignored(h):
    h.start_runner(0)
    future = h.submit()
    h.pool.runner_exited(0, 77, signal.SIGKILL, 0, None, h.out)
    assert not h.out and future.running()


def test_the_initializer_failing_three_times_breaks_the_pool():
    h = Harness(size=1)
    try:
        queued = None
        for _attempt in range(3):
            h.start_runner(0, ready=False)
            if queued is None:
                queued = [h.submit(), h.submit()]
            assert not queued[0].running(), "no job runs before its runner is initialized"
            outcome = _wire.encode_exception(ZeroDivisionError("init"))
            h.pool.result_arrived(
                0, _protocol.INIT_SEQ, _wire.OUTCOME_ERROR, memoryview(outcome), h.out
            )
            h.settle()
            h.pool.runner_exited(0, h.next_runner - 1, 3 << 8, h.words.state(0), None, h.out)
            h.settle()
        first, second = queued
        assert isinstance(first.exception(0), BrokenProcessPool)
        assert isinstance(second.exception(0), BrokenProcessPool)
        assert isinstance(first.exception(0).__cause__, ZeroDivisionError)
        assert h.pool.broken is not None
        late = h.submit()
        h.settle()
        assert isinstance(late.exception(0), BrokenProcessPool)
    finally:
        h.close()


def test_a_lost_supervisor_fails_running_jobs_and_keeps_queued_ones():
    h = Harness(size=1)
    try:
        h.start_runner(0)
        running, queued = h.submit(), h.submit()
        assert queued.running(), "sent ahead to the only runner"
        h.begin(0, FRESH | 1, 1)
        h.pool.supervisor_lost(555, 9, h.out)
        h.settle()
        error = running.exception(0)
        assert isinstance(error, ProcessDiedError) and "supervisor (pid 555) died" in str(error)
        assert not queued.done() and not queued.running() and list(h.pool.pending)
        h.start_runner(0)  # a new supervisor's runner
        h.pool.fill_idle()
        assert queued.running()
    finally:
        h.close()


def test_max_tasks_retires_a_runner_after_its_jobs():
    h = Harness(size=1, max_tasks=1)
    try:
        h.start_runner(0)
        first, second = h.submit(), h.submit()
        h.begin(0, FRESH | 1, 1)
        h.words.finish(0, 1)
        h.runner_finishes(0, 1, "one")
        assert first.result(0) == "one"
        assert not second.running(), "the retiring runner takes no second job"
        h.pool.runner_exited(0, 1, 0, h.words.state(0), None, h.out)
        h.start_runner(0)
        h.pool.fill_idle()
        assert second.running()
    finally:
        h.close()


def test_shutdown_finishes_only_when_nothing_runs(h):
    h.start_runner(0)
    running, queued = h.submit(), h.submit()
    h.start_runner(1)
    h.pool.fill_idle()
    h.pool.begin_shutdown(False, h.out)
    assert not h.pool.finished()
    for slot, seq in ((0, 1), (1, 2)):
        h.begin(slot, h.words.state(slot), seq)
        h.words.finish(slot, seq)
        h.runner_finishes(slot, seq, seq)
    assert running.result(0) == 1 and queued.result(0) == 2
    assert h.pool.finished()


def test_shutdown_with_cancel_futures_cancels_the_queue(h):
    h.start_runner(0)
    running = h.submit()
    queued = [h.submit() for _ in range(3)]
    assert h.pool.slots[1].coming, "a runner was asked for the queue"
    h.pool.begin_shutdown(True, h.out)
    h.settle()
    assert not queued[0].done(), "the runner on its way takes the first queued job"
    assert all(f.cancelled() for f in queued[1:])
    assert running.running()
    h.start_runner(1)
    h.pool.fill_idle()
    assert queued[0].running()
    assert not h.pool.pending


def test_shutdown_with_cancel_futures_before_any_runner_is_up_spares_one_job_per_slot():
    """The stdlib's submit starts its workers, and shutdown(cancel_futures=True)
    spares what is already in its call queue: here, one job per runner asked for."""
    h = Harness(size=3)
    try:
        futures = [h.submit() for _ in range(10)]
        h.pool.begin_shutdown(True, h.out)
        h.settle()
        assert [f.cancelled() for f in futures] == [False] * 3 + [True] * 7
        assert h.pool.stats()["cancelled"] == 7 and h.pool.stats()["pending"] == 3
        for slot in range(3):
            h.start_runner(slot)
        h.pool.fill_idle()
        assert all(f.running() for f in futures[:3])
        assert not h.pool.finished()
        for slot, seq, _payload in list(h.io.jobs):
            h.begin(slot, h.words.state(slot), seq)
            h.words.finish(slot, seq)
            h.runner_finishes(slot, seq, seq)
        assert [f.result(0) for f in futures[:3]] == [1, 2, 3]
        assert h.pool.finished()
        counts = h.pool.stats()
        assert counts["submitted"] == 10 and counts["finished"] == 3 and counts["cancelled"] == 7
        assert counts["pending"] == counts["running"] == 0
    finally:
        h.close()


def test_jobs_spared_by_shutdown_get_runners_again_after_the_supervisor_is_lost():
    h = Harness(size=2)
    try:
        futures = [h.submit() for _ in range(5)]
        h.pool.begin_shutdown(True, h.out)
        h.settle()
        assert [f.cancelled() for f in futures] == [False, False, True, True, True]
        h.pool.supervisor_lost(555, 9, h.out)
        h.settle()
        h.io.control.clear()
        h.pool.supervisor_started()
        asked = [m for m in h.io.control if isinstance(m, _protocol.StartRunner)]
        assert len(asked) == 2, "the new supervisor is asked for a runner per spared job"
        assert not h.pool.finished()
    finally:
        h.close()


def test_shutdown_with_cancel_futures_does_not_spare_jobs_already_cancelled():
    h = Harness(size=2)
    try:
        futures = [h.submit() for _ in range(4)]
        assert futures[0].cancel()
        h.pool.begin_shutdown(True, h.out)
        h.settle()
        assert [f.cancelled() for f in futures] == [True, False, False, True]
        assert h.pool.stats()["cancelled"] == 2 and h.pool.stats()["pending"] == 2
    finally:
        h.close()


def test_kill_everything_cancels_the_queue_and_kills_what_runs(h):
    h.start_runner(0)
    running = h.submit()
    queued = h.submit()
    h.begin(0, FRESH | 1, 1)
    h.pool.kill_everything("terminate_workers()", h.out)
    h.settle()
    assert running.cancelled() and queued.cancelled()
    assert h.io.killed == [0]
    with pytest.raises(ProcessCancelledError, match="terminate_workers"):
        running.result(0)


def test_jobs_start_in_the_order_they_were_submitted():
    """A runner freed while jobs are queued takes the oldest, never a newcomer
    that arrived before the queue was looked at (the manager runs the queue
    before new submits)."""
    h = Harness(size=1)
    try:
        h.start_runner(0)
        first, second, third = h.submit(), h.submit(), h.submit()
        assert second.running() and not third.running(), "one sent ahead, one queued"
        h.begin(0, FRESH | 1, 1)
        h.words.finish(0, 1)
        _kind, outcome = _wire.encode_result(1)
        h.pool.result_arrived(0, 1, _kind, memoryview(outcome), h.out)  # room for one
        fourth = h.submit()
        assert not fourth.running(), "a newcomer jumped the queue"
        h.pool.fill_idle()
        assert third.running() and not fourth.running()
        assert [seq for _slot, seq, _body in h.io.jobs] == [1, 2, 3]
        assert third._cancelk_job.placement.seq == 3
        h.settle()
        assert first.result(0) == 1
    finally:
        h.close()


def test_counts_add_up_at_every_step():
    """submitted = pending + running + finished + failed + timed out +
    cancelled + died, after every event."""
    h = Harness(size=2)
    try:
        h.start_runner(0)
        h.start_runner(1)
        fine, raising, killed, timed, queued_cancel, queued = (h.submit() for _ in range(6))
        # one job runs on each runner, one is sent ahead to each, two wait
        assert h.check_counts()["pending"] == 2
        assert queued_cancel.cancel(), "queued: cancelled at once"
        s = h.check_counts()
        assert s["cancelled"] == 1 and s["pending"] == 1, "a queued cancel counts at once"
        h.run_to_end(fine, "ok")
        h.run_to_end(raising, None, outcome=_wire.run_and_encode(int, ("x",), {}))
        h.pool.fill_idle()  # as the manager thread does after each event
        s = h.check_counts()
        assert (s["finished"], s["failed"], s["running"]) == (1, 1, 3)
        assert killed.running() and timed.running() and queued.running()
        killed_slot = killed._cancelk_job.placement.slot
        timed_slot = timed._cancelk_job.placement.slot
        h.begin_job(killed)
        assert killed.cancel()
        s = h.check_counts()
        assert s["cancelled"] == 2 and s["running"] == 2, "a killed job no longer runs"
        timed_seq = h.begin_job(timed)
        h.words.decide_kill(timed_slot, timed_seq, KILL_TIMEOUT)
        h.pool.job_killed(
            timed_slot, timed._cancelk_job.placement.runner_id, timed_seq, KILL_TIMEOUT, 0, h.out
        )
        h.settle()
        s = h.check_counts()
        assert s["timed_out"] == 1 and s["running"] == 1
        for slot in (killed_slot, timed_slot):
            h.exited(slot, h.pool.slots[slot].runner_id, signal.SIGKILL)
        s = h.check_counts()
        assert s["cancelled"] == 2 and s["timed_out"] == 1, "the exits count nothing twice"
        assert s["pending"] == 1 and not queued.running(), "the job sent ahead is queued again"
    finally:
        h.close()


def test_a_pool_whose_runners_never_got_ready_finishes_once_its_queue_is_cancelled():
    h = Harness(size=1)
    try:
        h.start_runner(0, ready=False)  # an initializer that never returns
        future = h.submit()
        assert not future.running()
        assert future.cancel()
        h.pool.begin_shutdown(False, h.out)
        assert h.pool.finished(), "a cancelled job must not keep the pool waiting"
        assert h.check_counts()["cancelled"] == 1
    finally:
        h.close()


def test_a_queued_job_past_its_deadline_never_starts():
    h = Harness(size=1)
    try:
        h.start_runner(0)
        blocker = h.submit()
        future = Future(h)
        job = Job(future, 99, b"payload", JobOptions(), deadline_at=123.0)
        future._cancelk_job = job
        h.pool.accept(job, h.out)
        ((at, command),) = h.io.timers
        assert at == 123.0
        command(h.out)  # the manager thread runs it at that time
        h.settle()
        with pytest.raises(ProcessTimeoutError, match="waited for a runner"):
            future.result(0)
        assert h.check_counts()["timed_out"] == 1
        h.begin(0, FRESH | 1, 1)
        h.words.finish(0, 1)
        h.runner_finishes(0, 1, "done")
        h.pool.fill_idle()
        assert blocker.result(0) == "done"
        assert [seq for _, seq, _ in h.io.jobs] == [1], "the late job was never sent"
        assert h.check_counts()["pending"] == 0
    finally:
        h.close()


def test_limits_are_sent_with_the_job(h):
    h.start_runner(0)
    future = Future(h)
    options = JobOptions(timeout=1.0, memory_limit=300 << 20)
    job = Job(future, 7, b"payload", options, deadline_at=time.monotonic() + 0.5)
    future._cancelk_job = job
    h.pool.accept(job, h.out)
    kinds = [type(m).__name__ for m in h.io.control]
    assert kinds == ["SetTimeLimit", "SetDeadline", "SetMemoryLimit"]
    deadline = h.io.control[1]
    left_ns = deadline.at_ns - _core.monotonic_ns()
    assert 0.3e9 < left_ns <= 0.5e9
    assert h.io.control[2].nbytes == 300 << 20


def test_a_memory_kill_ends_with_process_memory_error(h):
    h.start_runner(0)
    future = h.submit(JobOptions(memory_limit=1000))
    h.begin(0, FRESH | 1, 1)
    assert h.words.decide_kill(0, 1, KILL_MEMORY)
    h.pool.job_killed(0, 1, 1, KILL_MEMORY, 4096, h.out)
    h.settle()
    error = future.exception(0)
    assert isinstance(error, ProcessMemoryError) and isinstance(error, MemoryError)
    assert (error.limit, error.peak) == (1000, 4096)
    assert h.check_counts()["memory_exceeded"] == 1


def test_max_pending_refuses_at_once_and_accepts_once_drained():
    h = Harness(size=1)
    h.pool.max_pending = 2
    try:
        h.start_runner(0)
        first, ahead, second, third = h.submit(), h.submit(), h.submit(), h.submit()
        with pytest.raises(PoolFullError):
            h.submit()
        stats = h.check_counts()
        assert (stats["submitted"], stats["refused"], stats["pending"]) == (4, 1, 2)
        assert second.cancel()  # a cancelled job no longer waits
        fourth = h.submit()
        assert not fourth.done()
        assert h.check_counts()["pending"] == 2
        del first, ahead, third
    finally:
        h.close()


def test_a_finished_future_is_freed_without_the_cyclic_gc(h):
    import gc
    import weakref

    h.start_runner(0)
    future = h.submit()
    h.begin(0, FRESH | 1, 1)
    h.words.finish(0, 1)
    h.runner_finishes(0, 1, "value")
    assert future.result(0) == "value"
    ref = weakref.ref(future)
    gc.disable()
    try:
        del future
        assert ref() is None, "the future and its job still hold each other"
    finally:
        gc.enable()


def test_runners_start_on_demand_one_per_waiting_job():
    h = Harness(size=4)
    try:
        assert not h.io.control, "no runner before the first job"
        first = h.submit()
        assert h.io.control == [_protocol.StartRunner(0)]
        second = h.submit()
        assert h.io.control[1:] == [_protocol.StartRunner(1)]
        h.start_runner(0)
        h.pool.fill_idle()
        assert first.running() and not second.running()
        third = h.submit()  # runner 1 is on its way for the second; a third is asked for
        assert h.io.control[2:] == [_protocol.StartRunner(2)]
        assert not third.running()
    finally:
        h.close()


def test_a_pool_running_one_job_at_a_time_asks_for_one_runner():
    h = Harness(size=32)
    try:
        for seq in range(1, 11):
            future = h.submit()
            if seq == 1:
                h.start_runner(0)
                h.pool.fill_idle()
            assert future.running()
            before = h.words.state(0)
            h.begin(0, before, seq)
            h.words.finish(0, seq)
            h.runner_finishes(0, seq, seq)
        starts = [m for m in h.io.control if isinstance(m, _protocol.StartRunner)]
        assert starts == [_protocol.StartRunner(0)]
    finally:
        h.close()


def test_a_cancel_that_saw_the_job_queued_does_not_mark_it_once_it_started(h):
    # cancel() read PENDING, then the pool started the job: marking it now
    # would say "cancelled before it started" of a running job.
    h.start_runner(0)
    future = h.submit()
    assert future.running()
    assert not future._mark_cancelled("stale", by_caller=True, queued=True)
    assert future.running(), "it runs on; a cancel now kills it"
    h.begin(0, FRESH | 1, 1)
    assert future.cancel() is True and h.io.killed == [0]


# -- jobs sent ahead: a runner's next job waits in its channel ---------------------


def test_a_job_is_sent_ahead_only_once_every_slot_has_its_runner(h):
    h.start_runner(0)
    first, second = h.submit(), h.submit()
    assert first.running() and not second.running(), "slot 1 has no runner yet: it waits"
    h.start_runner(1)
    h.pool.fill_idle()
    third = h.submit()
    assert second.running() and third.running(), "the third is sent ahead"
    assert h.pool.stats()["pending"] == 0 and h.pool.stats()["running"] == 3


def test_a_job_with_a_memory_limit_is_not_sent_ahead(h1):
    h1.submit()
    limited = h1.submit(JobOptions(memory_limit=1 << 30))
    assert not limited.running()


def test_a_job_sent_ahead_is_queued_again_when_its_runner_dies_first(h1):
    doomed, ahead = h1.submit(), h1.submit()
    h1.begin_job(doomed)
    h1.exited(0, 1, signal.SIGSEGV)
    assert isinstance(doomed.exception(0), ProcessDiedError)
    assert not ahead.running() and not ahead.done(), "never claimed: queued again"
    first_seq = ahead._cancelk_job.seq
    assert h1.words.claim_word(0, h1.io.claim_words[first_seq]) == first_seq | _slots.RETURNED
    assert not h1.words.claim(0, h1.io.claim_words[first_seq], first_seq)
    h1.start_runner(0)
    h1.pool.fill_idle()
    assert ahead.running() and ahead._cancelk_job.seq > first_seq, "a new seq"
    h1.run_to_end(ahead, "ran once")
    assert ahead.result(0) == "ran once"
    s = h1.check_counts()
    assert (s["died"], s["finished"], s["started"]) == (1, 1, 2), "started once each"


def test_a_cancel_takes_back_a_job_sent_ahead_without_a_kill(h1):
    running, ahead = h1.submit(), h1.submit()
    seq = ahead._cancelk_job.placement.seq
    assert ahead.cancel() and ahead.cancelled()
    assert not h1.io.killed and not h1.io.control, "its runner goes on"
    assert not h1.words.claim(0, h1.io.claim_words[seq], seq), "the runner skips it"
    h1.run_to_end(running, "fine")
    assert running.result(0) == "fine"
    third = h1.submit()
    assert third.running(), "the runner has room again"
    s = h1.check_counts()
    assert (s["cancelled"], s["finished"], s["running"]) == (1, 1, 1)
    assert s["started"] == 2, "the job taken back never started"


def test_a_cancel_after_the_claim_kills_before_the_job_begins(h1):
    first, second = h1.submit(), h1.submit()
    h1.run_to_end(first, 1)
    seq = second._cancelk_job.placement.seq
    assert h1.words.claim(0, h1.io.claim_words[seq], seq)  # claimed, not begun
    assert second.cancel() and second.cancelled()
    assert h1.io.killed == [0]
    assert h1.words.state(0) == seq | KILL_CANCEL
    assert not h1.words.begin(0, 1 | _slots.DONE, seq), "the runner must not begin it"


def test_a_late_cancel_of_a_finished_job_does_not_hit_the_job_after_it(h1):
    first, second = h1.submit(), h1.submit()
    first_seq = h1.begin_job(first)
    assert h1.words.finish(0, first_seq)
    h1.begin_job(second)  # the runner went on before the user process heard
    assert first.cancel() is False
    assert not h1.io.killed and second.running()


def test_an_idle_runner_takes_over_a_job_sent_ahead_to_a_busy_one(h):
    h.start_runner(0)
    h.start_runner(1)
    first, second, ahead = h.submit(), h.submit(), h.submit()
    busy = ahead._cancelk_job.placement.slot
    long_one, short = (
        (first, second) if first._cancelk_job.placement.slot == busy else (second, first)
    )
    h.begin_job(long_one)
    h.run_to_end(short, "quick")
    h.pool.take_over_sent_ahead()
    placement = ahead._cancelk_job.placement
    assert ahead.running() and placement.slot != busy, "taken over by the idle runner"
    h.run_to_end(ahead, "done")
    assert ahead.result(0) == "done" and long_one.running()
    assert h.check_counts()["running"] == 1


# -- deeper: a quick runner gets a burst's jobs several at a time -------------------


def _make_quick(h: Harness, slot: int = 0) -> None:
    """One job run to its end on the slot: its runner has returned a result."""
    first = h.submit()
    assert first._cancelk_job.placement.slot == slot
    h.run_to_end(first, "warm")


def test_a_quick_runner_is_sent_jobs_ahead_each_under_its_own_claim_word(h1, quick):
    _make_quick(h1)
    burst = [h1.submit() for _ in range(JOBS_PER_SLOT + 2)]
    assert [f.running() for f in burst] == [True] * JOBS_PER_SLOT + [False, False]
    seqs = [f._cancelk_job.placement.seq for f in burst[:JOBS_PER_SLOT]]
    words = {h1.io.claim_words[seq] for seq in seqs}
    assert len(words) == JOBS_PER_SLOT, "no two jobs of a slot share a CLAIM word"
    assert h1.check_counts()["pending"] == 2
    for future in burst:  # the runner goes through them in order; each result makes room
        h1.pool.fill_idle()
        h1.run_to_end(future, "ok")
    assert all(f.result(0) == "ok" for f in burst)
    assert h1.check_counts()["finished"] == len(burst) + 1


def test_a_slow_runner_gets_one_job_ahead(h1):
    _make_quick(h1)  # not quick: QUICK_S is 0 here
    running, ahead, queued = h1.submit(), h1.submit(), h1.submit()
    assert running.running() and ahead.running() and not queued.running()


def test_with_max_pending_a_quick_runner_still_gets_one_job_ahead(quick):
    h = Harness(size=1)
    h.pool.max_pending = 4
    try:
        h.start_runner(0)
        _make_quick(h)
        _running, ahead, queued = h.submit(), h.submit(), h.submit()
        assert ahead.running() and not queued.running(), "max_pending counts it as waiting"
    finally:
        h.close()


def test_jobs_sent_ahead_to_a_runner_that_dies_are_queued_again_in_order(h1, quick):
    _make_quick(h1)
    doomed, *ahead = (h1.submit() for _ in range(JOBS_PER_SLOT))
    queued = h1.submit()
    h1.begin_job(doomed)
    h1.exited(0, 1, signal.SIGKILL)
    assert isinstance(doomed.exception(0), ProcessDiedError)
    assert not any(f.running() or f.done() for f in [*ahead, queued]), "never claimed"
    assert [job.future for job in h1.pool.pending] == [*ahead, queued], "in submit order"
    h1.start_runner(0)
    h1.pool.fill_idle()
    for future in [*ahead, queued]:
        h1.pool.fill_idle()
        h1.run_to_end(future, "once")
    s = h1.check_counts()
    assert (s["died"], s["finished"], s["running"], s["pending"]) == (1, JOBS_PER_SLOT + 1, 0, 0)


def test_an_idle_runner_takes_over_the_first_jobs_waiting_behind_a_long_one(h, quick):
    h.start_runner(0)
    h.start_runner(1)
    for warm in [h.submit(), h.submit()]:  # one on each runner: both quick
        h.run_to_end(warm, "warm")
    long_one = h.submit()
    busy = long_one._cancelk_job.placement.slot
    burst = [h.submit() for _ in range(7)]
    behind = [f for f in burst if f._cancelk_job.placement.slot == busy]
    elsewhere = [f for f in burst if f._cancelk_job.placement.slot != busy]
    assert len(behind) >= 2 and elsewhere, "sent ahead to both runners"
    h.begin_job(long_one)
    for future in elsewhere:
        h.run_to_end(future, "there")
    h.pool.take_over_sent_ahead()
    moved = [f for f in behind if f._cancelk_job.placement.slot != busy]
    assert moved == behind[:1], "the first one waiting moves to the idle runner"
    h.run_to_end(moved[0], "moved")
    h.pool.take_over_sent_ahead()
    assert behind[1]._cancelk_job.placement.slot != busy, "then the next one"
    h.run_to_end(behind[1], "moved too")
    assert long_one.running() and all(f.running() for f in behind[2:])
    h.check_counts()


def test_an_idle_runner_takes_jobs_waiting_behind_a_long_job_before_queued_ones(
    h, quick, monkeypatch
):
    h.start_runner(0)
    h.start_runner(1)
    for warm in [h.submit(), h.submit()]:  # both runners quick
        h.run_to_end(warm, "warm")
    long_one = h.submit()
    busy = long_one._cancelk_job.placement.slot
    burst = [h.submit() for _ in range(2 * JOBS_PER_SLOT + 2)]
    behind = [f for f in burst if f.running() and f._cancelk_job.placement.slot == busy]
    queued = [f for f in burst if not f.running()]
    assert len(behind) == JOBS_PER_SLOT - 1 and queued
    h.begin_job(long_one)
    monkeypatch.setattr(_pool, "QUICK_S", 0.0)  # the long job has run past it now
    for future in [f for f in burst if f.running() and f not in behind]:
        h.run_to_end(future, "there")  # the other runner goes idle
    sent_before = len(h.io.jobs)
    h.pool.fill_idle()
    moved = [f for f in behind if f._cancelk_job.placement.slot != busy]
    assert moved == behind[:1], "the oldest job waiting behind the long one moves first"
    first_sent = h.io.jobs[sent_before][1]
    assert first_sent == moved[0]._cancelk_job.placement.seq, "before the queued jobs"
    assert long_one.running()
    h.check_counts()


def test_jobs_queued_again_never_wait_behind_jobs_submitted_after_them(h, quick):
    h.start_runner(0)
    h.start_runner(1)
    for warm in [h.submit(), h.submit()]:  # both runners quick
        h.run_to_end(warm, "warm")
    burst = [h.submit() for _ in range(6)]
    doomed_slot = burst[0]._cancelk_job.placement.slot
    on_doomed = [f for f in burst if f._cancelk_job.placement.slot == doomed_slot]
    on_other = [f for f in burst if f._cancelk_job.placement.slot != doomed_slot]
    assert len(on_doomed) == len(on_other) == 3, "sent to both runners in turn"
    h.begin_job(on_doomed[0])
    h.begin_job(on_other[0])
    h.exited(doomed_slot, h.pool.slots[doomed_slot].runner_id, signal.SIGKILL)
    h.start_runner(doomed_slot)
    h.pool.fill_idle()
    back = on_doomed[1:]
    assert all(f.running() for f in back)
    assert all(f._cancelk_job.placement.slot == doomed_slot for f in back), (
        "the other runner holds later jobs: they wait for the new runner instead"
    )
    h.check_counts()


def test_jobs_of_a_dead_runner_whose_future_is_locked_are_queued_again_not_failed(h1):
    doomed, ahead = h1.submit(), h1.submit()
    h1.begin_job(doomed)
    with lock_held_elsewhere(ahead):  # another thread looks at it (f.pid, f.done())
        h1.exited(0, 1, signal.SIGKILL)
        assert isinstance(doomed.exception(0), ProcessDiedError)
        assert not ahead.done(), "never claimed: it must not fail as if it ran"
        h1.start_runner(0)  # a warm spare takes the slot at once
        h1.pool.shutting_down = True
        assert not h1.pool.finished(), "a job still to be handed back keeps the pool going"
        h1.pool.shutting_down = False
        other = h1.submit()
        ahead_word = h1.io.claim_words[ahead._cancelk_job.placement.seq]
        assert h1.io.claim_words[other._cancelk_job.placement.seq] != ahead_word, (
            "the word of a job still to be handed back is not given to another"
        )
    for _at, command in list(h1.io.timers):  # the retry, as the manager thread runs it
        command(h1.out)
    h1.settle()
    assert not ahead.done() and not h1.pool.limbo
    h1.run_to_end(other, "other")
    h1.pool.fill_idle()
    assert ahead.running(), "queued again, then sent to the new runner"
    h1.run_to_end(ahead, "ran once")
    assert ahead.result(0) == "ran once" and other.result(0) == "other"
    s = h1.check_counts()
    assert (s["died"], s["finished"]) == (1, 2)


def test_a_dead_runners_job_handed_back_after_shutdown_cancelled_the_queue_never_runs(h1):
    doomed, ahead = h1.submit(), h1.submit()
    h1.begin_job(doomed)
    with lock_held_elsewhere(ahead):
        h1.exited(0, 1, signal.SIGKILL)
        h1.pool.begin_shutdown(True, h1.out)  # shutdown(cancel_futures=True)
        h1.settle()
        assert not ahead.done() and not h1.pool.finished()
    for _at, command in list(h1.io.timers):
        command(h1.out)
    h1.settle()
    assert ahead.cancelled(), "cancelled with the queue it rejoined, never run"
    assert h1.pool.finished() and h1.check_counts()["cancelled"] == 1


def test_a_cancel_of_a_job_queued_again_cancels_it_in_the_queue(h1):
    doomed, ahead = h1.submit(), h1.submit()
    h1.begin_job(doomed)
    h1.exited(0, 1, signal.SIGKILL)
    assert ahead.cancel() and ahead.cancelled()
    s = h1.check_counts()
    assert s["cancelled"] == 1 and s["pending"] == 0
    h1.start_runner(0)
    h1.pool.fill_idle()
    assert not ahead.running() and h1.pool.stats()["running"] == 0


def test_shutdown_with_cancel_futures_cancels_a_job_sent_ahead(h1):
    running, ahead, queued = h1.submit(), h1.submit(), h1.submit()
    h1.begin_job(running)
    h1.pool.begin_shutdown(True, h1.out)
    h1.settle()
    assert running.running() and ahead.cancelled() and queued.cancelled()
    seq = ahead._cancelk_job.placement.seq if ahead._cancelk_job else None
    assert seq is None or not h1.words.claim(0, h1.io.claim_words[seq], seq)
    s = h1.check_counts()
    assert (s["cancelled"], s["started"], s["running"]) == (2, 1, 1)


def test_a_runner_whose_jobs_were_all_taken_back_takes_the_next_one(h1):
    """No result or exit comes for a job taken back: the count of its cancel
    gives its runner the queue's next job."""
    first, second, third = h1.submit(), h1.submit(), h1.submit()
    assert first.cancel() and second.cancel()  # neither taken by the runner yet
    assert third.running(), "the runner has room again"
    assert h1.check_counts()["pending"] == 0
    h1.run_to_end(third, "ran")
    assert third.result(0) == "ran"


def test_a_dispatch_never_waits_for_a_future_lock_held_elsewhere(h):
    """A thread inside wait() holds its futures' locks; a finalizer there that
    submits waits for the pool's lock.  The dispatch, under the pool's lock,
    must not wait for the future's: it leaves the job queued and tries again."""
    future = h.submit()
    with lock_held_elsewhere(future):
        h.start_runner(0)
        h.pool.fill_idle()
        assert not future.running() and h.pool.stats()["pending"] == 1
        assert len(h.io.timers) == 1, "tried again shortly"
    _at, retry = h.io.timers.pop()
    retry(h.out)
    assert future.running() and h.pool.stats()["pending"] == 0
    h.run_to_end(future, "ran")
    assert future.result(0) == "ran"
