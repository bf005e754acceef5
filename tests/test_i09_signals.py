"""I9: the user process's signal handlers and wakeup fd are never triggered by
jobs being killed, and forked pool processes never run them.

The user process installs its handlers *before* the pool starts (so a fork
supervisor inherits them, with the wakeup fd): ``signal.signal`` for SIGCHLD
and SIGTERM plus ``signal.set_wakeup_fd`` on a socketpair, or asyncio's
``loop.add_signal_handler`` for SIGTERM and SIGCHLD. Faults injected, many
rounds, for every start method and both C backends: running jobs (with
children) cancelled, jobs timed out, a job that SIGTERMs its own process
group, a job whose child SIGTERMs its parent (the job), a job whose children
exit (SIGCHLDs inside the job) before it dies, a runner SIGKILLed from
outside, a segfault. Afterwards no handler has run and not one byte was
written to the wakeup fd. (The supervisor is the user process's child, so its
own exit at shutdown is a legitimate SIGCHLD: the handlers are checked before
shutdown, and restored in ``finally``.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from cancelk import (
    ProcessCancelledError,
    ProcessDiedError,
    ProcessTimeout,
    ProcessTimeoutError,
)

import jobs
import procs
from jobs import RESULT_WAIT, START_METHODS

SMALL_TREE = ("child", "setsid")


def fault_round(exe, tmp_path, tag):
    """One round of every fault; returns how many jobs were stopped or died."""
    path = str(tmp_path / f"tree{tag}.json")
    futures = {
        "cancelled": exe.submit(jobs.tree_job, path, SMALL_TREE),
        "timeout": exe.submit(jobs.sleep_return, 30, None, ProcessTimeout(0.05)),
    }
    procs.read_record(path)
    procs.wait_running(futures["cancelled"])
    assert futures["cancelled"].cancel()
    with pytest.raises(ProcessCancelledError):
        futures["cancelled"].result(timeout=RESULT_WAIT)
    with pytest.raises(ProcessTimeoutError):
        futures["timeout"].result(timeout=RESULT_WAIT)
    dying = [
        (exe.submit(jobs.sigterm_own_group), signal.SIGTERM),
        (exe.submit(jobs.child_sigterms_its_parent), signal.SIGTERM),
        (exe.submit(jobs.segfault_job), signal.SIGSEGV),
        (exe.submit(jobs.children_then_exit, 2), None),
    ]
    for future, signum in dying:
        err = future.exception(timeout=RESULT_WAIT)
        assert isinstance(err, ProcessDiedError), repr(err)
        assert err.signal == signum, repr(err)
    outside = str(tmp_path / f"self{tag}.json")
    victim = exe.submit(jobs.sleep_job, outside)
    os.kill(procs.read_record(outside)[0][0], signal.SIGKILL)
    assert isinstance(victim.exception(timeout=RESULT_WAIT), ProcessDiedError)
    assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
    return 2 + len(dying) + 1


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
def test_killed_jobs_never_run_the_users_handlers_or_wakeup_fd(backend, method, tmp_path, scale):
    calls = []
    receiver, sender = socket.socketpair()
    receiver.setblocking(False)
    sender.setblocking(False)
    old_fd = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    old_chld = signal.signal(signal.SIGCHLD, lambda signum, frame: calls.append(signum))
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    factory = procs.PoolFactory()
    try:
        exe = factory(2, mp_context=method)  # started after the handlers: a fork inherits them
        assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2
        rounds = scale(2, 100)
        stopped = sum(fault_round(exe, tmp_path, i) for i in range(rounds))
        time.sleep(0.2)  # a late signal would have arrived by now
        try:
            written = receiver.recv(4096)
        except BlockingIOError:
            written = b""
        assert not calls, f"the user's handlers ran for signals {calls}"
        assert written == b"", f"bytes written to the user's wakeup fd: {list(written)}"
        print(
            f"I9 [{method}/{backend}] signal.signal + set_wakeup_fd: {rounds} rounds, "
            f"{stopped} jobs killed/died; handler calls 0, wakeup bytes 0"
        )
    finally:
        try:
            factory.close_all()
        finally:
            signal.signal(signal.SIGCHLD, old_chld)
            signal.signal(signal.SIGTERM, old_term)
            signal.set_wakeup_fd(old_fd)
            receiver.close()
            sender.close()


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
def test_killed_jobs_never_run_asyncio_signal_handlers(backend, method, tmp_path, scale):
    calls = []
    factory = procs.PoolFactory()
    rounds = scale(2, 100)

    async def one_round(loop, exe, tag):
        path = str(tmp_path / f"tree{tag}.json")
        task = asyncio.ensure_future(loop.run_in_executor(exe, jobs.tree_job, path, SMALL_TREE))
        await loop.run_in_executor(None, procs.read_record, path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(exe, jobs.sleep_return, 30), 0.05)
        with pytest.raises(ProcessTimeoutError):
            await loop.run_in_executor(exe, jobs.sleep_return, 30, None, ProcessTimeout(0.05))
        results = await asyncio.gather(
            loop.run_in_executor(exe, jobs.sigterm_own_group),
            loop.run_in_executor(exe, jobs.child_sigterms_its_parent),
            loop.run_in_executor(exe, jobs.segfault_job),
            loop.run_in_executor(exe, jobs.children_then_exit, 2),
            return_exceptions=True,
        )
        assert all(isinstance(r, ProcessDiedError) for r in results), results
        outside = str(tmp_path / f"self{tag}.json")
        victim = asyncio.ensure_future(loop.run_in_executor(exe, jobs.sleep_job, outside))
        records = await loop.run_in_executor(None, procs.read_record, outside)
        os.kill(records[0][0], signal.SIGKILL)
        with pytest.raises(ProcessDiedError):
            await victim
        assert await loop.run_in_executor(exe, jobs.add, 2, 2) == 4

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, calls.append, "SIGCHLD")
        loop.add_signal_handler(signal.SIGTERM, calls.append, "SIGTERM")
        try:
            exe = factory(2, mp_context=method)  # started after the handlers
            assert await loop.run_in_executor(exe, jobs.add, 1, 1) == 2
            for i in range(rounds):
                await one_round(loop, exe, i)
            await asyncio.sleep(0.2)  # a stray wakeup byte would be handled by now
            return list(calls)
        finally:
            # shutdown first: the supervisor's own exit is a real SIGCHLD
            await loop.run_in_executor(None, factory.close_all)
            loop.remove_signal_handler(signal.SIGCHLD)
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        seen = asyncio.run(main())
    finally:
        factory.close_all()
    assert seen == [], f"asyncio signal handlers ran: {seen}"
    print(
        f"I9 [{method}/{backend}] asyncio add_signal_handler: {rounds} rounds, "
        f"{rounds * 8} jobs killed/died; handler calls 0"
    )
