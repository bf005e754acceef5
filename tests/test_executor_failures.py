"""When things go wrong (DESIGN A6, I3, I8): jobs that die, data that does not
pickle, initializers that fail, a supervisor that is killed.

Only the affected job fails; the pool goes on and never reports
BrokenProcessPool for a job's death. No future ever hangs.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import cancelk
from cancelk import ProcessDiedError
from cancelk.errors import ResultPicklingError

import jobs
import procs
from jobs import RESULT_WAIT

NEEDS_PROC = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="lists descriptors through /proc/self/fd (Linux)"
)


# -------------------------------------------------------------------------
# jobs that die


@pytest.mark.timeout(30)
def test_job_exit_code(make_pool, backend):
    exe = make_pool(2)
    bystander = exe.submit(jobs.sleep_pid, 1.0)
    bystander_pid = procs.wait_running(bystander)
    future = exe.submit(jobs.exit_with, 3)
    with pytest.raises(ProcessDiedError) as info:
        future.result(timeout=RESULT_WAIT)
    err = info.value
    assert err.exitcode == 3 and err.signal is None
    assert err.pid is not None and err.pid != bystander_pid
    assert "exited with code 3" in str(err)
    assert not isinstance(err, BrokenProcessPool)
    assert bystander.result(timeout=RESULT_WAIT) == bystander_pid  # untouched
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_job_segfault(make_pool, backend):
    exe = make_pool(2)
    bystander = exe.submit(jobs.sleep_pid, 1.0)
    bystander_pid = procs.wait_running(bystander)
    future = exe.submit(jobs.kill_self, signal.SIGSEGV)
    with pytest.raises(ProcessDiedError) as info:
        future.result(timeout=RESULT_WAIT)
    assert info.value.signal == signal.SIGSEGV
    assert info.value.exitcode is None
    assert "SIGSEGV" in str(info.value)
    assert bystander.result(timeout=RESULT_WAIT) == bystander_pid
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_job_sigkill_from_outside(make_pool, backend, tmp_path):
    path = str(tmp_path / "record.json")
    exe = make_pool(2)
    bystander = exe.submit(jobs.sleep_pid, 1.5)
    bystander_pid = procs.wait_running(bystander)
    future = exe.submit(jobs.sleep_job, path)
    records = procs.read_record(path)
    pid = procs.wait_running(future)
    assert pid == records[0][0]
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ProcessDiedError) as info:
        future.result(timeout=RESULT_WAIT)
    assert time.monotonic() - start < 1.5
    err = info.value
    assert err.signal == signal.SIGKILL and err.pid == pid
    # Sent from outside and no OOM kill happened meanwhile: no OOM claim.
    assert "SIGKILL" in str(err) and "outside cancelk" in str(err) and "OOM" not in str(err)
    assert not future.cancelled()
    assert not procs.wait_gone(records)
    assert bystander.result(timeout=RESULT_WAIT) == bystander_pid
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_job_sigterm_to_itself(make_pool):
    exe = make_pool(1)
    with pytest.raises(ProcessDiedError) as info:
        exe.submit(jobs.sigterm_self).result(timeout=RESULT_WAIT)
    assert info.value.signal == signal.SIGTERM
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
def test_many_deaths_never_break_the_pool(make_pool, backend):
    exe = make_pool(2)
    dying = [exe.submit(jobs.exit_with, 1) for _ in range(15)]
    dying += [exe.submit(jobs.kill_self, signal.SIGSEGV) for _ in range(5)]
    good = [exe.submit(jobs.square, i) for i in range(10)]
    for f in dying:
        err = f.exception(timeout=RESULT_WAIT)
        assert isinstance(err, ProcessDiedError), repr(err)
    assert [f.result(timeout=RESULT_WAIT) for f in good] == [i * i for i in range(10)]
    assert exe.stats()["died"] == 20
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_died_error_pickles(make_pool):
    err = ProcessDiedError(123, signal=signal.SIGSEGV, detail="x")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.pid, copy.exitcode, copy.signal, copy.detail) == (123, None, signal.SIGSEGV, "x")
    assert str(copy) == str(err)


# -------------------------------------------------------------------------
# data that does not pickle


@pytest.mark.timeout(30)
def test_unpicklable_function(make_pool):
    exe = make_pool(1)
    future = exe.submit(lambda: 1)
    err = future.exception(timeout=RESULT_WAIT)
    assert isinstance(err, (pickle.PicklingError, AttributeError, TypeError)), repr(err)
    assert "lambda" in str(err)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_unpicklable_argument(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.echo, threading.Lock())
    err = future.exception(timeout=RESULT_WAIT)
    assert isinstance(err, (pickle.PicklingError, TypeError)), repr(err)
    assert "lock" in str(err)
    future = exe.submit(jobs.echo, key=threading.Lock())
    assert isinstance(future.exception(timeout=RESULT_WAIT), (pickle.PicklingError, TypeError))
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_argument_that_fails_to_unpickle_in_the_runner(make_pool):
    exe = make_pool(1)
    future = exe.submit(jobs.echo, jobs.Unloadable(1, 2))
    err = future.exception(timeout=RESULT_WAIT)
    assert isinstance(err, TypeError), repr(err)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_unpicklable_result(make_pool):
    exe = make_pool(1)
    err = exe.submit(jobs.return_lock).exception(timeout=RESULT_WAIT)
    assert isinstance(err, ResultPicklingError), repr(err)
    assert "lock" in str(err)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_result_that_fails_to_unpickle(make_pool):
    exe = make_pool(1)
    err = exe.submit(jobs.return_unloadable).exception(timeout=RESULT_WAIT)
    assert isinstance(err, ResultPicklingError), repr(err)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_unpicklable_exception(make_pool):
    exe = make_pool(1)
    err = exe.submit(jobs.raise_unpicklable, "held a lock").exception(timeout=RESULT_WAIT)
    assert isinstance(err, ResultPicklingError), repr(err)
    assert "UnpicklableError" in str(err) and "held a lock" in str(err)
    assert err.__cause__ is not None and "raise_unpicklable" in str(err.__cause__)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(30)
def test_exception_that_fails_to_unpickle(make_pool):
    exe = make_pool(1)
    err = exe.submit(jobs.raise_unloadable).exception(timeout=RESULT_WAIT)
    assert isinstance(err, ResultPicklingError), repr(err)
    procs.assert_pool_works(exe)


# -------------------------------------------------------------------------
# failing initializers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_initializer_failure_is_the_cause_of_the_jobs_error(make_pool, method):
    exe = make_pool(1, mp_context=method, initializer=jobs.init_fail, initargs=("init boom",))
    future = exe.submit(jobs.add, 1, 2)
    err = future.exception(timeout=RESULT_WAIT)
    assert err is not None
    assert isinstance(err.__cause__, jobs.InitError), (repr(err), repr(err.__cause__))
    assert "init boom" in str(err.__cause__)


@pytest.mark.timeout(60)
def test_initializer_failure_before_any_submit(make_pool):
    """The runners' initializer fails while no job is there; a job submitted
    afterwards still fails with an error caused by the initializer's."""
    exe = make_pool(1, initializer=jobs.init_fail, initargs=("early boom",))
    exe.submit(jobs.add, 0, 0).exception(timeout=RESULT_WAIT)  # starts the pool
    time.sleep(0.5)
    try:
        future = exe.submit(jobs.add, 1, 2)
    except BrokenProcessPool as err:
        chain = procs.cause_chain(err)
    else:
        chain = procs.cause_chain(future.exception(timeout=RESULT_WAIT))
    assert any(isinstance(e, jobs.InitError) for e in chain), chain


