"""Benchmark of ``killable_wrapper`` inside the stdlib pool (design P6 and P3).

    user process                       host worker (stdlib ProcessPoolExecutor, 1 worker;
    ------------                       initializer sets CANCELK_BACKEND)
    round trips: submit(noop)  ----->  noop()
           vs submit(killable_wrapper, noop) -> a standby runs it, wait in C
    submit(measuring fn)       ----->  times, each in a block of its own, N x
                                       [10 ms pause, noop(), killable_wrapper(noop)],
                                       N back-to-back killable_wrapper(noop), N/2
                                       after a fork of the worker, N forked at
                                       the call (fresh), N bare fork+_exit+waitpid;
                                       SIGKILL -> exited of a fresh fork of
                                       the worker (a standby's size);
                                       times killable_wrapper(job, timeout=50 ms):
                                         t0 = monotonic_ns(); deadline = t0 + 50 ms
                                         ProcessTimeoutError raised  -> "raised"
                                         every job process gone      -> "all gone"
                                       then the same job killed at 50 ms by
                                       the benchmark's killer -> "floor"

P6: overhead per call = killable_wrapper(noop) - median(noop()), measured inside
the host worker and as a round trip from the user process.  Target <= 0.5 ms
(the design's raised figure).  The default path is measured: in a pool worker
a standby process, forked ahead of time, runs the job.  Each P6 call comes
after a 10 ms pause, as a worker's next task does, by which time the standby
the last call used has been replaced; back-to-back calls are their own row
(each waits for that replacement: the standbys' pace, not a call's cost), and
so are calls right after a fork of the worker (the fork's page faults land on
whatever writes next).  The round trips from the user process pause as
long between pairs for the same reason.  The fork-at-call path
(``killable_wrapper_fresh=True``, the only one before) and a bare fork are
timed in blocks of their own.

P3: overshoot past the deadline for the jobs of wrapper_jobs.py, which runs in
the host worker.  "All gone" includes the kernel's teardown of the job's
processes.  Each trial is followed by its floor: the same job, run the same
way with no time limit, SIGKILLed at the same age (50 ms) by a process of the
benchmark, SIGKILL -> every job process exited; the overhead over the floor
is the median of the trials' differences.  Target: overhead <= 0.3 ms at p50
(the design's raised P3); p50 <= 0.5 ms and p99 <= 2 ms of the whole are
shown beside it.  A fresh fork of the worker killed at once, the floor of a
process that has not lived, is shown too: cheaper than the floor of one that
has run 50 ms (see wrapper_jobs.py).

The stdlib contrast: ``pool.submit(job).result(timeout=0.05)`` raises on time,
but the job (1 s long) keeps the worker busy; we watch for up to 1 s past the
deadline and report how long the worker stayed busy, or "still running".

Both C backends run (``pidfd`` and ``posix``), each in its own pool.
``run(...)`` returns a JSON-ready dict; wrapper_report.py makes the tables;
the command line is run.py (``python -m cancelk bench --figures P6``).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import cancelk
from cancelk import killable_wrapper

try:
    from benchmarks import stats, wrapper_jobs
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import stats  # type: ignore[no-redef]
    import wrapper_jobs  # type: ignore[no-redef]

__all__ = ["BACKENDS", "Plan", "make_plan", "run"]

STDLIB_JOB_S = 1.0
STDLIB_WATCH_NS = 1_000_000_000  # how long past the deadline we watch a stdlib job
BACKENDS = ("pidfd", "posix")


@dataclass(frozen=True)
class Plan:
    """How many samples each figure gets."""

    calls: int  # killable_wrapper(noop) calls timed inside the host worker
    round_trips: int  # submit -> result pairs (plain, wrapped) from the user process
    timeout_trials: int  # per P3 variant and backend
    stdlib_trials: int  # 1 s stdlib jobs per variant
    warmup_calls: int
    warmup_trials: int


def make_plan(quick: bool = False, repeat: int | None = None) -> Plan:
    """Default ~60 s on 2 cores, quick ~10 s; ``repeat`` sets the timeout trials
    per variant, with 10x as many timed calls and 5x as many round trips."""
    if quick:
        plan = Plan(200, 100, 10, 1, 20, 1)
    else:
        plan = Plan(1000, 400, 70, 2, 50, 2)
    if repeat is not None:
        if repeat < 1:
            raise ValueError("--repeat must be at least 1")
        plan = replace(plan, calls=10 * repeat, round_trips=5 * repeat, timeout_trials=repeat)
    return plan


def time_round_trips(pool: cf.Executor, pairs: int, warmup: int) -> dict[str, list[int]]:
    """Interleaved ns of submit(noop).result() and submit(killable_wrapper, noop).result()."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        pool.submit(wrapper_jobs.noop).result()
        pool.submit(killable_wrapper, wrapper_jobs.noop).result()
    plain: list[int] = []
    wrapped: list[int] = []
    for _ in range(pairs):
        time.sleep(wrapper_jobs.GAP_S)
        t = clock()
        pool.submit(wrapper_jobs.noop).result()
        plain.append(clock() - t)
        t = clock()
        pool.submit(killable_wrapper, wrapper_jobs.noop).result()
        wrapped.append(clock() - t)
    return {"plain": plain, "wrapped": wrapped}


