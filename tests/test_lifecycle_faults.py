"""Lifecycle under faults (DESIGN A5, I3, I6, I10): executors that are
dropped without shutdown, interpreters that exit with jobs running, a forked
child of the user process that touches the parent's pool, and shutdowns with
a thousand queued futures.

Faults injected:
- the executor is dropped inside a reference cycle (only the cyclic GC frees
  it) while jobs with children run, and while idle: its jobs end as a
  ``shutdown(wait=False)`` lets them, then every pool process is gone within
  2 s and no manager thread is left;
- a script ends with a running job that has a child, a job that times out and
  20 queued jobs, by returning, ``sys.exit``, an uncaught exception,
  ``os._exit``, or after ``shutdown(wait=False)`` (with and without
  ``cancel_futures``): it exits promptly, every future that the exit path
  lets end ends once, and no process is left;
- a child made by ``os.fork()`` of the user process submits to, cancels
  running futures of, and shuts down the parent's pool: each is a clear error
  or harmless, and the parent's running jobs finish untouched on the same
  runners;
- ``shutdown(cancel_futures=True)`` with 1 000 queued futures (while other
  threads keep submitting): every future ends exactly once, none is left
  pending, and it returns promptly.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import cancelk
from cancelk import ProcessTimeout

import jobs
import procs
from jobs import RESULT_WAIT, START_METHODS

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def pool_processes(supervisor):
    return procs.snapshot([supervisor.pid] + [p.pid for p in supervisor.children(recursive=True)])


def read_pids(path, wait=RESULT_WAIT):
    procs.wait_for_path(path, wait, f"the job never wrote {path}")
    with open(path) as handle:
        return [int(x) for x in handle.read().split()]


def wait_threads(count, timeout=2.0):
    deadline = time.monotonic() + timeout
    while len(procs.manager_threads()) > count and time.monotonic() < deadline:
        time.sleep(0.005)
    return len(procs.manager_threads())


# -------------------------------------------------------------------------
# an executor garbage-collected without shutdown


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep_futures", [True, False], ids=["futures-kept", "futures-dropped"])
def test_executor_collected_while_jobs_run_lets_them_end_then_leaves_nothing(
    tmp_path, backend, keep_futures
):
    threads_before = len(procs.manager_threads())
    exe = cancelk.ProcessPoolExecutor(2)
    exe.cycle = exe  # only the cyclic garbage collector can free it
    paths = [str(tmp_path / f"job{i}") for i in range(2)]
    running = [exe.submit(jobs.sleep_with_child, 0.5, p) for p in paths]
    queued = [exe.submit(jobs.add, i, 1) for i in range(10)]
    pids = [read_pids(p) for p in paths]
    supervisor = procs.supervisor_of(pids[0][0])
    processes = pool_processes(supervisor)
    assert len(processes) >= 5, processes  # supervisor, two runners, two sleeps
    try:
        if not keep_futures:
            del running, queued
        del exe
        gc.collect()
        dropped = time.monotonic()
        if keep_futures:
            # as with the stdlib (shutdown(wait=False)): what was submitted still runs
            assert [f.result(timeout=RESULT_WAIT) for f in running] == [p[0] for p in pids]
            assert [f.result(timeout=RESULT_WAIT) for f in queued] == [i + 1 for i in range(10)]
            ended = time.monotonic()
        else:
            ended = dropped + 0.5
        left = procs.wait_gone(processes, timeout=max(ended - time.monotonic(), 0) + 2.0)
        gone = time.monotonic() - dropped
        threads = wait_threads(threads_before)
    finally:
        procs.kill_records(processes)
    print(
        f"collected executor with running jobs [{backend}, {keep_futures=}]: "
        f"{len(processes)} processes gone {gone * 1000:.0f} ms after the drop (jobs: 500 ms)"
    )
    assert not left, f"left behind: {left}"
    assert threads == threads_before, "the manager thread outlived the executor"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_idle_executor_collected_leaves_no_process_and_no_thread(method):
    threads_before = len(procs.manager_threads())
    exe = cancelk.ProcessPoolExecutor(2, mp_context=method)
    exe.cycle = exe
    probe = exe.submit(jobs.sleep_return, 0.2, "probe")
    supervisor = procs.supervisor_of(procs.wait_running(probe))
    assert probe.result(timeout=RESULT_WAIT) == "probe"
    victim = exe.submit(jobs.sleep_return, 20)  # a replaced runner too
    procs.wait_running(victim)
    assert victim.cancel()
    assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2
    processes = pool_processes(supervisor)
    try:
        del exe, probe, victim
        gc.collect()
        start = time.monotonic()
        left = procs.wait_gone(processes, timeout=2.0)
        elapsed = time.monotonic() - start
        threads = wait_threads(threads_before)
    finally:
        procs.kill_records(processes)
    print(
        f"collected idle executor [{method}]: {len(processes)} processes gone in "
        f"{elapsed * 1000:.0f} ms"
    )
    assert not left, f"left behind: {left}"
    assert threads == threads_before


# -------------------------------------------------------------------------
# the interpreter exits


EXIT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import cancelk, psutil
    import jobs

    def report(name):
        def callback(future):
            if future.cancelled():
                what = "cancelled"
            elif future.exception() is not None:
                what = type(future.exception()).__name__
            else:
                what = "ok"
            os.write(1, f"{name} {what}\\n".encode())  # one write: threads do not interleave
        return callback

    if __name__ == "__main__":
        method, mode, path = sys.argv[2], sys.argv[3], sys.argv[4]
        exe = cancelk.ProcessPoolExecutor(2, mp_context=method)
        a = exe.submit(jobs.sleep_with_child, 0.5, path)
        b = exe.submit(jobs.sleep_return, 60, None, cancelk.ProcessTimeout(0.5))
        a.add_done_callback(report("A"))
        b.add_done_callback(report("B"))
        for i in range(20):
            exe.submit(jobs.add, i, 1).add_done_callback(report("Q"))
        deadline = time.monotonic() + 20
        while not os.path.exists(path) or b.pid is None:
            assert time.monotonic() < deadline, "the jobs never started"
            time.sleep(0.005)
        me = psutil.Process()
        while len(me.children(recursive=True)) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        kids = me.children(recursive=True)
        with open(path + ".tmp", "w") as handle:
            json.dump([[p.pid, p.create_time()] for p in kids], handle)
        os.replace(path + ".tmp", path + ".record")
        if mode == "sys_exit":
            sys.exit(3)
        if mode == "exception":
            raise KeyError("uncaught")
        if mode == "os_exit":
            os._exit(4)
        if mode == "shutdown_nowait":
            exe.shutdown(wait=False)
        if mode == "shutdown_nowait_cancel":
            exe.shutdown(wait=False, cancel_futures=True)
        # "return": just fall off the end
    """
)