@pytest.mark.timeout(60)
def test_repeated_initializer_failures_break_the_pool_without_hanging(make_pool):
    exe = make_pool(2, initializer=jobs.init_fail, initargs=("always",))
    futures = [exe.submit(jobs.add, i, 0) for i in range(20)]
    _done, not_done = concurrent.futures.wait(futures, timeout=RESULT_WAIT)
    assert not not_done, f"{len(not_done)} futures hang after initializer failures"
    errors = [f.exception(timeout=0) for f in futures]
    assert all(e is not None for e in errors)
    assert any(isinstance(e, BrokenProcessPool) for e in errors), errors
    with pytest.raises(BrokenProcessPool):
        exe.submit(jobs.add, 1, 1)


@pytest.mark.timeout(60)
def test_initializer_that_kills_the_runner_does_not_hang(make_pool):
    exe = make_pool(1, initializer=jobs.exit_with, initargs=(4,))
    futures = [exe.submit(jobs.add, i, 0) for i in range(3)]
    _done, not_done = concurrent.futures.wait(futures, timeout=20)
    if not_done:
        pytest.fail(
            "an initializer that exits the runner leaves futures pending forever "
            f"({len(not_done)} of {len(futures)}), the pool keeps forking runners: "
            f"{exe.stats()}"
        )
    for f in futures:
        assert f.exception(timeout=0) is not None


