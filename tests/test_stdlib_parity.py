"""Drop-in parity with concurrent.futures.ProcessPoolExecutor (issue 11).

What code written for the stdlib pool relies on, beyond the public API:
exception types it catches, private attributes it reads, what a job sees of
its process (stdin, the authkey), what ``help()`` says, and that the pool
works on every interpreter the project supports.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import gc
import multiprocessing as mp
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref

import pytest

import cancelk
import cancelk.errors
from cancelk._manager_thread import ManagerThread

import jobs
import procs
from jobs import RESULT_WAIT, START_METHODS

# Instance attributes threading.Thread.__init__ sets, on CPython 3.9 to 3.14.
_THREAD_ATTRIBUTES = {
    "_args", "_daemonic", "_handle", "_ident", "_initialized", "_invoke_excepthook",
    "_is_stopped", "_kwargs", "_name", "_native_id", "_started", "_stderr", "_target",
    "_tstate_lock",
}  # fmt: skip


@pytest.mark.timeout(10)
def test_manager_thread_shadows_nothing_threading_sets():
    """A method of the manager thread named like an attribute Thread sets in
    its __init__ is replaced by that attribute (3.13 sets ``_handle``, which
    was a method here: every pool broke on 3.13)."""
    own = set(vars(ManagerThread))
    plain = set(vars(threading.Thread())) | _THREAD_ATTRIBUTES
    assert not own & plain


# --------------------------------------------------------------------------
# 5. a pickling error is caught where the stdlib's is


STDLIB_CATCHES = {
    "unpicklable result (lock)": (jobs.return_lock,),
    "unpicklable result (lambda)": (jobs.return_lambda,),
    "unpicklable result (generator)": (jobs.return_generator,),
    "result whose pickling raises": (jobs.return_refuses_pickling,),
    "exception holding a lock": (jobs.raise_holding_a_lock,),
    "exception whose pickling raises": (jobs.raise_refuses_pickling,),
    "unpicklable exception": (jobs.raise_unpicklable, "held a lock"),
}


@pytest.fixture(scope="module")
def stdlib_errors():
    """The exception each case gives on the stdlib pool itself."""
    errors = {}
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        for name, call in STDLIB_CATCHES.items():
            errors[name] = pool.submit(*call).exception(timeout=RESULT_WAIT)
    return errors


@pytest.mark.timeout(60)
def test_pickling_errors_are_caught_where_the_stdlibs_are(make_pool, stdlib_errors):
    exe = make_pool(1)
    for name, call in STDLIB_CATCHES.items():
        err = exe.submit(*call).exception(timeout=RESULT_WAIT)
        expected = type(stdlib_errors[name])
        assert isinstance(err, cancelk.ResultPicklingError), (name, repr(err))
        # code written for the stdlib pool catches it as before ...
        assert isinstance(err, expected), f"{name}: {err!r} is no {expected.__name__}"
        # ... and the message says what could not be pickled
        assert "could not be pickled" in str(err), (name, str(err))
        assert type(err.__cause__) is concurrent.futures.process._RemoteTraceback, name
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_result_that_fails_to_unpickle_keeps_the_unpicklers_type(make_pool):
    err = make_pool(1).submit(jobs.return_unloadable).exception(timeout=RESULT_WAIT)
    assert isinstance(err, cancelk.ResultPicklingError) and isinstance(err, TypeError), repr(err)
    assert "could not be unpickled" in str(err)


@pytest.mark.timeout(30)
def test_remote_traceback_is_the_stdlibs_class(make_pool):
    err = make_pool(1).submit(jobs.raise_job_error, "x").exception(timeout=RESULT_WAIT)
    assert type(err) is jobs.JobError
    assert type(err.__cause__) is concurrent.futures.process._RemoteTraceback
    assert "raise_job_error" in err.__cause__.tb


def test_result_pickling_error_is_exported():
    assert cancelk.ResultPicklingError is cancelk.errors.ResultPicklingError
    assert "ResultPicklingError" in cancelk.__all__


# --------------------------------------------------------------------------
# 2. map lets go of each result once it is yielded (CPython's bpo-14406 test)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "options", [{}, {"chunksize": 3}, {"buffersize": 2}, {"timeout": 30}], ids=repr
)
def test_map_keeps_no_result_it_has_yielded(make_pool, options):
    exe = make_pool(2)
    seen = 0
    for obj in exe.map(jobs.make_token, range(10), **options):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None, f"map still holds result {seen}"
        seen += 1
    assert seen == 10


# --------------------------------------------------------------------------
# 1. a job can use the Manager proxies the user process gives it


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_manager_proxies_work_in_jobs(make_pool, method):
    """Proxies authenticate with the user process's authkey, which the
    stdlib passes to its workers; so must cancelk, under every start method."""
    manager = mp.get_context("fork").Manager()
    try:
        queue, event, shared = manager.Queue(), manager.Event(), manager.dict()
        exe = make_pool(1, mp_context=method)
        assert exe.submit(jobs.put_in, queue, "progress").result(timeout=RESULT_WAIT)
        assert queue.get(timeout=RESULT_WAIT) == "progress"
        exe.submit(jobs.put_in, event).result(timeout=RESULT_WAIT)
        assert event.is_set()
        exe.submit(shared.update, {"done": True}).result(timeout=RESULT_WAIT)
        assert shared["done"] is True
    finally:
        manager.shutdown()


# --------------------------------------------------------------------------
# 4. a job's stdin is /dev/null, as in the stdlib's workers

STDIN_SCRIPT = """
import os, sys
import cancelk

