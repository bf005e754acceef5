"""I10 (and I6's "nothing in /dev/shm"): no file descriptor, process, thread
or memory grows with the number of jobs run.

Fault injected: 10 000 jobs (CI size; ``-m stress`` runs 1 000 000) with a
mixed outcome -- results, job exceptions, time-limit kills (~5 %), cancels of
queued and running jobs (~5 %) and ``os._exit`` deaths (~1 %) -- so runners
are killed and replaced about a thousand times. After a warm-up batch of the
same mix, the user process's fd count, OS thread count, child-process count
and RSS, and the supervisor's fd count and RSS, are measured; after the run
they must be back at (or below) those figures, with a small fixed RSS slack.
Nothing may appear in /dev/shm, and neither the user process nor any pool
process may hold a listening socket (TCP/UDP via psutil, unix sockets via
/proc/net/unix matched by inode).
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import socket
import threading
import time

import psutil
import pytest

from cancelk import ProcessDiedError, ProcessTimeout, ProcessTimeoutError

import jobs
import procs
from jobs import MB, RESULT_WAIT, START_METHODS

RSS_SLACK = 10 * MB
NEEDS_PROC = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc (Linux)")
BATCH = 500


def fd_count(pid="self"):
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid):
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_unix_inodes():
    """Inodes of unix sockets in the listening state (__SO_ACCEPTCON)."""
    listening = set()
    with open("/proc/net/unix") as handle:
        next(handle)
        for line in handle:
            fields = line.split()
            if len(fields) >= 7 and int(fields[3], 16) & 0x10000:
                listening.add(int(fields[6]))
    return listening


def listening_sockets(pids):
    found = []
    unix = listening_unix_inodes()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM:
                    found.append(f"pid {pid}: {conn}")
            for inode in socket_inodes(pid) & unix:
                found.append(f"pid {pid}: listening unix socket inode {inode}")
        except (psutil.NoSuchProcess, FileNotFoundError):
            continue
    return found


def dev_shm():
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def shm_held_by(pids):
    """/dev/shm files that one of ``pids`` has open or mapped."""
    held = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as handle:
                for line in handle:
                    if "/dev/shm/" in line:
                        held.add(line.split("/dev/shm/", 1)[1].split()[0])
            for name in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{name}")
                except OSError:
                    continue
                if target.startswith("/dev/shm/"):
                    held.add(target[len("/dev/shm/") :].split()[0])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return held


def new_shm_of(pids, before):
    """New /dev/shm entries that are ours. The machine may run other test
    sessions at the same time (their stdlib pools create ``sem.mp-*``), so a
    new entry counts against the pool when one of its processes holds it, or
    when its name says cancelk; the others are only reported."""
    new = dev_shm() - before
    ours = {name for name in new if "cancelk" in name.lower()}
    ours |= shm_held_by(pids)
    return ours, new - ours


class Mix:
    """Submits batches of jobs with mixed outcomes and checks every outcome."""

    def __init__(self, exe, seed):
        self.exe = exe
        self.rng = random.Random(seed)
        self.counts = dict.fromkeys(
            ("result", "raised", "timed_out", "cancelled_pending", "cancelled_running", "died"), 0
        )
        self.jobs = 0

    def batch(self, size):
        rng = self.rng
        submitted = []
        to_cancel = []
        for i in range(size):
            roll = rng.random()
            if roll < 0.05:
                f = self.exe.submit(jobs.sleep_return, 20, None, ProcessTimeout(0.005))
                submitted.append(("timed_out", i, f))
            elif roll < 0.10:
                f = self.exe.submit(jobs.sleep_return, 8, None)
                submitted.append(("cancel", i, f))
                if rng.random() < 0.5:
                    f.cancel()  # most likely still queued
                else:
                    to_cancel.append(f)
            elif roll < 0.11:
                submitted.append(("died", i, self.exe.submit(jobs.exit_with, 5)))
            elif roll < 0.30:
                submitted.append(("raised", i, self.exe.submit(jobs.raise_mixed, i)))
            else:
                submitted.append(("result", i, self.exe.submit(jobs.add, i, 1)))
        # cancel the others once they run (in order: they start in order)
        answers = {}
        for f in to_cancel:
            deadline = time.monotonic() + RESULT_WAIT
            while not f.done() and f.pid is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            state = f._state
            answers[id(f)] = (state, f.cancel())
        futures = [f for _, _, f in submitted]
        _, not_done = concurrent.futures.wait(futures, timeout=RESULT_WAIT * 2)
        assert not not_done, f"{len(not_done)} futures never ended"
        for kind, i, f in submitted:
            self.jobs += 1
            if kind == "result":
                assert f.result(timeout=0) == i + 1
                self.counts["result"] += 1
            elif kind == "raised":
                err = f.exception(timeout=0)
                assert isinstance(err, jobs.MixedJobError) and err.args == (i,), repr(err)
                self.counts["raised"] += 1
            elif kind == "timed_out":
                assert isinstance(f.exception(timeout=0), ProcessTimeoutError)
                self.counts["timed_out"] += 1
            elif kind == "died":
                err = f.exception(timeout=0)
                assert isinstance(err, ProcessDiedError) and err.exitcode == 5, repr(err)
                self.counts["died"] += 1
            else:
                assert f.cancelled(), (
                    f"job {i} was cancelled but is {f._state}; (state at cancel, cancel() "
                    f"answer): {answers.get(id(f), 'cancelled at submit')}"
                )
                pending = f._cancel_reason.endswith("before it started")
                self.counts["cancelled_pending" if pending else "cancelled_running"] += 1


def snapshot(supervisor):
    me = psutil.Process()
    return {
        "user fds": fd_count(),
        "user threads (OS)": me.num_threads(),
        "user threads (Python)": threading.active_count(),
        "user children": len(me.children(recursive=True)),
        "user RSS": me.memory_info().rss,
        "supervisor fds": fd_count(supervisor.pid),
        "supervisor RSS": supervisor.memory_info().rss,
        "supervisor threads": supervisor.num_threads(),
    }


def settled(supervisor, before, timeout=3.0):
    """Measure again until nothing exceeds ``before`` (processes being
    replaced or reaped settle within a few ms) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(supervisor)
        over = {
            key: (before[key], value)
            for key, value in now.items()
            if value > before[key] + (RSS_SLACK if "RSS" in key else 0)
        }
        if not over or time.monotonic() > deadline:
            return now, over
        time.sleep(0.05)


