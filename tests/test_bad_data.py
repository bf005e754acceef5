"""Bad data (DESIGN A6, I3, I8, I1): data that does not pickle or unpickle,
huge arguments and results, and a big result racing its own deadline.

Faults injected:
- every way a job's data can fail to cross the process boundary -- a lambda, a
  local function, a function the runner cannot import, a lock or a generator
  as argument, an argument whose unpickling raises or even ends the runner,
  results and exceptions that cannot be pickled (TypeError or a ``__reduce__``
  that raises) or cannot be unpickled in the user process (``__init__``
  arguments not passed back, a class that exists only in the runner). Each
  must fail only its own future, with an error that names the type, and the
  pool must go on -- on the *same* runner (pid checked) wherever the runner
  itself was not hurt. A random stream of these mixed with good jobs checks
  that no outcome ever lands on the wrong future.
- 100 MB argument and 100 MB result in one job: size and SHA-256 checked on
  both sides, and the memory released afterwards (user process and runner).
- an 8 MB result (larger than any pipe buffer) whose production takes as long
  as the job's time limit, with the limit jittered around that time: the
  future ends with the full, correct result or ProcessTimeoutError -- never a
  truncated or foreign result, a hang, or ProcessDiedError -- and the job queued
  right behind it always runs. Both backends.
"""

from __future__ import annotations

import gc
import pickle
import random
import statistics
import sys
import threading
import time

import psutil
import pytest

from cancelk import ProcessDiedError, ProcessTimeout, ProcessTimeoutError
from cancelk.errors import ResultPicklingError

import jobs
import procs
from jobs import MB, RESULT_WAIT

# Python's own TypeError names the class that failed to load only from 3.10
# on ("Unloadable.__init__() missing ..."); cancelk passes that message on.
UNLOADABLE_NAMED = ["Unloadable"] if sys.version_info >= (3, 10) else []


def runner_pid(exe):
    return exe.submit(jobs.getpid).result(timeout=RESULT_WAIT)


# Each case: (submit arguments, accepted exception types, words the message
# must contain, whether the runner survives it).
def bad_cases():
    def local_function():
        return 1

    return {
        "lambda": ((lambda: 1,), (pickle.PicklingError, AttributeError), ["lambda"]),
        "local function": (
            (local_function,),
            (pickle.PicklingError, AttributeError),
            ["local_function"],
        ),
        "lock argument": ((jobs.echo_kind, threading.Lock()), (TypeError,), ["lock"]),
        "generator argument": (
            (jobs.echo_kind, (i for i in range(3))),
            (TypeError,),
            ["generator"],
        ),
        "lock keyword argument": (
            (jobs.echo_kind,),
            (TypeError,),
            ["lock"],
            {"value": threading.Lock()},
        ),
        "argument failing to unpickle in the runner": (
            (jobs.echo_kind, jobs.Unloadable(1, 2)),
            (TypeError,),
            UNLOADABLE_NAMED,
        ),
        "unpicklable result (lock)": ((jobs.return_lock,), (ResultPicklingError,), ["lock"]),
        "unpicklable result (generator)": (
            (jobs.return_generator,),
            (ResultPicklingError,),
            ["generator"],
        ),
        "result whose pickling raises": (
            (jobs.return_refuses_pickling,),
            (ResultPicklingError,),
            ["RefusesPickling", "RuntimeError"],
        ),
        "result failing to unpickle in the user process": (
            (jobs.return_unloadable,),
            (ResultPicklingError,),
            UNLOADABLE_NAMED,
        ),
        "result of a class only the runner has": (
            (jobs.return_ghost,),
            (ResultPicklingError,),
            ["Ghost"],
        ),
        "exception holding a lock": (
            (jobs.raise_holding_a_lock,),
            (ResultPicklingError,),
            ["ValueError", "holds a lock"],
        ),
        "exception whose pickling raises": (
            (jobs.raise_refuses_pickling,),
            (ResultPicklingError,),
            ["RefusesPicklingError", "boom"],
        ),
        "exception failing to unpickle in the user process": (
            (jobs.raise_needs_two,),
            (ResultPicklingError,),
            ["NeedsTwoError"],
        ),
    }


def submit_case(exe, case):
    args = case[0]
    kwargs = case[3] if len(case) > 3 else {}
    return exe.submit(*args, **kwargs)


def check_case(name, case, err):
    kinds, words = case[1], case[2]
    assert err is not None, f"{name}: the future succeeded"
    assert isinstance(err, kinds), f"{name}: {err!r} is not one of {kinds}"
    text = str(err)
    for word in words:
        assert word.lower() in text.lower(), f"{name}: {word!r} not named in {text!r}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_each_kind_of_bad_data_fails_only_its_future_on_the_same_runner(make_pool, method):
    exe = make_pool(1, mp_context=method)
    pid = runner_pid(exe)
    cases = bad_cases()
    for name, case in cases.items():
        future = submit_case(exe, case)
        err = future.exception(timeout=RESULT_WAIT)
        check_case(name, case, err)
        assert runner_pid(exe) == pid, f"{name}: the runner was replaced"
    stats = exe.stats()
    assert stats["died"] == 0 and stats["processes_started"] == 1, stats
    print(f"bad data [{method}]: {len(cases)} kinds, runner {pid} kept throughout")


