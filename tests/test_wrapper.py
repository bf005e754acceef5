"""killable_wrapper (DESIGN A7), on both C backends.

Each test runs at the *sites* it names (``@at``; all of them by default):
- ``pool-fork``, ``pool-forkserver``, ``pool-spawn``: as the submitted
  function of a plain stdlib ProcessPoolExecutor with that start method: the
  job is forked from the host worker;
- ``direct``: called directly from this (single-threaded) process: forked
  from here;
- ``threaded``: called directly from a process with another thread: the job
  runs in a clean interpreter, because forking a threaded process is unsafe.

A site is set up once for all its tests (class scope: a pool site's host
pools start before its first test and stop after its last one), so pytest
runs the tests site by site.

Timing bounds are generous on purpose (2-core CI machines, maybe loaded): they
tell "stopped by the deadline" from "ran on", not precision, which the
benchmarks measure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
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

POOL_SITES = tuple(f"pool-{method}" for method in START_METHODS)
DIRECT = "direct"
THREADED = "threaded"
ALL_SITES = (*POOL_SITES, DIRECT, THREADED)


def at(*sites):
    """Run the decorated test at these sites only."""

    def mark(test):
        test.sites = sites
        return test

    return mark


def pytest_generate_tests(metafunc):
    if "site_setup" in metafunc.fixturenames:
        sites = getattr(metafunc.function, "sites", ALL_SITES)
        metafunc.parametrize("site_setup", sites, indirect=True, scope="class")


@pytest.fixture(scope="class")
def site_setup(request, long_lived):
    """(site, its host pools by (start method, backend)): at a pool site, a
    host pool per backend, started before the site's first test (so their
    processes and fds predate every leak check) and shut down after its last
    one (so their threads do not outlive it); none elsewhere."""
    name = request.param
    if name in POOL_SITES:
        with procs.running_hosts([name.removeprefix("pool-")], long_lived) as hosts:
            yield name, hosts
    else:
        yield name, {}


class Site:
    """Where a test runs killable_wrapper, and how it calls it there."""

    def __init__(self, name, host):
        self.name = name
        self.host = host  # a procs.Host at a pool site, else None: this process hosts
        self.futures = []  # of the host pool, for job_guard

    def submit(self, fn, /, *args, **kwargs):
        """killable_wrapper(fn, ...) submitted to the host pool (pool sites)."""
        future = self.host.pool.submit(killable_wrapper, fn, *args, **kwargs)
        self.futures.append(future)
        return future

    def call(self, fn, /, *args, **kwargs):
        """killable_wrapper(fn, ...) at this site: its result, or its exception."""
        if self.host is None:
            return killable_wrapper(fn, *args, **kwargs)
        return self.submit(fn, *args, **kwargs).result(timeout=RESULT_WAIT)

    def assert_host_ok(self):
        """At a pool site, the host pool survived: its workers live and it
        still runs jobs. (Elsewhere the host is this process.)"""
        if self.host is None:
            return
        assert not self.host.worker_problems()
        futures = [self.submit(jobs.add, i, 1) for i in range(HOST_WORKERS)]
        assert [f.result(timeout=RESULT_WAIT) for f in futures] == list(range(1, HOST_WORKERS + 1))
        assert not self.host.worker_problems()


@pytest.fixture
def site(request, site_setup, backend):
    """The test's site; afterwards the killable_wrapper standby processes it
    left (in the host pool's workers, or here) are stopped."""
    name, hosts = site_setup
    if name == DIRECT:
        request.getfixturevalue("single_threaded")
    elif name == THREADED:
        request.getfixturevalue("extra_thread")
    site = Site(name, hosts.get((name.removeprefix("pool-"), backend)))
    yield site
    if site.host is not None:
        concurrent.futures.wait(site.futures, timeout=RESULT_WAIT)
        procs.stop_standbys(site.host)
    else:
        getattr(cancelk.wrapper, "stop_standby", lambda: None)()  # (none before the standbys)


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


def no_new_descendants(before):
    now = {p.pid for p in psutil.Process().children(recursive=True)}
    return now - before


@pytest.mark.usefixtures("site")
class TestKillableWrapper:
    # ======================================================================
    # at every site

    def test_job_exception_comes_back_with_remote_traceback(self, site):
        with pytest.raises(jobs.JobError, match="boom 7") as info:
            site.call(jobs.raise_job_error, "boom 7")
        assert type(info.value) is jobs.JobError
        text = "\n".join(str(exc) for exc in procs.cause_chain(info.value))
        assert "raise_job_error" in text  # the job's own frame, from the job's process
        assert "JobError: boom 7" in text
        if site.host is None:  # called here: the cause is the job's own traceback
            cause = info.value.__cause__
            assert isinstance(cause, RemoteTraceback)
            assert "raise_job_error" in cause.tb
            assert "JobError: boom 7" in cause.tb

    def test_exit_code(self, site):
        with pytest.raises(ProcessDiedError, match="code 3") as info:
            site.call(jobs.exit_with, 3)
        assert info.value.exitcode == 3
        assert info.value.signal is None
        assert not psutil.pid_exists(info.value.pid)
        site.assert_host_ok()

    def test_child_the_job_forks_never_reports_a_result(self, site, tmp_path):
        path = tmp_path / "child"
        assert site.call(jobs.fork_and_return, str(path)) == "parent"
        pid, created = path.read_text().split()
        left = procs.wait_gone([(int(pid), float(created))], GONE, orphaned_zombies_ok=True)
        assert not left, f"the job's child lives on: {left}"
        site.assert_host_ok()

    def test_result_larger_than_pipe_buffer(self, site):
        size = 8 << 20
        assert site.call(jobs.big_bytes, size) == jobs.big_bytes(size)

    # ======================================================================
    # in a host pool and called from this single-threaded process

    @at(*POOL_SITES, DIRECT)
    def test_returns_result_with_args_and_kwargs(self, site):
        assert site.call(jobs.echo, 1, "a", key=[2]) == ((1, "a"), {"key": [2]})
        assert site.call(jobs.echo, 1, [2], k="v") == ((1, [2]), {"k": "v"})
        assert site.call(jobs.add, 2, b=3) == 5

    @at(*POOL_SITES, DIRECT)
    def test_no_time_limit(self, site):
        result = site.call(jobs.sleep_return, 0.3, "slow", killable_wrapper_timeout=None)
        assert result == "slow"

    @at(*POOL_SITES, DIRECT)
    @pytest.mark.parametrize("kind", list(jobs.STOP_JOBS))
    def test_timeout_stops_job(self, site, kind, record_path):
        start = time.monotonic()
        with job_guard(record_path, site.futures):
            with pytest.raises(ProcessTimeoutError, match="time limit"):
                site.call(jobs.STOP_JOBS[kind], record_path, killable_wrapper_timeout=SHORT)
            elapsed = time.monotonic() - start
            assert SHORT * 0.9 <= elapsed < SHORT + SLACK
            assert_all_gone(procs.read_record(record_path, wait=0))
        site.assert_host_ok()

    @at(*POOL_SITES, DIRECT)
    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("kind", list(jobs.TREE_JOBS))
    def test_timeout_kills_job_tree(self, site, kind, record_path):
        start = time.monotonic()
        with job_guard(record_path, site.futures):
            with pytest.raises(ProcessTimeoutError):
                site.call(jobs.TREE_JOBS[kind], record_path, killable_wrapper_timeout=TREE_LIMIT)
            assert time.monotonic() - start < TREE_LIMIT + SLACK
            records = procs.read_record(record_path, wait=0)
            assert len(records) >= 2, "the job did not start its processes in time"
            assert_all_gone(records)
        site.assert_host_ok()

    @at(*POOL_SITES, DIRECT)
    def test_segfault(self, site):
        with pytest.raises(ProcessDiedError, match="SIGSEGV") as info:
            site.call(jobs.kill_self, signal.SIGSEGV)
        assert info.value.signal == signal.SIGSEGV == 11
        assert info.value.exitcode is None
        site.assert_host_ok()

    @at(*POOL_SITES, DIRECT)
    @pytest.mark.parametrize(
        ("job", "type_name"),
        [(jobs.return_lambda, "builtins.function"), (jobs.return_lock, "_thread.lock")],
    )
    def test_unpicklable_result(self, site, job, type_name):
        start = time.monotonic()
        with pytest.raises(ResultPicklingError, match=type_name):
            site.call(job)
        assert time.monotonic() - start < 10
        site.assert_host_ok()

    @at(*POOL_SITES, DIRECT)
    def test_unpicklable_exception(self, site):
        with pytest.raises(ResultPicklingError, match="UnpicklableError") as info:
            site.call(jobs.raise_unpicklable, "locked in")
        assert "locked in" in str(info.value)
        if site.host is None:  # called here: the cause is the job's own traceback
            assert "raise_unpicklable" in str(info.value.__cause__)
        site.assert_host_ok()

    # ======================================================================
    # called directly, forked from this process or run in a clean interpreter

    @at(DIRECT, THREADED)
    def test_job_inherits_host_state_only_when_forked(self, site, monkeypatch):
        monkeypatch.setitem(jobs.STATE, "init", "set-in-host")
        info = killable_wrapper(jobs.main_thread_only)
        if site.name == DIRECT:
            assert info["state"] == "set-in-host"
        else:
            assert info["state"] is None  # not a fork: the host's memory was not copied
        assert info["ppid"] == os.getpid()
        assert info["pid"] != os.getpid()
        assert not psutil.pid_exists(info["pid"])
        assert killable_wrapper(jobs.echo, 1, k=2) == ((1,), {"k": 2})

    # ======================================================================
    # in a host pool only: the test goes on while the wrapped job runs

    @at(*POOL_SITES)
    def test_job_is_forked_from_host_worker_with_its_state(self, site):
        host = site.host
        workers = {w.pid for w in host.workers}
        info = site.call(jobs.host_info)
        assert info["state"] == host.token  # the initializer ran in the host, the job inherits
        # By default a standby runs it: forked by the worker's template, the
        # worker's own child (the template lives on until stopped).
        template = psutil.Process(info["ppid"])
        assert template.ppid() in workers
        assert info["pgid"] == info["pid"]  # its own process group
        assert info["backend_env"] == host.backend
        assert info["backend"] == host.backend  # what the wrapper's loop is built with
        fresh = site.call(jobs.host_info, killable_wrapper_fresh=True)
        assert fresh["state"] == host.token
        assert fresh["ppid"] in workers  # forked by the worker at the call
        assert fresh["pgid"] == fresh["pid"]

    @at(*POOL_SITES)
    def test_cancel_message_stops_running_job(self, site, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        future = site.submit(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
        with job_guard(record_path, site.futures):
            records = procs.read_record(record_path)
            start = time.monotonic()
            sender.send("cancel")
            with pytest.raises(ProcessCancelledError, match="cancelled"):
                future.result(timeout=RESULT_WAIT)
            assert time.monotonic() - start < SLACK
            assert_all_gone(records)
        site.assert_host_ok()

    @at(*POOL_SITES)
    def test_cancel_by_bytes_that_do_not_unpickle_stops_running_job(
        self, site, cancel_pipe, record_path
    ):
        sender, receiver = cancel_pipe
        future = site.submit(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
        with job_guard(record_path, site.futures):
            records = procs.read_record(record_path)
            sender.send_bytes(b"stop")
            with pytest.raises(ProcessCancelledError, match="cancelled"):
                future.result(timeout=RESULT_WAIT)
            assert_all_gone(records)
        site.assert_host_ok()

    @at(*POOL_SITES)
    def test_job_keyword_named_fn_reaches_the_job_in_a_pool(self, site):
        assert site.call(jobs.echo, 1, fn="f") == ((1,), {"fn": "f"})

    @at(*POOL_SITES)
    def test_cancel_grace_sent_while_running_lets_job_finish(self, site, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        future = site.submit(
            jobs.record_then,
            record_path,
            0.4,
            "finished",
            killable_wrapper_cancel_pipe=receiver,
        )
        with job_guard(record_path, site.futures):
            procs.read_record(record_path)
            sender.send({"cancel_timeout": 10})
            assert future.result(timeout=RESULT_WAIT) == "finished"

    @at(*POOL_SITES)
    def test_cancel_grace_sent_while_running_expires(self, site, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        future = site.submit(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
        with job_guard(record_path, site.futures):
            records = procs.read_record(record_path)
            start = time.monotonic()
            sender.send({"cancel_timeout": 0.3})
            with pytest.raises(ProcessCancelledError):
                future.result(timeout=RESULT_WAIT)
            assert 0.25 <= time.monotonic() - start < 0.3 + SLACK
            assert_all_gone(records)
        site.assert_host_ok()

    @at(*POOL_SITES)
    def test_sigkill_from_outside_is_named_so(self, site, record_path):
        future = site.submit(jobs.sleep_job, record_path)
        with job_guard(record_path, site.futures):
            records = procs.read_record(record_path)
            os.kill(records[0][0], signal.SIGKILL)
            # No OOM claim without evidence that the OOM killer ran.
            with pytest.raises(ProcessDiedError, match="outside cancelk") as info:
                future.result(timeout=RESULT_WAIT)
            assert info.value.signal == signal.SIGKILL
            assert info.value.pid == records[0][0]
            assert_all_gone(records)
        site.assert_host_ok()

    # ======================================================================
    # called directly from this single-threaded process only

    @at(DIRECT)
    def test_infinite_time_limit_is_no_limit(self):
        result = killable_wrapper(jobs.sleep_return, 0.3, "slow", killable_wrapper_timeout=math.inf)
        assert result == "slow"

    @at(DIRECT)
    def test_zero_time_limit_stops_at_once(self):
        start = time.monotonic()
        with pytest.raises(ProcessTimeoutError):
            killable_wrapper(jobs.sleep_return, 5, "never", killable_wrapper_timeout=0)
        assert time.monotonic() - start < SLACK

    @at(DIRECT)
    @pytest.mark.skipif(sys.version_info < (3, 11), reason="builtin TimeoutError only from 3.11")
    def test_timeout_is_a_builtin_timeout_error(self):
        with pytest.raises(TimeoutError):
            killable_wrapper(jobs.sleep_return, 5, "never", killable_wrapper_timeout=0.05)

    @at(DIRECT)
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

    @at(DIRECT)
    @pytest.mark.parametrize(
        ("send", "message"),
        [
            ("send", "cancel"),
            ("send", None),
            ("send", {"unrelated": 1}),
            ("send", 0),
            # issue 12.5: "anything that arrives cancels", also bytes that are no pickle
            ("send_bytes", b"stop"),
            ("send_bytes", b""),
            ("send_bytes", b"\x80\x04garbage"),
        ],
    )
    def test_any_cancel_message_cancels(self, cancel_pipe, send, message, record_path):
        sender, receiver = cancel_pipe
        getattr(sender, send)(message)
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessCancelledError):
                killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
            assert time.monotonic() - start < SLACK
            if os.path.exists(record_path):  # the job may be killed before it records
                assert_all_gone(procs.read_record(record_path, wait=0))

    @at(DIRECT)
    @pytest.mark.parametrize("grace", [-1, -0.5, math.nan, -math.inf, "soon", [1], True], ids=repr)
    def test_malformed_cancel_grace_kills_now_and_warns(
        self, cancel_pipe, grace, record_path, caplog
    ):
        # Issue 12.5: a grace that is no grace is none: kill now, say so.
        sender, receiver = cancel_pipe
        sender.send({"cancel_timeout": grace})
        start = time.monotonic()
        with job_guard(record_path), caplog.at_level(logging.WARNING, logger="cancelk"):
            with pytest.raises(ProcessCancelledError):
                killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
            assert time.monotonic() - start < SLACK
            if os.path.exists(record_path):
                assert_all_gone(procs.read_record(record_path, wait=0))
        warned = [r for r in caplog.records if r.name == "cancelk" and r.levelno == logging.WARNING]
        assert len(warned) == 1, caplog.records
        assert repr(grace) in warned[0].getMessage()

    @at(DIRECT)
    def test_job_keyword_named_fn_reaches_the_job(self):
        # Issue 12.6: the wrapped function is positional-only, as submit's is.
        assert killable_wrapper(jobs.echo, fn=1) == ((), {"fn": 1})
        assert killable_wrapper(jobs.echo, 2, fn=jobs.add, args=3) == (
            (2,),
            {"fn": jobs.add, "args": 3},
        )
        with pytest.raises(TypeError):
            killable_wrapper(fn=jobs.echo)  # as submit(fn=...): fn is no keyword

    @at(DIRECT)
    def test_cancel_grace_sent_before_the_call_lets_job_finish(self, cancel_pipe):
        sender, receiver = cancel_pipe
        sender.send({"cancel_timeout": 10})
        result = killable_wrapper(
            jobs.sleep_return, 0.3, "finished", killable_wrapper_cancel_pipe=receiver
        )
        assert result == "finished"

    @at(DIRECT)
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

    @at(DIRECT)
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

    @at(DIRECT)
    def test_cancel_grace_sent_before_the_call_expires(self, cancel_pipe, record_path):
        sender, receiver = cancel_pipe
        sender.send({"cancel_timeout": 0.3})
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessCancelledError):
                killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_cancel_pipe=receiver)
            assert 0.25 <= time.monotonic() - start < 0.3 + SLACK
            assert_all_gone(procs.read_record(record_path, wait=0))

    @at(DIRECT)
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

    @at(DIRECT)
    def test_closed_cancel_pipe_does_not_cancel(self, cancel_pipe):
        sender, receiver = cancel_pipe
        sender.close()  # EOF: the other side went away without asking for anything
        result = killable_wrapper(
            jobs.sleep_return, 0.2, "kept", killable_wrapper_cancel_pipe=receiver
        )
        assert result == "kept"

    @at(DIRECT)
    def test_sigkill_from_another_process_is_named_so(self, record_path):
        # Another process plays the OOM killer: it waits for the job's record,
        # then SIGKILLs the job while killable_wrapper waits for it.
        killer = subprocess.Popen([sys.executable, "-c", procs.KILL_RECORDED, record_path, "job"])
        try:
            with job_guard(record_path):
                with pytest.raises(ProcessDiedError, match="outside cancelk") as info:
                    killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_timeout=60)
                assert info.value.signal == signal.SIGKILL
                records = procs.read_record(record_path, wait=0)
                assert info.value.pid == records[0][0]
                assert_all_gone(records)
        finally:
            killer.kill()
            killer.wait()

    @at(DIRECT)
    def test_exception_that_cannot_be_unpickled(self):
        with pytest.raises(ResultPicklingError, match="unpickled"):
            killable_wrapper(jobs.raise_unloadable)

    @at(DIRECT)
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

    @at(DIRECT)
    def test_not_callable(self):
        with pytest.raises(TypeError, match="callable"):
            killable_wrapper(42)

    @at(DIRECT)
    def test_cancel_pipe_must_be_a_connection(self):
        with pytest.raises(TypeError, match="Connection"):
            killable_wrapper(jobs.add, 1, 2, killable_wrapper_cancel_pipe=object())

    @at(DIRECT)
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

    @at(DIRECT)
    def test_top_level_export(self):
        assert cancelk.killable_wrapper is killable_wrapper

    # ======================================================================
    # called from a process with other threads only: a clean interpreter

    @at(THREADED)
    @pytest.mark.parametrize("kind", ["sleep", "gil_c"])
    def test_timeout_stops_job_in_a_clean_interpreter(self, kind, record_path):
        limit = 1.0  # includes starting an interpreter
        start = time.monotonic()
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(jobs.STOP_JOBS[kind], record_path, killable_wrapper_timeout=limit)
            assert limit * 0.9 <= time.monotonic() - start < limit + SLACK
            assert_all_gone(procs.read_record(record_path, wait=0))

    @at(THREADED)
    @pytest.mark.timeout(60)
    def test_timeout_kills_job_tree_in_a_clean_interpreter(self, record_path):
        with job_guard(record_path):
            with pytest.raises(ProcessTimeoutError):
                killable_wrapper(jobs.popen_job, record_path, killable_wrapper_timeout=1.5)
            records = procs.read_record(record_path, wait=0)
            assert len(records) == 2
            assert_all_gone(records)

    @at(THREADED)
    def test_cancel_message(self, cancel_pipe):
        sender, receiver = cancel_pipe
        sender.send("cancel")
        with pytest.raises(ProcessCancelledError):
            killable_wrapper(jobs.sleep_return, 10, "never", killable_wrapper_cancel_pipe=receiver)

    @at(THREADED)
    def test_unpicklable_argument_is_refused_at_once(self):
        # The clean interpreter gets the job by pickle: nothing is started.
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with pytest.raises((TypeError, pickle.PicklingError), match="lock"):
            killable_wrapper(jobs.echo, threading.Lock())
        assert not no_new_descendants(before)

    @at(THREADED)
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
