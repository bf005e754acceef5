"""I2: a runner slot is reused only after its old process is reaped.

Fault injected: runners end in a tight loop on pools of 1 and 2 runners --
cancel() of the running job, a time limit, an outside SIGKILL of the runner,
``os._exit`` in the job, or (second test) ``max_tasks_per_child=1`` retiring
every runner after one job -- with the next job queued behind each, so a new
runner takes the slot as soon as the pool allows it.

Three independent checks:

- from inside: every job, as it starts, looks up the runners that ran the jobs
  before it (pid and create time, from a shared log) and writes down any that
  still exists, alive or a zombie. On a pool of one there must be none; on a
  pool of two at most one (the other slot's runner);
- from the user side: the moment ``Future.pid`` names a new runner, the same
  count over every runner seen so far;
- a sampler thread watches the supervisor's children (/proc) about every
  0.2 ms: zombies never pile up, none is left at the end.

Both C backends (reaping is what differs between them).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import psutil
import pytest

from cancelk import ProcessCancelledError, ProcessDiedError, ProcessTimeout, ProcessTimeoutError

import jobs
import procs
from jobs import RESULT_WAIT

pytestmark = procs.needs_proc

KINDS = ("cancel", "timeout", "sigkill", "exit", "normal")


def _state(pid: int) -> str | None:
    """The state letter of a process (Z: zombie), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


