"""killable_wrapper under races and host deaths (DESIGN A7, I3, I4), on both backends.

The host is a plain stdlib ``concurrent.futures.ProcessPoolExecutor`` whose
submitted function is ``killable_wrapper``. Faults injected:

- the cancel pipe (``killable_wrapper_cancel_pipe``) gets its message at a
  random offset around the job's end, with and without a ``cancel_timeout``
  grace: the call ends with the job's exact result or ProcessCancelledError,
  never ProcessDiedError, never a hang; the host worker lives on and runs the
  next job;
- the cancel message lands while the job is still starting its children
  (``Popen``, one with ``start_new_session``): no child may escape the kill
  (children are found by a unique marker in their command line, so even one
  forked as the kill lands is seen);
- a ``killable_wrapper_timeout`` about as long as the job: the exact result or
  ProcessTimeoutError, never a death, and the host pool stays whole;
- SIGKILL of a host worker from outside while wrapped jobs with children run:
  the stdlib pool reports BrokenProcessPool (as it does for any dead worker),
  and every process of every wrapped job -- the job (parent-death signal) and
  its children, also one in its own session -- is gone within 2 s;
- host pool ``shutdown(wait=False / True, cancel_futures=True)`` while wrapped
  jobs with a time limit run: queued jobs are cancelled, and once the host
  workers have exited no job process is left -- none alive without a SIGKILL
  pending -- (the times are measured).

Figures (race outcomes, worst clean-up times) are printed; see them with -s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import random
import signal
import statistics
import time
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection as mp_connection
from multiprocessing import resource_sharer

import psutil
import pytest

from cancelk import (
    ProcessCancelledError,
    ProcessDiedError,
    ProcessTimeoutError,
    killable_wrapper,
)

import jobs
import procs
from jobs import GONE, HOST_WORKERS, RESULT_WAIT, START_METHODS


def expected(i):
    return i * 7 + 1


def seeded(name):
    seed = int(os.environ.get("CANCELK_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\n{name}: seed {seed} (replay: CANCELK_CHAOS_SEED={seed})")
    return random.Random(seed), seed


def assert_host_ok(host):
    """The host pool survived: its workers live and it still runs jobs."""
    assert not host.worker_problems(), host.worker_problems()
    futures = [host.pool.submit(killable_wrapper, jobs.value, i) for i in range(HOST_WORKERS)]
    got = [f.result(timeout=RESULT_WAIT)[0] for f in futures]
    assert got == [expected(i) for i in range(HOST_WORKERS)]
    assert not host.worker_problems(), host.worker_problems()


@pytest.fixture(params=["fork", "spawn"])
def race_host(request, host_pools, backend):
    return host_pools[request.param, backend]


@pytest.fixture(autouse=True)
def stop_standbys_after(request):
    """After a test on the class's host pools, stop the killable_wrapper
    standby processes it left in their workers."""
    yield
    if "host_pools" in request.fixturenames:
        for host in request.getfixturevalue("host_pools").values():
            procs.stop_standbys(host)


# ==========================================================================
# races inside a long-lived host pool


class TestRaces:
    @pytest.mark.stress
    @pytest.mark.timeout(90)
    def test_cancel_pipe_racing_the_end_gives_result_or_cancelled_never_death(
        self, race_host, scale
    ):
        rng, seed = seeded("cancel-pipe race")
        n = scale(60, 6000)
        counts = collections.Counter()
        latencies = []
        try:
            for i in range(n):
                sender, receiver = multiprocessing.Pipe()
                try:
                    seconds = rng.choice([0.0, 0.001, 0.002, 0.004, 0.008])
                    grace = rng.choice([None, None, 0.0, 0.002, 0.02])
                    message = "cancel" if grace is None else {"cancel_timeout": grace}
                    future = race_host.pool.submit(
                        killable_wrapper,
                        jobs.work,
                        seconds,
                        i,
                        True,  # spin
                        killable_wrapper_cancel_pipe=receiver,
                    )
                    offset = time.perf_counter() + rng.uniform(0.0, 0.02)
                    while time.perf_counter() < offset:
                        pass
                    sent = time.perf_counter()
                    try:
                        sender.send(message)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the job ended and the host closed its end already
                    try:
                        outcome = future.result(timeout=RESULT_WAIT)
                    except ProcessCancelledError:
                        latencies.append(time.perf_counter() - sent)
                        counts["cancelled"] += 1
                    except concurrent.futures.TimeoutError:
                        pytest.fail(f"seed {seed} iteration {i}: the wrapped call hung")
                    except ProcessDiedError as why:
                        pytest.fail(f"seed {seed} iteration {i}: a cancel race gave {why!r}")
                    else:
                        assert outcome[0] == expected(i), f"seed {seed} iteration {i}: {outcome}"
                        counts["result"] += 1
                    assert not race_host.worker_problems(), (seed, i, race_host.worker_problems())
                finally:
                    sender.close()
                    receiver.close()
        finally:
            resource_sharer.stop(timeout=5)
        assert_host_ok(race_host)
        worst = max(latencies, default=float("nan")) * 1e3
        median = statistics.median(latencies) * 1e3 if latencies else float("nan")
        print(
            f"cancel-pipe race {race_host.method}/{race_host.backend}: {n} races {dict(counts)}; "
            f"send -> ProcessCancelledError median {median:.1f} ms, worst {worst:.1f} ms"
        )
        assert counts["result"] + counts["cancelled"] == n

    @pytest.mark.stress
    @pytest.mark.timeout(90)
    def test_time_limit_racing_the_end_gives_result_or_timeout_never_death(self, race_host, scale):
        rng, seed = seeded("time-limit race")
        n = scale(120, 12000)
        batch = []
        for i in range(n):
            # the limit counts from the fork, the spin from the job's start
            limit = rng.choice([0.002, 0.005, 0.01, 0.02])
            seconds = limit * rng.uniform(0.3, 1.1)
            future = race_host.pool.submit(
                killable_wrapper, jobs.work, seconds, i, True, killable_wrapper_timeout=limit
            )
            batch.append((i, future))
        counts = collections.Counter()
        for i, future in batch:
            try:
                outcome = future.result(timeout=RESULT_WAIT)
            except ProcessTimeoutError:
                counts["timed_out"] += 1
            except ProcessDiedError as why:
                pytest.fail(f"seed {seed} job {i}: a time-limit race gave {why!r}")
            else:
                assert outcome[0] == expected(i), f"seed {seed} job {i}: {outcome}"
                counts["result"] += 1
        assert_host_ok(race_host)
        print(f"time-limit race {race_host.method}/{race_host.backend}: {n} jobs {dict(counts)}")
        assert counts["result"] + counts["timed_out"] == n

    @pytest.mark.stress
    @pytest.mark.timeout(90)
    def test_cancel_pipe_racing_the_jobs_own_forks_leaves_no_child(
        self, host_pools, backend, scale
    ):
        """The cancel lands while the job is still starting its children (one
        in its own session): none of them may escape the kill."""
        host = host_pools["fork", backend]
        rng, seed = seeded("cancel racing the job's forks")
        n = scale(40, 4000)
        nonce = random.SystemRandom().randrange(10**6)
        escaped = []
        try:
            for i in range(n):
                marker = f"{int(jobs.LONG) - 1}.{nonce:06d}{i:06d}"
                sender, receiver = multiprocessing.Pipe()
                try:
                    future = host.pool.submit(
                        killable_wrapper,
                        jobs.marked_children,
                        marker,
                        2,
                        killable_wrapper_cancel_pipe=receiver,
                    )
                    time.sleep(rng.uniform(0.0, 0.03))
                    sender.send("cancel")
                    with pytest.raises(ProcessCancelledError):
                        future.result(timeout=RESULT_WAIT)
                finally:
                    sender.close()
                    receiver.close()
                left = marked(marker)
                deadline = time.monotonic() + GONE
                while left and time.monotonic() < deadline:
                    time.sleep(0.01)
                    left = marked(marker)
                if left:
                    escaped.append((i, [p.pid for p in left]))
                    for proc in left:
                        proc.kill()
        finally:
            resource_sharer.stop(timeout=5)
        assert_host_ok(host)
        print(f"cancel racing forks fork/{backend}: {n} cancels, {len(escaped)} escaped children")
        assert not escaped, (
            f"seed {seed}: children of a cancelled wrapped job outlived it by {GONE} s "
            f"(iteration, pids): {escaped[:10]}"
        )


def marked(marker):
    """Live processes running ``sleep <marker>`` (zombies are dead: not counted)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


