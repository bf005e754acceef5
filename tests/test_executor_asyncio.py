"""asyncio (DESIGN A2, A3, I7, I9): run_in_executor with markers, cancelling
the task (directly, by asyncio.wait_for, by asyncio.timeout) kills the job,
the event loop is never blocked, and killed jobs never reach the user
process's signal handlers.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
import time

import pytest

import cancelk
from cancelk import ProcessCancelTimeout, ProcessTimeout, ProcessTimeoutError

import jobs
import procs
from jobs import RESULT_WAIT, START_METHODS


async def read_record(path, wait=15.0):
    """procs.read_record without blocking the loop."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return procs.read_record(path, wait=0)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)


# -------------------------------------------------------------------------
# markers through run_in_executor


@pytest.mark.timeout(30)
def test_run_in_executor_result_and_time_limit(make_pool, backend):
    exe = make_pool(2)

    async def main():
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(exe, jobs.add, 2, 3) == 5
        start = time.monotonic()
        with pytest.raises(ProcessTimeoutError):
            await loop.run_in_executor(exe, jobs.sleep_return, 20, None, ProcessTimeout(0.2))
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert 0.18 <= elapsed < 1.5


@pytest.mark.timeout(30)
def test_gather_many_jobs(make_pool):
    exe = make_pool(2)

    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(exe, jobs.square, i) for i in range(40)))

    assert asyncio.run(main()) == [i * i for i in range(40)]


# -------------------------------------------------------------------------
# cancelling the asyncio side kills the job


@pytest.mark.timeout(30)
def test_cancelling_the_task_kills_the_job(make_pool, backend, record_path):
    exe = make_pool(1)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(loop.run_in_executor(exe, jobs.sleep_job, record_path))
        records = await read_record(record_path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return records

    records = asyncio.run(main())
    procs.assert_gone(records)
    assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2
    assert exe.stats()["cancelled"] == 1


@pytest.mark.timeout(30)
def test_cancelling_a_coroutine_awaiting_the_job_kills_it(make_pool, record_path):
    exe = make_pool(1)

    async def work():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(exe, jobs.sleep_job, record_path)

    async def main():
        task = asyncio.create_task(work())
        records = await read_record(record_path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return records

    procs.assert_gone(asyncio.run(main()))


@pytest.mark.timeout(30)
def test_wait_for_kills_the_job(make_pool, backend, record_path):
    exe = make_pool(1)

    async def main():
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(exe, jobs.sleep_job, record_path), 0.5)
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert elapsed < 1.8
    procs.assert_gone(procs.read_record(record_path, wait=0))


@pytest.mark.timeout(30)
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout() is new in Python 3.11")
def test_asyncio_timeout_kills_the_job(make_pool, record_path):
    exe = make_pool(1)

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await loop.run_in_executor(exe, jobs.sleep_job, record_path)

    asyncio.run(main())
    procs.assert_gone(procs.read_record(record_path, wait=0))


@pytest.mark.timeout(30)
def test_task_cancel_with_grace_lets_the_job_run_then_kills_it(make_pool, record_path):
    grace = 1.0
    exe = make_pool(1)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            loop.run_in_executor(exe, jobs.sleep_job, record_path, ProcessCancelTimeout(grace))
        )
        records = await read_record(record_path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return records

    records = asyncio.run(main())
    cancelled_at = time.monotonic()
    time.sleep(0.2)
    assert procs.still_there(records), "the job was killed before its grace ended"
    procs.assert_gone(records, timeout=grace + 1.5)
    assert time.monotonic() - cancelled_at >= grace * 0.9


@pytest.mark.timeout(30)
def test_options_view_in_run_in_executor(make_pool):
    exe = make_pool(1)

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(ProcessTimeoutError):
            await loop.run_in_executor(exe.options(timeout=0.2), time.sleep, 20)
        return await loop.run_in_executor(exe.options(timeout=5), jobs.add, 1, 2)

    assert asyncio.run(main()) == 3


# -------------------------------------------------------------------------
# the seed README's asyncio examples, with only the import changed
# (times shortened: 10 s jobs, stopped after 0.5 s instead of 5 s)


@pytest.mark.timeout(30)
def test_seed_readme_wait_for_example(capsys):
    import cancelk as cancelkulture
    from cancelk import ProcessPoolExecutor

    assert ProcessPoolExecutor is cancelkulture.ProcessPoolExecutor
    before = procs.descendants()

    async def awork():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(ProcessPoolExecutor(), time.sleep, 10.0)

    async def main():
        try:
            await asyncio.wait_for(awork(), 0.5)
        except asyncio.TimeoutError:
            print("Timed out!")

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 2.0
    assert "Timed out!" in capsys.readouterr().out
    # the unnamed executor is dropped: its job and processes go away
    left = procs.wait_gone(sorted(procs.descendants() - before), timeout=5)
    assert not left, left


@pytest.mark.timeout(30)
def test_seed_readme_task_cancel_example(capsys):
    from cancelk import ProcessPoolExecutor

    before = procs.descendants()

    async def awork():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(ProcessPoolExecutor(), time.sleep, 10.0)

    async def main():
        t = asyncio.create_task(awork())
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, t.cancel)
        try:
            await t
        except asyncio.CancelledError:
            print("Cancelled!")

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 2.0
    assert "Cancelled!" in capsys.readouterr().out
    left = procs.wait_gone(sorted(procs.descendants() - before), timeout=5)
    assert not left, left