def _overhead(wrapped: Sequence[int], baseline: Sequence[int]) -> list[float]:
    base = stats.median(baseline)
    return [w - base for w in wrapped]


def _make_pool(start_method: str, backend: str | None = None) -> cf.ProcessPoolExecutor:
    context = multiprocessing.get_context(start_method)
    if backend is None:
        return cf.ProcessPoolExecutor(max_workers=1, mp_context=context)
    return cf.ProcessPoolExecutor(
        max_workers=1, mp_context=context, initializer=wrapper_jobs.set_backend, initargs=(backend,)
    )


def measure_backend(backend: str, plan: Plan, start_method: str) -> dict[str, Any]:
    """P6 and P3 for one C backend, in a fresh stdlib pool."""
    with _make_pool(start_method, backend) as pool:
        try:
            facts = pool.submit(wrapper_jobs.worker_facts).result()
        except (RuntimeError, ValueError) as why:
            return {"skipped": str(why)}
        calls = pool.submit(
            wrapper_jobs.time_calls_in_worker, plan.calls, plan.warmup_calls
        ).result()
        trips = time_round_trips(pool, plan.round_trips, plan.warmup_calls)
        handoff = pool.submit(wrapper_jobs.handoff_floor_in_worker, plan.calls // 5).result()
        floor = pool.submit(
            wrapper_jobs.teardown_floor_in_worker, plan.timeout_trials, plan.warmup_trials
        ).result()
        timeouts = {
            kind: pool.submit(
                wrapper_jobs.timeout_trials_in_worker, kind, plan.timeout_trials, plan.warmup_trials
            ).result()
            for kind in wrapper_jobs.KINDS
        }
    return {
        "worker": facts,
        "p6_in_worker": {
            "noop": stats.summarize(calls["direct"]),
            "killable_wrapper": stats.summarize(calls["wrapped"]),
            "overhead": stats.summarize(_overhead(calls["wrapped"], calls["direct"])),
            "back_to_back": stats.summarize(calls["back_to_back"]),
            "after_fork": stats.summarize(calls["after_fork"]),
            "after_fork_overhead": stats.summarize(_overhead(calls["after_fork"], calls["direct"])),
            "fresh": stats.summarize(calls["fresh"]),
            "fresh_overhead": stats.summarize(_overhead(calls["fresh"], calls["direct"])),
            "fork_exit_reap": stats.summarize(calls["fork_floor"]),
            "handoff_floor": stats.summarize(handoff),
        },
        "p6_round_trip": {
            "plain": stats.summarize(trips["plain"]),
            "killable_wrapper": stats.summarize(trips["wrapped"]),
            "overhead": stats.summarize(_overhead(trips["wrapped"], trips["plain"])),
        },
        "p3_floor": {
            "exit": stats.summarize(floor["exit_ns"]),
            "child_rss_mb": round(stats.median(floor["child_rss"]) / 2**20, 1)
            if floor["child_rss"]
            else None,
        },
        "p3": {kind: _p3_kind(result) for kind, result in timeouts.items()},
    }


def _p3_kind(result: dict[str, Any]) -> dict[str, Any]:
    """One job kind's P3 figures; with its paired floor, the overhead over
    it: the median of the trials' own differences (all gone - floor)."""
    figures = {
        "raised": stats.summarize(result["raised"]),
        "gone": stats.summarize(result["gone"]),
        "failures": result["failures"],
    }
    pairs = [(g, f) for g, f in zip(result["gone"], result.get("floor", [])) if f is not None]
    if pairs:
        figures["floor"] = stats.summarize([f for _g, f in pairs])
        figures["over_floor"] = stats.summarize([g - f for g, f in pairs])
    return figures


def _stdlib_trial(pool: cf.Executor, kind: str) -> tuple[float, float | None]:
    """(raise overshoot, busy after deadline or None if still running) in ns."""
    t0 = time.monotonic_ns()
    future = pool.submit(wrapper_jobs.JOBS[kind], -1, STDLIB_JOB_S)
    try:
        future.result(timeout=wrapper_jobs.TIMEOUT_S)
    except cf.TimeoutError:
        raised = time.monotonic_ns()
    else:
        raise RuntimeError(f"the stdlib {kind} job ended before its 50 ms timeout")
    deadline = t0 + wrapper_jobs.TIMEOUT_NS
    watch_s = max(0.0, (deadline + STDLIB_WATCH_NS - time.monotonic_ns()) / 1e9)
    done, _ = cf.wait([future], timeout=watch_s)
    busy = time.monotonic_ns() - deadline if done else None
    future.result()  # a still-running job ends on its own (it is 1 s long)
    return raised - deadline, busy


def measure_stdlib(plan: Plan, start_method: str) -> dict[str, Any]:
    """What the stdlib offers: result(timeout) raises, the job runs on."""
    out: dict[str, Any] = {}
    with _make_pool(start_method) as pool:
        pool.submit(wrapper_jobs.noop).result()  # start the worker outside the timings
        for kind in wrapper_jobs.KINDS:
            trials = [_stdlib_trial(pool, kind) for _ in range(plan.stdlib_trials)]
            busy = [b for _, b in trials if b is not None]
            out[kind] = {
                "raised": stats.summarize([r for r, _ in trials]),
                "busy_after_deadline": stats.summarize(busy),
                "still_running_after_watch": len(trials) - len(busy),
            }
    return out


def run(
    quick: bool = False,
    repeat: int | None = None,
    start_method: str = "fork",
    backends: Sequence[str] = BACKENDS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure everything; a JSON-ready dict (see ``wrapper_report.format_report``)."""
    say = progress or (lambda _message: None)
    plan = make_plan(quick, repeat)
    machine = stats.machine_info()
    began = time.monotonic()
    results: dict[str, Any] = {}
    for backend in backends:
        say(f"killable_wrapper, {backend} backend ...")
        results[backend] = measure_backend(backend, plan, start_method)
    say("stdlib result(timeout) contrast ...")
    stdlib = measure_stdlib(plan, start_method)
    return {
        "benchmark": "killable_wrapper (P3, P6)",
        "cancelk_version": cancelk.__version__,
        "machine": machine,
        "config": {
            "start_method": start_method,
            "quick": quick,
            "timeout_ms": wrapper_jobs.TIMEOUT_NS / 1e6,
            "stdlib_job_ms": STDLIB_JOB_S * 1e3,
            "stdlib_watch_ms": STDLIB_WATCH_NS / 1e6,
            "plan": asdict(plan),
        },
        "backends": results,
        "stdlib": stdlib,
        "elapsed_s": round(time.monotonic() - began, 1),
        "load_average_after": stats.machine_info()["load_average"],
    }