# ==========================================================================
# host workers killed, host pools shut down: each test has its own host pool


def start_host(method, backend):
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=HOST_WORKERS,
        mp_context=multiprocessing.get_context(method),
        initializer=jobs.init_host,
        initargs=(backend, "races"),
    )
    # every worker up before the test begins (spawn starts them on demand)
    warm = [pool.submit(jobs.work, 0.2, 0) for _ in range(2 * HOST_WORKERS)]
    for future in warm:
        future.result(timeout=RESULT_WAIT)
    pids = set(pool._processes)
    assert len(pids) == HOST_WORKERS
    return pool, pids


def sigkill_pending(pid):
    """True if SIGKILL is pending for ``pid``: it is dead, only not yet
    scheduled to exit (on a loaded machine that can take a while)."""
    bit = 1 << (signal.SIGKILL - 1)
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
                    return True
    except OSError:
        return True  # gone already
    return False


def not_doomed(records):
    """Recorded processes that still exist and have no SIGKILL coming (zombies
    and processes about to die of a SIGKILL count as stopped)."""
    alive = []
    for pid, created in records:
        proc = procs.same_process(pid, created)
        if proc is None:
            continue  # gone, or the pid names another process now
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or sigkill_pending(pid):
                continue
            alive.append(f"pid {pid} ({proc.status()}, ppid {proc.ppid()}): {proc.cmdline()}")
        except psutil.NoSuchProcess:
            continue
    return alive


