"""killable_wrapper (DESIGN A7), on both C backends.

Three ways to run it:
- as the submitted function of a plain stdlib ProcessPoolExecutor (fork,
  forkserver, spawn): the job is forked from the host worker;
- called directly from this (single-threaded) process: forked from here;
- called directly from a process with another thread: the job runs in a clean
  interpreter, because forking a threaded process is unsafe.

Timing bounds are generous on purpose (2-core CI machines, maybe loaded): they
tell "stopped by the deadline" from "ran on", not precision, which the
benchmarks measure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import cancelk
from cancelk import (
    ProcessCancelledError,
    ProcessDiedError,
    ProcessTimeoutError,
    killable_wrapper,
)
from cancelk.errors import RemoteTraceback, ResultPicklingError

import jobs
import procs
from jobs import GONE, HOST_WORKERS, RESULT_WAIT, SLACK, START_METHODS

SHORT = 0.2  # time limit for jobs that must be stopped
TREE_LIMIT = 0.6  # time limit for jobs that first start processes of their own


def cause_chain_text(exc: BaseException) -> str:
    """Everything the cause/context chain of ``exc`` says."""
    parts = []
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def assert_all_gone(records, job_pid=None, timeout=GONE):
    """Every recorded process is gone; the job itself not even a zombie."""
    reaped = (job_pid,) if job_pid is not None else (records[0][0],)
    # The direct child is reaped by killable_wrapper before it returns: not
    # even a zombie of it may remain.
    direct = procs.still_there([r for r in records if r[0] in reaped])
    assert not direct, f"killable_wrapper returned but its job process remains: {direct}"
    left = procs.wait_gone(records, timeout=timeout, orphaned_zombies_ok=True)
    assert not left, f"processes of the job survived the stop: {left}"


@contextlib.contextmanager
def job_guard(record_path, futures=()):
    """Whatever happens in the test, leave no job process running and no
    future of a host pool pending."""
    try:
        yield
    finally:
        if os.path.exists(record_path):
            procs.kill_records(procs.read_record(record_path, wait=0), reap=True)
        concurrent.futures.wait(list(futures), timeout=RESULT_WAIT)


KILLER = """
import json, os, sys, time
path = sys.argv[1]
deadline = time.monotonic() + 30
while not os.path.exists(path) and time.monotonic() < deadline:
    time.sleep(0.005)
with open(path) as f:
    pid = json.load(f)[0][0]
