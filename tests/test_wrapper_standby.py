"""killable_wrapper's standby processes (issue 15.2), on both C backends.

A host that is a multiprocessing child (a pool worker) hands its jobs to a
standby: a process forked ahead of time by the host's *template*, itself
forked from the host once. What that keeps of the semantics of forking the
job at the call, and what it changes (cancelk/_standby.py, the README):

(a) the job sees the host's memory as of the template's fork; the template is
    forked again when the host imported modules, changed its environment,
    working directory or sys.path; a job that does not load there is forked
    from the host; an unpicklable call is too; ``killable_wrapper_fresh=True``
    and ``CANCELK_WRAPPER_STANDBY=0`` fork at the call. The job gets the
    host's file descriptors as they are at the call, and no template or idle
    standby keeps any of them open;
(b) a time limit or cancel kills its own job only: the standby forked for
    the next call meanwhile runs the next call;
(c) template and standbys end with their host: its exit, its SIGKILL, a stdlib
    pool's shutdown or broken-pool handling (fork, forkserver, spawn), a
    worker retired by max_tasks_per_child;
(d) a threaded host still gets a clean interpreter per call.

Most tests run the standbys in this (single-threaded) process, which asks for
them with CANCELK_WRAPPER_STANDBY=1, and stop them at the end; pool tests
start and shut down their own stdlib pools.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest

import cancelk.wrapper
from cancelk import (
    ProcessCancelledError,
    ProcessDiedError,
    ProcessTimeoutError,
    _standby,
    killable_wrapper,
)

import jobs
import procs
from jobs import GONE, HOST_WORKERS, RESULT_WAIT, START_METHODS


@pytest.fixture
def standby_here(monkeypatch, single_threaded, backend):
    """Standbys in this very process (a main program uses them only when
    asked); stopped at the end of the test."""
    monkeypatch.setenv("CANCELK_WRAPPER_STANDBY", "1")
    try:
        yield
    finally:
        cancelk.wrapper.stop_standby()


def template_pid():
    template = _standby._template
    assert template is not None, "no template: the call did not use a standby"
    return template.pid


def ready_standby():
    """The pid of the idle standby this process's template announced (waits
    for the announcement)."""
    template = _standby._template
    deadline = time.monotonic() + RESULT_WAIT
    while not template.ready:
        assert time.monotonic() < deadline, "no standby announced"
        template.read_records(block=False)
        time.sleep(0.002)
    return template.ready[0][0]


def gone(pid, timeout=GONE):
    """True once ``pid`` is gone: dead and reaped (a zombie is not gone)."""
    return procs.wait_pid_gone(pid, timeout)


# ==========================================================================
# (a) what the job sees


@pytest.mark.timeout(60)
def test_a_standby_forked_by_the_template_runs_the_job(standby_here):
    info = killable_wrapper(jobs.host_info)
    template = template_pid()
    assert info["ppid"] == template
    assert psutil.Process(template).ppid() == os.getpid()
    assert info["pgid"] == info["pid"] != template  # its own process group
    # the next call: the standby forked ahead of time, then gone with its job
    standby = ready_standby()
    assert killable_wrapper(jobs.getpid) == standby
    assert gone(standby)
    assert template_pid() == template  # one template for every call


@pytest.mark.timeout(60)
def test_job_sees_the_hosts_memory_as_of_the_template_fork(standby_here, monkeypatch):
    monkeypatch.setitem(jobs.STATE, "k", "before")
    assert killable_wrapper(jobs.get_state, "k")["value"] == "before"
    jobs.STATE["k"] = "after"  # the host changes its memory: nothing shows it
    # the documented difference: the standby's memory is the template's
    assert killable_wrapper(jobs.get_state, "k")["value"] == "before"
    # the opt-outs fork the job from the host at the call
    fresh = killable_wrapper(jobs.get_state, "k", killable_wrapper_fresh=True)
    assert fresh["value"] == "after"
    assert fresh["ppid"] == os.getpid()
    monkeypatch.setenv("CANCELK_WRAPPER_STANDBY", "0")
    assert killable_wrapper(jobs.get_state, "k")["value"] == "after"
    with pytest.raises(TypeError, match="killable_wrapper_fresh"):
        killable_wrapper(jobs.add, 1, 2, killable_wrapper_fresh="yes")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", ["import", "environ", "cwd", "sys.path"])
def test_template_forked_again_when_the_host_changed(
    standby_here, monkeypatch, tmp_path, request, change
):
    name = f"standby_probe_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop(name, None))
    monkeypatch.setitem(jobs.STATE, "k", "before")
    assert killable_wrapper(jobs.get_state, "k")["value"] == "before"
    first = template_pid()
    jobs.STATE["k"] = "after"
    if change == "import":
        assert jobs.import_in_host(name)
    elif change == "environ":
        monkeypatch.setenv("CANCELK_STANDBY_PROBE", "1")
    elif change == "cwd":
        monkeypatch.chdir(tmp_path)
    else:
        monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    seen = killable_wrapper(jobs.get_state, "k")
    assert seen["value"] == "after"  # a new template, forked at this call
    assert template_pid() != first
    assert seen["ppid"] == template_pid()
    assert gone(first), "the old template outlived its replacement"
    if change == "cwd":
        assert killable_wrapper(jobs.cwd) == str(tmp_path)


@pytest.mark.timeout(60)
def test_job_the_template_cannot_load_is_forked_from_the_host(standby_here):
    killable_wrapper(jobs.add, 1, 2)  # the template exists
    first = template_pid()
    jobs.define_late_job("late")  # jobs.late_job exists here, not in the template
    try:
        value, parent = killable_wrapper(jobs.late_job)
        assert value == "late"
        assert parent == os.getpid()  # forked from here, at the call
        # the template is known stale now: the next call forks a new one
        assert killable_wrapper(jobs.late_job)[0] == "late"
        assert template_pid() != first
    finally:
        del jobs.late_job


@pytest.mark.timeout(60)
def test_call_that_does_not_pickle_is_forked_from_the_host(standby_here):
    lock = threading.Lock()
    assert killable_wrapper(len, [lock, lock]) == 2
    assert killable_wrapper(lambda: os.getppid()) == os.getpid()
    killable_wrapper(jobs.add, 1, 2)
    assert killable_wrapper(jobs.host_info)["ppid"] == template_pid()


@pytest.mark.timeout(60)
def test_job_gets_the_hosts_fds_of_the_call_and_no_standby_keeps_any(standby_here):
    killable_wrapper(jobs.add, 1, 2)  # the template is forked before the pipe exists
    read_end, write_end = os.pipe()
    try:
        assert killable_wrapper(jobs.write_fd, write_end, b"hello") != os.getpid()
        assert os.read(read_end, 5) == b"hello"
        os.close(write_end)
        write_end = -1
        # EOF at once: neither the template nor a standby holds the write end
        readable, _, _ = select.select([read_end], [], [], 5)
        assert readable and os.read(read_end, 1) == b""
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    ours = set(procs.pipe_and_socket_targets(os.getpid()).values())
    for pid in (template_pid(), ready_standby()):  # what stays while the host is elsewhere
        theirs = procs.pipe_and_socket_targets(pid)
        assert not set(theirs.values()) & ours, (pid, theirs)
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == os.devnull


# ==========================================================================
# (b) a stop kills its own job only


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", ["timeout", "cancel"])
def test_stop_kills_its_own_job_and_the_next_standby_runs_the_next(
    standby_here, record_path, cancel_pipe, stop
):
    killable_wrapper(jobs.add, 1, 2)
    template = template_pid()
    sender, receiver = cancel_pipe
    if stop == "timeout":
        options = {"killable_wrapper_timeout": 0.5}
        error = ProcessTimeoutError
    else:
        sender.send({"cancel_timeout": 0.5})
        options = {"killable_wrapper_cancel_pipe": receiver}
        error = ProcessCancelledError
    with pytest.raises(error):
        killable_wrapper(jobs.sleep_job, record_path, **options)
    stopped_at = time.time()
    records = procs.read_record(record_path, wait=0)
    assert not procs.still_there(records[:1]), "the stopped job is still there (not reaped)"
    # the standby forked while the job ran was not hit, and runs the next call
    standby = ready_standby()
    assert psutil.Process(standby).create_time() < stopped_at
    assert killable_wrapper(jobs.getpid) == standby
    assert template_pid() == template


# ==========================================================================
# (c) template and standbys end with their host


def start_pool(method, backend, **options):
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=HOST_WORKERS,
        mp_context=multiprocessing.get_context(method),
        initializer=jobs.init_host,
        initargs=(backend, "standby"),
        **options,
    )
    # every worker started, each with its standby (they run at the same time)
    futures = [pool.submit(killable_wrapper, jobs.sleep_pid, 0.3) for _ in range(HOST_WORKERS)]
    for future in futures:
        future.result(timeout=RESULT_WAIT)
    return pool


IDLE = 1 + _standby._SPARES  # a template and its idle standbys


def standbys_of(workers):
    """{worker pid: [its template, its idle standbys]}, once each worker has
    just those: the standby of the last job gone (until it has exited it
    still holds the call's descriptors, which are the worker's), the spares
    forked.  After RESULT_WAIT, whatever is there (the asserts then say what)."""
    deadline = time.monotonic() + RESULT_WAIT
    while True:
        found = {pid: procs.standby_processes(pid) for pid in workers}
        settled = all(
            len(found[pid]) == IDLE and not pool_fds_held(pid, found[pid]) for pid in workers
        )
        if settled or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def pool_fds_held(worker, standbys):
    """{pid: the worker's pipes and sockets it holds} for those standbys that hold any."""
    held = set(procs.pipe_and_socket_targets(worker).values())
    found = {}
    for proc in standbys:
        try:
            theirs = set(procs.pipe_and_socket_targets(proc.pid).values())
        except FileNotFoundError:
            continue  # exited after it was listed: it holds nothing now
        if theirs & held:
            found[proc.pid] = theirs & held
    return found


def assert_no_pool_fds(worker, standbys):
    """The template and the idle standbys hold none of the worker's pipes
    and sockets (the pool's sentinel, its queues): its exit is seen as
    before."""
    holders = pool_fds_held(worker, standbys)
    assert not holders, f"standbys hold fds of worker {worker}: {holders}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_worker_sigkilled_while_idle_is_seen_at_once_and_takes_its_standbys(backend, method):
    pool = start_pool(method, backend)
    standbys = {}
    try:
        workers = sorted(pool._processes)
        standbys = standbys_of(workers)
        for worker in workers:
            assert len(standbys[worker]) == IDLE, standbys
            assert_no_pool_fds(worker, standbys[worker])
        victim = workers[0]
        busy = pool.submit(jobs.sleep_return, 30)  # a plain job: the other worker
        time.sleep(0.2)
        start = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            busy.result(timeout=RESULT_WAIT)
        broken_after = time.perf_counter() - start
        left = procs.wait_gone(
            [(p.pid, p.create_time()) for p in standbys[victim]], orphaned_zombies_ok=True
        )
        gone_after = time.perf_counter() - start
        print(
            f"{method}/{backend}: idle worker with standbys SIGKILLed: BrokenProcessPool "
            f"after {broken_after * 1e3:.0f} ms, its standby processes gone after "
            f"{gone_after * 1e3:.0f} ms"
        )
        assert not left, f"standby processes outlived their SIGKILLed worker: {left}"
        assert broken_after < 2.0
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        everything = [(p.pid, p.create_time()) for ps in standbys.values() for p in ps]
        left = procs.wait_gone(everything, orphaned_zombies_ok=True)
        procs.kill_records(everything)
    assert not left, f"standby processes outlived the pool: {left}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_shutdown_with_idle_standbys_is_as_prompt_as_without(backend, method):
    timings = {}
    for standby in (False, True):
        pool = start_pool(method, backend) if standby else None
        if pool is None:
            pool = concurrent.futures.ProcessPoolExecutor(
                HOST_WORKERS, mp_context=multiprocessing.get_context(method)
            )
            for future in [pool.submit(jobs.sleep_pid, 0.3) for _ in range(HOST_WORKERS)]:
                future.result(timeout=RESULT_WAIT)
        workers = sorted(pool._processes)
        found = standbys_of(workers) if standby else {}
        everything = [(p.pid, p.create_time()) for ps in found.values() for p in ps]
        start = time.perf_counter()
        pool.shutdown(wait=True)
        timings[standby] = time.perf_counter() - start
        left = procs.wait_gone(everything, orphaned_zombies_ok=True)
        procs.kill_records(everything)
        assert not left, f"standby processes outlived the pool's shutdown: {left}"
    print(
        f"{method}/{backend}: shutdown(wait=True) {timings[False] * 1e3:.0f} ms without "
        f"standbys, {timings[True] * 1e3:.0f} ms with"
    )
    assert timings[True] < max(1.0, 3 * timings[False])


@pytest.mark.timeout(90)
@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is 3.11's")
def test_worker_retired_by_max_tasks_per_child_takes_its_standbys(backend):
    pool = start_pool("spawn", backend, max_tasks_per_child=3)
    try:
        first = sorted(pool._processes)
        found = standbys_of(first)
        everything = [(p.pid, p.create_time()) for ps in found.values() for p in ps]
        for i in range(3 * HOST_WORKERS):  # every first worker retires
            assert (
                pool.submit(killable_wrapper, jobs.add, i, 1).result(timeout=RESULT_WAIT) == i + 1
            )
        left = procs.wait_gone(everything, orphaned_zombies_ok=True)
        procs.kill_records(everything)
        assert not left, f"standby processes outlived their retired worker: {left}"
    finally:
        pool.shutdown(wait=True)


HOST_PROGRAM = r"""
import json, multiprocessing, os, sys, time
sys.path.insert(0, sys.argv[1])
import cancelk, jobs, psutil
from cancelk import killable_wrapper
assert killable_wrapper(jobs.add, 1, 2) == 3
time.sleep(0.2)  # the standby is forked
me = psutil.Process()
pids = [(p.pid, p.create_time()) for p in me.children(recursive=True)]
print(json.dumps(pids), flush=True)
if sys.argv[2] == "wait":
    time.sleep(60)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("end", ["exit", "SIGKILL"])
def test_host_program_exit_or_sigkill_leaves_no_standby(backend, tmp_path, end):
    script = tmp_path / "host.py"
    script.write_text(HOST_PROGRAM)
    env = dict(os.environ, CANCELK_BACKEND=backend, CANCELK_WRAPPER_STANDBY="1")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    mode = "wait" if end == "SIGKILL" else "exit"
    proc = subprocess.Popen(
        [sys.executable, str(script), tests_dir, mode], stdout=subprocess.PIPE, text=True, env=env
    )
    records = []
    try:
        line = proc.stdout.readline()
        records = [tuple(r) for r in __import__("json").loads(line)]
        assert len(records) >= 2, f"no template and standby in the host: {records}"
        if end == "SIGKILL":
            proc.kill()
        proc.wait(timeout=RESULT_WAIT)
        left = procs.wait_gone(records, orphaned_zombies_ok=True)
        assert not left, f"standby processes outlived their host ({end}): {left}"
    finally:
        procs.stop_process(proc)
        procs.kill_records(records)


# ==========================================================================
# (d) threaded hosts, and processes killed from outside


@pytest.mark.timeout(60)
def test_threaded_host_gets_a_clean_interpreter_even_with_a_template(standby_here, monkeypatch):
    monkeypatch.setitem(jobs.STATE, "init", "set-in-host")
    assert killable_wrapper(jobs.main_thread_only)["state"] == "set-in-host"
    template = template_pid()
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        info = killable_wrapper(jobs.main_thread_only)
    finally:
        release.set()
        thread.join()
    assert info["state"] is None  # a clean interpreter: no memory of the host's
    assert info["ppid"] == os.getpid()
    assert killable_wrapper(jobs.host_info)["ppid"] == template  # alone again: standbys


@pytest.mark.timeout(60)
def test_stop_of_a_standby_that_ended_after_its_result_is_still_answered(standby_here):
    """H asks T to stop a standby only after killing it through its pidfd,
    so T may reap a standby done with its job (its result written, no
    report due) before H's request arrives: T answers it all the same, with
    the status it reaped, and the call does not wait for a report that would
    never come."""
    killable_wrapper(jobs.add, 1, 2)  # a template, and a standby ready
    job = _standby.acquire(jobs.add, (2, 3), {})
    assert job is not None, "no standby"
    try:
        assert job.start()
        assert select.select([job.result_fd], [], [], RESULT_WAIT)[0], "no result"
        time.sleep(0.2)  # T reads the standby's "done" news
        os.kill(job.pid, signal.SIGKILL)  # unreaped by T until it sees the exit
        assert gone(job.pid), "T did not reap its standby"
        began = time.monotonic()
        status = job.finish(stop=True)
        assert time.monotonic() - began < GONE
        assert status is not None and os.WIFSIGNALED(status)
        assert os.WTERMSIG(status) == signal.SIGKILL
    finally:
        job.close()
    assert killable_wrapper(jobs.add, 3, 3) == 6  # the template serves on


@pytest.mark.timeout(60)
def test_idle_standby_or_template_killed_from_outside(standby_here):
    killable_wrapper(jobs.add, 1, 2)
    standby = ready_standby()
    os.kill(standby, signal.SIGKILL)
    assert gone(standby)
    assert killable_wrapper(jobs.add, 2, 2) == 4  # another standby
    template = template_pid()
    os.kill(template, signal.SIGKILL)
    procs.wait_gone([(template, psutil.Process(template).create_time())], zombies_ok=True)
    assert killable_wrapper(jobs.add, 3, 2) == 5  # another template
    assert template_pid() != template
    assert gone(template)


@pytest.mark.timeout(60)
def test_template_killed_while_its_job_runs(standby_here, record_path):
    killable_wrapper(jobs.add, 1, 2)
    template = template_pid()
    reader = subprocess.Popen(
        [sys.executable, "-c", procs.KILL_RECORDED, record_path, "parent"],
    )
    try:
        with pytest.raises(ProcessDiedError, match="template"):
            killable_wrapper(jobs.sleep_job, record_path, killable_wrapper_timeout=RESULT_WAIT)
        records = procs.read_record(record_path, wait=0)
        assert not procs.wait_gone(records, orphaned_zombies_ok=True)
    finally:
        reader.kill()
        reader.wait()
    assert gone(template)
    assert killable_wrapper(jobs.add, 3, 2) == 5  # a new template


@pytest.mark.timeout(60)
def test_stop_standby_leaves_no_process_and_no_fd(standby_here):
    fds_before = set(os.listdir("/proc/self/fd"))
    killable_wrapper(jobs.add, 1, 2)
    ready_standby()
    template = psutil.Process(template_pid())
    processes = [template, *template.children()]
    assert len(processes) >= 2
    cancelk.wrapper.stop_standby()
    assert not procs.still_there([(p.pid, p.create_time()) for p in processes])
    assert set(os.listdir("/proc/self/fd")) <= fds_before | {str(max(map(int, fds_before)) + 1)}
    assert killable_wrapper(jobs.add, 1, 1) == 2  # and a new one on demand


# ==========================================================================
# the C helpers that move an fd table between processes


@pytest.mark.timeout(60)
def test_place_fds_installs_any_table_without_clobbering(tmp_path):
    """_core.place_fds puts each received fd at its target number, with its
    close-on-exec flag, whatever the overlap between where the fds arrived,
    where they go and the caller's own fds (which it moves out of the way)."""
    from cancelk import _core

    for trial in range(200):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a child per table
            code = 1
            try:
                import random

                rng = random.Random(trial)
                null = os.open(os.devnull, os.O_RDONLY)
                count = rng.randint(0, 20)
                targets = sorted(rng.sample(range(40), count))
                sent = []
                for _ in range(count):
                    read_end, write_end = os.pipe()
                    os.close(write_end)
                    sent.append(read_end)
                identity = [os.fstat(fd).st_ino for fd in sent]
                keep = [os.dup(null) for _ in range(2)]
                kept = [os.fstat(fd).st_ino for fd in keep]
                flags = [rng.random() < 0.5 for _ in range(count)]
                moved = _core.place_fds(sent, list(zip(targets, flags)), keep)
                for target, inode, flag in zip(targets, identity, flags):
                    assert os.fstat(target).st_ino == inode
                    assert os.get_inheritable(target) is not flag
                for fd, inode in zip(moved, kept):
                    assert fd not in targets and os.fstat(fd).st_ino == inode
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"table {trial} misplaced"


@pytest.mark.timeout(60)
def test_open_fds_lists_this_process_fds():
    from cancelk import _core

    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    directory = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for listing in (_core.open_fds(), _core.open_fds(directory)):
            table = dict(listing)
            assert table[read_end] is True  # close-on-exec (Python's default)
            assert table[write_end] is False
            assert directory not in table or listing == _core.open_fds()
        assert directory not in dict(_core.open_fds(directory))
    finally:
        for fd in (read_end, write_end, directory):
            os.close(fd)
    assert read_end not in dict(_core.open_fds())


def _receive_in_child(
    receiver: int, closes: list[int], report: int, size: int
) -> None:  # pragma: no cover
    """In a forked child: close ``closes`` (the numbers the table fills),
    receive the table on ``receiver`` and write, per fd now open, its
    number, inode and close-on-exec flag, then the ``size`` bytes after the
    table (what receive_table did not read of them is read here)."""
    from cancelk import _core

    code = 1
    try:
        for fd in closes:
            os.close(fd)
        keep = [receiver, report]
        start = _core.receive_table(receiver, keep)
        receiver, report = keep
        lines = []
        for fd, cloexec in _core.open_fds():
            if fd not in (receiver, report):
                lines.append(f"{fd} {os.fstat(fd).st_ino} {int(cloexec)}")
        while start is not None and len(start) < size:
            start += os.read(receiver, size - len(start))
        lines.append("frame " + ("EOF" if start is None else start.hex()))
        os.write(report, ("\n".join(lines) + "\n").encode())
        code = 0
    finally:
        os._exit(code)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [0, 3, 600])  # 600: three chunks of fds (the kernel takes 253)
