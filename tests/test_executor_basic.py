"""cancelk.ProcessPoolExecutor as a drop-in stdlib pool (DESIGN A1, A2, A6, A8).

Results, exceptions, map, validation, the seed README's synchronous examples,
markers, option views, stats, Future.pid, initializers, max_tasks_per_child
and start methods. Timing bounds are generous: a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import math
import os
import sys
import textwrap
import threading
import time

import psutil
import pytest

import cancelk
from cancelk import ProcessCancelTimeout, ProcessTimeout, ProcessTimeoutError

import jobs
import procs
from jobs import RESULT_WAIT, START_METHODS


def module_level_cube(x):
    """Defined in the test module itself: runners must import it by name."""
    return x * x * x


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param


# -------------------------------------------------------------------------
# drop-in shape


@pytest.mark.timeout(30)
def test_is_a_stdlib_process_pool_and_futures_are_stdlib_futures(make_pool):
    exe = make_pool(1)
    assert isinstance(exe, concurrent.futures.ProcessPoolExecutor)
    future = exe.submit(jobs.add, 1, 2)
    assert isinstance(future, concurrent.futures.Future)
    assert isinstance(future, cancelk.Future)
    assert future.result(timeout=RESULT_WAIT) == 3
    assert issubclass(cancelk.ProcessTimeoutError, concurrent.futures.TimeoutError)
    if sys.version_info >= (3, 11):  # where concurrent.futures.TimeoutError is the builtin
        assert issubclass(cancelk.ProcessTimeoutError, TimeoutError)
    assert issubclass(cancelk.ProcessCancelledError, concurrent.futures.CancelledError)


@pytest.mark.timeout(60)
def test_results_and_kwargs_for_every_start_method(make_pool, start_method):
    exe = make_pool(2, mp_context=start_method)
    futures = [exe.submit(jobs.square, i) for i in range(10)]
    assert [f.result(timeout=RESULT_WAIT) for f in futures] == [i * i for i in range(10)]
    got = exe.submit(jobs.echo, 1, "a", key=[2]).result(timeout=RESULT_WAIT)
    assert got == ((1, "a"), {"key": [2]})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_function_from_the_test_module_under_spawn_and_forkserver(make_pool, method):
    exe = make_pool(1, mp_context=method)
    assert exe.submit(module_level_cube, 3).result(timeout=RESULT_WAIT) == 27


MAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import cancelk

    STATE = {}

    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    def init(tag):
        STATE["tag"] = tag

    def norm2(p):
        return p.x * p.x + p.y * p.y, STATE.get("tag")

    if __name__ == "__main__":
        with cancelk.ProcessPoolExecutor(2, mp_context=sys.argv[1], initializer=init,
                                         initargs=("from-main",)) as exe:
            print(exe.submit(norm2, Point(3, 4)).result(timeout=30))
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_functions_and_initializer_defined_in_a_scripts_main(tmp_path, method):
    proc = procs.run_script(tmp_path, "main_script.py", MAIN_SCRIPT, method)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(25, 'from-main')", (proc.stdout, proc.stderr)


@pytest.mark.timeout(30)
def test_stdlib_positional_constructor_arguments(make_pool):
    import multiprocessing

    exe = make_pool(1, multiprocessing.get_context("fork"), jobs.init_record, ("positional",))
    info = exe.submit(jobs.init_info).result(timeout=RESULT_WAIT)
    assert info["args"] == ("positional",)
    # fn is positional-only: a keyword argument named fn goes to the function
    assert exe.submit(jobs.echo, fn=1).result(timeout=RESULT_WAIT) == ((), {"fn": 1})
    assert list(exe.map(jobs.add, [], [])) == []
    assert list(exe.map(jobs.add, [1, 2, 3], [10, 20])) == [11, 22]  # zip semantics


@pytest.mark.timeout(30)
def test_mp_context_object_is_accepted(make_pool):
    import multiprocessing

    exe = make_pool(1, mp_context=multiprocessing.get_context("fork"))
    assert exe.submit(jobs.add, 2, 3).result(timeout=RESULT_WAIT) == 5


# -------------------------------------------------------------------------
# exceptions


@pytest.mark.timeout(30)
def test_job_exception_has_its_type_and_remote_traceback(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.raise_job_error, "boom 42")
    with pytest.raises(jobs.JobError, match="boom 42") as info:
        future.result(timeout=RESULT_WAIT)
    assert type(info.value) is jobs.JobError
    cause = info.value.__cause__
    assert cause is not None, "the remote traceback is not attached as __cause__"
    text = str(cause)
    assert "_deep_frame_of_the_job" in text  # a frame only the job's process ran
    assert "raise_job_error" in text
    assert "JobError: boom 42" in text
    assert isinstance(future.exception(timeout=RESULT_WAIT), jobs.JobError)
    # the pool goes on
    assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2


@pytest.mark.timeout(30)
def test_system_exit_in_job_is_that_jobs_exception(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.raise_system_exit, 5)
    with pytest.raises(SystemExit) as info:
        future.result(timeout=RESULT_WAIT)
    assert info.value.code == 5
    assert exe.submit(jobs.add, 2, 2).result(timeout=RESULT_WAIT) == 4


@pytest.mark.timeout(30)
def test_submit_not_callable_raises_type_error(make_pool):
    exe = make_pool(1)
    with pytest.raises(TypeError):
        exe.submit(42)


# -------------------------------------------------------------------------
# map


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 3, 7])
def test_map_in_order_for_every_chunksize(make_pool, chunksize):
    exe = make_pool(2)
    got = list(exe.map(jobs.add, range(20), range(100, 120), chunksize=chunksize))
    assert got == [i + 100 + i for i in range(20)]


@pytest.mark.timeout(30)
def test_map_chunksize_zero_is_rejected(make_pool):
    exe = make_pool(1)
    with pytest.raises(ValueError):
        exe.map(jobs.square, [1], chunksize=0)


@pytest.mark.timeout(30)
def test_map_job_exception_is_raised_by_the_iterator(make_pool):
    exe = make_pool(1)
    results = exe.map(jobs.raise_job_error, ["map boom"])
    with pytest.raises(jobs.JobError, match="map boom"):
        list(results)


@pytest.mark.timeout(30)
def test_map_timeout_raises_timeout_error(make_pool):
    exe = make_pool(2)
    start = time.monotonic()
    results = exe.map(jobs.sleep_return, [2, 2], timeout=0.3)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    assert time.monotonic() - start < 1.5


@pytest.mark.timeout(30)
def test_map_timeout_stops_every_job_of_the_map(make_pool, tmp_path):
    """As in the stdlib, the iterator cancels what it has not delivered when it
    ends with a TimeoutError; for cancelk a cancel stops running jobs. That
    must include the job whose result() just timed out."""
    exe = make_pool(2)
    paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    results = exe.map(jobs.sleep_job, paths, timeout=1.0)
    records = [procs.read_record(p) for p in paths]
    try:
        with pytest.raises(concurrent.futures.TimeoutError):
            next(results)
        left = procs.wait_gone([r for rec in records for r in rec], timeout=2.0)
        assert not left, f"jobs of a timed-out map are still running: {left}"
    finally:
        for rec in records:
            procs.kill_records(rec)


@pytest.mark.timeout(30)
def test_map_buffersize_over_an_endless_iterator(make_pool):
    exe = make_pool(2)
    results = exe.map(jobs.square, itertools.count(), buffersize=2)
    first = list(itertools.islice(results, 10))
    assert first == [i * i for i in range(10)]
    submitted = exe.stats()["submitted"]
    assert submitted <= 10 + 2 + 1, f"buffersize=2 submitted {submitted} jobs for 10 results"
    results.close()  # cancels what is still buffered
    assert exe.stats()["submitted"] == submitted


@pytest.mark.timeout(30)
def test_map_buffersize_validation(make_pool):
    exe = make_pool(1)
    with pytest.raises(ValueError):
        exe.map(jobs.square, [1], buffersize=0)
    with pytest.raises(TypeError):
        exe.map(jobs.square, [1], buffersize=1.5)


# -------------------------------------------------------------------------
# constructor validation and submit after shutdown


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_workers": 0}, ValueError),
        ({"max_workers": -1}, ValueError),
        ({"max_workers": "2"}, TypeError),
        ({"max_workers": 1, "max_tasks_per_child": 0}, ValueError),
        ({"max_workers": 1, "max_tasks_per_child": 1.5}, TypeError),
        ({"max_workers": 1, "initializer": 3}, TypeError),
        ({"max_workers": 1, "timeout": -1}, ValueError),
        ({"max_workers": 1, "timeout": math.nan}, ValueError),
        ({"max_workers": 1, "timeout": "1"}, TypeError),
        ({"max_workers": 1, "cancel_timeout": -0.5}, ValueError),
        ({"max_workers": 1, "mp_context": "no-such-method"}, ValueError),
    ],
)
def test_constructor_validation(kwargs, error):
    before = procs.descendants()
    with pytest.raises(error):
        cancelk.ProcessPoolExecutor(**kwargs)
    assert procs.descendants() <= before  # nothing was started


@pytest.mark.timeout(30)
def test_default_max_workers_is_cpu_count(make_pool):
    exe = make_pool()
    expected = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    assert exe._max_workers == expected
    assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3


@pytest.mark.timeout(30)
def test_submit_after_shutdown_raises_runtime_error(make_pool):
    exe = make_pool(1)
    assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
    exe.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        exe.submit(jobs.add, 1, 2)


@pytest.mark.timeout(30)
def test_submit_after_shutdown_of_unused_pool_raises_runtime_error():
    exe = cancelk.ProcessPoolExecutor(1)
    exe.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        exe.submit(jobs.add, 1, 2)


# -------------------------------------------------------------------------
# the seed README's synchronous examples, with only the import changed


@pytest.mark.timeout(30)
def test_seed_readme_cancel_from_a_thread():
    import cancelk as cancelkulture

    def delayed_cancel(fut, delay):
        time.sleep(delay)
        fut.cancel()

    start = time.monotonic()
    with cancelkulture.ProcessPoolExecutor() as exe:
        fut = exe.submit(
            time.sleep,
            10.0,
            cancelkulture.ProcessCancelTimeout(0.0),
        )
        t = threading.Thread(target=delayed_cancel, args=(fut, 0.5), daemon=True)
        t.start()
        with pytest.raises(cancelkulture.ProcessCancelledError):
            _ = fut.result()
        t.join(timeout=5)
    assert time.monotonic() - start < 3.0


@pytest.mark.timeout(30)
def test_seed_readme_process_timeout():
    import cancelk as cancelkulture

    start = time.monotonic()
    with cancelkulture.ProcessPoolExecutor() as exe:
        fut = exe.submit(
            time.sleep,
            10.0,
            cancelkulture.ProcessTimeout(0.5),
        )
        with pytest.raises(cancelkulture.ProcessTimeoutError):
            _ = fut.result()
    assert time.monotonic() - start < 3.0


@pytest.mark.timeout(30)
def test_seed_readme_result_timeout_is_only_an_alert():
    """fut.result(timeout) raises concurrent.futures.TimeoutError, not a kill:
    the job goes on and completes afterwards."""
    import cancelk as cancelkulture

    with cancelkulture.ProcessPoolExecutor() as exe:
        fut = exe.submit(jobs.sleep_pid, 1.0)
        with pytest.raises(concurrent.futures.TimeoutError) as info:
            _ = fut.result(timeout=0.2)
        assert not isinstance(info.value, cancelkulture.ProcessTimeoutError)
        pid = fut.pid
        assert pid is not None and psutil.pid_exists(pid)
        assert not fut.done()
        assert fut.result(timeout=RESULT_WAIT) == pid
        assert not fut.cancelled()


# -------------------------------------------------------------------------
# markers (A2)


@pytest.mark.timeout(30)
def test_markers_are_removed_from_args_and_keyword_values(make_pool):
    exe = make_pool(1)
    future = exe.submit(
        jobs.echo,
        1,
        ProcessTimeout(20),
        2,
        ProcessCancelTimeout(0.5),
        key=ProcessTimeout(10),
        grace=ProcessCancelTimeout(1),
        other=3,
    )
    assert future.result(timeout=RESULT_WAIT) == ((1, 2), {"other": 3})


@pytest.mark.timeout(30)
def test_marker_in_keyword_value_takes_effect(make_pool):
    exe = make_pool(1)
    start = time.monotonic()
    future = exe.submit(jobs.sleep_return, 20, limit=ProcessTimeout(0.2))
    with pytest.raises(ProcessTimeoutError):
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - start < 1.5


@pytest.mark.timeout(30)
def test_markers_inside_partial_are_not_seen(make_pool):
    """Documented: markers in a functools.partial reach the function."""
    exe = make_pool(1)
    marker = ProcessTimeout(0.1)
    args, kwargs = exe.submit(functools.partial(jobs.echo, marker)).result(timeout=RESULT_WAIT)
    assert args == (marker,) and kwargs == {}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("marker", [ProcessTimeout, ProcessCancelTimeout])
@pytest.mark.parametrize(
    "value, error",
    [
        (-1, ValueError),
        (math.nan, ValueError),
        ("1", TypeError),
        (True, TypeError),
        ([], TypeError),
    ],
)
def test_bad_marker_values_fail_at_submit(make_pool, marker, value, error):
    exe = make_pool(1)
    with pytest.raises(error):
        exe.submit(jobs.add, 1, marker(value))
    with pytest.raises(error):
        exe.submit(jobs.add, 1, b=marker(value))
    assert exe.stats()["submitted"] == 0


@pytest.mark.timeout(30)
def test_infinite_and_none_time_limits_mean_no_limit(make_pool):
    exe = make_pool(2, timeout=0.2)
    a = exe.submit(jobs.sleep_return, 0.6, "a", ProcessTimeout(None))
    b = exe.submit(jobs.sleep_return, 0.6, "b", ProcessTimeout(math.inf))
    assert a.result(timeout=RESULT_WAIT) == "a"
    assert b.result(timeout=RESULT_WAIT) == "b"


# -------------------------------------------------------------------------
# executor-wide defaults and option views


@pytest.mark.timeout(30)
def test_executor_wide_timeout_default(make_pool):
    exe = make_pool(2, timeout=0.3)
    start = time.monotonic()
    slow = exe.submit(jobs.sleep_return, 20)
    fast = exe.submit(jobs.square, 4)
    assert fast.result(timeout=RESULT_WAIT) == 16
    with pytest.raises(ProcessTimeoutError):
        slow.result(timeout=RESULT_WAIT)
    assert time.monotonic() - start < 1.8
    # a marker overrides the default
    assert (
        exe.submit(jobs.sleep_return, 0.6, "ok", ProcessTimeout(5)).result(timeout=RESULT_WAIT)
        == "ok"
    )


@pytest.mark.timeout(30)
def test_options_view_with_submit_and_run_in_executor(make_pool):
    exe = make_pool(2)
    view = exe.options(timeout=0.3)
    assert isinstance(view, concurrent.futures.Executor)
    assert view.submit(jobs.square, 5).result(timeout=RESULT_WAIT) == 25
    start = time.monotonic()
    with pytest.raises(ProcessTimeoutError):
        view.submit(jobs.sleep_return, 20).result(timeout=RESULT_WAIT)
    assert time.monotonic() - start < 1.8

    async def main():
        loop = asyncio.get_running_loop()
        begun = time.monotonic()
        with pytest.raises(ProcessTimeoutError):
            await loop.run_in_executor(view, jobs.sleep_return, 20)
        return time.monotonic() - begun

    assert asyncio.run(main()) < 1.8
    # the executor itself keeps its own defaults: no limit
    assert exe.submit(jobs.sleep_return, 0.6, "plain").result(timeout=RESULT_WAIT) == "plain"
    # views share the pool
    assert exe.stats()["timed_out"] == 2
    assert list(view.map(jobs.square, [1, 2, 3])) == [1, 4, 9]


@pytest.mark.timeout(30)
def test_options_view_of_a_view_and_bad_values(make_pool):
    exe = make_pool(1)
    view = exe.options(timeout=0.2).options(cancel_timeout=2.0)
    future = view.submit(jobs.sleep_return, 20)
    with pytest.raises(ProcessTimeoutError):
        future.result(timeout=RESULT_WAIT)
    with pytest.raises(ValueError):
        exe.options(timeout=-1)
    with pytest.raises(TypeError):
        exe.options(cancel_timeout="soon")


# -------------------------------------------------------------------------
# introspection (A8)


@pytest.mark.timeout(30)
def test_future_pid_is_the_jobs_pid_while_it_runs(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_pid, 0.8)
    pid = procs.wait_running(future)
    assert psutil.pid_exists(pid)
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert future.result(timeout=RESULT_WAIT) == pid  # the job ran in that very process
    assert future.pid is None
    pending = exe.submit(jobs.add, 1, 1)
    assert pending.result(timeout=RESULT_WAIT) == 2
    assert pending.pid is None


@pytest.mark.timeout(30)
def test_stats_counts(make_pool):
    exe = make_pool(2)
    assert exe.stats()["submitted"] == 0
    for f in [exe.submit(jobs.square, i) for i in range(3)]:
        f.result(timeout=RESULT_WAIT)
    timed = exe.submit(jobs.sleep_return, 20, None, ProcessTimeout(0.1))
    with pytest.raises(ProcessTimeoutError):
        timed.result(timeout=RESULT_WAIT)
    running = exe.submit(jobs.sleep_return, 20)
    procs.wait_running(running)
    assert running.cancel()
    died = exe.submit(jobs.exit_with, 3)
    with pytest.raises(cancelk.ProcessDiedError):
        died.result(timeout=RESULT_WAIT)
    deadline = time.monotonic() + 10
    while exe.stats()["processes_started"] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = exe.stats()
    assert stats["submitted"] == 6
    assert stats["started"] == 6
    assert stats["finished"] == 3
    assert stats["timed_out"] == 1
    assert stats["cancelled"] == 1
    assert stats["died"] == 1
    assert stats["processes_started"] == 2 + 3  # two runners, three replaced
    assert stats["running"] == 0
    assert stats["pending"] == 0


# -------------------------------------------------------------------------
# initializer and max_tasks_per_child


@pytest.mark.timeout(60)
def test_initializer_runs_once_per_runner(make_pool, start_method):
    exe = make_pool(2, mp_context=start_method, initializer=jobs.init_record, initargs=("a", 1))
    infos = [f.result(timeout=RESULT_WAIT) for f in [exe.submit(jobs.init_info) for _ in range(12)]]
    pids = {info["pid"] for info in infos}
    assert 1 <= len(pids) <= 2
    for info in infos:
        assert info["calls"] == 1, info
        assert info["init_pid"] == info["pid"], info  # it ran in the runner itself
        assert info["args"] == ("a", 1), info


@pytest.mark.timeout(60)
def test_max_tasks_per_child_one_gives_a_fresh_process_per_job(make_pool, start_method):
    exe = make_pool(
        1,
        mp_context=start_method,
        max_tasks_per_child=1,
        initializer=jobs.init_record,
        initargs=("fresh",),
    )
    infos = [exe.submit(jobs.init_info).result(timeout=RESULT_WAIT) for _ in range(4)]
    pids = [info["pid"] for info in infos]
    assert len(set(pids)) == 4, pids
    assert all(info["calls"] == 1 for info in infos), infos


@pytest.mark.timeout(60)
def test_max_tasks_per_child_two(make_pool):
    exe = make_pool(1, max_tasks_per_child=2)
    pids = [exe.submit(jobs.getpid).result(timeout=RESULT_WAIT) for _ in range(6)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5], pids
    assert len(set(pids)) == 3, pids


# -------------------------------------------------------------------------
# large data (jobs go over a socket; what does not fit is sent later)


@pytest.mark.timeout(30)
def test_large_argument_to_an_idle_runner(make_pool):
    exe = make_pool(1)
    assert exe.submit(jobs.add, 0, 0).result(timeout=RESULT_WAIT) == 0
    assert exe.submit(jobs.length, b"x" * (8 << 20)).result(timeout=RESULT_WAIT) == 8 << 20


@pytest.mark.timeout(30)
def test_large_argument_to_a_queued_job(make_pool):
    """The job is dispatched by the manager thread when a runner frees up;
    its payload does not fit the socket buffer in one send."""
    exe = make_pool(1)
    first = exe.submit(jobs.sleep_return, 0.3, "first")
    big = exe.submit(jobs.length, b"x" * (8 << 20))
    assert first.result(timeout=RESULT_WAIT) == "first"
    assert big.result(timeout=5) == 8 << 20


@pytest.mark.timeout(30)
def test_large_argument_as_first_job_of_a_new_pool(make_pool):
    exe = make_pool(1)
    assert exe.submit(jobs.length, b"y" * (8 << 20)).result(timeout=5) == 8 << 20


@pytest.mark.timeout(30)
def test_large_result(make_pool):
    exe = make_pool(1)
    size = 16 << 20
    assert exe.submit(jobs.big_bytes, size).result(timeout=RESULT_WAIT) == jobs.big_bytes(size)


# -------------------------------------------------------------------------
# threads and callbacks


@pytest.mark.timeout(30)
def test_submit_from_done_callbacks(make_pool):
    exe = make_pool(2)
    results, done = [], threading.Event()
    procs.submit_from_callback(exe, [10], results, done)
    assert done.wait(RESULT_WAIT)
    assert results == list(range(11))


@pytest.mark.timeout(60)
def test_concurrent_submit_and_cancel_from_many_threads(make_pool):
    exe = make_pool(2)
    outcomes = []
    lock = threading.Lock()

    def worker(seed):
        futures = []
        for i in range(40):
            value = seed * 1000 + i
            if i % 4 == 0:
                future = exe.submit(jobs.sleep_return, 20, value)
            else:
                future = exe.submit(jobs.spin_return, 0.001, value)
            futures.append((value, future))
            if i % 4 == 0 or i % 7 == 0:
                future.cancel()
        with lock:
            outcomes.extend(futures)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RESULT_WAIT)
    assert len(outcomes) == 240
    _done, not_done = concurrent.futures.wait([f for _, f in outcomes], timeout=RESULT_WAIT)
    assert not not_done, f"{len(not_done)} futures never ended"
    for value, future in outcomes:
        if future.cancelled():
            with pytest.raises(cancelk.ProcessCancelledError):
                future.result(timeout=0)
        else:
            # a job that was not cancelled delivers its own result, never another's
            assert value % 1000 % 4 != 0, "a 20 s job was not stopped"
            assert future.result(timeout=0)[0] == value
    stats = exe.stats()
    assert stats["died"] == 0 and stats["submitted"] == 240


# -------------------------------------------------------------------------
# logging (A8)


@pytest.mark.timeout(30)
def test_kills_are_logged_at_info_and_plain_jobs_are_quiet(make_pool, caplog):
    caplog.set_level(logging.DEBUG, logger="cancelk")
    exe = make_pool(1)
    for f in [exe.submit(jobs.add, i, 1) for i in range(100)]:
        f.result(timeout=RESULT_WAIT)
    assert not [r for r in caplog.records if r.name.startswith("cancelk")], caplog.text
    running = exe.submit(jobs.sleep_return, 20)
    pid = procs.wait_running(running)
    assert running.cancel()
    with pytest.raises(ProcessTimeoutError):
        exe.submit(jobs.sleep_return, 20, None, ProcessTimeout(0.1)).result(timeout=RESULT_WAIT)
    assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2
    infos = [
        r for r in caplog.records if r.name.startswith("cancelk") and r.levelno == logging.INFO
    ]
    texts = [r.getMessage() for r in infos]
    assert any(str(pid) in t and "cancel" in t for t in texts), texts
    assert any("timeout" in t or "time limit" in t for t in texts), texts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spare_runner_imports_the_jobs_module_before_its_first_job(make_pool, method):
    """A spawned supervisor never imports the jobs' modules; its spare runner
    does, ahead of time, so the job after a kill does not wait for the import."""
    exe = make_pool(1, mp_context=method)
    for _ in range(2):  # the first kill makes a spare; the second puts it to work
        running = exe.submit(jobs.sleep_return, 20)
        procs.wait_running(running)
        time.sleep(0.3)  # the spare starts and preloads meanwhile
        assert running.cancel()
    time.sleep(0.3)
    assert exe.submit(jobs.import_age).result(timeout=RESULT_WAIT) > 0.2