# mode -> (exit code, expected outcome lines or None when none may be printed)
EXIT_MODES = {
    "return": (0, {"A ok": 1, "B ProcessTimeoutError": 1, "Q ok": 20}),
    "sys_exit": (3, {"A ok": 1, "B ProcessTimeoutError": 1, "Q ok": 20}),
    "exception": (1, {"A ok": 1, "B ProcessTimeoutError": 1, "Q ok": 20}),
    "shutdown_nowait": (0, {"A ok": 1, "B ProcessTimeoutError": 1, "Q ok": 20}),
    "shutdown_nowait_cancel": (0, {"A ok": 1, "B ProcessTimeoutError": 1, "Q cancelled": 20}),
    "os_exit": (4, {}),
}
EXIT_CASES = [("fork", mode) for mode in EXIT_MODES] + [
    ("forkserver", "return"),
    ("spawn", "return"),
    ("spawn", "shutdown_nowait"),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method,mode", EXIT_CASES)
def test_interpreter_exit_with_running_jobs_is_prompt_and_leaves_nothing(tmp_path, method, mode):
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), TESTS_DIR, method, mode, str(tmp_path / "a.pids")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(tmp_path),
    )
    records = []
    record = tmp_path / "a.pids.record"
    try:
        deadline = time.monotonic() + 30
        while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        recorded = time.monotonic()
        if record.exists():
            records = [tuple(r) for r in json.loads(record.read_text())]
        out, err = proc.communicate(timeout=30)
        exited = time.monotonic() - recorded
        lines = out.splitlines()
        left = procs.wait_gone(records, timeout=2.0, zombies_ok=True)
        gone = time.monotonic() - recorded
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        procs.kill_records(records)
    code, expected = EXIT_MODES[mode]
    print(
        f"exit [{method}/{mode}]: exited {exited * 1000:.0f} ms after the jobs ran "
        f"(job A needs 500 ms), all {len(records)} processes gone after {gone * 1000:.0f} ms"
    )
    assert len(records) >= 4, (records, err)  # supervisor, two runners, A's sleep
    assert proc.returncode == code, (proc.returncode, err)
    if mode == "exception":
        assert "KeyError: 'uncaught'" in err
    else:
        assert "Traceback" not in err, err
    counts = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    assert counts == expected, f"outcomes at exit: {counts}; stderr: {err}"
    assert exited < 10, f"the interpreter took {exited:.1f} s to exit"
    assert not left, f"left behind: {left}"


# -------------------------------------------------------------------------
# a forked child of the user process