os.kill(pid, 9)
"""


def no_new_descendants(before):
    now = {p.pid for p in psutil.Process().children(recursive=True)}
    return now - before


# ==========================================================================
# inside a stdlib ProcessPoolExecutor


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param


@pytest.fixture
def host(host_pools, start_method, backend):
    return host_pools[start_method, backend]


def assert_host_ok(host):
    """The host pool survived: its workers live and it still runs jobs."""
    assert not host.worker_problems()
    futures = [host.pool.submit(killable_wrapper, jobs.add, i, 1) for i in range(HOST_WORKERS)]
    assert [f.result(timeout=RESULT_WAIT) for f in futures] == list(range(1, HOST_WORKERS + 1))
    assert not host.worker_problems()


class TestInStdlibPool:
    def test_returns_result(self, host):
        future = host.pool.submit(killable_wrapper, jobs.echo, 1, "a", key=[2])
        assert future.result(timeout=RESULT_WAIT) == ((1, "a"), {"key": [2]})

    def test_job_is_forked_from_host_worker_with_its_state(self, host):
        info = host.pool.submit(killable_wrapper, jobs.host_info).result(timeout=RESULT_WAIT)
        assert info["state"] == host.token  # the initializer ran in the host, the job inherits
        assert info["ppid"] in {w.pid for w in host.workers}
        assert info["pgid"] == info["pid"]  # its own process group
        assert info["backend_env"] == host.backend
        assert info["backend"] == host.backend  # what the wrapper's loop is built with

    def test_job_exception_comes_back_with_remote_traceback(self, host):
        future = host.pool.submit(killable_wrapper, jobs.raise_job_error, "boom 7")
        with pytest.raises(jobs.JobError, match="boom 7") as info:
            future.result(timeout=RESULT_WAIT)
        assert type(info.value) is jobs.JobError
        text = cause_chain_text(info.value)
        assert "raise_job_error" in text  # the job's own frame, from the job's process
        assert "JobError: boom 7" in text

    def test_no_time_limit(self, host):
        future = host.pool.submit(
            killable_wrapper, jobs.sleep_return, 0.3, "slow", killable_wrapper_timeout=None
        )
        assert future.result(timeout=RESULT_WAIT) == "slow"

    @pytest.mark.parametrize("kind", list(jobs.STOP_JOBS))
    def test_timeout_stops_job(self, host, kind, record_path):
        start = time.monotonic()
        future = host.pool.submit(
            killable_wrapper, jobs.STOP_JOBS[kind], record_path, killable_wrapper_timeout=SHORT
        )
        with job_guard(record_path, [future]):
            with pytest.raises(ProcessTimeoutError, match="time limit"):
                future.result(timeout=RESULT_WAIT)
            elapsed = time.monotonic() - start
            assert SHORT * 0.9 <= elapsed < SHORT + SLACK
            assert_all_gone(procs.read_record(record_path, wait=0))
        assert_host_ok(host)

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("kind", list(jobs.TREE_JOBS))
    def test_timeout_kills_job_tree(self, host, kind, record_path):
        start = time.monotonic()
        job = jobs.TREE_JOBS[kind]
        future = host.pool.submit(
            killable_wrapper, job, record_path, killable_wrapper_timeout=TREE_LIMIT
        )
        with job_guard(record_path, [future]):
            with pytest.raises(ProcessTimeoutError):
                future.result(timeout=RESULT_WAIT)
            assert time.monotonic() - start < TREE_LIMIT + SLACK
            records = procs.read_record(record_path, wait=0)
            assert len(records) >= 2, "the job did not start its processes in time"
            assert_all_gone(records)
        assert_host_ok(host)

    def test_cancel_message_stops_running_job(self, host, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        future = host.pool.submit(
            killable_wrapper, jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver
        )
        with job_guard(record_path, [future]):
            records = procs.read_record(record_path)
            start = time.monotonic()
            sender.send("cancel")
            with pytest.raises(ProcessCancelledError, match="cancelled"):
                future.result(timeout=RESULT_WAIT)
            assert time.monotonic() - start < SLACK
            assert_all_gone(records)
        assert_host_ok(host)

    def test_cancel_grace_lets_job_finish(self, host, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        future = host.pool.submit(
            killable_wrapper,
            jobs.record_then,
            record_path,
            0.4,
            "finished",
            killable_wrapper_cancel_pipe=receiver,
        )
        with job_guard(record_path, [future]):
            procs.read_record(record_path)
            sender.send({"cancel_timeout": 10})
            assert future.result(timeout=RESULT_WAIT) == "finished"

    def test_cancel_grace_expires(self, host, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        future = host.pool.submit(
            killable_wrapper, jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver
        )
        with job_guard(record_path, [future]):
            records = procs.read_record(record_path)
            start = time.monotonic()
            sender.send({"cancel_timeout": 0.3})
            with pytest.raises(ProcessCancelledError):
                future.result(timeout=RESULT_WAIT)
            assert 0.25 <= time.monotonic() - start < 0.3 + SLACK
            assert_all_gone(records)
        assert_host_ok(host)

    def test_exit_code(self, host):
        future = host.pool.submit(killable_wrapper, jobs.exit_with, 3)
        with pytest.raises(ProcessDiedError) as info:
            future.result(timeout=RESULT_WAIT)
        assert info.value.exitcode == 3
        assert info.value.signal is None
        assert_host_ok(host)

    def test_segfault(self, host):
        future = host.pool.submit(killable_wrapper, jobs.kill_self, signal.SIGSEGV)
        with pytest.raises(ProcessDiedError, match="SIGSEGV") as info:
            future.result(timeout=RESULT_WAIT)
        assert info.value.signal == signal.SIGSEGV == 11
        assert info.value.exitcode is None
        assert_host_ok(host)

    def test_sigkill_from_outside_suggests_oom(self, host, record_path):
        future = host.pool.submit(killable_wrapper, jobs.sleep_job, record_path)
        with job_guard(record_path, [future]):
            records = procs.read_record(record_path)
            os.kill(records[0][0], signal.SIGKILL)
            with pytest.raises(ProcessDiedError, match="OOM") as info:
                future.result(timeout=RESULT_WAIT)
            assert info.value.signal == signal.SIGKILL
            assert info.value.pid == records[0][0]
            assert_all_gone(records)
        assert_host_ok(host)

    @pytest.mark.parametrize(
        ("job", "type_name"), [(jobs.return_lambda, "function"), (jobs.return_lock, "lock")]
    )
    def test_unpicklable_result(self, host, job, type_name):
        future = host.pool.submit(killable_wrapper, job)
        with pytest.raises(ResultPicklingError, match=type_name):
            future.result(timeout=RESULT_WAIT)
        assert_host_ok(host)

    def test_unpicklable_exception(self, host):
        future = host.pool.submit(killable_wrapper, jobs.raise_unpicklable, "locked in")
        with pytest.raises(ResultPicklingError, match="UnpicklableError") as info:
            future.result(timeout=RESULT_WAIT)
        assert "locked in" in str(info.value)
        assert_host_ok(host)

    def test_result_larger_than_pipe_buffer(self, host):
        size = 8 << 20
        future = host.pool.submit(killable_wrapper, jobs.big_bytes, size)
        assert future.result(timeout=RESULT_WAIT) == jobs.big_bytes(size)


# ==========================================================================
# called directly from this process


class TestDirect:
    """killable_wrapper called in the test process itself (no threads: forked)."""

    @pytest.fixture(autouse=True)
    def _setup(self, backend, single_threaded):
        return None

    def test_forked_job_inherits_host_state(self, monkeypatch):
        monkeypatch.setitem(jobs.STATE, "init", "set-in-host")
        info = killable_wrapper(jobs.main_thread_only)
        assert info["state"] == "set-in-host"
        assert info["ppid"] == os.getpid()
        assert not psutil.pid_exists(info["pid"])

    def test_returns_result_with_args_and_kwargs(self):
        assert killable_wrapper(jobs.echo, 1, [2], k="v") == ((1, [2]), {"k": "v"})
        assert killable_wrapper(jobs.add, 2, b=3) == 5

    def test_job_exception_type_and_remote_traceback(self):
        with pytest.raises(jobs.JobError, match="boom") as info:
            killable_wrapper(jobs.raise_job_error, "boom")
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "raise_job_error" in cause.tb
        assert "JobError: boom" in cause.tb

    @pytest.mark.parametrize("limit", [None, math.inf])
    def test_no_time_limit(self, limit):
        result = killable_wrapper(jobs.sleep_return, 0.3, "slow", killable_wrapper_timeout=limit)
        assert result == "slow"

    def test_zero_time_limit_stops_at_once(self):
        start = time.monotonic()
        with pytest.raises(ProcessTimeoutError):
            killable_wrapper(jobs.sleep_return, 5, "never", killable_wrapper_timeout=0)
        assert time.monotonic() - start < SLACK

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="builtin TimeoutError only from 3.11")
    def test_timeout_is_a_builtin_timeout_error(self):
        with pytest.raises(TimeoutError):
            killable_wrapper(jobs.sleep_return, 5, "never", killable_wrapper_timeout=0.05)

    @pytest.mark.parametrize("kind", list(jobs.STOP_JOBS))
    def test_timeout_stops_job(self, kind, record_path):
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(jobs.STOP_JOBS[kind], record_path, killable_wrapper_timeout=SHORT)
            elapsed = time.monotonic() - start
            assert SHORT * 0.9 <= elapsed < SHORT + SLACK
            assert_all_gone(procs.read_record(record_path, wait=0))

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("kind", list(jobs.TREE_JOBS))
    def test_timeout_kills_job_tree(self, kind, record_path):
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(
                    jobs.TREE_JOBS[kind], record_path, killable_wrapper_timeout=TREE_LIMIT
                )
            assert time.monotonic() - start < TREE_LIMIT + SLACK
            records = procs.read_record(record_path, wait=0)
            assert len(records) >= 2, "the job did not start its processes in time"
            assert_all_gone(records)

    def test_timeout_kills_grandchild_that_left_the_process_group(self, record_path):
        # A7: "On timeout it kills the child's process tree". A grandchild in
        # its own session is still part of the job's tree.
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(
                    jobs.setsid_child_job, record_path, killable_wrapper_timeout=TREE_LIMIT
                )
            records = procs.read_record(record_path, wait=0)
            assert len(records) == 2
            assert_all_gone(records)

    @pytest.mark.parametrize("message", ["cancel", None, {"unrelated": 1}, 0])
    def test_any_cancel_message_cancels(self, cancel_pipe, message, record_path):
        sender, receiver = cancel_pipe
        sender.send(message)
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessCancelledError):
                killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
            assert time.monotonic() - start < SLACK
            if os.path.exists(record_path):  # the job may be killed before it records
                assert_all_gone(procs.read_record(record_path, wait=0))

    def test_cancel_grace_lets_job_finish(self, cancel_pipe):
        sender, receiver = cancel_pipe
        sender.send({"cancel_timeout": 10})
        result = killable_wrapper(
            jobs.sleep_return, 0.3, "finished", killable_wrapper_cancel_pipe=receiver
        )
        assert result == "finished"

    @pytest.mark.parametrize("grace", [math.inf, None])
    def test_unlimited_cancel_grace_lets_job_finish(self, cancel_pipe, grace):
        # As for the executor's ProcessCancelTimeout: infinity (and None, which
        # check_seconds makes of it) means no limit, not "kill now".
        sender, receiver = cancel_pipe
        sender.send({"cancel_timeout": grace})
        result = killable_wrapper(
            jobs.sleep_return, 0.3, "finished", killable_wrapper_cancel_pipe=receiver
        )
        assert result == "finished"

    def test_closed_cancel_pipe_is_refused_without_leaving_a_job(self, cancel_pipe, record_path):
        _, receiver = cancel_pipe
        receiver.close()
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with job_guard(record_path):
            with pytest.raises((OSError, ValueError, TypeError)):
                killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
            deadline = time.monotonic() + GONE
            while no_new_descendants(before) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not no_new_descendants(before), "the job runs on after the error"

    def test_cancel_grace_expires(self, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        sender.send({"cancel_timeout": 0.3})
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessCancelledError):
                killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
            assert 0.25 <= time.monotonic() - start < 0.3 + SLACK
            assert_all_gone(procs.read_record(record_path, wait=0))

    def test_time_limit_before_grace_end_is_a_timeout(self, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        sender.send({"cancel_timeout": 10})
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(
                    jobs.sleep_job,
                    record_path,
                    killable_wrapper_timeout=0.3,
                    killable_wrapper_cancel_pipe=receiver,
                )
            assert time.monotonic() - start < 0.3 + SLACK

    def test_closed_cancel_pipe_does_not_cancel(self, cancel_pipe):
        sender, receiver = cancel_pipe
        sender.close()  # EOF: the other side went away without asking for anything
        result = killable_wrapper(
            jobs.sleep_return, 0.2, "kept", killable_wrapper_cancel_pipe=receiver
        )
        assert result == "kept"

    def test_exit_code(self):
        with pytest.raises(ProcessDiedError, match="code 3") as info:
            killable_wrapper(jobs.exit_with, 3)
        assert info.value.exitcode == 3
        assert info.value.signal is None
        assert not psutil.pid_exists(info.value.pid)

    def test_segfault(self):
        with pytest.raises(ProcessDiedError, match="SIGSEGV") as info:
            killable_wrapper(jobs.kill_self, signal.SIGSEGV)
        assert info.value.signal == signal.SIGSEGV
        assert info.value.exitcode is None

    def test_sigkill_from_outside_suggests_oom(self, record_path):
        # Another process plays the OOM killer: it waits for the job's record,
        # then SIGKILLs the job while killable_wrapper waits for it.
        killer = subprocess.Popen([sys.executable, "-c", KILLER, record_path])
        try:
            with job_guard(record_path):
                with pytest.raises(ProcessDiedError, match="OOM") as info:
                    killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_timeout=60)
                assert info.value.signal == signal.SIGKILL
                records = procs.read_record(record_path, wait=0)
                assert info.value.pid == records[0][0]
                assert_all_gone(records)
        finally:
            killer.kill()
            killer.wait()

    @pytest.mark.parametrize(
        ("job", "type_name"),
        [(jobs.return_lambda, "builtins.function"), (jobs.return_lock, "_thread.lock")],
    )
    def test_unpicklable_result(self, job, type_name):
        start = time.monotonic()
        with pytest.raises(ResultPicklingError, match=type_name):
            killable_wrapper(job)
        assert time.monotonic() - start < 10

    def test_unpicklable_exception(self):
        with pytest.raises(ResultPicklingError, match="UnpicklableError") as info:
            killable_wrapper(jobs.raise_unpicklable, "locked in")
        assert "locked in" in str(info.value)
        assert "raise_unpicklable" in str(info.value.__cause__)

    def test_exception_that_cannot_be_unpickled(self):
        with pytest.raises(ResultPicklingError, match="unpickled"):
            killable_wrapper(jobs.raise_unloadable)

    def test_result_larger_than_pipe_buffer(self):
        size = 8 << 20
        assert killable_wrapper(jobs.big_bytes, size) == jobs.big_bytes(size)

    @pytest.mark.parametrize(
        ("limit", "error"),
        [
            (-1, ValueError),
            (-0.001, ValueError),
            (-math.inf, ValueError),
            (math.nan, ValueError),
            ("1", TypeError),
            (True, TypeError),
            ([1], TypeError),
        ],
    )
    def test_bad_time_limit_rejected_before_any_fork(self, limit, error):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with pytest.raises(error, match="killable_wrapper_timeout"):
            killable_wrapper(jobs.add, 1, 2, killable_wrapper_timeout=limit)
        assert not no_new_descendants(before)

    def test_not_callable(self):
        with pytest.raises(TypeError, match="callable"):
            killable_wrapper(42)

    def test_cancel_pipe_must_be_a_connection(self):
        with pytest.raises(TypeError, match="Connection"):
            killable_wrapper(jobs.add, 1, 2, killable_wrapper_cancel_pipe=object())

    def test_exception_in_host_while_waiting_kills_job(self, record_path):
        class Interrupted(Exception):
            pass

        def on_signal(signum, frame):
            raise Interrupted

        previous = signal.signal(signal.SIGUSR1, on_signal)
        try:
            with job_guard(record_path):
                with pytest.raises(Interrupted):
                    killable_wrapper(jobs.signal_parent_job, record_path, int(signal.SIGUSR1))
                assert_all_gone(procs.read_record(record_path, wait=0))
        finally:
            signal.signal(signal.SIGUSR1, previous)

    def test_top_level_export(self):
        assert cancelk.killable_wrapper is killable_wrapper


# ==========================================================================
# called from a process with other threads: the job runs in a clean interpreter


class TestThreadedHost:
    @pytest.fixture(autouse=True)
    def _setup(self, backend, extra_thread):
        return None

    def test_returns_result_from_clean_interpreter(self, monkeypatch):
        monkeypatch.setitem(jobs.STATE, "init", "set-in-host")
        info = killable_wrapper(jobs.main_thread_only)
        assert info["state"] is None  # not a fork: the host's memory was not copied
        assert info["ppid"] == os.getpid()
        assert info["pid"] != os.getpid()
        assert not psutil.pid_exists(info["pid"])
        assert killable_wrapper(jobs.echo, 1, k=2) == ((1,), {"k": 2})

    def test_job_exception(self):
        with pytest.raises(jobs.JobError, match="boom") as info:
            killable_wrapper(jobs.raise_job_error, "boom")
        assert "raise_job_error" in str(info.value.__cause__)

    @pytest.mark.parametrize("kind", ["sleep", "gil_c"])
    def test_timeout_stops_job(self, kind, record_path):
        limit = 1.0  # includes starting an interpreter
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(jobs.STOP_JOBS[kind], record_path, killable_wrapper_timeout=limit)
            assert limit * 0.9 <= time.monotonic() - start < limit + SLACK
            assert_all_gone(procs.read_record(record_path, wait=0))

    @pytest.mark.timeout(60)
    def test_timeout_kills_job_tree(self, record_path):
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(jobs.popen_job, record_path, killable_wrapper_timeout=1.5)
            records = procs.read_record(record_path, wait=0)
            assert len(records) == 2
            assert_all_gone(records)

    def test_cancel_message(self, cancel_pipe):
        sender, receiver = cancel_pipe
        sender.send("cancel")
        with pytest.raises(ProcessCancelledError):
            killable_wrapper(jobs.sleep_return, 10, "never", killable_wrapper_cancel_pipe=receiver)

    def test_exit_code(self):
        with pytest.raises(ProcessDiedError) as info:
            killable_wrapper(jobs.exit_with, 3)
        assert info.value.exitcode == 3

    def test_result_larger_than_pipe_buffer(self):
        size = 8 << 20
        assert killable_wrapper(jobs.big_bytes, size) == jobs.big_bytes(size)

    def test_unpicklable_argument_is_refused_at_once(self):
        # The clean interpreter gets the job by pickle: nothing is started.
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with pytest.raises((TypeError, pickle.PicklingError), match="lock"):
            killable_wrapper(jobs.echo, threading.Lock())
        assert not no_new_descendants(before)

    @pytest.mark.timeout(60)
    def test_concurrent_calls_from_worker_threads(self, record_path):
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as threads:
            stopped = threads.submit(
                killable_wrapper, jobs.sleep_job, record_path, killable_wrapper_timeout=1.0
            )
            results = [threads.submit(killable_wrapper, jobs.add, i, i) for i in range(4)]
            with job_guard(record_path):
                assert [f.result(timeout=RESULT_WAIT) for f in results] == [0, 2, 4, 6]
                with pytest.raises(ProcessTimeoutError):
                    stopped.result(timeout=RESULT_WAIT)
                assert_all_gone(procs.read_record(record_path, wait=0))
