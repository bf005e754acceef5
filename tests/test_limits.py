"""Limits for services: memory held under a limit while the job runs,
deadlines that include the time in the queue, and load shedding."""

from __future__ import annotations

import logging
import os
import time

import pytest

import cancelk
from cancelk import (
    PoolFullError,
    ProcessDeadline,
    ProcessMemoryError,
    ProcessMemoryLimit,
    ProcessTimeout,
    ProcessTimeoutError,
)

import jobs
import procs
from jobs import MB, RESULT_WAIT, START_METHODS

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("method", START_METHODS)
def test_a_growing_job_dies_at_its_memory_limit_and_the_pool_goes_on(make_pool, backend, method):
    exe = make_pool(2, mp_context=method)
    assert exe.submit(jobs.square, 3).result(timeout=RESULT_WAIT) == 9
    started = time.monotonic()
    future = exe.submit(jobs.grow, 50, 40, 0.05, ProcessMemoryLimit(300 * MB))
    pid = procs.wait_running(future)
    with pytest.raises(ProcessMemoryError) as info:
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - started < 10
    error = info.value
    assert isinstance(error, MemoryError)
    assert error.limit == 300 * MB
    assert error.peak is not None and 300 * MB < error.peak < 600 * MB, error.peak
    assert procs.wait_pid_gone(pid)
    assert exe.submit(jobs.square, 4).result(timeout=RESULT_WAIT) == 16
    assert exe.stats()["memory_exceeded"] == 1


def test_the_limit_counts_the_jobs_children(make_pool, backend):
    exe = make_pool(1)
    future = exe.submit(jobs.grow_in_child, 50, 40, 0.05, ProcessMemoryLimit(300 * MB))
    with pytest.raises(ProcessMemoryError):
        future.result(timeout=RESULT_WAIT)


def test_untouched_address_space_does_not_count(make_pool, backend):
    exe = make_pool(1)
    future = exe.submit(jobs.reserve_untouched, 4, ProcessMemoryLimit(300 * MB))
    assert future.result(timeout=RESULT_WAIT) == 4


def test_the_log_names_the_memory_watch_once(make_pool, caplog):
    exe = make_pool(1)
    with caplog.at_level(logging.INFO, logger="cancelk"):
        for _ in range(2):
            exe.submit(jobs.value, 1, cancelk.ProcessMemoryLimit(200 * MB)).result(RESULT_WAIT)
    told = [
        r.getMessage() for r in caplog.records if "memory limits are enforced" in r.getMessage()
    ]
    assert len(told) == 1 and "rss-sampling" in told[0], told


def test_a_pool_wide_limit_applies_to_every_job(make_pool, backend):
    exe = make_pool(2, memory_limit=200 * MB)
    futures = [exe.submit(jobs.grow, 50, 20, 0.03) for _ in range(3)]
    for future in futures:
        with pytest.raises(ProcessMemoryError):
            future.result(timeout=RESULT_WAIT)
    assert exe.submit(jobs.grow, 10, 2, 0).result(timeout=RESULT_WAIT) == 20
    view = exe.options(memory_limit=None)
    assert view.submit(jobs.grow, 100, 3, 0).result(timeout=RESULT_WAIT) == 300


@pytest.mark.parametrize("method", START_METHODS)
def test_a_queued_job_past_its_deadline_fails_then_and_never_runs(
    make_pool, backend, method, tmp_path
):
    exe = make_pool(1, mp_context=method)
    exe.submit(jobs.square, 1).result(timeout=RESULT_WAIT)
    blocker = exe.submit(jobs.sleep_return, 2, "done")
    procs.wait_running(blocker)
    marker = tmp_path / "ran"
    submitted = time.monotonic()
    late = exe.submit(jobs.mark_then_sleep, str(marker), 0, ProcessDeadline(0.5))
    with pytest.raises(ProcessTimeoutError, match="deadline"):
        late.result(timeout=RESULT_WAIT)
    failed_after = time.monotonic() - submitted
    assert 0.45 < failed_after < 1.5, failed_after
    assert blocker.result(timeout=RESULT_WAIT) == "done"
    assert exe.submit(jobs.square, 2).result(timeout=RESULT_WAIT) == 4
    assert not marker.exists(), "a job past its deadline must never start"
    stats = exe.stats()
    assert stats["timed_out"] == 1 and stats["pending"] == 0


def test_a_running_job_is_killed_at_its_deadline(make_pool, backend):
    exe = make_pool(1)
    started = time.monotonic()
    future = exe.submit(jobs.sleep_pid, 30, ProcessDeadline.at(time.monotonic() + 0.4))
    pid = procs.wait_running(future)
    with pytest.raises(ProcessTimeoutError, match="deadline"):
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - started < 1.4
    assert procs.wait_pid_gone(pid)


def test_deadline_and_time_limit_the_earlier_wins(make_pool, backend):
    exe = make_pool(1)
    started = time.monotonic()
    future = exe.submit(jobs.sleep_pid, 30, ProcessTimeout(0.3), ProcessDeadline(5))
    with pytest.raises(ProcessTimeoutError, match=r"time limit of 0\.3 s"):
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - started < 1.3


def test_asyncio_gets_deadlines_through_a_view(make_pool, backend):
    import asyncio

    exe = make_pool(1)

    async def main():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(exe.options(deadline=0.3), jobs.sleep_pid, 30)

    started = time.monotonic()
    with pytest.raises(ProcessTimeoutError):
        asyncio.run(main())
    assert time.monotonic() - started < 1.3


@pytest.mark.parametrize("method", START_METHODS)
def test_max_pending_refuses_at_once_and_accepts_when_drained(make_pool, backend, method):
    exe = make_pool(1, mp_context=method, max_pending=2)
    exe.submit(jobs.square, 1).result(timeout=RESULT_WAIT)
    running = exe.submit(jobs.sleep_return, 0.5, "a")
    procs.wait_running(running)
    # The first is sent ahead to the busy runner (running, not queued); two queue.
    queued = [exe.submit(jobs.square, n) for n in (2, 3, 4)]
    assert exe.stats()["pending"] == 2
    began = time.perf_counter()
    with pytest.raises(PoolFullError):
        exe.submit(jobs.square, 5)
    assert time.perf_counter() - began < 0.001 * 20  # a refusal never waits (generous bound)
    assert exe.stats()["refused"] == 1
    assert [f.result(timeout=RESULT_WAIT) for f in queued] == [4, 9, 16]
    assert exe.submit(jobs.square, 6).result(timeout=RESULT_WAIT) == 36


def test_bad_limits_raise_at_submit_and_construction(make_pool):
    with pytest.raises(ValueError):
        ProcessMemoryLimit(0)
    with pytest.raises(TypeError):
        ProcessMemoryLimit(1.5)
    with pytest.raises(ValueError):
        ProcessDeadline(-1)
    with pytest.raises(TypeError):
        ProcessDeadline.at("soon")
    with pytest.raises(ValueError):
        cancelk.ProcessPoolExecutor(1, max_pending=0)
    with pytest.raises(TypeError):
        cancelk.ProcessPoolExecutor(1, memory_limit="1G")
    exe = make_pool(1)
    with pytest.raises(ValueError):
        exe.options(deadline=-0.1)
    with pytest.raises(TypeError):
        exe.options(memory_limit=True)
    assert os.getpid()