def read_stdin():
    try:
        line = input()
    except EOFError:
        line = "EOFError"
    return line, os.read(0, 100)

if __name__ == "__main__":
    with cancelk.ProcessPoolExecutor(1, mp_context=sys.argv[1]) as pool:
        print(pool.submit(read_stdin).result(timeout=30))
    print("the user read:", sys.stdin.readline().strip())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_jobs_read_no_stdin(tmp_path, method):
    script = tmp_path / "stdin_script.py"
    script.write_text(STDIN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), method],
        input="typed by the user\n",
        capture_output=True,
        text=True,
        timeout=40,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "('EOFError', b'')",
        "the user read: typed by the user",
    ], proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# 6. the stdlib pool's private attributes that code in the wild reads


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_compatibility_views(make_pool, method):
    exe = make_pool(3, mp_context=method)
    assert exe._max_workers == 3
    assert exe._mp_context.get_start_method() == method
    assert exe._broken is False
    assert exe._executor_manager_thread is None  # not started yet
    assert exe._processes == {}
    futures = [exe.submit(jobs.sleep_return, 0.2, i) for i in range(6)]
    processes = exe._processes  # waits for the starting pool's runners
    assert len(processes) == 3
    for pid, handle in processes.items():
        assert handle.pid == pid and handle.is_alive() and handle.exitcode is None
    assert {f.result(timeout=RESULT_WAIT) for f in futures} == set(range(6))
    thread = exe._executor_manager_thread
    assert isinstance(thread, threading.Thread) and thread.is_alive()
    exe.shutdown(wait=False)
    exe._call_queue.join_thread()  # returns once the pool has stopped
    assert not thread.is_alive()
    for handle in processes.values():
        handle.join(timeout=10)
        assert not handle.is_alive() and handle.exitcode is not None
        assert procs.wait_pid_gone(handle.pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_killing_a_runner_through_processes_fails_only_its_job(make_pool, how):
    exe = make_pool(2)
    running = exe.submit(jobs.sleep_return, 60)
    bystander = exe.submit(jobs.sleep_return, 60)  # runners start on demand: two jobs, two
    pid = procs.wait_running(running)
    procs.wait_running(bystander)
    handle = exe._processes[pid]
    other = next(h for p, h in exe._processes.items() if p != pid)
    getattr(handle, how)()
    err = running.exception(timeout=RESULT_WAIT)
    assert isinstance(err, cancelk.ProcessDiedError) and err.pid == pid, repr(err)
    assert "executor._processes" in str(err), str(err)
    handle.join(timeout=10)
    assert not handle.is_alive() and handle.exitcode == -signal.SIGKILL
    assert other.is_alive() and bystander.running()
    bystander.cancel()
    procs.assert_pool_works(exe)  # the pool goes on, with a new runner
    assert pid not in exe._processes


@pytest.mark.timeout(60)
def test_broken_view_names_what_broke_the_pool(make_pool):
    exe = make_pool(1, initializer=jobs.init_fail, initargs=("boom",))
    for _ in range(20):
        try:
            exe.submit(jobs.add, 1, 1).exception(timeout=RESULT_WAIT)
        except concurrent.futures.process.BrokenProcessPool:
            break
    assert exe._broken and "boom" in exe._broken, exe._broken


def test_max_tasks_per_child_defaults_to_spawn_as_in_the_stdlib():
    exe = cancelk.ProcessPoolExecutor(1, max_tasks_per_child=2)
    assert exe._mp_context.get_start_method() == "spawn"
    exe.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_failing_initializer_logs_where_it_ran_and_its_queue_arrives(make_pool, method):
    """CPython's test_init: a multiprocessing Queue among the initargs works
    under every start method, the failure is logged on the initializer's
    process on the concurrent.futures logger, and what it put is flushed
    before the runner exits."""
    ctx = mp.get_context(method)
    log_queue = ctx.Queue()
    try:
        exe = make_pool(
            1, mp_context=ctx, initializer=jobs.init_log_to_queue, initargs=(log_queue, True)
        )
        err = exe.submit(jobs.add, 1, 1).exception(timeout=RESULT_WAIT)
        assert isinstance(err, concurrent.futures.process.BrokenProcessPool), repr(err)
        # each runner that tried (and a spare) put its line, then its record
        seen = []
        while not any(not isinstance(m, str) for m in seen):
            seen.append(log_queue.get(timeout=RESULT_WAIT))
        assert isinstance(seen[0], str) and seen[0].startswith("initialized in"), seen
        text = seen[-1].getMessage()
        assert "Exception in initializer" in text and "error in initializer" in text, text
    finally:
        log_queue.close()
        log_queue.join_thread()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_dropped_executor_with_an_unread_map_finishes_and_stops(method):
    """CPython's test_del_shutdown: a map's iterator keeps no reference to the
    executor, so a dropped executor shuts down and its thread ends."""
    exe = cancelk.ProcessPoolExecutor(2, mp_context=method)
    results = exe.map(abs, range(-5, 5))
    thread = exe._executor_manager_thread
    processes = exe._processes
    del exe
    gc.collect()
    thread.join(timeout=RESULT_WAIT)
    assert not thread.is_alive()
    for handle in processes.values():
        handle.join(timeout=10)
    assert list(results) == [abs(i) for i in range(-5, 5)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_shutdown_cancel_futures_right_after_submit_runs_the_first_jobs(make_pool, method):
    """CPython's test_cancel_futures: the stdlib's submit starts its workers,
    so the first jobs run even if shutdown(cancel_futures=True) follows at once."""
    exe = make_pool(3, mp_context=method)
    futures = [exe.submit(jobs.sleep_return, 0.1, i) for i in range(30)]
    exe.shutdown(cancel_futures=True)
    ran = [f for f in futures if not f.cancelled()]
    assert 0 < len(ran) < 30, len(ran)
    assert all(f.exception(timeout=0) is None for f in ran)


# --------------------------------------------------------------------------
# 7. no ResourceWarning from any process of a pool (python -X dev)

DEV_MODE_SCRIPT = """
import os, sys, threading, time
import cancelk

def die():
    os._exit(3)

if __name__ == "__main__":
    pool = cancelk.ProcessPoolExecutor(2, mp_context=sys.argv[1], initializer=abs, initargs=(1,))
    with pool:
        print(pool.submit(abs, -3).result())
        late = pool.submit(time.sleep, 10, cancelk.ProcessTimeout(0.1))
        print(type(late.exception()).__name__)
        running = pool.submit(time.sleep, 10)
        while not running.running():
            time.sleep(0.01)
        time.sleep(0.1)
        running.cancel()
        print(type(pool.submit(die).exception()).__name__)
        print(sorted(pool.map(abs, range(-3, 0))))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_no_resource_warning_in_dev_mode(tmp_path, method):
    script = tmp_path / "dev_mode_script.py"
    script.write_text(DEV_MODE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", str(script), method],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "3",
        "ProcessTimeoutError",
        "ProcessDiedError",
        "[1,",
        "2,",
        "3]",
    ]
    assert "ResourceWarning" not in proc.stderr and "Exception ignored" not in proc.stderr, (
        proc.stderr
    )


# --------------------------------------------------------------------------
# 7. help() tells cancelk's behaviour, not the stdlib's


def test_help_describes_cancelk_not_the_stdlib():
    stdlib = concurrent.futures.ProcessPoolExecutor
    for name in ("submit", "map", "shutdown"):
        doc = getattr(cancelk.ProcessPoolExecutor, name).__doc__
        assert doc and doc != getattr(stdlib, name).__doc__, name
    assert "ProcessTimeout" in cancelk.ProcessPoolExecutor.submit.__doc__
    assert "timeout" in cancelk.ProcessPoolExecutor.shutdown.__doc__
    map_doc = cancelk.ProcessPoolExecutor.map.__doc__
    assert "timeout" in map_doc and "killed" in map_doc
    cancel_doc = cancelk.Future.cancel.__doc__
    assert "cannot be cancelled if it is running" not in cancel_doc
    assert "SIGKILL" in cancel_doc
    # nothing of the pool's inner workings looks like API
    extra = {n for n in dir(cancelk.Future) if not n.startswith("_")} - set(
        dir(concurrent.futures.Future)
    )
    assert extra == {"pid"}, extra


def test_options_view_repr(make_pool):
    view = make_pool(1).options(timeout=2, cancel_timeout=0.5)
    assert "timeout=2" in repr(view) and "cancel_timeout=0.5" in repr(view), repr(view)


# --------------------------------------------------------------------------
# 9. Python 3.14's defaults, emulated on the interpreters at hand

PY314_SCRIPT = """
import multiprocessing, os, time
import cancelk

def where():
    return os.getpid()

if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")  # 3.14's default on Linux
    with cancelk.ProcessPoolExecutor(2) as pool:
        print(pool._mp_context.get_start_method())
        print(pool.submit(where).result() != os.getpid())  # a __main__ function
        print(list(pool.map(abs, range(-4, 0), buffersize=2)))
        running = pool.submit(time.sleep, 30)
        while not running.running():
            time.sleep(0.01)
        pool.kill_workers()
        try:
            running.result()
        except cancelk.ProcessCancelledError:
            print("killed")
"""


@pytest.mark.timeout(60)
def test_python_314_defaults(tmp_path):
    script = tmp_path / "py314_script.py"
    script.write_text(PY314_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["forkserver", "True", "[4, 3, 2, 1]", "killed"], (
        proc.stdout + proc.stderr
    )


@pytest.mark.timeout(30)
def test_views_and_cancel_futures_do_not_wait_on_the_manager_thread(make_pool):
    """From a done-callback (the manager thread), reading _processes or
    shutting down with cancel_futures must not wait for runners that only
    that thread can report."""
    exe = make_pool(2)
    seen = []
    done = threading.Event()

    def callback(_future):
        started = time.monotonic()
        seen.append(len(exe._processes))
        exe.shutdown(wait=False, cancel_futures=True)
        seen.append(time.monotonic() - started)
        done.set()

    exe.submit(jobs.add, 1, 1).add_done_callback(callback)
    assert done.wait(RESULT_WAIT)
    assert seen[1] < 1.0, seen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_runners_start_on_demand_and_idle_ones_are_reused(make_pool, method):
    """As the stdlib's since 3.9: a 32-worker pool that runs one job at a time
    holds one runner; a busy one starts as many as it has jobs, up to its size."""
    exe = make_pool(32, mp_context=method)
    pids = {exe.submit(jobs.getpid).result(timeout=RESULT_WAIT) for _ in range(20)}
    assert len(pids) == 1, pids
    assert len(exe._processes) == 1
    busy = make_pool(3, mp_context=method)
    futures = [busy.submit(jobs.sleep_pid, 0.5) for _ in range(6)]
    assert len({f.result(timeout=RESULT_WAIT) for f in futures}) == 3
    assert len(busy._processes) == 3