@pytest.mark.timeout(60)
def test_function_defined_after_the_runner_forked_names_the_missing_function(make_pool):
    """Under fork, runners are copies of the user process taken at pool start:
    a module attribute set later cannot be found there."""
    import sys

    exe = make_pool(1, mp_context="fork")
    pid = runner_pid(exe)
    module = sys.modules[__name__]

    def newcomer():
        return 1

    newcomer.__module__ = __name__
    newcomer.__qualname__ = newcomer.__name__ = "newcomer_after_fork"
    module.newcomer_after_fork = newcomer
    try:
        err = exe.submit(newcomer).exception(timeout=RESULT_WAIT)
    finally:
        del module.newcomer_after_fork
    assert isinstance(err, AttributeError), repr(err)
    assert "newcomer_after_fork" in str(err)
    assert runner_pid(exe) == pid


@pytest.mark.timeout(60)
def test_argument_whose_unpickling_kills_the_runner_fails_only_that_job(make_pool, backend):
    exe = make_pool(1)
    pid = runner_pid(exe)
    bad = exe.submit(jobs.echo_kind, jobs.KillsOnUnpickle(7))
    behind = exe.submit(jobs.token_pid, "behind")
    err = bad.exception(timeout=RESULT_WAIT)
    assert isinstance(err, ProcessDiedError), repr(err)
    assert err.exitcode == 7 and err.pid == pid, (err.exitcode, err.pid, pid)
    token, new_pid = behind.result(timeout=RESULT_WAIT)
    assert token == "behind" and new_pid != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_random_stream_of_bad_and_good_jobs_never_crosses_outcomes(make_pool, scale, method):
    """All queued at once on one runner: every good job gets its own token
    back, every bad one its own error, and the runner is never replaced."""
    rng = random.Random(4321)
    count = scale(300, 30_000)
    exe = make_pool(1, mp_context=method)
    pid = runner_pid(exe)
    cases = bad_cases()
    names = list(cases)
    submitted = []
    for i in range(count):
        if rng.random() < 0.5:
            submitted.append((i, None, exe.submit(jobs.token_pid, i)))
        else:
            name = rng.choice(names)
            submitted.append((i, name, submit_case(exe, cases[name])))
    bad = 0
    for i, name, future in submitted:
        if name is None:
            assert future.result(timeout=RESULT_WAIT) == (i, pid), f"job {i}"
        else:
            check_case(name, cases[name], future.exception(timeout=RESULT_WAIT))
            bad += 1
    stats = exe.stats()
    assert stats["died"] == 0 and stats["processes_started"] == 1, stats
    print(f"bad data stream [{method}]: {count} jobs, {bad} bad, one runner ({pid}) throughout")


# -------------------------------------------------------------------------
# big data


def rss(pid=None):
    return psutil.Process(pid).memory_info().rss


