"""I4: killing a job kills its whole process tree.

Fault injected: the job builds a tree of every shape a job can leave behind --
a child, a grandchild, a child in its own process group (setpgid), a child in
its own session (setsid), a double-fork daemon (fork, setsid, fork, the middle
process exits, so the daemon is nobody's child in the job's tree), a
``subprocess.Popen(start_new_session=True)`` grandchild and a multiprocessing
child. Each process reports its own pid (with its create time), so the test
knows every one of them whoever its parent is now. The job is then stopped by
``cancel()`` or by its time limit, on both C backends, repeatedly; every
recorded process must be dead within 2 s (measured: median and worst time
from the stop until the last one is dead) and reaped soon after (the leak
check of conftest fails a test that leaves a zombie).
"""

from __future__ import annotations

import statistics
import time

import psutil
import pytest

from cancelk import ProcessCancelledError, ProcessTimeout, ProcessTimeoutError

import jobs
import procs
from jobs import GONE, RESULT_WAIT


def _dead(pid, created):
    proc = procs.same_process(pid, created)
    if proc is None:
        return True
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def time_until_dead(records, start, timeout=GONE):
    """Poll every ~1 ms; seconds from ``start`` until every record is dead
    (None if some still live after ``timeout``)."""
    pending = list(records)
    while True:
        pending = [r for r in pending if not _dead(*r)]
        now = time.monotonic()
        if not pending:
            return now - start
        if now - start > timeout:
            return None
        time.sleep(0.001)


def stop_and_measure(exe, how, path, backend):
    """Run a whole-tree job, stop it (cancel or time limit); return seconds
    from the stop until its whole tree is dead."""
    if how == "cancel":
        future = exe.submit(jobs.tree_job, path)
    else:
        future = exe.submit(jobs.tree_job, path, ProcessTimeout(1.0))
    records = procs.read_record(path)
    try:
        expected = 1 + sum(jobs.TREE_SIZE.values())
        assert len(records) == expected, records
        assert all(not _dead(*r) for r in records), "a process of the tree died early"
        job_pid = procs.wait_running(future)
        assert job_pid == records[0][0]
        # the processes that left the job's group and session really did
        groups = {psutil.Process(pid).pid: _pgid(pid) for pid, _ in records}
        assert len(set(groups.values())) >= 4, groups
        if how == "cancel":
            start = time.monotonic()
            assert future.cancel()
            elapsed = time_until_dead(records, start)
            with pytest.raises(ProcessCancelledError):
                future.result(timeout=RESULT_WAIT)
        else:
            with pytest.raises(ProcessTimeoutError):
                future.result(timeout=RESULT_WAIT)
            start = time.monotonic()
            elapsed = time_until_dead(records, start)
        left = procs.wait_gone(records, timeout=0)
        assert elapsed is not None, (
            f"[{backend}/{how}] processes of the stopped job still alive {GONE} s later: {left}"
        )
        reaped_left = procs.wait_gone(records, timeout=GONE)
        assert not reaped_left, f"dead but never reaped: {reaped_left}"
        return elapsed
    finally:
        procs.kill_records(records)


def _pgid(pid):
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.stress
@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["cancel", "time_limit"])
def test_stopping_a_job_kills_every_process_of_its_tree(make_pool, backend, how, tmp_path, scale):
    exe = make_pool(2)
    assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2
    runs = scale(3, 200)
    times = []
    for i in range(runs):
        times.append(stop_and_measure(exe, how, str(tmp_path / f"tree{i}.json"), backend))
    futures = [exe.submit(jobs.square, i) for i in range(4)]
    assert [f.result(timeout=RESULT_WAIT) for f in futures] == [0, 1, 4, 9]
    ms = [t * 1000 for t in times]
    label = "cancel()" if how == "cancel" else "time-limit error seen"
    print(
        f"I4 [{backend}/{how}]: {runs} runs, {len(jobs.TREE_KINDS)} tree shapes, "
        f"{1 + sum(jobs.TREE_SIZE.values())} processes each; {label} -> all dead: "
        f"median {statistics.median(ms):.1f} ms, worst {max(ms):.1f} ms"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", jobs.TREE_KINDS)
def test_each_tree_shape_dies_with_a_cancelled_spinning_job(make_pool, backend, kind, tmp_path):
    """One shape at a time, the job busy in Python when it is cancelled:
    a failure names the shape that survives."""
    exe = make_pool(1)
    path = str(tmp_path / "tree.json")
    future = exe.submit(jobs.tree_spin_job, path, (kind,))
    records = procs.read_record(path)
    try:
        assert len(records) == 1 + jobs.TREE_SIZE[kind], records
        procs.wait_running(future)
        start = time.monotonic()
        assert future.cancel()
        with pytest.raises(ProcessCancelledError):
            future.result(timeout=RESULT_WAIT)
        elapsed = time_until_dead(records, start)
        assert elapsed is not None, f"{kind}: survived its job: {procs.wait_gone(records, 0)}"
        assert not procs.wait_gone(records, timeout=GONE)
    finally:
        procs.kill_records(records)
    assert exe.submit(jobs.add, 2, 3).result(timeout=RESULT_WAIT) == 5


@pytest.mark.timeout(60)
def test_a_tree_left_behind_by_a_job_that_returned_dies_with_the_pool(make_pool, backend, tmp_path):
    """The job returns normally while its whole tree still runs; at the latest
    the pool's shutdown must take those processes (nothing outlives the pool)."""
    exe = make_pool(1)
    path = str(tmp_path / "tree.json")
    future = exe.submit(jobs.tree_then_return, path, 0.1)
    records = procs.read_record(path)
    try:
        assert future.result(timeout=RESULT_WAIT) == "returned"
        assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
        exe.shutdown(wait=True)
        left = procs.wait_gone(records[1:], timeout=GONE)
        assert not left, f"processes a finished job left behind outlive the pool: {left}"
    finally:
        procs.kill_records(records)