def _in_child(exe, running, action, conn_fd):
    """Runs in the forked child; reports what happened, never returns."""
    code = 0
    try:
        try:
            if action == "submit":
                exe.submit(jobs.add, 1, 1)
                answer = "submitted"
            elif action == "cancel":
                answer = f"cancel returned {[f.cancel() for f in running]}"
            elif action == "shutdown":
                exe.shutdown(wait=True, cancel_futures=True)
                answer = "shutdown returned"
            elif action == "kill_workers":
                exe.kill_workers()
                answer = "kill_workers returned"
            else:
                del exe, running
                gc.collect()
                answer = "dropped"
        except BaseException as err:  # a clear error is an accepted answer
            answer = f"{type(err).__name__}: {err}"
        os.write(conn_fd, pickle.dumps(answer))
    except BaseException:
        code = 1
    finally:
        os._exit(code)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["submit", "cancel", "shutdown", "kill_workers", "drop"])
def test_forked_child_using_the_parents_pool_never_touches_the_parents_jobs(
    make_pool, backend, action
):
    exe = make_pool(2)
    assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
    running = [exe.submit(jobs.sleep_return, 1.0, f"parent job {i}") for i in range(2)]
    job_pids = [procs.wait_running(f) for f in running]
    queued = exe.submit(jobs.token_pid, "queued")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        _in_child(exe, running, action, write_fd)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as handle:
            data = handle.read()
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    answer = pickle.loads(data) if data else "<nothing>"
    print(f"forked child, {action}: {answer!r}")
    assert os.waitstatus_to_exitcode(status) == 0, answer
    if action == "submit":
        assert answer.startswith("RuntimeError"), answer
    # the parent's jobs: untouched, on the same runners, results on time
    for i, future in enumerate(running):
        try:
            value = future.result(timeout=5)  # the job needs 1 s
        except concurrent.futures.TimeoutError:
            # unwedge the pool for its teardown: its runners die, it replaces them
            for job_pid in job_pids:
                try:
                    os.killpg(job_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail(
                f"after the child's {action!r} ({answer!r}) the parent's running job {i} "
                f"never finished (state {future._state})"
            )
        assert value == f"parent job {i}", value
        assert psutil.pid_exists(job_pids[i])
    token, queued_pid = queued.result(timeout=RESULT_WAIT)
    assert token == "queued" and queued_pid in job_pids
    assert exe.submit(jobs.getpid).result(timeout=RESULT_WAIT) in job_pids
    assert exe.stats()["died"] == 0 and exe.stats()["cancelled"] == 0


# -------------------------------------------------------------------------
# shutdown(cancel_futures=True) with a thousand queued futures


@pytest.mark.stress
@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_with_1000_queued_ends_every_future_once(make_pool, scale):
    queued_count = scale(1000, 100_000)
    exe = make_pool(2)
    calls = {}
    lock = threading.Lock()

    def count(future):
        with lock:
            calls[id(future)] = calls.get(id(future), 0) + 1

    running = [exe.submit(jobs.sleep_return, 0.3, i) for i in range(2)]
    for f in running:
        procs.wait_running(f)
    queued = []
    for i in range(queued_count):
        extra = (ProcessTimeout(5),) if i % 3 == 0 else ()
        queued.append(exe.submit(jobs.add, i, 1, *extra))
    everything = running + queued
    for f in everything:
        f.add_done_callback(count)
    # other threads keep submitting while the shutdown happens
    stop = threading.Event()
    late = []
    refused = [0]

    def submitter():
        while not stop.is_set():
            try:
                f = exe.submit(jobs.add, 0, 0)
            except RuntimeError:
                refused[0] += 1
                return
            f.add_done_callback(count)
            late.append(f)

    threads = [threading.Thread(target=submitter) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.01)
    start = time.monotonic()
    exe.shutdown(wait=True, cancel_futures=True)
    elapsed = time.monotonic() - start
    stop.set()
    for t in threads:
        t.join(10)
    everything += late
    pending = [f for f in everything if not f.done()]
    assert not pending, f"{len(pending)} futures still pending after shutdown"
    assert [f.result(timeout=0) for f in running] == [0, 1]
    cancelled = sum(f.cancelled() for f in queued)
    ran = [(i, f) for i, f in enumerate(queued) if not f.cancelled()]
    for i, f in ran:
        assert f.result(timeout=0) == i + 1
    for f in late:
        assert f.cancelled() or f.result(timeout=0) == 0
    deadline = time.monotonic() + 2
    while len(calls) < len(everything) and time.monotonic() < deadline:
        time.sleep(0.01)
    once = [calls.get(id(f), 0) for f in everything]
    assert all(n == 1 for n in once), f"callback counts {sorted(set(once))}"
    print(
        f"shutdown(cancel_futures=True): {len(queued)} queued ({cancelled} cancelled, "
        f"{len(ran)} ran), {len(late)} submitted meanwhile, {refused[0]} submitters refused; "
        f"returned in {elapsed * 1000:.0f} ms (running jobs needed <= 300 ms)"
    )
    assert refused[0] == len(threads)
    assert elapsed < 5, f"shutdown took {elapsed:.1f} s"
