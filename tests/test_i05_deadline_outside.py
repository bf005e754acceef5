"""I5: deadlines are enforced outside the job and depend on neither the job's
GIL nor the user process's GIL.

Faults injected:
- the job holds its own GIL in C -- a C ``sleep()`` called through
  ``ctypes.PyDLL`` (which keeps the GIL) or a CPU-bound C loop (exponential
  regex backtracking, all inside ``re``): no signal handler or Python code in
  the job could ever run, yet the job must be killed on time;
- at the same time the *user process's* main thread holds the user process's
  GIL in a 1.5 s C sleep (``ctypes.PyDLL(None).usleep``) started right after
  ``submit``: the pool's manager thread in the user process cannot run, so a
  deadline kept there would fire only after the call. A watcher *process*
  (started before) polls ``/proc/<job pid>/stat`` every 0.2 ms and records the
  wall-clock time the job died; the test asserts that this was before its own
  C call returned, and how late after the job's start + its time limit.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import psutil
import pytest

from cancelk import ProcessTimeout, ProcessTimeoutError

import jobs
import procs
from jobs import RESULT_WAIT

pytestmark = procs.needs_proc

LIMIT = 0.2  # the job's time limit
HOLD = 1.5  # how long the user process's main thread holds its GIL in C
LATE = 1.0  # how late a kill may be on a loaded 2-core machine


def start_watcher(record_path, out_path):
    watcher = subprocess.Popen(
        [sys.executable, "-c", procs.WATCHER, record_path, out_path],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout.readline().strip() == "ready"
    return watcher


def read_json(path, timeout=10.0):
    procs.wait_for_path(path, timeout, poll=0.002)
    with open(path) as handle:
        return json.load(handle)


def _alive(stamp):
    proc = procs.same_process(stamp["pid"], stamp["created"])
    if proc is None:
        return None
    try:
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def wait_dead(stamp, timeout=2.0):
    """Wall-clock time at which the stamped job was seen dead (polled every
    ~1 ms), or None if it still lives after ``timeout``."""
    deadline = time.monotonic() + timeout
    while _alive(stamp) is not None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)
    return time.time()


def kill_if_alive(stamp):
    proc = _alive(stamp)
    if proc is not None:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.stress
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["sleep", "c_sleep", "c_busy"])
def test_deadline_fires_while_job_and_user_process_both_hold_their_gil(
    make_pool, backend, kind, tmp_path, scale
):
    exe = make_pool(1)
    assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2  # supervisor and runner up
    usleep = ctypes.PyDLL(None).usleep  # PyDLL: the GIL stays held during the call
    runs = scale(1, 50)
    lateness = []
    for i in range(runs):
        record_path = str(tmp_path / f"stamp{i}.json")
        out_path = str(tmp_path / f"gone{i}.json")
        watcher = start_watcher(record_path, out_path)
        stamp = None
        try:
            future = exe.submit(jobs.stamped_job, record_path, kind, ProcessTimeout(LIMIT))
            usleep(int(HOLD * 1e6))  # the user process's GIL is held from here ...
            returned = time.time()  # ... to here
            with pytest.raises(ProcessTimeoutError):
                future.result(timeout=RESULT_WAIT)
            stamp = read_json(record_path)
            gone = read_json(out_path)
            assert gone["pid"] == stamp["pid"]
            late = gone["gone"] - (stamp["started"] + LIMIT)
            lateness.append(late)
            assert gone["gone"] < returned, (
                f"[{backend}/{kind}] the job died {gone['gone'] - returned:.3f} s after the "
                "user process released its GIL: the deadline waited for the user process"
            )
            assert late < LATE, f"[{backend}/{kind}] killed {late:.3f} s after its deadline"
        finally:
            procs.stop_process(watcher)
            if stamp is None and os.path.exists(record_path):
                stamp = read_json(record_path)
            if stamp is not None:
                kill_if_alive(stamp)
    assert exe.submit(jobs.add, 2, 2).result(timeout=RESULT_WAIT) == 4
    ms = [x * 1000 for x in lateness]
    print(
        f"I5 [{backend}/{kind}] user GIL held {HOLD} s in C, job limit {LIMIT} s: {runs} runs, "
        f"job dead after start+limit by median {statistics.median(ms):.1f} ms, "
        f"worst {max(ms):.1f} ms (the job's start is stamped a little after the clock starts)"
    )


@pytest.mark.stress
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["c_sleep", "c_busy"])
def test_job_holding_its_gil_in_c_is_killed_on_time(make_pool, backend, kind, tmp_path, scale):
    """Only the job holds its GIL; many runs on two runners at once."""
    exe = make_pool(2)
    runs = scale(4, 200)
    lateness = []
    for i in range(0, runs, 2):
        batch = []
        for j in (i, i + 1):
            path = str(tmp_path / f"stamp{j}.json")
            batch.append((path, exe.submit(jobs.stamped_job, path, kind, ProcessTimeout(0.1))))
        for path, future in batch:
            with pytest.raises(ProcessTimeoutError):
                future.result(timeout=RESULT_WAIT)
            stamp = read_json(path)
            dead_at = wait_dead(stamp)
            assert dead_at is not None, f"[{backend}/{kind}] the timed-out job still runs"
            lateness.append(dead_at - (stamp["started"] + 0.1))
    assert exe.submit(jobs.add, 2, 2).result(timeout=RESULT_WAIT) == 4
    ms = [x * 1000 for x in lateness]
    assert max(lateness) < LATE + 1.0, ms
    print(
        f"I5 [{backend}/{kind}] job holds its GIL in C, limit 0.1 s: {len(ms)} jobs, "
        f"dead (polled 1 ms, after the error) after start+limit: "
        f"median {statistics.median(ms):.1f} ms, worst {max(ms):.1f} ms"
    )
