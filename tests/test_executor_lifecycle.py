"""The pool's life (DESIGN A5, I6, I10): shutdown in all its forms, the
context manager, a dropped executor, interpreter exit, a user process killed
by SIGKILL, use from a daemonic process and from a forked child, and no
growth with the number of jobs.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import multiprocessing
import os
import signal
import textwrap
import threading
import time

import psutil
import pytest

import cancelk
from cancelk import ProcessCancelledError, ProcessTimeout

import jobs
import procs
from jobs import RESULT_WAIT, START_METHODS

NEEDS_PROC = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="lists descriptors through /proc/self/fd (Linux)"
)


def pool_processes(future, expect=1):
    """(pid, create_time) of the supervisor and all its descendants, found
    from a running job of the pool (waiting a little for ``expect`` of them)."""
    supervisor = procs.supervisor_of(procs.wait_running(future))
    deadline = time.monotonic() + 5
    while len(supervisor.children(recursive=True)) < expect and time.monotonic() < deadline:
        time.sleep(0.005)
    return procs.snapshot([supervisor.pid] + [p.pid for p in supervisor.children(recursive=True)])


# -------------------------------------------------------------------------
# shutdown


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_shutdown_wait_ends_every_future_and_process(make_pool, method, tmp_path):
    exe = make_pool(2, mp_context=method)
    # a finished job that left a detached child behind
    detached_path = str(tmp_path / "detached.json")
    exe.submit(jobs.leave_detached_child, detached_path).result(timeout=RESULT_WAIT)
    detached = procs.read_record(detached_path, wait=0)
    probe = exe.submit(jobs.sleep_return, 0.5, "probe")
    processes = pool_processes(probe, expect=2)
    futures = [exe.submit(jobs.sleep_return, 0.05, i) for i in range(10)]
    assert len(processes) >= 3  # supervisor and two runners
    exe.shutdown(wait=True)
    assert all(f.done() for f in [probe, *futures])
    assert [f.result(timeout=0) for f in futures] == list(range(10))
    left = procs.still_there(processes + detached)  # at once: no waiting
    if left:
        procs.kill_records(processes + detached)
    assert not left, f"shutdown(wait=True) returned while pool processes remain: {left}"


@pytest.mark.timeout(30)
def test_shutdown_cancel_futures_with_100_queued_jobs(make_pool):
    exe = make_pool(1)
    running = exe.submit(jobs.sleep_return, 0.5, "running")
    procs.wait_running(running)
    queued = [exe.submit(jobs.add, i, 0) for i in range(100)]
    start = time.monotonic()
    exe.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - start < 3.0
    assert running.result(timeout=0) == "running"  # a running job is not cancelled
    assert all(f.cancelled() for f in queued)
    _done, not_done = concurrent.futures.wait(queued, timeout=2)
    assert not not_done, "wait() does not see futures cancelled by shutdown(cancel_futures=True)"
    for f in queued[:3]:
        with pytest.raises(ProcessCancelledError):
            f.result(timeout=0)
    assert exe.stats()["started"] == 1


@pytest.mark.timeout(30)
def test_shutdown_timeout_kills_what_still_runs(make_pool, tmp_path):
    path = str(tmp_path / "record.json")
    exe = make_pool(1)
    running = exe.submit(jobs.sleep_job, path)
    records = procs.read_record(path)
    queued = [exe.submit(jobs.add, i, 0) for i in range(5)]
    processes = pool_processes(running)
    start = time.monotonic()
    exe.shutdown(wait=True, timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 2.0, elapsed
    with pytest.raises(ProcessCancelledError):
        running.result(timeout=0)
    assert all(f.cancelled() for f in queued)
    left = procs.still_there(processes + records)
    if left:
        procs.kill_records(processes + records)
    assert not left, left


@pytest.mark.timeout(30)
def test_shutdown_timeout_not_needed(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_return, 0.2, "quick")
    start = time.monotonic()
    exe.shutdown(wait=True, timeout=5)
    assert time.monotonic() - start < 2.0
    assert future.result(timeout=0) == "quick"


@pytest.mark.timeout(30)
def test_shutdown_without_wait(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.sleep_return, 0.5, "finished anyway")
    processes = pool_processes(future)
    start = time.monotonic()
    exe.shutdown(wait=False)
    assert time.monotonic() - start < 1.0
    with pytest.raises(RuntimeError):
        exe.submit(jobs.add, 1, 1)
    assert future.result(timeout=RESULT_WAIT) == "finished anyway"
    assert not procs.wait_gone(processes, timeout=5)


@pytest.mark.timeout(30)
def test_shutdown_twice_and_unused_pool():
    before = procs.descendants()
    exe = cancelk.ProcessPoolExecutor(2)
    exe.shutdown(wait=True)
    exe.shutdown(wait=True, cancel_futures=True, timeout=1)
    assert procs.descendants() <= before  # an unused pool never started a process
    used = cancelk.ProcessPoolExecutor(1)
    assert used.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
    used.shutdown(wait=True)
    used.shutdown(wait=True)
    cancelk.ProcessPoolExecutor(1).terminate_workers()
    cancelk.ProcessPoolExecutor(1).kill_workers()
    assert procs.descendants() <= before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers(make_pool, how, tmp_path):
    path = str(tmp_path / "record.json")
    exe = make_pool(2)
    running = exe.submit(jobs.popen_job, path)
    records = procs.read_record(path)
    processes = pool_processes(running, expect=2)
    other = exe.submit(jobs.sleep_return, 20)
    queued = [exe.submit(jobs.add, i, 0) for i in range(5)]
    start = time.monotonic()
    getattr(exe, how)()
    assert time.monotonic() - start < 1.0, f"{how}() blocked"
    for f in (running, other):
        with pytest.raises(ProcessCancelledError):
            f.result(timeout=2)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError):
        exe.submit(jobs.add, 1, 1)
    left = procs.wait_gone(processes + records, timeout=2)
    assert not left, left
    exe.shutdown(wait=True)


@pytest.mark.timeout(30)
def test_context_manager(tmp_path):
    with cancelk.ProcessPoolExecutor(2) as exe:
        futures = [exe.submit(jobs.sleep_return, 0.2, i) for i in range(4)]
        processes = pool_processes(futures[0], expect=2)
    assert [f.result(timeout=0) for f in futures] == list(range(4))
    assert not procs.still_there(processes)
    with pytest.raises(RuntimeError):
        exe.submit(jobs.add, 1, 1)


@pytest.mark.timeout(30)
def test_context_manager_exit_by_exception_waits_for_jobs():
    with pytest.raises(KeyError):
        with cancelk.ProcessPoolExecutor(1) as exe:
            future = exe.submit(jobs.sleep_return, 0.3, "done")
            raise KeyError("boom")
    assert future.result(timeout=0) == "done"


@pytest.mark.timeout(30)
def test_dropped_executor_goes_away():
    threads_before = len(procs.manager_threads())
    exe = cancelk.ProcessPoolExecutor(2)
    probe = exe.submit(jobs.sleep_return, 0.2, "probe")
    processes = pool_processes(probe, expect=2)
    assert probe.result(timeout=RESULT_WAIT) == "probe"
    del exe, probe
    gc.collect()
    left = procs.wait_gone(processes, timeout=5)
    assert not left, f"a dropped executor left its processes: {left}"
    deadline = time.monotonic() + 5
    while len(procs.manager_threads()) > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(procs.manager_threads()) == threads_before


# -------------------------------------------------------------------------
# the user process ends


EXIT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import cancelk, psutil

    if __name__ == "__main__":
        exe = cancelk.ProcessPoolExecutor(2, mp_context=sys.argv[1])
        fut = exe.submit(time.sleep, 0.5)
        fut.add_done_callback(lambda f: print("job done", f.result(), flush=True))
        deadline = time.monotonic() + 10
        while fut.pid is None and time.monotonic() < deadline:
            time.sleep(0.005)
        me = psutil.Process()
        while len(me.children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)  # the supervisor and the job's runner (runners start on demand)
        kids = me.children(recursive=True)
        print(json.dumps([[p.pid, p.create_time()] for p in kids]), flush=True)
        # no shutdown: the interpreter exits with the job still running
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_interpreter_exit_with_a_running_job(tmp_path, method):
    start = time.monotonic()
    proc = procs.run_script(tmp_path, "exit_script.py", EXIT_SCRIPT, method, timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 10, elapsed
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    records = [tuple(r) for r in json.loads(lines[0])]
    assert len(records) >= 2, records  # the supervisor and the job's runner
    assert "job done None" in lines, proc.stdout  # the job ran to its end
    left = procs.wait_gone(records, timeout=2, zombies_ok=True)
    assert not left, left


KILLED_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys, time
    import cancelk, psutil

    def job():
        kids = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
        kids.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
        time.sleep(60)

    if __name__ == "__main__":
        exe = cancelk.ProcessPoolExecutor(2, mp_context=sys.argv[1])
        futures = [exe.submit(job) for _ in range(2)]
        me = psutil.Process()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sleeps = [p for p in me.children(recursive=True) if p.name() == "sleep"]
            if len(sleeps) >= 6:
                break
            time.sleep(0.01)
        kids = me.children(recursive=True)
        print(json.dumps([[p.pid, p.create_time()] for p in kids]), flush=True)
        time.sleep(60)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_user_process_sigkilled_takes_every_pool_process_with_it(tmp_path, backend, method):
    proc = procs.start_script(tmp_path, "killed_script.py", KILLED_SCRIPT, method)
    records = []
    try:
        line = proc.stdout.readline()
        records = [tuple(r) for r in json.loads(line)]
        # supervisor, two runners, six sleeps
        assert len(records) >= 9, records
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        start = time.monotonic()
        left = procs.wait_gone(records, timeout=5, zombies_ok=True)
        elapsed = time.monotonic() - start
        print(
            f"[{method}/{backend}] all {len(records)} pool processes gone {elapsed * 1000:.1f} ms "
            "after the user process was reaped"
        )
        assert not left, left
        assert elapsed < 1.0, f"pool processes outlived the user process by {elapsed:.2f} s"
    finally:
        procs.stop_process(proc)
        procs.kill_records(records)


# -------------------------------------------------------------------------
# other processes using pools


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_pool_inside_a_daemonic_process(context):
    ctx = multiprocessing.get_context(context)
    parent_conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=jobs.daemon_target, args=("fork", child_conn), daemon=True)
    process.start()
    child_conn.close()
    try:
        assert parent_conn.poll(RESULT_WAIT), "the daemonic process never reported"
        report = parent_conn.recv()
    finally:
        process.join(RESULT_WAIT)
        if process.is_alive():
            process.kill()
            process.join()
        parent_conn.close()
    assert report == {
        "square": 49,
        "timeout": "ProcessTimeoutError",
        "cancel": True,
        "job_gone": True,
    }, report
    assert process.exitcode == 0


def _child_uses_parent_pool(exe, conn):
    try:
        exe.submit(jobs.add, 1, 1)
    except RuntimeError as err:
        conn.send(f"RuntimeError: {err}")
    except BaseException as err:
        conn.send(f"unexpected {err!r}")
    else:
        conn.send("submitted")
    conn.close()


@pytest.mark.timeout(30)
def test_forked_child_cannot_use_the_parents_pool_and_does_not_disturb_it(make_pool):
    exe = make_pool(2)
    assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
    long_job = exe.submit(jobs.sleep_return, 0.5, "parent job")
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_child_uses_parent_pool, args=(exe, child_conn))
    child.start()
    child_conn.close()
    assert parent_conn.poll(RESULT_WAIT)
    answer = parent_conn.recv()
    child.join(RESULT_WAIT)
    parent_conn.close()
    assert answer.startswith("RuntimeError"), answer
    assert child.exitcode == 0
    assert long_job.result(timeout=RESULT_WAIT) == "parent job"
    assert exe.submit(jobs.add, 2, 2).result(timeout=RESULT_WAIT) == 4


FORK_CHILD_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import cancelk

    def add(a, b):
        return a + b

    if __name__ == "__main__":
        exe = cancelk.ProcessPoolExecutor(2, mp_context=sys.argv[1])
        assert exe.submit(add, 1, 2).result(timeout=30) == 3
        pid = os.fork()
        if pid == 0:
            try:
                exe.submit(add, 1, 1)
            except RuntimeError:
                print("child: RuntimeError", flush=True)
            sys.exit(0)  # a normal exit: atexit handlers and finalizers run here
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status), flush=True)
        print("parent", exe.submit(add, 2, 3).result(timeout=30), flush=True)
        exe.shutdown()
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_forked_child_exiting_normally_leaves_the_parents_pool_alone(tmp_path, method):
    proc = procs.run_script(tmp_path, "fork_child_script.py", FORK_CHILD_SCRIPT, method)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["child: RuntimeError", "child exit 0", "parent 5"], (
        proc.stdout,
        proc.stderr,
    )


# -------------------------------------------------------------------------
# descriptors and growth (I10)


@NEEDS_PROC
@pytest.mark.timeout(30)
def test_pool_descriptors_are_not_inherited_by_exec(make_pool):
    """Descriptors the pool holds in the user process must be close-on-exec,
    so that a program the user starts (os.system, Popen(close_fds=False)) does
    not hold a runner's channel open."""
    before = set(os.listdir("/proc/self/fd"))
    exe = make_pool(2)
    assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
    # runners replaced after a kill hand over new channels too
    victim = exe.submit(jobs.sleep_return, 20)
    procs.wait_running(victim)
    assert victim.cancel()
    assert exe.submit(jobs.add, 2, 2).result(timeout=RESULT_WAIT) == 4
    time.sleep(0.2)
    inheritable = []
    for name in set(os.listdir("/proc/self/fd")) - before:
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                inheritable.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    assert not inheritable, f"inheritable pool descriptors: {inheritable}"


