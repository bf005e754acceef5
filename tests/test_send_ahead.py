"""A runner's next job sent ahead (issue 15.3): while a runner runs a job, the
next one waits in its channel, so the runner need not wait for the user
process between two jobs.  What must hold (DESIGN A3, I1, I3):

- a job sent ahead and cancelled before its runner took it never runs, and
  its runner is not killed for it;
- a job sent ahead to a runner that dies (killed, crashed) first is run once
  by another runner, never lost, never run twice;
- a job sent ahead behind a long one is taken over by a runner that goes
  idle, rather than waiting behind it;
- its time limit counts from its own start, not from when it was sent.

Both C backends; real processes.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import time

import psutil
import pytest

from cancelk import ProcessDiedError, ProcessTimeout, ProcessTimeoutError

import jobs
import procs
from jobs import RESULT_WAIT


def _runs(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.timeout(30)
def test_a_job_sent_ahead_and_cancelled_never_runs_and_costs_no_runner(
    make_pool, backend, tmp_path
):
    exe = make_pool(1)
    procs.assert_pool_works(exe)  # its runner is up: the next job is sent ahead
    runs = tmp_path / "runs"
    first = exe.submit(jobs.count_run, str(runs), "first", 0.5)
    ahead = exe.submit(jobs.count_run, str(runs), "ahead")
    assert ahead.running(), "sent ahead to the only runner"
    assert ahead.cancel() and ahead.cancelled()
    assert first.result(timeout=RESULT_WAIT)[0] == "first"
    after = exe.submit(jobs.count_run, str(runs), "after")
    _token, pid = after.result(timeout=RESULT_WAIT)
    assert pid == first.result()[1], "the runner was not killed for the cancel"
    assert _runs(runs) == ["first", "after"]
    stats = exe.stats()
    assert (stats["cancelled"], stats["processes_started"]) == (1, 1)
    assert ahead.pid is None


@pytest.mark.timeout(30)
def test_a_job_sent_ahead_runs_once_when_its_runner_is_killed_first(make_pool, backend, tmp_path):
    exe = make_pool(1)
    procs.assert_pool_works(exe)  # its runner is up: the next job is sent ahead
    runs = tmp_path / "runs"
    doomed = exe.submit(jobs.count_run, str(runs), "doomed", 30)
    ahead = exe.submit(jobs.count_run, str(runs), "ahead")
    procs.wait_for_path(str(runs))
    assert _runs(runs) == ["doomed"]
    doomed_pid = doomed.pid
    assert doomed.cancel()
    token, pid = ahead.result(timeout=RESULT_WAIT)
    assert token == "ahead" and pid != doomed_pid
    assert _runs(runs) == ["doomed", "ahead"], "run once, by the next runner"
    assert not psutil.pid_exists(doomed_pid) or psutil.Process(doomed_pid).status() == "zombie"


@pytest.mark.timeout(30)
def test_a_job_sent_ahead_runs_once_when_its_runner_crashes_first(make_pool, backend, tmp_path):
    exe = make_pool(1)
    procs.assert_pool_works(exe)  # its runner is up: the next job is sent ahead
    runs = tmp_path / "runs"
    crash = exe.submit(jobs.exit_after, 0.2, 7)
    ahead = exe.submit(jobs.count_run, str(runs), "ahead")
    with pytest.raises(ProcessDiedError):
        crash.result(timeout=RESULT_WAIT)
    assert ahead.result(timeout=RESULT_WAIT)[0] == "ahead"
    assert _runs(runs) == ["ahead"]


@pytest.mark.timeout(30)
def test_an_idle_runner_takes_over_a_job_sent_ahead_to_a_busy_one(make_pool, backend, tmp_path):
    exe = make_pool(2)
    procs.assert_pool_works(exe)  # both runners up: jobs are sent ahead
    long_one = exe.submit(jobs.sleep_return, 20, "long")
    quick = [exe.submit(jobs.token_pid, i) for i in range(3)]
    started = time.monotonic()
    for future in quick:
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - started < 5, "a quick job waited behind the long one"
    assert long_one.running()
    assert long_one.cancel()


@pytest.mark.timeout(30)
def test_the_time_limit_of_a_job_sent_ahead_counts_from_its_start(make_pool, backend):
    exe = make_pool(1)
    procs.assert_pool_works(exe)
    first = exe.submit(jobs.sleep_return, 0.6, "first")
    within = exe.submit(jobs.sleep_return, 0.1, "within", ProcessTimeout(0.4))
    past = exe.submit(jobs.sleep_return, 5, "past", ProcessTimeout(0.4))
    assert first.result(timeout=RESULT_WAIT) == "first"
    assert within.result(timeout=RESULT_WAIT) == "within", "its wait behind first counted"
    started = time.monotonic()
    with pytest.raises(ProcessTimeoutError):
        past.result(timeout=RESULT_WAIT)
    assert time.monotonic() - started < 3
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
def test_a_burst_of_quick_jobs_runs_each_once_through_runner_kills(make_pool, backend, tmp_path):
    """Quick runners get several jobs ahead; SIGKILLs of runners in the middle
    of a burst lose none and run none twice: the jobs a dead runner never
    claimed run once elsewhere, and only the job it ran dies with it."""
    exe = make_pool(2)
    procs.assert_pool_works(exe)
    runs = tmp_path / "runs"
    burst = [exe.submit(jobs.count_run, str(runs), f"j{i}") for i in range(1500)]
    victims = [burst[300], burst[700], burst[1100]]
    killed = set()
    for victim in victims:
        while not victim.done():
            pid = victim.pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                break
            time.sleep(0.0002)
    died = 0
    for future in burst:
        try:
            future.result(timeout=RESULT_WAIT)
        except ProcessDiedError:
            died += 1
    counts = collections.Counter(_runs(runs))
    assert max(counts.values()) == 1, "a job ran twice"
    finished = {f"j{i}" for i, future in enumerate(burst) if future.exception() is None}
    assert finished <= set(counts), "a finished job never ran"
    assert died <= len(killed), "only the job a killed runner ran dies with it"
    assert len(finished) + died == len(burst)