@pytest.mark.timeout(30)
def test_seed_readme_partial_and_cancel_timeout_example(record_path):
    from cancelk import ProcessCancelTimeout, ProcessPoolExecutor

    executors = []

    async def work():
        loop = asyncio.get_running_loop()
        exe = ProcessPoolExecutor()
        executors.append(exe)
        return await loop.run_in_executor(
            exe,
            functools.partial(jobs.sleep_job, record_path),
            ProcessCancelTimeout(0.3),
        )

    async def main():
        task = asyncio.create_task(work())
        records = await read_record(record_path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return records

    try:
        records = asyncio.run(main())
        procs.assert_gone(records, timeout=0.3 + 1.5)
    finally:
        for exe in executors:
            exe.shutdown(wait=True, cancel_futures=True, timeout=5)


# -------------------------------------------------------------------------
# the loop is never blocked (I7)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_event_loop_is_never_blocked(make_pool, method):
    exe = make_pool(2, mp_context=method)

    async def ticker(lags, stop):
        period = 0.005
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(period)
            lags.append(loop.time() - before - period)

    async def main():
        loop = asyncio.get_running_loop()
        lags, stop = [], asyncio.Event()
        tick = asyncio.create_task(ticker(lags, stop))
        await asyncio.sleep(0.05)
        # the first submit starts the pool's supervisor from inside the loop
        tasks = [
            asyncio.ensure_future(loop.run_in_executor(exe, jobs.sleep_return, 20))
            for _ in range(10)
        ]
        tasks += [
            asyncio.ensure_future(
                loop.run_in_executor(exe, jobs.sleep_return, 20, None, ProcessTimeout(0.1))
            )
            for _ in range(4)
        ]
        tasks += [
            asyncio.ensure_future(loop.run_in_executor(exe, jobs.square, i)) for i in range(20)
        ]
        for _ in range(10):
            await asyncio.sleep(0.05)
            for task in tasks[:10]:
                if not task.done():
                    task.cancel()
                    break
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stop.set()
        await tick
        return lags, results

    lags, results = asyncio.run(main())
    assert len(lags) > 20
    assert max(lags) < 0.2, f"the event loop was blocked for {max(lags):.3f} s"
    assert all(isinstance(r, asyncio.CancelledError) for r in results[:10])
    assert all(isinstance(r, ProcessTimeoutError) for r in results[10:14])
    assert results[14:] == [i * i for i in range(20)]


# -------------------------------------------------------------------------
# signal handlers of the user process are never called for killed jobs (I9)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_killed_jobs_never_call_the_users_signal_handlers(make_pool, backend, method, record_path):
    calls = {"SIGCHLD": 0, "SIGTERM": 0}

    def on_signal(name):
        calls[name] += 1

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, on_signal, "SIGCHLD")
        loop.add_signal_handler(signal.SIGTERM, on_signal, "SIGTERM")
        # the pool (and, for fork, its supervisor) starts after the handlers
        exe = make_pool(2, mp_context=method)
        assert await loop.run_in_executor(exe, jobs.add, 1, 1) == 2
        task = asyncio.ensure_future(loop.run_in_executor(exe, jobs.popen_job, record_path))
        records = await read_record(record_path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ProcessTimeoutError):
            await loop.run_in_executor(exe, jobs.sleep_return, 20, None, ProcessTimeout(0.1))
        with pytest.raises(cancelk.ProcessDiedError):
            await loop.run_in_executor(exe, jobs.sigterm_self)
        with pytest.raises(cancelk.ProcessDiedError):
            await loop.run_in_executor(exe, jobs.kill_self, signal.SIGSEGV)
        with pytest.raises(cancelk.ProcessDiedError):
            await loop.run_in_executor(exe, jobs.exit_with, 2)
        assert await loop.run_in_executor(exe, jobs.add, 2, 2) == 4
        await asyncio.sleep(0.3)  # a stray wakeup byte would be handled by now
        seen = dict(calls)
        loop.remove_signal_handler(signal.SIGCHLD)
        loop.remove_signal_handler(signal.SIGTERM)
        return records, seen

    records, seen = asyncio.run(main())
    assert seen == {"SIGCHLD": 0, "SIGTERM": 0}, seen
    procs.assert_gone(records)
