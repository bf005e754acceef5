"""The kernel's floor under P3 and P4, measured in the same run, and cancelk over it.

A SIGKILLed process is gone only once the kernel has torn its memory down, and
that takes longer the larger the process.  So P3 ("deadline -> done and gone")
and P4 ("cancel -> gone") are reported as the floor plus cancelk's overhead
(design section 5, "Raised since the first version"):

    1. a cancelk runner's size: a pool like P3's and P4's (1 worker, the run's
       start method) runs a job, and the runner's RSS is read (psutil);
    2. the floor: floor_host.py, a fresh small interpreter, grows until a fork of
       it has that RSS, then forks, SIGKILLs and times the child until its pidfd
       is readable (exited) and until it is reaped (waitpid elsewhere);
    2b. the floor of the same process: a cancelk runner running a sleeping
       job is SIGKILLed by this process, nothing of cancelk's on the way, and
       timed until its pidfd is readable.  It is the process a stop kills,
       with its ~170 mappings and the pages it wrote (a fresh interpreter
       grown with one large block has ~40 and shares its pages with its
       parent: its teardown is cheaper than a runner's of the same RSS);
    3. ``over_floor``: cancelk's overhead over the floor (the exit figure: P3
       and P4 count a zombie as gone), for each P3 job kind and both P4 rows.
       The floor is the row's own when it has one: stops.py follows each of
       cancelk's trials with the same job SIGKILLed by the benchmark, in the
       same pool, so the two are measured alternately under the same load,
       and the overhead is the median of the trials' differences.  Otherwise
       the floor is 2b's (measured after P3 and P4), else 2's, and the
       overhead is cancelk p50 - floor p50.
                                                    target overhead <= 0.3 ms at p50
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

try:
    from benchmarks import floor_host, harness, jobs, peers, stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import floor_host  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

__all__ = ["OVERHEAD_TARGET_MS", "figure_floor", "over_floor"]

OVERHEAD_TARGET_MS = 0.3
HOST_LIMIT_S = 120.0
WARMUP = 3


def _runner_rss(ctx: harness.Context) -> int:
    """Resident bytes of a cancelk runner that has run a job (1 worker, as in P3/P4)."""
    import psutil

    library = peers.by_name("cancelk")
    with peers.opened(library, 1, ctx.method) as handle:
        harness.warm(library, handle.pool, 1)
        pid = library.submit(handle.pool, jobs.getpid).result(timeout=harness.RESULT_LIMIT_S)
        return int(psutil.Process(pid).memory_info().rss)


def _runner_kill_exits(ctx: harness.Context, trials: int) -> list[int]:
    """ns from SIGKILL to exited (pidfd readable) of a cancelk runner running
    a job, killed by this process (step 2b); [] without pidfds."""
    if not hasattr(os, "pidfd_open"):
        return []
    library = peers.by_name("cancelk")
    samples: list[int] = []
    with peers.opened(library, 1, ctx.method) as handle:
        for _ in range(WARMUP + trials):
            harness.warm(library, handle.pool, 1)  # also the runner replacing the last one
            future = library.submit(handle.pool, jobs.nap, HOST_LIMIT_S)
            give_up = time.monotonic() + harness.RESULT_LIMIT_S
            while getattr(future, "pid", None) is None:
                if time.monotonic() > give_up:
                    raise RuntimeError("the floor's job did not start")
                time.sleep(0.001)
            pidfd = os.pidfd_open(future.pid)
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                began = time.monotonic_ns()
                os.kill(future.pid, signal.SIGKILL)
                if not poller.poll(HOST_LIMIT_S * 1000):
                    raise RuntimeError(f"a SIGKILLed runner ({future.pid}) did not exit")
                samples.append(time.monotonic_ns() - began)
            finally:
                os.close(pidfd)
            future.exception(timeout=harness.RESULT_LIMIT_S)  # ProcessDiedError
    return samples[WARMUP:]


def _measure(ctx: harness.Context) -> dict[str, Any]:
    if not peers.by_name("cancelk").available:
        return {"status": peers.by_name("cancelk").why_unavailable}
    target = _runner_rss(ctx)
    trials = ctx.plan.floor_trials
    ctx.say(f"P3/P4 kernel floor: kill a process of {target / 2**20:.0f} MB, {trials} trials")
    done = subprocess.run(
        [sys.executable, "-I", floor_host.__file__, str(target), str(trials), str(WARMUP)],
        stdout=subprocess.PIPE,
        timeout=HOST_LIMIT_S,
        check=True,
    )
    host = json.loads(done.stdout)
    sizes = host["child_rss"]
    ctx.say(f"P3/P4 kernel floor: SIGKILL a runner running a job, {trials} trials")
    runner_kills = _runner_kill_exits(ctx, trials)
    return {
        "runner_rss_mb": target / 2**20,
        "floor_rss_mb": stats.median(sizes) / 2**20 if sizes else None,
        "clock": host["clock"],
        **harness.summaries(
            [{"exit": e, "reaped": r} for e, r in zip(host["exit_ns"], host["reaped_ns"])],
            ("exit", "reaped"),
        ),
        "runner_exit": stats.summarize(runner_kills),
    }


def figure_floor(ctx: harness.Context) -> dict[str, Any]:
    """The floor for the run's start method: see the module's steps 1 and 2."""
    with ctx.capture.heard() as heard:
        try:
            measured = _measure(ctx)
        except Exception as why:
            measured = {"status": f"error: {type(why).__name__}: {why}"}
    return {"method": ctx.method, "trials": ctx.plan.floor_trials, "notes": heard, **measured}


def _cancelk_rows(figures: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what, row) of cancelk's P3 rows per job kind ("all": done and gone,
    as ``measure``) and P4 rows ("gone")."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for row in figures.get("P3", {}).get("rows", []):
        if row["name"] == "cancelk" and "kind" in row and "status" not in row:
            label = harness.KIND_LABELS[row["kind"]]
            rows.append((f"P3 {label}: deadline -> done and gone", {**row, "measure": row["all"]}))
    for part, call in (("sync", "cancel()"), ("asyncio", "task.cancel()")):
        for row in figures.get("P4", {}).get(part, []):
            if row["name"] == "cancelk" and "status" not in row:
                rows.append((f"P4 {part} {call} -> gone", {**row, "measure": row["gone"]}))
    return rows


def _run_floor(figures: dict[str, Any]) -> dict[str, Any]:
    """The floor measured apart (step 2b, else 2), or {}."""
    measured = figures.get("floor", {})
    for key in ("runner_exit", "exit"):
        floor = measured.get(key)
        if floor and floor.get("n"):
            return dict(floor)
    return {}


def over_floor(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """cancelk's P3/P4 figures beside their floor, and the overhead over it."""
    apart = _run_floor(figures)
    out = []
    for what, row in _cancelk_rows(figures):
        summary, paired = row["measure"], row.get("floor", {})
        floor, kind = (paired, "paired") if paired.get("n") else (apart, "measured apart")
        if not summary.get("n") or not floor.get("n"):
            continue
        differences = row.get("over_floor", {})
        if kind == "paired" and differences.get("n"):
            overhead = differences["median_ms"]  # the median of the trials' own differences
        else:
            overhead = summary["median_ms"] - floor["median_ms"]
        out.append(
            {
                "what": what,
                "n": summary["n"],
                "cancelk_p50_ms": summary["median_ms"],
                "cancelk_p99_ms": summary["p99_ms"],
                "floor": kind,
                "floor_n": floor["n"],
                "floor_p50_ms": floor["median_ms"],
                "floor_p99_ms": floor["p99_ms"],
                "overhead_ms": overhead,
                "met": overhead <= OVERHEAD_TARGET_MS,
            }
        )
    return out
