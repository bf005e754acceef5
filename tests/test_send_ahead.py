"""Jobs sent ahead to a busy runner (DESIGN P2, I1, A3): while jobs are short
the pool sends a runner its next job before the current one ends.  Such a job
is still PENDING; a cancel takes it back (it never runs), a kill of the job
before it hands it back to the queue (it runs elsewhere, untouched), and one
stuck behind a long job goes to a free runner.  These run real processes; the
decisions themselves are in tests/unit/test_pool_logic.py."""

from __future__ import annotations

import os
import time

import pytest

import cancelk
from cancelk import ProcessCancelledError

import jobs
import procs
from jobs import RESULT_WAIT


def _warm(exe, count=40):
    """Short jobs first: the pool sends jobs ahead only while jobs are short."""
    for future in [exe.submit(jobs.add, i, 1) for i in range(count)]:
        future.result(timeout=RESULT_WAIT)


def _sent_ahead(exe, future, timeout=5.0):
    """Wait until ``future``'s job waits in a busy runner's channel."""
    pool = exe._manager.pool
    job = future._cancelk_job
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(slot.next is job for slot in pool.slots):
            return True
        time.sleep(0.001)
    return False


@pytest.mark.timeout(60)
def test_a_job_sent_ahead_survives_the_kill_of_the_job_before_it(make_pool, backend):
    exe = make_pool(1)
    _warm(exe)
    victim = exe.submit(jobs.sleep_pid, 30)
    procs.wait_running(victim)
    runner = victim.pid
    behind = exe.submit(jobs.add, 20, 22)
    assert _sent_ahead(exe, behind), "the pool did not send the job ahead"
    assert not behind.running() and behind.pid is None
    assert victim.cancel() is True
    with pytest.raises(ProcessCancelledError):
        victim.result(timeout=RESULT_WAIT)
    assert behind.result(timeout=RESULT_WAIT) == 42, "handed back, then run by a new runner"
    assert procs.wait_pid_gone(runner)
    assert exe.stats()["finished"] == 41 and exe.stats()["cancelled"] == 1


@pytest.mark.timeout(60)
def test_cancel_of_a_job_sent_ahead_means_it_never_runs(make_pool, tmp_path):
    exe = make_pool(1)
    _warm(exe)
    first = exe.submit(jobs.sleep_return, 0.5, "first")
    procs.wait_running(first)
    behind = exe.submit(jobs.mark, str(tmp_path), "behind")
    assert _sent_ahead(exe, behind)
    assert behind.cancel() is True and behind.cancelled()
    assert first.result(timeout=RESULT_WAIT) == "first", "the job before it is untouched"
    assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2
    assert not os.path.exists(tmp_path / "behind"), "a job cancelled while pending ran"
    assert first.pid is None and exe.stats()["cancelled"] == 1


@pytest.mark.timeout(120)
def test_racing_cancels_never_run_a_job_reported_cancelled_before_it_started(
    make_pool, tmp_path, scale
):
    """Cancels race the runners taking their next job: a job whose future says
    it was cancelled before it started left no trace; one that finished did;
    every future ends and the counts add up."""
    exe = make_pool(2)
    _warm(exe)
    named = []
    for r in range(scale(20, 400)):
        batch = [(f"{r}-{i}", exe.submit(jobs.mark, str(tmp_path), f"{r}-{i}")) for i in range(60)]
        named += batch
        for _, future in batch[5::3]:
            future.cancel()
    for name, future in named:
        try:
            assert future.result(timeout=RESULT_WAIT)[0] == name
            assert os.path.exists(tmp_path / name), f"job {name} finished without running"
        except ProcessCancelledError as why:
            if "before it started" in str(why):
                assert not os.path.exists(tmp_path / name), f"cancelled job {name} ran"
    stats = exe.stats()
    parts = ("pending", "running", "finished", "failed", "cancelled", "died")
    assert stats["submitted"] == sum(stats[k] for k in parts), stats
    assert stats["died"] == 0 and stats["failed"] == 0 and stats["running"] == 0


@pytest.mark.timeout(60)
def test_a_job_behind_a_long_one_goes_to_a_free_runner(make_pool):
    exe = make_pool(2)
    _warm(exe)
    long = exe.submit(jobs.sleep_return, 20, "long")
    short = exe.submit(jobs.sleep_return, 0.3, "short")
    procs.wait_running(long)
    procs.wait_running(short)
    started = time.monotonic()
    behind = [exe.submit(jobs.add, i, 0) for i in range(4)]
    assert [f.result(timeout=RESULT_WAIT) for f in behind] == [0, 1, 2, 3]
    took = time.monotonic() - started
    assert took < 5, f"jobs waited {took:.1f} s behind a 20 s job"
    assert long.running(), "and the long job goes on"
    assert long.cancel() is True


@pytest.mark.timeout(60)
def test_jobs_with_limits_are_never_sent_ahead(make_pool):
    exe = make_pool(1)
    _warm(exe)
    first = exe.submit(jobs.sleep_return, 0.5, "first")
    procs.wait_running(first)
    limited = exe.submit(jobs.add, 1, 2, cancelk.ProcessTimeout(10))
    assert not _sent_ahead(exe, limited, timeout=0.3), "its limit must count from its start"
    assert limited.result(timeout=RESULT_WAIT) == 3
    assert first.result(timeout=RESULT_WAIT) == "first"


@pytest.mark.timeout(90)
def test_a_busy_pool_with_jobs_sent_ahead_shuts_down_and_leaves_nothing(make_pool):
    exe = make_pool(2)
    _warm(exe)
    futures = [exe.submit(jobs.add, i, 0) for i in range(3000)]
    processes = set(exe._processes) | {exe._manager.io.supervisor.process.pid}
    exe.shutdown(wait=True, cancel_futures=True)
    for i, future in enumerate(futures):
        if not future.cancelled():
            assert future.result(timeout=0) == i
    assert all(f.done() for f in futures)
    for pid in processes:
        assert procs.wait_pid_gone(pid)