@NEEDS_PROC
@pytest.mark.timeout(90)
def test_descriptors_threads_and_processes_do_not_grow_with_jobs(make_pool):
    exe = make_pool(2)

    def batch():
        futures = [exe.submit(jobs.add, i, 1) for i in range(200)]
        victims = [exe.submit(jobs.sleep_return, 20, None, ProcessTimeout(0.01)) for _ in range(5)]
        cancelled = [exe.submit(jobs.sleep_return, 20) for _ in range(5)]
        time.sleep(0.05)
        for f in cancelled:
            f.cancel()
        # (only running futures: a cancelled pending one is never reported to
        # wait(), see test_cancelled_pending_job_is_seen_by_wait_and_as_completed)
        concurrent.futures.wait(futures + victims, timeout=RESULT_WAIT)
        assert all(f.cancelled() for f in cancelled)
        assert [f.result(timeout=0) for f in futures] == [i + 1 for i in range(200)]
        time.sleep(0.2)  # replacement runners are in

    batch()
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    processes = len(psutil.Process().children(recursive=True))
    for _ in range(3):
        batch()
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert threading.active_count() <= threads
    assert len(psutil.Process().children(recursive=True)) <= processes


@pytest.mark.timeout(120)
def test_supervisor_memory_does_not_grow_with_time_limited_jobs(make_pool):
    """Every job here has a (long) time limit and finishes at once: the
    supervisor must not keep one deadline per finished job."""
    exe = make_pool(2, timeout=3600)

    def run(count):
        for _ in range(count // 1000):
            futures = [exe.submit(jobs.add, i, 0) for i in range(1000)]
            concurrent.futures.wait(futures, timeout=RESULT_WAIT)

    probe = exe.submit(jobs.sleep_return, 0.2)
    supervisor = procs.supervisor_of(procs.wait_running(probe))
    probe.result(timeout=RESULT_WAIT)
    run(3000)
    rss_before = supervisor.memory_info().rss
    run(36000)
    grown = supervisor.memory_info().rss - rss_before
    print(f"supervisor RSS {rss_before >> 10} KiB -> {(rss_before + grown) >> 10} KiB")
    assert grown < 1.5 * 2**20, (
        f"the supervisor grew by {grown / 2**20:.1f} MiB over 36000 jobs with a time limit"
    )