def time_until_gone(records, timeout):
    """Seconds until every recorded process is gone (dead and unreaped by an
    init that never reaps counts as gone), or None with what is left."""
    start = time.perf_counter()
    left = procs.wait_gone(records, timeout=timeout, orphaned_zombies_ok=True)
    if left:
        return None, left
    return time.perf_counter() - start, []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_host_worker_sigkilled_takes_every_wrapped_job_tree_with_it(backend, method, tmp_path):
    pool, worker_pids = start_host(method, backend)
    paths = [str(tmp_path / f"job-{k}.json") for k in range(HOST_WORKERS)]
    records = []
    try:
        futures = [
            pool.submit(
                killable_wrapper, jobs.wrapped_tree, path, 2, killable_wrapper_timeout=RESULT_WAIT
            )
            for path in paths
        ]
        per_job = [procs.read_record(path, wait=RESULT_WAIT) for path in paths]
        records = [r for job in per_job for r in job]
        assert all(len(job) == 3 for job in per_job)  # each job and its two children
        jobs_only = [job[0] for job in per_job]
        ended = []
        for future in futures:
            future.add_done_callback(lambda _: ended.append(time.perf_counter()))
        victim = procs.host_worker_of(jobs_only[0][0], worker_pids)
        start = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        jobs_gone_after, jobs_left = time_until_gone(jobs_only, GONE)
        gone_after, left = time_until_gone(records, GONE)
        for future in futures:
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=RESULT_WAIT)
        broken_after = max(ended) - start
        print(
            f"host {method}/{backend}: worker SIGKILLed; BrokenProcessPool after "
            f"{broken_after * 1e3:.0f} ms; wrapped job processes gone after "
            + (f"{jobs_gone_after * 1e3:.1f} ms" if jobs_gone_after is not None else "NEVER")
            + "; their children gone after "
            + (f"{gone_after * 1e3:.1f} ms" if gone_after is not None else "NEVER")
        )
        assert not jobs_left, (
            f"{method}/{backend}: wrapped jobs outlived their dead host worker by {GONE} s "
            f"(parent-death signal): {jobs_left}"
        )
        assert not left, (
            f"{method}/{backend}: children of wrapped jobs (one in the job's group, one in "
            f"its own session) outlived the job's dead host worker by {GONE} s: {left}"
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        procs.kill_records(records)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", [False, True])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_host_shutdown_while_wrapped_jobs_run_leaves_no_job_process(
    backend, method, wait, tmp_path
):
    limit = 0.5
    pool, worker_pids = start_host(method, backend)
    paths = [str(tmp_path / f"job-{k}.json") for k in range(HOST_WORKERS)]
    records = []
    try:
        running = [
            pool.submit(
                killable_wrapper, jobs.wrapped_tree, path, 2, killable_wrapper_timeout=limit
            )
            for path in paths
        ]
        queued = [
            pool.submit(killable_wrapper, jobs.value, i, killable_wrapper_timeout=limit)
            for i in range(20)
        ]
        records = [r for path in paths for r in procs.read_record(path, wait=RESULT_WAIT)]
        # shutdown(wait=False) drops the pool's references to its manager
        # thread and result queue; keep them to release their fds afterwards
        manager = pool._executor_manager_thread
        result_queue = pool._result_queue
        workers = list(pool._processes.values())
        assert {proc.pid for proc in workers} == worker_pids
        start = time.perf_counter()
        pool.shutdown(wait=wait, cancel_futures=True)
        returned = time.perf_counter() - start
        # Wait on the workers' sentinels (readable once the process ended):
        # neither psutil nor Process.join, which would race the pool's own
        # manager thread for the exit status.
        pending = {proc.sentinel for proc in workers}
        deadline = time.monotonic() + RESULT_WAIT
        while pending and time.monotonic() < deadline:
            pending -= set(mp_connection.wait(list(pending), timeout=1.0))
        assert not pending, "host workers still running after their jobs' time limit"
        exited = time.perf_counter() - start
        manager.join(RESULT_WAIT)
        for proc in workers:
            proc.close()  # its sentinel fd
        result_queue.close()
        del manager, result_queue, workers
        left = not_doomed(records)  # at once, no waiting
        gone_after, _ = time_until_gone(records, GONE)
        for future in running:
            with pytest.raises(ProcessTimeoutError):
                future.result(timeout=RESULT_WAIT)
        cancelled = sum(f.cancelled() for f in queued)
        for future in queued:
            if not future.cancelled():
                assert future.result(timeout=RESULT_WAIT)[0] >= 1
        print(
            f"host {method}/{backend} shutdown(wait={wait}, cancel_futures=True): returned "
            f"after {returned * 1e3:.0f} ms, workers exited after {exited * 1e3:.0f} ms, "
            f"{cancelled}/{len(queued)} queued cancelled, job processes left when the "
            f"workers had exited: {len(left)}; all gone (reaped by init) after "
            + (f"{gone_after * 1e3:.0f} ms" if gone_after is not None else "NEVER")
        )
        assert not left, f"job processes outlived the host workers: {left}"
        assert gone_after is not None
        # the stdlib has moved up to max_workers + 1 calls to its call queue,
        # where cancel_futures no longer reaches them
        assert cancelled >= len(queued) - HOST_WORKERS - 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        procs.kill_records(records)
