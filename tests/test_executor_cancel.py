"""Stopping jobs: Future.cancel() (DESIGN A3, I1, I3, I4) and time limits (A4, I5).

Kills go through the supervisor's C loop, so most tests run on both backends
(the ``backend`` fixture of conftest sets CANCELK_BACKEND). Every stopped job
must take its whole process tree with it; the pool must go on.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import sys
import threading
import time

import psutil
import pytest

import cancelk
from cancelk import (
    ProcessCancelledError,
    ProcessCancelTimeout,
    ProcessDiedError,
    ProcessTimeout,
    ProcessTimeoutError,
)

import jobs
import procs
from jobs import RESULT_WAIT, SLACK, START_METHODS

# -------------------------------------------------------------------------
# pending jobs


@pytest.mark.timeout(30)
def test_cancel_pending_job(make_pool, tmp_path):
    exe = make_pool(1)
    blocker = exe.submit(jobs.sleep_return, 0.5, "blocker")
    marker = tmp_path / "ran"
    pending = exe.submit(jobs.record, str(marker))
    assert pending.cancel() is True
    assert pending.cancelled() and pending.done()
    with pytest.raises(concurrent.futures.CancelledError):
        pending.result(timeout=RESULT_WAIT)
    with pytest.raises(ProcessCancelledError):
        pending.result(timeout=RESULT_WAIT)
    assert blocker.result(timeout=RESULT_WAIT) == "blocker"
    procs.assert_pool_works(exe)
    assert not marker.exists(), "a cancelled pending job ran anyway"


@pytest.mark.timeout(30)
def test_cancelled_pending_job_is_seen_by_wait_and_as_completed(make_pool):
    """As in the stdlib, a pending future cancelled by the user is reported
    done by concurrent.futures.wait()/as_completed() (at the latest when the
    pool gets to it)."""
    exe = make_pool(1)
    blocker = exe.submit(jobs.sleep_return, 0.3, "blocker")
    pending = exe.submit(jobs.add, 1, 2)
    assert pending.cancel()
    assert blocker.result(timeout=RESULT_WAIT) == "blocker"
    done, not_done = concurrent.futures.wait([pending], timeout=5)
    assert pending in done and not not_done, "wait() never saw the cancelled pending future"
    assert list(concurrent.futures.as_completed([pending], timeout=5)) == [pending]


# -------------------------------------------------------------------------
# running jobs, grace 0 (the default)


@pytest.mark.timeout(30)
def test_cancel_running_job_kills_it_at_once(make_pool, backend, record_path):
    exe = make_pool(2)
    future = exe.submit(jobs.sleep_job, record_path)
    records = procs.read_record(record_path)
    pid = records[0][0]
    assert future.pid == pid and future.running()
    called = []
    future.add_done_callback(called.append)
    start = time.monotonic()
    assert future.cancel() is True
    assert time.monotonic() - start < 0.5, "cancel() blocked"
    assert future.cancelled() and future.done()
    assert called == [future], "done-callbacks did not run on cancel()"
    with pytest.raises(ProcessCancelledError) as info:
        future.result(timeout=0)
    assert isinstance(info.value, concurrent.futures.CancelledError)
    with pytest.raises(ProcessCancelledError):
        future.exception(timeout=0)
    procs.assert_gone(records)
    assert future.cancel() is True  # a second cancel agrees
    assert future.pid is None
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_cancel_running_job_every_start_method(make_pool, method, record_path):
    exe = make_pool(1, mp_context=method)
    future = exe.submit(jobs.sleep_job, record_path)
    records = procs.read_record(record_path)
    assert future.cancel()
    with pytest.raises(ProcessCancelledError):
        future.result(timeout=RESULT_WAIT)
    procs.assert_gone(records)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["mp_child", "popen"])
def test_cancel_kills_the_jobs_children(make_pool, backend, kind, record_path):
    job = {"mp_child": jobs.mp_child_job, "popen": jobs.popen_job}[kind]
    exe = make_pool(1)
    future = exe.submit(job, record_path)
    records = procs.read_record(record_path)
    assert len(records) >= 2, records
    assert future.cancel()
    assert future.cancelled()
    procs.assert_gone(records)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper is Linux-only")
def test_cancel_kills_grandchild_that_left_the_process_group(make_pool, backend, record_path):
    exe = make_pool(1)
    future = exe.submit(jobs.detached_grandchild_job, record_path)
    records = procs.read_record(record_path)
    assert len(records) == 2, records
    job_pid, grandchild = records[0][0], records[1][0]
    assert os.getsid(grandchild) != os.getsid(job_pid)  # it left the session
    assert os.getpgid(grandchild) != os.getpgid(job_pid)  # and the process group
    assert psutil.Process(grandchild).ppid() == job_pid  # the runner is its subreaper
    assert future.cancel()
    procs.assert_gone(records)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["stdlib", "cancelk"])
def test_cancel_kills_a_pool_the_job_runs(make_pool, kind, record_path):
    """A job running a process pool of its own: every process of it goes,
    including a nested cancelk supervisor (its own process group) and what its
    runners started."""
    job = {"stdlib": jobs.nested_stdlib_pool_job, "cancelk": jobs.nested_cancelk_pool_job}[kind]
    exe = make_pool(1)
    future = exe.submit(job, record_path)
    records = procs.read_record(record_path)
    records += [r for i in range(2) for r in procs.read_record(f"{record_path}.{i}", wait=0)]
    assert len({pid for pid, _ in records}) >= 5, records
    assert future.cancel()
    procs.assert_gone(records)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_cancel_finished_future_returns_false(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.add, 1, 2)
    assert future.result(timeout=RESULT_WAIT) == 3
    assert future.cancel() is False
    assert not future.cancelled()
    assert future.result() == 3


@pytest.mark.timeout(30)
def test_wait_and_as_completed_see_a_cancelled_running_future(make_pool, record_path):
    exe = make_pool(2)
    future = exe.submit(jobs.sleep_job, record_path)
    other = exe.submit(jobs.sleep_return, 20)
    records = procs.read_record(record_path)
    seen = {}

    def waiter():
        seen["wait"] = concurrent.futures.wait(
            [future, other], timeout=10, return_when=concurrent.futures.FIRST_COMPLETED
        )

    def completer():
        seen["as_completed"] = next(concurrent.futures.as_completed([future, other], timeout=10))

    threads = [threading.Thread(target=waiter), threading.Thread(target=completer)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # both are waiting now
    start = time.monotonic()
    assert future.cancel()
    for t in threads:
        t.join(timeout=15)
    assert time.monotonic() - start < 2.0
    done, _ = seen["wait"]
    assert done == {future}
    assert seen["as_completed"] is future
    assert other.cancel()
    procs.assert_gone(records)


@pytest.mark.timeout(30)
def test_cancel_from_many_threads_at_once(make_pool, record_path):
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_job, record_path)
    records = procs.read_record(record_path)
    barrier = threading.Barrier(8)
    answers = []

    def cancel():
        barrier.wait()
        answers.append(future.cancel())

    threads = [threading.Thread(target=cancel) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert answers == [True] * 8
    assert future.cancelled()
    procs.assert_gone(records)
    deadline = time.monotonic() + 5
    while exe.stats()["cancelled"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert exe.stats()["cancelled"] == 1  # one kill, not eight
    procs.assert_pool_works(exe)


# -------------------------------------------------------------------------
# running jobs with a grace period


@pytest.mark.timeout(30)
def test_grace_job_finishing_in_time_keeps_its_result(make_pool, backend):
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_pid, 0.4, ProcessCancelTimeout(3.0))
    pid = procs.wait_running(future)
    assert future.cancel() is False
    assert future.result(timeout=RESULT_WAIT) == pid
    assert not future.cancelled()
    # the runner was not killed: the next job runs in the same process
    assert exe.submit(jobs.getpid).result(timeout=RESULT_WAIT) == pid


@pytest.mark.timeout(30)
def test_grace_job_raising_in_time_keeps_its_exception(make_pool):
    exe = make_pool(1, cancel_timeout=3.0)  # the executor-wide default grace
    future = exe.submit(jobs.sleep_return, 0.3)
    procs.wait_running(future)
    future2 = exe.submit(jobs.raise_job_error, "late")
    assert future.cancel() is False
    assert future.result(timeout=RESULT_WAIT) is None
    with pytest.raises(jobs.JobError):
        future2.result(timeout=RESULT_WAIT)


@pytest.mark.timeout(30)
def test_grace_expires_then_job_is_killed(make_pool, backend, record_path):
    grace = 0.5
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_job, record_path, ProcessCancelTimeout(grace))
    records = procs.read_record(record_path)
    start = time.monotonic()
    assert future.cancel() is False  # not decided yet
    assert not future.done()
    assert future.cancel() is False  # a second cancel does not restart the grace
    with pytest.raises(ProcessCancelledError):
        future.result(timeout=RESULT_WAIT)
    elapsed = time.monotonic() - start
    assert grace * 0.9 <= elapsed < grace + 1.5
    assert future.cancelled()
    procs.assert_gone(records)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_unlimited_grace_never_kills(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_return, 0.5, "done", ProcessCancelTimeout(None))
    procs.wait_running(future)
    assert future.cancel() is False
    assert future.result(timeout=RESULT_WAIT) == "done"


# -------------------------------------------------------------------------
# I1: a cancel that races with the job's end never kills another job


@pytest.mark.timeout(120)
def test_cancel_races_with_job_end_never_kill_another_job(make_pool, backend):
    """200 pairs on one runner: job A is cancelled at a random moment around
    its end, job B follows on the same runner. A stale kill of A must never
    reach B; every future ends in exactly one state."""
    rng = random.Random(1234)
    exe = make_pool(1)
    procs.assert_pool_works(exe)
    calls = {}

    def count(fut):
        calls[id(fut)] = calls.get(id(fut), 0) + 1

    log = []
    for i in range(200):
        # the runner is idle: A starts at once, B waits behind it
        a = exe.submit(jobs.spin_return, rng.choice([0, 0.0005, 0.001, 0.002, 0.004]), i)
        b = exe.submit(jobs.spin_return, 0.001, -i)
        a.add_done_callback(count)
        b.add_done_callback(count)
        offset = time.perf_counter() + rng.uniform(0, 0.006)
        while time.perf_counter() < offset:
            pass
        pid_at_cancel = a.pid
        answer = a.cancel()
        log.append((i, a, b, answer, pid_at_cancel))
        concurrent.futures.wait([b], timeout=RESULT_WAIT)
    outcome_counts = {}
    for i, a, b, answer, pid_at_cancel in log:
        # B was never cancelled: it must deliver its own result
        value, _pid = b.result(timeout=RESULT_WAIT)
        assert value == -i
        assert not b.cancelled()
        if answer:
            assert a.cancelled(), f"pair {i}: cancel() said True but the future is not cancelled"
            with pytest.raises(ProcessCancelledError):
                a.result(timeout=0)
            kind = "killed" if pid_at_cancel else "pending"
        else:
            assert not a.cancelled()
            value, pid = a.result(timeout=0)  # neither killed nor a ProcessDiedError
            assert value == i
            assert pid_at_cancel in (None, pid)
            kind = "finished"
        outcome_counts[kind] = outcome_counts.get(kind, 0) + 1
    exe.shutdown(wait=True)
    for i, a, b, answer, _ in log:
        # exactly one final state: callbacks ran once, the state never changed
        assert calls.get(id(a)) == 1 and calls.get(id(b)) == 1, f"pair {i}: callbacks {calls}"
        assert a.cancelled() == answer
        assert not b.cancelled() and b.result(timeout=0)[0] == -i
    print("outcomes:", outcome_counts)
    assert exe.stats()["died"] == 0
    assert outcome_counts.get("killed", 0) > 0 and outcome_counts.get("finished", 0) > 0, (
        f"the race never happened both ways: {outcome_counts}"
    )


@pytest.mark.timeout(120)
def test_cancel_racing_a_job_death_does_not_wedge_the_next_job(make_pool, backend):
    """Job A dies by itself (os._exit) on a fresh runner while cancel() runs.
    Whatever cancel() answers, the job that follows on the replacement runner
    must run: a cancel decided for A must not stick to the new runner."""
    rng = random.Random(99)
    exe = make_pool(1)
    for i in range(120):
        first = exe.submit(jobs.exit_with, 3)  # so the next job starts a fresh runner
        concurrent.futures.wait([first], timeout=RESULT_WAIT)
        time.sleep(0.002)
        a = exe.submit(jobs.exit_with, 3)
        offset = time.perf_counter() + rng.uniform(0, 0.003)
        while time.perf_counter() < offset:
            pass
        answer = a.cancel()
        b = exe.submit(jobs.add, i, 0)
        try:
            got = b.result(timeout=5)
        except concurrent.futures.TimeoutError:
            pytest.fail(
                f"iteration {i}: the job after a cancelled dying job never ran "
                f"(cancel() returned {answer}, A's state {a._state})"
            )
        assert got == i
        assert a.done()
        if not a.cancelled():
            with pytest.raises(ProcessDiedError):
                a.result(timeout=0)


@pytest.mark.timeout(120)
def test_deadline_racing_job_end_never_kills_the_next_job(make_pool, backend):
    """Jobs whose running time is about their time limit, each followed by a
    job without limit on the same runner: the followers never die."""
    rng = random.Random(7)
    exe = make_pool(1)
    pairs = []
    for i in range(100):
        limit = rng.choice([0.001, 0.002, 0.003])
        a = exe.submit(
            jobs.spin_return, limit + rng.uniform(-0.001, 0.001), i, ProcessTimeout(limit)
        )
        b = exe.submit(jobs.spin_return, 0.004, -i)
        pairs.append((i, a, b))
    kinds = {}
    for i, a, b in pairs:
        value, _pid = b.result(timeout=RESULT_WAIT)
        assert value == -i
        try:
            value, _pid = a.result(timeout=RESULT_WAIT)
            assert value == i
            kinds["finished"] = kinds.get("finished", 0) + 1
        except ProcessTimeoutError:
            kinds["timed_out"] = kinds.get("timed_out", 0) + 1
    print("outcomes:", kinds)
    assert exe.stats()["died"] == 0


# -------------------------------------------------------------------------
# time limits (A4)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(jobs.STOP_JOBS))
def test_time_limit_stops_job(make_pool, backend, kind, record_path):
    limit = 0.2
    exe = make_pool(1)
    procs.assert_pool_works(exe)  # the runner is up: the limit counts from the job's start
    start = time.monotonic()
    future = exe.submit(jobs.STOP_JOBS[kind], record_path, ProcessTimeout(limit))
    with pytest.raises(ProcessTimeoutError, match="time limit") as info:
        future.result(timeout=RESULT_WAIT)
    elapsed = time.monotonic() - start
    if sys.version_info >= (3, 11):  # where concurrent.futures.TimeoutError is the builtin
        assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    assert limit * 0.9 <= elapsed < limit + SLACK, elapsed
    procs.assert_gone(procs.read_record(record_path, wait=0))
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_time_limit_other_start_methods(make_pool, method, record_path):
    exe = make_pool(1, mp_context=method)
    procs.assert_pool_works(exe)
    start = time.monotonic()
    future = exe.submit(jobs.gil_c_job, record_path, ProcessTimeout(0.2))
    with pytest.raises(ProcessTimeoutError):
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - start < 0.2 + SLACK
    procs.assert_gone(procs.read_record(record_path, wait=0))


@pytest.mark.timeout(60)
def test_time_limit_kills_the_jobs_tree(make_pool, backend, record_path):
    exe = make_pool(1)
    future = exe.submit(jobs.popen_job, record_path, 2, ProcessTimeout(1.5))
    with pytest.raises(ProcessTimeoutError):
        future.result(timeout=RESULT_WAIT)
    records = procs.read_record(record_path, wait=0)
    assert len(records) == 3, records
    procs.assert_gone(records)


@pytest.mark.timeout(30)
def test_zero_time_limit_stops_at_once(make_pool):
    exe = make_pool(1)
    start = time.monotonic()
    with pytest.raises(ProcessTimeoutError):
        exe.submit(jobs.sleep_return, 20, None, ProcessTimeout(0)).result(timeout=RESULT_WAIT)
    assert time.monotonic() - start < SLACK


@pytest.mark.timeout(30)
def test_job_within_its_limit_returns_and_its_runner_lives_on(make_pool, backend):
    exe = make_pool(1)
    pid = exe.submit(jobs.sleep_pid, 0.05, ProcessTimeout(0.4)).result(timeout=RESULT_WAIT)
    # the next job runs while the finished job's deadline passes
    follower = exe.submit(jobs.sleep_pid, 0.8)
    assert follower.result(timeout=RESULT_WAIT) == pid
    assert exe.stats()["timed_out"] == 0
    assert exe.submit(jobs.getpid).result(timeout=RESULT_WAIT) == pid


@pytest.mark.timeout(30)
def test_time_limit_counts_from_the_start_not_the_submit(make_pool, backend):
    exe = make_pool(1)
    first = exe.submit(jobs.sleep_return, 0.7, "first")
    queued = exe.submit(jobs.sleep_return, 0.3, "queued", ProcessTimeout(0.6))
    assert first.result(timeout=RESULT_WAIT) == "first"
    assert queued.result(timeout=RESULT_WAIT) == "queued"


@pytest.mark.timeout(30)
def test_time_limit_and_grace_together(make_pool, record_path):
    """A cancel with a long grace does not stop the time limit."""
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_job, record_path, ProcessTimeout(0.6), ProcessCancelTimeout(10))
    records = procs.read_record(record_path)
    start = time.monotonic()
    assert future.cancel() is False
    with pytest.raises(ProcessTimeoutError):
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - start < 0.6 + SLACK
    procs.assert_gone(records)


@pytest.mark.timeout(60)
def test_many_time_limits_on_two_runners(make_pool, backend):
    exe = make_pool(2)
    futures = [exe.submit(jobs.sleep_return, 20, None, ProcessTimeout(0.05)) for _ in range(10)]
    futures += [exe.submit(jobs.square, i) for i in range(10)]
    for f in futures[:10]:
        with pytest.raises(ProcessTimeoutError):
            f.result(timeout=RESULT_WAIT)
    assert [f.result(timeout=RESULT_WAIT) for f in futures[10:]] == [i * i for i in range(10)]
    stats = exe.stats()
    assert stats["timed_out"] == 10 and stats["died"] == 0


@pytest.mark.timeout(30)
def test_cancel_with_pool_of_one_keeps_queue_order(make_pool, record_path):
    exe = make_pool(1)
    running = exe.submit(jobs.sleep_job, record_path)
    queued = [exe.submit(jobs.add, i, 0) for i in range(5)]
    records = procs.read_record(record_path)
    assert running.cancel()
    assert [f.result(timeout=RESULT_WAIT) for f in queued] == list(range(5))
    procs.assert_gone(records)


@pytest.mark.timeout(10)
def test_processcancelled_error_is_a_cancelled_error():
    assert issubclass(cancelk.ProcessCancelledError, concurrent.futures.CancelledError)
    err = cancelk.ProcessCancelledError("x")
    assert isinstance(err, concurrent.futures.CancelledError)
