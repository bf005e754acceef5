"""I1: a kill names a job, not a pid.

Fault injected: kills that race with the end of the job they target.

- ``cancel()`` at a random offset (0-3 ms after submit) of a job that runs a
  random 0-3 ms, on pools of 1 and 2 runners, with a bystander job running
  beside it (2 runners) and a successor queued behind it;
- ``cancel()`` with a grace period that expires about when the job ends;
- time limits (``ProcessTimeout``) about equal to the job's running time,
  with results small and larger than the channel's buffer, so the deadline
  fires while the result is being written, pipelined back to back with
  jobs without limit on the same runners.

Every job returns a unique token and its pid. The test asserts that no job
other than the targeted one was ever stopped: every other future holds its
own token; the target holds its token or ProcessCancelledError /
ProcessTimeoutError, never ProcessDiedError; a killed target's process is
gone and its successor on a pool of one ran on a fresh runner, a target that
won ran its successor on the same runner (as did one cancelled before its
runner took it from its channel: nothing is killed for it). Both C backends. The numbers of
races the kill won and the job won are printed (``-s``).
"""

from __future__ import annotations

import concurrent.futures
import random
import time

import pytest

from cancelk import (
    ProcessCancelledError,
    ProcessCancelTimeout,
    ProcessDiedError,
    ProcessTimeout,
    ProcessTimeoutError,
)

import jobs
import procs
from jobs import RESULT_WAIT


def spin_until(moment):
    while time.perf_counter() < moment:
        pass