class Sampler:
    """Counts the supervisor's zombie and live children, about every 0.2 ms."""

    def __init__(self, supervisor: psutil.Process) -> None:
        self.supervisor = supervisor
        self.samples = 0
        self.max_zombies = 0
        self.max_live = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="i2-sampler", daemon=True)

    def count(self) -> tuple[int, int]:
        pid = self.supervisor.pid
        try:  # Linux: the supervisor is single-threaded; this is ~50x faster than psutil
            with open(f"/proc/{pid}/task/{pid}/children") as handle:
                children = [int(c) for c in handle.read().split()]
        except FileNotFoundError:
            if not self.supervisor.is_running():
                raise psutil.NoSuchProcess(pid) from None
            children = [c.pid for c in self.supervisor.children()]
        states = [(child, _state(child)) for child in children]
        zombies = [child for child, state in states if state == "Z"]
        live = sum(1 for _child, state in states if state not in ("Z", None))
        if len(zombies) > 1 and not all(_state(child) == "Z" for child in reversed(zombies)):
            # One sample is many reads, and this thread may lose the GIL for
            # milliseconds between two: a runner seen a zombie early in it
            # may be reaped, and its successor run its job and exit, before
            # the last read.  Zombies count as piled up only if, read again
            # in reverse order, each still is one: a zombie stays one until
            # reaped, so then they all were at once.
            zombies = zombies[-1:]
        return len(zombies), live

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                zombies, live = self.count()
            except psutil.NoSuchProcess:
                return
            self.samples += 1
            self.max_zombies = max(self.max_zombies, zombies)
            self.max_live = max(self.max_live, live)
            time.sleep(0.0002)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def settle(self, timeout: float = 2.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            zombies, live = self.count()
            if zombies == 0 or time.monotonic() > deadline:
                return zombies, live
            time.sleep(0.005)


def present(known: dict[int, float], but: int) -> list[str]:
    """Runners in ``known`` (pid -> create time) other than ``but`` that exist."""
    found = []
    for pid, created in known.items():
        if pid == but:
            continue
        proc = procs.same_process(pid, created)
        if proc is None:
            continue
        try:
            found.append(f"{pid}:{proc.status()}")
        except psutil.NoSuchProcess:
            continue
    return found


def read_log(path: str) -> list[tuple[int, list[str]]]:
    with open(path) as handle:
        lines = handle.read().splitlines()
    entries = []
    for line in lines:
        pid, _created, rest = line.split(" ", 2)
        entries.append((int(pid), [] if rest == "-" else rest.split()))
    return entries


def check_log(path: str, workers: int) -> int:
    entries = read_log(path)
    bad = [(pid, alive) for pid, alive in entries if len(alive) > workers - 1]
    assert not bad, (
        f"jobs started while earlier runners of their slot were not reaped "
        f"(pool of {workers}): {bad[:5]}"
    )
    return len(entries)


def start_pool(make_pool, workers, **kwargs):
    exe = make_pool(workers, **kwargs)
    probe = exe.submit(jobs.token_sleep, "probe", 0.05)
    supervisor = procs.supervisor_of(procs.wait_running(probe))
    probe.result(timeout=RESULT_WAIT)
    return exe, supervisor


@pytest.mark.stress
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
def test_killed_runners_slot_is_refilled_only_after_the_old_runner_is_reaped(
    make_pool, backend, workers, scale, tmp_path
):
    rounds = scale(16, 1600)
    batch = 6
    rng = random.Random(f"i2-{backend}-{workers}")
    path = str(tmp_path / "runners.log")
    exe, supervisor = start_pool(make_pool, workers)
    known: dict[int, float] = {}
    outcomes = dict.fromkeys(KINDS, 0)
    worst_present = 0
    with Sampler(supervisor) as sampler:
        for _ in range(rounds):
            kinds = [rng.choice(KINDS) for _ in range(batch)]
            futures = []
            for kind in kinds:
                markers = (ProcessTimeout(rng.uniform(0.002, 0.02)),) if kind == "timeout" else ()
                futures.append(exe.submit(jobs.log_then, path, kind, *markers))
            for kind, future in zip(kinds, futures):
                if kind in ("cancel", "sigkill"):
                    pid = procs.wait_running(future)
                    others = present(known, pid)
                    worst_present = max(worst_present, len(others))
                    assert len(others) <= workers - 1, (
                        f"runner {pid} runs a job while earlier runners exist: {others}"
                    )
                    runner = psutil.Process(pid)
                    assert runner.ppid() == supervisor.pid, "a runner not forked by the supervisor"
                    known[pid] = runner.create_time()
                    if kind == "cancel":
                        assert future.cancel()
                    else:
                        os.kill(pid, signal.SIGKILL)
            for kind, future in zip(kinds, futures):
                try:
                    pid = future.result(timeout=RESULT_WAIT)
                except ProcessCancelledError:
                    assert kind == "cancel", kind
                except ProcessTimeoutError:
                    assert kind == "timeout", kind
                except ProcessDiedError as why:
                    assert kind in ("sigkill", "exit"), (kind, why)
                    if kind == "sigkill":
                        assert why.signal == signal.SIGKILL, why
                    else:
                        assert why.exitcode == 5, why
                else:
                    assert kind == "normal", (kind, pid)
                outcomes[kind] += 1
        zombies, live = sampler.settle()
    started = check_log(path, workers)
    print(
        f"I2 kill loop [{backend}, {workers} runner(s)]: {started} jobs started, "
        f"runner ends {outcomes}; supervisor children over {sampler.samples} samples: "
        f"max zombies {sampler.max_zombies}, max live {sampler.max_live}; "
        f"worst earlier runners present at a new job {worst_present}"
    )
    assert zombies == 0, f"{zombies} zombie children left under the supervisor"
    assert live <= workers + 1, f"{live} live children for {workers} slot(s) and a spare"
    assert sampler.max_zombies <= workers, f"zombies piled up: {sampler.max_zombies}"
    # each slot's dying runner, its replacement and the warm spare at most
    assert sampler.max_live <= 2 * workers + 1, sampler.max_live


@pytest.mark.stress
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
def test_max_tasks_per_child_one_reuses_a_slot_only_after_reaping(
    make_pool, backend, workers, scale, tmp_path
):
    count = scale(120, 12000)
    path = str(tmp_path / "runners.log")
    exe, supervisor = start_pool(make_pool, workers, max_tasks_per_child=1)
    with Sampler(supervisor) as sampler:
        futures = [exe.submit(jobs.log_predecessors, path) for _ in range(count)]
        pids = [f.result(timeout=RESULT_WAIT) for f in futures]
        zombies, _live = sampler.settle()
    assert len(set(pids)) == count, "a runner ran more than max_tasks_per_child jobs"
    started = check_log(path, workers)
    assert started == count
    print(
        f"I2 max_tasks_per_child=1 [{backend}, {workers} runner(s)]: {count} runners "
        f"retired; over {sampler.samples} samples max zombies {sampler.max_zombies}, "
        f"max live {sampler.max_live}"
    )
    assert zombies == 0, f"{zombies} zombie children left under the supervisor"
    assert sampler.max_zombies <= workers, f"zombies piled up: {sampler.max_zombies}"
    assert exe.stats()["processes_started"] >= count