def test_send_table_installs_the_senders_fds_at_their_numbers(extra):
    """What _core.send_table sends, _core.receive_table installs in another
    process: every fd of the sender but the excluded ones, at the same
    number, with the same close-on-exec flag; the frame after it comes back
    whole."""
    import resource

    from cancelk import _core

    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limits[0] < 2048:  # room for the 600, and for the receiver's copies of them
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, limits[1]), limits[1]))
    ours, theirs = __import__("socket").socketpair()
    report_r, report_w = os.pipe()
    opened = []
    try:
        for i in range(extra):
            fd = os.open(os.devnull, os.O_RDONLY)
            os.set_inheritable(fd, i % 2 == 0)
            opened.append(fd)
        exclude = [ours.fileno(), theirs.fileno(), report_r, report_w]
        expected = {
            fd: (os.fstat(fd).st_ino, int(cloexec))
            for fd, cloexec in _core.open_fds()
            if fd not in exclude
        }
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            not_ours = [fd for fd in expected if fd > 2] + [ours.fileno(), report_r]
            _receive_in_child(theirs.fileno(), not_ours, report_w, len(b"frame bytes"))
        os.close(report_w)
        report_w = -1
        _core.send_table(ours.fileno(), -1, exclude, b"frame bytes")
        lines = b""
        while chunk := os.read(report_r, 1 << 16):
            lines += chunk
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        *table, frame = lines.decode().splitlines()
        got = {int(fd): (int(inode), int(flag)) for fd, inode, flag in map(str.split, table)}
        assert got == expected
        assert frame == "frame " + b"frame bytes".hex()
    finally:
        for fd in [*opened, report_r, report_w]:
            if fd >= 0:
                os.close(fd)
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@pytest.mark.timeout(60)
def test_receive_table_eof_and_garbage():
    """EOF before a whole table is None (the host gave the standby back); a
    table whose fds did not come is an OSError, and no fd is left behind."""
    import errno
    import socket
    import struct

    from cancelk import _core

    ours, theirs = socket.socketpair()
    try:
        ours.close()
        assert _core.receive_table(theirs.fileno(), [theirs.fileno()]) is None
    finally:
        theirs.close()
    ours, theirs = socket.socketpair()
    try:
        before = dict(_core.open_fds())
        ours.sendall(struct.pack("<I", 2) + struct.pack("<ii", 5, 0) * 2 + b"rest")
        with pytest.raises(OSError) as caught:
            _core.receive_table(theirs.fileno(), [theirs.fileno()])
        assert caught.value.errno == errno.EPROTO
        assert "file descriptor table" in str(caught.value)
        assert dict(_core.open_fds()) == before
        # A table whose fd came but whose target is no fd number: the fd
        # received is closed again, nothing placed.
        read_end, write_end = os.pipe()
        try:
            table = struct.pack("<I", 1) + struct.pack("<ii", -5, 0)
            socket.send_fds(ours, [table], [read_end])
            with pytest.raises(OSError) as caught:
                _core.receive_table(theirs.fileno(), [theirs.fileno()])
            assert caught.value.errno == errno.EPROTO
            assert dict(_core.open_fds()) == before | {read_end: True, write_end: True}
        finally:
            os.close(read_end)
            os.close(write_end)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.timeout(60)
def test_recv_pending_reads_every_message_and_its_fds_in_order():
    """_core.recv_pending takes what a socket holds in one call: the bytes of
    several messages and their fds, in order, then says drained; at the
    peer's close, EOF."""
    import socket

    from cancelk import _core

    ours, theirs = socket.socketpair()
    pipes = [os.pipe() for _ in range(3)]
    try:
        socket.send_fds(ours, [b"a" * 16], [pipes[0][0], pipes[1][0]])
        ours.sendall(b"b" * 16)
        socket.send_fds(ours, [b"c" * 16], [pipes[2][0]])
        data, fds, state = _core.recv_pending(theirs.fileno())
        assert data == b"a" * 16 + b"b" * 16 + b"c" * 16
        assert state == _core.PENDING_DRAINED
        assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(r).st_ino for r, _ in pipes]
        assert all(not os.get_inheritable(fd) for fd in fds)
        for fd in fds:
            os.close(fd)
        assert _core.recv_pending(theirs.fileno()) == (b"", [], _core.PENDING_DRAINED)
        ours.close()
        assert _core.recv_pending(theirs.fileno()) == (b"", [], _core.PENDING_EOF)
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
        ours.close()
        theirs.close()
