"""Figure L, limits for services (cancelk only: no peer has them).

    L1 memory limit: a job touching ~1 GB/s under a 300 MB limit: how far past
       the limit its tree was when the watch killed it (MB: the peak sampled),
       and the time from the start of the allocation that crossed the limit
       (the job's own log) to the future's end (ms)
    L2 the cost of the memory watch: supervisor CPU with 32 running jobs that
       carry a limit, against the same jobs without one (per job per second)
    L3 a queued job's deadline: deadline -> future done (ms), the job never run

The job logs its own resident size and the time after each step, so the
crossing is read from the job itself, not guessed.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

import psutil

import cancelk

MB = 1 << 20
LIMIT = 300 * MB
STEP_MB, STEP_S = 10, 0.01  # ~1 GB/s


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def balloon(log_path: str) -> None:
    """Touch STEP_MB every STEP_S, logging (time, resident bytes) before each
    allocation: a step's line says when the allocation began, from what size."""
    held = []
    with open(log_path, "w") as log:
        while True:
            log.write(f"{time.monotonic()} {_rss()}\n")
            log.flush()
            held.append(b"\x01" * (STEP_MB * MB))
            time.sleep(STEP_S)


def idle(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _crossing(log_path: str) -> tuple[float, int]:
    """When the allocation that took the job past LIMIT began, and the most
    the job saw itself hold (at the start of its last allocation)."""
    crossed, most = 0.0, 0
    with open(log_path) as log:
        for line in log:
            moment, size = float(line.split()[0]), int(line.split()[1])
            most = max(most, size)
            if size + STEP_MB * MB > LIMIT and not crossed:
                crossed = moment
    return crossed, most


def _memory_trial(pool: cancelk.ProcessPoolExecutor, workdir: str, n: int) -> dict[str, Any]:
    log_path = os.path.join(workdir, f"balloon-{n}.log")
    future = pool.submit(balloon, log_path, cancelk.ProcessMemoryLimit(LIMIT))
    error = future.exception(timeout=60)
    done = time.monotonic()
    assert isinstance(error, cancelk.ProcessMemoryError), repr(error)
    crossed, _most = _crossing(log_path)
    return {
        "overshoot_mb": ((error.peak or LIMIT) - LIMIT) / MB,
        "detect_ms": (done - crossed) * 1000,
    }


def memory_overshoot(trials: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir, cancelk.ProcessPoolExecutor(1) as pool:
        pool.submit(idle, 0).result()
        rows = [_memory_trial(pool, workdir, n) for n in range(trials)]
    return {key: _summary([row[key] for row in rows]) for key in rows[0]}


def _supervisor(pool: cancelk.ProcessPoolExecutor) -> psutil.Process:
    # The benchmark's own view of the pool, as a user would find it: the
    # child of this process that is the runners' parent.
    runner = psutil.Process(pool.submit(os.getpid).result())
    return runner.parent()


def _supervisor_cpu(jobs: int, limit: int | None, seconds: float) -> float:
    with cancelk.ProcessPoolExecutor(jobs, memory_limit=limit) as pool:
        supervisor = _supervisor(pool)
        futures = [pool.submit(idle, seconds + 1.0) for _ in range(jobs)]
        while sum(f.running() for f in futures) < jobs:
            time.sleep(0.01)
        time.sleep(0.2)  # every job begun
        before = supervisor.cpu_times()
        time.sleep(seconds)
        after = supervisor.cpu_times()
        wait(futures)
    return (after.user + after.system) - (before.user + before.system)


def sampling_cost(jobs: int, seconds: float) -> dict[str, Any]:
    watched = _supervisor_cpu(jobs, LIMIT, seconds)
    unwatched = _supervisor_cpu(jobs, None, seconds)
    per_job_second = max(0.0, watched - unwatched) / (jobs * seconds)
    return {
        "jobs": jobs,
        "seconds": seconds,
        "supervisor_cpu_watched_s": watched,
        "supervisor_cpu_unwatched_s": unwatched,
        "cpu_share_of_a_core": (watched - unwatched) / seconds,
        "us_per_job_per_second": per_job_second * 1e6,
    }


def queued_deadline(trials: int) -> dict[str, Any]:
    late_ms = []
    with cancelk.ProcessPoolExecutor(1) as pool:
        pool.submit(idle, 0).result()
        blocker = pool.submit(idle, 3600)
        while not blocker.running():
            time.sleep(0.01)
        for _ in range(trials):
            deadline = time.monotonic() + 0.05
            future = pool.submit(idle, 0, cancelk.ProcessDeadline.at(deadline))
            done_at: list[float] = []
            future.add_done_callback(lambda _f, d=done_at: d.append(time.monotonic()))
            future.exception(timeout=10)
            late_ms.append((done_at[0] - deadline) * 1000)
        blocker.cancel()
    return {"late_ms": _summary(late_ms), "ran": 0}


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(values), "p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    progress("L1 memory limit overshoot (1 GB/s job, 300 MB limit)")
    memory = memory_overshoot(3 if quick else 10)
    progress("L2 memory watch cost (32 running jobs)")
    cost = sampling_cost(32, 1.0 if quick else 3.0)
    progress("L3 queued job's deadline -> future done")
    deadline = queued_deadline(10 if quick else 50)
    return {
        "mechanism": (
            "RSS sampling of the job trees in the supervisor, every 5 ms or 10x a sample's cost"
        ),
        "memory": memory,
        "cost": cost,
        "deadline": deadline,
    }


def format_report(result: dict[str, Any]) -> str:
    memory, cost, deadline = result["memory"], result["cost"], result["deadline"]
    lines = [
        f"L  limits for services (cancelk only; {result['mechanism']})",
        "figure                                           n     p50     p99     max",
    ]

    def row(name: str, summary: dict[str, float]) -> None:
        lines.append(
            f"{name:<45} {summary['n']:>4} {summary['p50']:7.1f} "
            f"{summary['p99']:7.1f} {summary['max']:7.1f}"
        )

    row("L1 MB past the 300 MB limit when killed", memory["overshoot_mb"])
    row("L1 crossing allocation began -> done, ms", memory["detect_ms"])
    row("L3 queued job: deadline -> future done, ms", deadline["late_ms"])
    lines.append(
        f"L2 memory watch, {cost['jobs']} running jobs: supervisor CPU "
        f"{cost['supervisor_cpu_watched_s']:.3f} s vs {cost['supervisor_cpu_unwatched_s']:.3f} s "
        f"without limits over {cost['seconds']:.0f} s = {100 * cost['cpu_share_of_a_core']:.1f}% "
        f"of a core, {cost['us_per_job_per_second']:.0f} us per job per second"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_report(run(quick=True)))