@NEEDS_PROC
@pytest.mark.stress
@pytest.mark.timeout(150)
def test_10000_mixed_jobs_leave_fds_threads_processes_and_memory_flat(make_pool, backend, scale):
    total = scale(10_000, 1_000_000)
    shm_before = dev_shm()
    exe = make_pool(2)
    probe = exe.submit(jobs.sleep_return, 0.2, "probe")
    supervisor = procs.supervisor_of(procs.wait_running(probe))
    assert probe.result(timeout=RESULT_WAIT) == "probe"
    mix = Mix(exe, seed=f"mix-{backend}")
    for _ in range(2):
        mix.batch(BATCH)  # warm-up: spares, buffers, caches
    time.sleep(0.3)
    before = snapshot(supervisor)
    start = time.monotonic()
    done = 0
    while done < total:
        size = min(BATCH, total - done)
        mix.batch(size)
        done += size
    elapsed = time.monotonic() - start
    after, over = settled(supervisor, before)
    pool_pids = [supervisor.pid] + [p.pid for p in supervisor.children(recursive=True)]
    listening = listening_sockets([os.getpid(), *pool_pids])
    new_shm, foreign_shm = new_shm_of([os.getpid(), *pool_pids], shm_before)
    stats = exe.stats()
    figures = "\n  ".join(
        f"{key}: {before[key] / MB:.1f} -> {after[key] / MB:.1f} MiB"
        if "RSS" in key
        else f"{key}: {before[key]} -> {after[key]}"
        for key in before
    )
    print(
        f"I10 [{backend}]: {total} jobs in {elapsed:.1f} s ({total / elapsed:.0f}/s), "
        f"outcomes {mix.counts}, processes started {stats['processes_started']}\n  {figures}"
        f"\n  /dev/shm: {len(new_shm)} new entries of the pool, {len(foreign_shm)} of others"
    )
    assert not over, f"grew over {total} jobs (before, after): {over}"
    assert not new_shm, f"new in /dev/shm: {new_shm}"
    assert not listening, f"listening sockets: {listening}"
    assert stats["died"] >= mix.counts["died"]
    assert mix.counts["timed_out"] and mix.counts["cancelled_running"] and mix.counts["died"]


@NEEDS_PROC
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_no_listening_socket_and_nothing_in_dev_shm_for_any_start_method(make_pool, method):
    shm_before = dev_shm()
    exe = make_pool(2, mp_context=method)
    running = exe.submit(jobs.sleep_return, 0.5, "done")
    supervisor = procs.supervisor_of(procs.wait_running(running))
    victim = exe.submit(jobs.sleep_return, 20)
    procs.wait_running(victim)
    assert victim.cancel()
    assert exe.submit(jobs.add, 1, 2).result(timeout=RESULT_WAIT) == 3
    pool_pids = [supervisor.pid] + [p.pid for p in supervisor.children(recursive=True)]
    listening = listening_sockets([os.getpid(), *pool_pids])
    new_shm, _ = new_shm_of([os.getpid(), *pool_pids], shm_before)
    assert running.result(timeout=RESULT_WAIT) == "done"
    assert not listening, f"listening sockets: {listening}"
    assert not new_shm, f"new in /dev/shm: {new_shm}"
    print(f"[{method}] {len(pool_pids)} pool processes, no listening socket, /dev/shm untouched")