def settle_rss(limit, pid=None, timeout=2.0):
    """Poll (collecting garbage) until the RSS is at most ``limit``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = rss(pid)
        if now <= limit or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_100_mb_argument_and_result_round_trip_and_memory_is_released(make_pool, method):
    size = 100 * MB
    slack = 10 * MB
    exe = make_pool(1, mp_context=method)
    runner, runner_before = exe.submit(jobs.runner_rss).result(timeout=RESULT_WAIT)
    gc.collect()
    user_before = rss()
    argument = jobs.pattern(size, "argument")
    sent_digest = jobs.digest(argument)
    start = time.perf_counter()
    (received_size, received_digest), result, runner_peak = exe.submit(
        jobs.big_round_trip, argument, "result"
    ).result(timeout=RESULT_WAIT)
    elapsed = time.perf_counter() - start
    assert received_size == size and received_digest == sent_digest
    assert len(result) == size
    assert jobs.digest(result) == jobs.digest(jobs.pattern(size, "result"))
    user_peak = rss()
    del argument, result
    # one more job first: what the pool keeps only until its next job (see the
    # two tests below) does not count as a leak here
    exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT)
    again, runner_after = exe.submit(jobs.runner_rss).result(timeout=RESULT_WAIT)
    user_after = settle_rss(user_before + slack)
    assert again == runner
    print(
        f"100 MB round trip [{method}]: {elapsed * 1000:.0f} ms; user RSS "
        f"{user_before / MB:.0f} -> peak {user_peak / MB:.0f} -> {user_after / MB:.0f} MiB; "
        f"runner RSS {runner_before / MB:.0f} -> peak {runner_peak / MB:.0f} -> "
        f"{runner_after / MB:.0f} MiB"
    )
    assert user_after <= user_before + slack, (
        f"the user process kept {(user_after - user_before) / MB:.0f} MiB after the 100 MB "
        "argument and result were dropped"
    )
    assert runner_after <= runner_before + slack, (
        f"the runner kept {(runner_after - runner_before) / MB:.0f} MiB after the job ended"
    )


@pytest.mark.timeout(60)
def test_a_queued_jobs_large_arguments_are_those_of_its_submit(make_pool):
    """Large arguments are pickled in parts, a ``bytes`` by reference: a
    ``bytearray`` (or a list holding one) changed while the job waits for a
    runner must still reach it as it was at submit."""
    exe = make_pool(1)
    blocker = exe.submit(jobs.sleep_return, 0.5, "blocker")
    procs.wait_running(blocker)
    data = jobs.pattern(3 * MB, "bytes")
    buffer = bytearray(jobs.pattern(2 * MB, "bytearray"))
    nested = [bytearray(jobs.pattern(MB + 5, "nested"))]
    expected = [jobs.digest(data), jobs.digest(buffer), jobs.digest(nested[0])]
    queued = exe.submit(jobs.digests, data, buffer, nested=nested)
    buffer[:] = bytes(len(buffer))
    nested[0][:10] = b"changed!!!"
    assert blocker.result(timeout=RESULT_WAIT) == "blocker"
    assert queued.result(timeout=RESULT_WAIT) == expected


@pytest.mark.timeout(120)
def test_100_mb_result_is_released_while_the_pool_is_idle(make_pool):
    """The user dropped the result; nothing else happens on the pool. The
    result must not stay pinned by the pool until some next job."""
    size = 100 * MB
    exe = make_pool(1)
    exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT)
    gc.collect()
    before = rss()
    result = exe.submit(jobs.pattern, size, "idle").result(timeout=RESULT_WAIT)
    assert len(result) == size
    del result
    after = settle_rss(before + 10 * MB, timeout=3.0)
    print(f"idle pool after a 100 MB result: user RSS {before / MB:.0f} -> {after / MB:.0f} MiB")
    assert after <= before + 10 * MB, (
        f"{(after - before) / MB:.0f} MiB still held 3 s after the 100 MB result was dropped"
    )


@pytest.mark.timeout(120)
def test_100_mb_result_is_released_by_the_runner_before_its_next_job(make_pool):
    """A long job that follows a big one must not run with the big job's data
    still in its runner."""
    size = 100 * MB
    exe = make_pool(1)
    _, before = exe.submit(jobs.runner_rss).result(timeout=RESULT_WAIT)
    assert len(exe.submit(jobs.pattern, size, "x").result(timeout=RESULT_WAIT)) == size
    _, during_next = exe.submit(jobs.runner_rss).result(timeout=RESULT_WAIT)
    print(
        f"runner RSS {before / MB:.0f} MiB, during the job after a 100 MB result "
        f"{during_next / MB:.0f} MiB"
    )
    assert during_next <= before + 10 * MB, (
        f"the runner ran its next job with {(during_next - before) / MB:.0f} MiB "
        "of the previous job's result still held"
    )


# -------------------------------------------------------------------------
# a big result racing its deadline


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sleep", "spin"])
def test_big_result_at_the_deadline_is_whole_or_a_timeout(make_pool, backend, scale, kind):
    rng = random.Random(f"{backend}-{kind}")
    size = 8 * MB
    delay = 0.04
    job = jobs.big_after if kind == "sleep" else jobs.spin_big_after
    iterations = scale(50, 5000)
    exe = make_pool(1)
    # how long one job takes, start to result, here and now
    start = time.perf_counter()
    seed, data = exe.submit(job, delay, size, "calibrate").result(timeout=RESULT_WAIT)
    produce = time.perf_counter() - start
    assert seed == "calibrate" and len(data) == size
    outcomes = {"result": 0, "timeout": 0}
    limits = {"result": [], "timeout": []}
    runner = runner_pid(exe)
    for i in range(iterations):
        # from well before to well after the time the job needs
        limit = delay * rng.uniform(0.9, 1.8)
        big = exe.submit(job, delay, size, i, ProcessTimeout(limit))
        behind = exe.submit(jobs.token_pid, -i)  # queued right behind it
        try:
            seed, data = big.result(timeout=RESULT_WAIT)
        except ProcessTimeoutError:
            outcomes["timeout"] += 1
            limits["timeout"].append(limit)
        else:
            assert seed == i, f"iteration {i}: got the result of job {seed}"
            assert len(data) == size, f"iteration {i}: truncated result, {len(data)} bytes"
            assert data == jobs.pattern(size, i), f"iteration {i}: corrupted result"
            outcomes["result"] += 1
            limits["result"].append(limit)
        token, pid = behind.result(timeout=RESULT_WAIT)
        assert token == -i
        if big.exception(timeout=0) is None:
            assert pid == runner, f"iteration {i}: the runner was replaced after a result"
        runner = pid
    stats = exe.stats()
    assert stats["died"] == 0, stats
    print(
        f"big result at deadline [{backend}/{kind}]: {iterations} runs, produce "
        f"{produce * 1000:.1f} ms, outcomes {outcomes}; median limit with result "
        f"{_ms(limits['result'])}, with timeout {_ms(limits['timeout'])}"
    )


def _ms(values):
    return f"{statistics.median(values) * 1000:.1f} ms" if values else "-"