@NEEDS_PROC
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_unpicklable_initializer_fails_cleanly(method):
    """spawn/forkserver must pickle the initializer for the supervisor. Each
    attempt may fail (as the stdlib's submit does), but it must not leave
    descriptors or processes behind, not even after shutdown."""
    before_fds = set(os.listdir("/proc/self/fd"))
    before = procs.descendants()
    exe = cancelk.ProcessPoolExecutor(1, mp_context=method, initializer=lambda: None)
    try:
        for _ in range(3):
            try:
                future = exe.submit(jobs.add, 1, 2)
            except (pickle.PicklingError, AttributeError, TypeError):
                continue
            assert future.exception(timeout=RESULT_WAIT) is not None
    finally:
        exe.shutdown(wait=True, cancel_futures=True, timeout=5)
    assert procs.descendants() <= before
    grown = set(os.listdir("/proc/self/fd")) - before_fds
    leaked = {}
    for name in grown:
        try:
            leaked[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    assert not leaked, f"descriptors left after three failed starts and shutdown: {leaked}"


# -------------------------------------------------------------------------
# the supervisor is killed (I8)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_supervisor_killed(make_pool, backend, method, tmp_path):
    path = str(tmp_path / "record.json")
    exe = make_pool(2, mp_context=method)
    procs.assert_pool_works(exe)
    running = exe.submit(jobs.popen_job, path)
    other = exe.submit(jobs.sleep_return, 30)
    records = procs.read_record(path)
    job_pid = procs.wait_running(running)
    procs.wait_running(other)
    supervisor = procs.supervisor_of(job_pid)
    pool_processes = procs.snapshot(
        [supervisor.pid] + [p.pid for p in supervisor.children(recursive=True)]
    )
    queued = [exe.submit(jobs.square, i) for i in range(4)]  # both runners are busy
    start = time.monotonic()
    supervisor.kill()
    for future in (running, other):
        with pytest.raises(ProcessDiedError) as info:
            future.result(timeout=5)
        elapsed = time.monotonic() - start
        assert elapsed < 1.0, f"a running future failed {elapsed:.2f} s after the supervisor died"
        assert "supervisor" in str(info.value)
        assert str(supervisor.pid) in str(info.value)
    # the old supervisor, its runners and the job's children all die
    left = procs.wait_gone(pool_processes + records, timeout=2.0, zombies_ok=True)
    assert not left, left
    # queued jobs and new submits run on a new supervisor
    assert [f.result(timeout=RESULT_WAIT) for f in queued] == [i * i for i in range(4)]
    assert exe.submit(jobs.add, 2, 3).result(timeout=RESULT_WAIT) == 5
    assert exe.stats()["died"] == 2
    new_job = exe.submit(jobs.sleep_pid, 0.3)
    new_supervisor = procs.supervisor_of(procs.wait_running(new_job))
    assert new_supervisor.pid != supervisor.pid
    new_job.result(timeout=RESULT_WAIT)
    assert exe.stats()["supervisors_started"] == 2


@pytest.mark.timeout(60)
def test_supervisor_killed_while_idle(make_pool):
    exe = make_pool(1)
    job = exe.submit(jobs.sleep_pid, 0.3)
    supervisor = procs.supervisor_of(procs.wait_running(job))
    job.result(timeout=RESULT_WAIT)
    old = procs.snapshot([supervisor.pid])
    supervisor.kill()  # the pool reaps it: do not wait() for it here
    assert not procs.wait_gone(old, timeout=5)
    # A job dispatched in the moment between the death and the pool seeing it
    # goes to a dead runner and fails with ProcessDiedError, as a running job
    # would; what is submitted once the pool replaced the supervisor runs.
    deadline = time.monotonic() + RESULT_WAIT
    while exe.stats()["supervisors_started"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    procs.assert_pool_works(exe)
    assert exe.stats()["supervisors_started"] == 2


@pytest.mark.timeout(60)
def test_supervisor_death_is_not_blamed_on_the_oom_killer(make_pool):
    """The error of a job lost with its supervisor names the supervisor; it
    must not also say that cancelk did not send the SIGKILL and suggest the
    OOM killer (cancelk's own clean-up killed the runner)."""
    exe = make_pool(1)
    running = exe.submit(jobs.sleep_return, 30)
    supervisor = procs.supervisor_of(procs.wait_running(running))
    supervisor.kill()
    err = running.exception(timeout=RESULT_WAIT)
    assert isinstance(err, ProcessDiedError)
    assert "supervisor" in str(err)
    assert "OOM" not in str(err), str(err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_supervisor_and_runners_killed_together(make_pool, method):
    """Like the OOM killer or a cgroup kill taking the supervisor and its
    runners at once: the control socket and the runners' channels reach EOF
    in the same instant. Running futures fail, the pool starts anew."""
    exe = make_pool(2, mp_context=method)
    for round_ in range(5):
        running = [exe.submit(jobs.sleep_return, 30) for _ in range(2)]
        supervisor = procs.supervisor_of(procs.wait_running(running[0]))
        procs.wait_running(running[1])
        runners = supervisor.children()
        supervisor.kill()
        for runner in runners:
            runner.kill()
        for future in running:
            try:
                err = future.exception(timeout=5)
            except concurrent.futures.TimeoutError:
                pytest.fail(f"round {round_}: a running future never failed after the kill")
            assert isinstance(err, ProcessDiedError), repr(err)
        assert exe.submit(jobs.add, round_, 1).result(timeout=10) == round_ + 1


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper is Linux-only")
def test_supervisor_killed_takes_detached_grandchildren_too(make_pool, backend, tmp_path):
    """I4 with I8: when the supervisor dies, its jobs die (ProcessDiedError),
    and so must what they started, including a grandchild that left the
    job's session: not in the runner's group, and with the supervisor gone
    it would belong to init if the runner died first."""
    path = str(tmp_path / "record.json")
    exe = make_pool(1)
    running = exe.submit(jobs.detached_grandchild_job, path)
    records = procs.read_record(path)
    supervisor = procs.supervisor_of(procs.wait_running(running))
    supervisor.kill()
    assert isinstance(running.exception(timeout=5), ProcessDiedError)
    left = procs.wait_gone(records, timeout=2.0, zombies_ok=True)
    procs.kill_records(records)
    assert not left, f"processes of a job lost with its supervisor survive: {left}"