def settled_stats(exe, **expected):
    """exe.stats() once its counts reach ``expected`` (a cancelled future ends at
    once; its kill is counted when the runner's exit is reported), or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        stats = exe.stats()
        if all(stats[k] >= v for k, v in expected.items()) or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def check_bystander(future, token):
    """A job nobody targeted: it must hold its own token."""
    try:
        value = future.result(timeout=RESULT_WAIT)
    except BaseException as why:  # report which job was hit and how
        raise AssertionError(f"bystander {token} was stopped: {why!r}") from why
    assert value[0] == token, f"bystander {token} got another job's result {value[0]}"
    return value[1]


def target_outcome(future, token, allowed):
    """'won' (the job's own token) or 'killed' (one of ``allowed``)."""
    try:
        value = future.result(timeout=RESULT_WAIT)
    except allowed:
        return "killed", None
    except ProcessDiedError as why:
        raise AssertionError(f"target {token}: a kill surfaced as a death: {why!r}") from why
    assert value[0] == token, f"target {token} got another job's result {value[0]}"
    return "won", value[1]


# -------------------------------------------------------------------------
# cancel() at random offsets around the end of the job


def _cancel_races(exe, workers, iterations, rng, grace):
    counts = {"won": 0, "killed": 0, "answer_true": 0, "taken_back": 0}
    kill_pids = []
    for i in range(iterations):
        length = rng.uniform(0, 0.003)
        delay = rng.uniform(0, 0.003)
        markers = (ProcessCancelTimeout(grace(length - delay)),) if grace else ()
        start = time.perf_counter()
        target = exe.submit(jobs.token_spin, f"T{i}", length, 0, *markers)
        beside = (
            exe.submit(jobs.token_spin, f"B{i}", rng.uniform(0, 0.003)) if workers > 1 else None
        )
        after = exe.submit(jobs.token_spin, f"S{i}", 0.0005)
        spin_until(start + delay)
        pid = target.pid
        answer = target.cancel()
        if grace:
            assert answer is False or target.cancelled(), f"iteration {i}: grace cancel said True"
        kind, ran_on = target_outcome(target, f"T{i}", ProcessCancelledError)
        if answer:
            counts["answer_true"] += 1
            assert kind == "killed", f"iteration {i}: cancel() said True, the job still won"
        successor_pid = check_bystander(after, f"S{i}")
        if beside is not None:
            check_bystander(beside, f"B{i}")
        counts[kind] += 1
        taken_back = kind == "killed" and "before its runner began it" in target._cancel_reason
        if taken_back:
            # Cancelled before its runner took it: nothing was killed, and
            # the runner went on to the successor.
            counts["taken_back"] += 1
        elif kind == "killed":
            if pid is not None:  # None: its runner took it just after the look
                kill_pids.append(pid)
            if pid is not None and workers == 1:
                assert successor_pid != pid, f"iteration {i}: successor ran in the killed process"
        elif workers == 1:
            assert successor_pid == ran_on, (
                f"iteration {i}: the target won, yet its runner {ran_on} was replaced "
                f"by {successor_pid}"
            )
    left = [pid for pid in kill_pids if not procs.wait_pid_gone(pid)]
    assert not left, f"killed targets' processes still there: {left}"
    return counts


@pytest.mark.stress
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_at_random_offsets_never_stops_another_job(make_pool, backend, workers, scale):
    iterations = scale(150, 15000)
    rng = random.Random(f"i1-cancel-{backend}-{workers}")
    exe = make_pool(workers)
    for f in [exe.submit(jobs.token_spin, f"W{i}", 0) for i in range(workers * 2)]:
        f.result(timeout=RESULT_WAIT)
    start = time.monotonic()
    counts = _cancel_races(exe, workers, iterations, rng, grace=None)
    elapsed = time.monotonic() - start
    stats = settled_stats(exe, cancelled=counts["killed"])
    print(
        f"I1 cancel races [{backend}, {workers} runner(s)]: {iterations} races, "
        f"kill won {counts['killed']} ({counts['taken_back']} taken back before their "
        f"runner took them), job won {counts['won']} "
        f"({elapsed / iterations * 1e3:.2f} ms per race); stats {stats}"
    )
    assert stats["died"] == 0 and stats["timed_out"] == 0
    assert stats["cancelled"] == counts["killed"], (stats, counts)
    assert counts["killed"] == counts["answer_true"]
    # the random offsets must really straddle the end of the job
    assert counts["killed"] > 0 and counts["won"] > 0, counts


@pytest.mark.stress
@pytest.mark.timeout(90)
def test_grace_expiring_at_job_end_never_stops_another_job(make_pool, backend, scale):
    """cancel() with a grace of about the job's remaining time: the job either
    finishes in its grace (its token) or is killed (ProcessCancelledError)."""
    iterations = scale(100, 10000)
    rng = random.Random(f"i1-grace-{backend}")
    exe = make_pool(1)
    exe.submit(jobs.token_spin, "W", 0).result(timeout=RESULT_WAIT)

    def grace(remaining):
        return max(0.0, remaining + rng.uniform(-0.001, 0.001))

    counts = _cancel_races(exe, 1, iterations, rng, grace=grace)
    stats = settled_stats(exe, cancelled=counts["killed"])
    print(
        f"I1 grace races [{backend}]: {iterations} races, kill won {counts['killed']}, "
        f"job won {counts['won']}; stats {stats}"
    )
    assert stats["died"] == 0 and stats["timed_out"] == 0
    assert stats["cancelled"] == counts["killed"], (stats, counts)
    assert counts["answer_true"] <= counts["killed"]


# -------------------------------------------------------------------------
# time limits expiring as the job ends and writes its result


@pytest.mark.stress
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
def test_deadline_at_job_end_never_stops_another_job(make_pool, backend, workers, scale):
    """Pairs (target with a limit about its running time, then a bystander
    without limit) submitted back to back, so every deadline races both the
    target's result write and the start of the next job on that runner."""
    pairs = scale(120, 12000)
    rng = random.Random(f"i1-deadline-{backend}-{workers}")
    exe = make_pool(workers)
    for f in [exe.submit(jobs.token_spin, f"W{i}", 0) for i in range(workers * 2)]:
        f.result(timeout=RESULT_WAIT)
    submitted = []
    start = time.monotonic()
    batch = 20
    counts = {"won": 0, "killed": 0, "big_won": 0, "big_killed": 0}
    for first in range(0, pairs, batch):
        submitted.clear()
        for i in range(first, min(pairs, first + batch)):
            limit = rng.choice([0.001, 0.002, 0.003])
            length = max(0.0, limit + rng.uniform(-0.0015, 0.0015))
            size = rng.choice([0, 0, 400_000])  # larger than the channel's buffer
            target = exe.submit(jobs.token_spin, f"T{i}", length, size, ProcessTimeout(limit))
            after = exe.submit(jobs.token_spin, f"S{i}", rng.uniform(0, 0.002))
            submitted.append((i, size, target, after))
        for i, size, target, after in submitted:
            check_bystander(after, f"S{i}")
            kind, _ = target_outcome(target, f"T{i}", ProcessTimeoutError)
            counts[kind] += 1
            if size:
                counts[f"big_{kind}"] += 1
                if kind == "won":
                    assert len(target.result(timeout=0)[2]) == size
    elapsed = time.monotonic() - start
    stats = settled_stats(exe, timed_out=counts["killed"])
    print(
        f"I1 deadline races [{backend}, {workers} runner(s)]: {pairs} pairs, "
        f"deadline won {counts['killed']} (big result {counts['big_killed']}), "
        f"job won {counts['won']} (big result {counts['big_won']}) "
        f"in {elapsed:.1f} s; stats {stats}"
    )
    assert stats["died"] == 0 and stats["cancelled"] == 0
    assert stats["timed_out"] == counts["killed"], (stats, counts)
    assert counts["killed"] > 0 and counts["won"] > 0, counts


@pytest.mark.stress
@pytest.mark.timeout(90)
def test_cancel_and_deadline_racing_each_other_settle_once(make_pool, backend, scale):
    """A time limit and a cancel() aimed at the same job at about the same
    moment, around the job's end: one of the three outcomes, exactly once;
    the successor is never touched."""
    iterations = scale(100, 10000)
    rng = random.Random(f"i1-both-{backend}")
    exe = make_pool(1)
    exe.submit(jobs.token_spin, "W", 0).result(timeout=RESULT_WAIT)
    counts = {"won": 0, "cancelled": 0, "timed_out": 0}
    calls = {}

    def count(future):
        calls[id(future)] = calls.get(id(future), 0) + 1

    futures = []
    for i in range(iterations):
        limit = rng.uniform(0.0005, 0.003)
        length = rng.uniform(0, 0.003)
        start = time.perf_counter()
        target = exe.submit(jobs.token_spin, f"T{i}", length, 0, ProcessTimeout(limit))
        target.add_done_callback(count)
        after = exe.submit(jobs.token_spin, f"S{i}", 0.0005)
        after.add_done_callback(count)
        spin_until(start + limit + rng.uniform(-0.0005, 0.0005))
        answer = target.cancel()
        try:
            value = target.result(timeout=RESULT_WAIT)
        except ProcessCancelledError:
            counts["cancelled"] += 1
            assert answer, f"iteration {i}: cancel() said False, the future was cancelled"
        except ProcessTimeoutError:
            counts["timed_out"] += 1
            assert not answer, f"iteration {i}: cancel() said True, the future timed out"
        except ProcessDiedError as why:
            raise AssertionError(f"iteration {i}: a kill surfaced as a death: {why!r}") from why
        else:
            assert value[0] == f"T{i}"
            assert not answer
            counts["won"] += 1
        check_bystander(after, f"S{i}")
        futures += [target, after]
    concurrent.futures.wait(futures, timeout=RESULT_WAIT)
    # callbacks run just after waiters wake, in the manager thread (maybe descheduled)
    deadline = time.monotonic() + 5
    while any(id(f) not in calls for f in futures) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # a second call would come now
    assert all(calls.get(id(f)) == 1 for f in futures), "a future ended twice or never"
    stats = settled_stats(exe, cancelled=counts["cancelled"], timed_out=counts["timed_out"])
    print(f"I1 cancel vs deadline [{backend}]: {iterations} races, {counts}; stats {stats}")
    assert stats["died"] == 0
    assert stats["cancelled"] == counts["cancelled"] and stats["timed_out"] == counts["timed_out"]
