"""P7: how fast a pool of 32 spawned workers is ready, and how much memory it takes.

constructor -> 32 distinct worker pids answered            target <= 0.25 x stdlib
and the total PSS of the pool's processes while they are all busy
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from typing import Any

try:
    from benchmarks import harness, jobs, peers, probes, stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import harness  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]
    import probes  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

__all__ = ["P7_WORKERS", "figure_p7"]

P7_WORKERS = 32
P7_LIMIT_S = 90.0


def _pool_pss(processes: Sequence[Any]) -> tuple[float, int]:
    import psutil

    total = 0
    counted = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
            counted += 1
        except (psutil.Error, AttributeError):
            continue
    return total / 2**20, counted


def _start_trial(ctx: harness.Context, library: peers.Library) -> harness.Outcome:
    reports = ctx.reports
    release = reports.release_channel()
    tokens = [reports.token() for _ in range(P7_WORKERS)]
    scope = peers.ProcessScope()
    began = probes.now_ns()
    handle = peers.Opened(library, library.make(P7_WORKERS, "spawn"), scope)
    try:
        futures = [
            library.submit(handle.pool, jobs.hold, reports.path, token, release.path, P7_LIMIT_S)
            for token in tokens
        ]
        seen = reports.collect(tokens, P7_LIMIT_S)
        ready = probes.now_ns()
        pids = {pid for pid, _ in seen.values()}
        pss_mb, processes = _pool_pss(scope.processes())
        release.open()
        cf.wait(futures, timeout=harness.RESULT_LIMIT_S)
    finally:
        peers.close(handle)
        release.close()
    if len(pids) < P7_WORKERS:
        return f"only {len(pids)} distinct workers answered within {P7_LIMIT_S:.0f} s"
    return {
        "ready": ready - began,
        "pss_mb": pss_mb,
        "processes": processes,
        "leftovers": handle.leftovers,
    }


def figure_p7(ctx: harness.Context) -> dict[str, Any]:
    plan = ctx.plan

    def body(library: peers.Library) -> dict[str, Any]:
        good: list[dict[str, Any]] = []
        failures: list[str] = []
        for index in range(plan.p7_repeats):
            ctx.say(f"P7 start {P7_WORKERS} workers (spawn), run {index + 1}: {library.name}")
            outcome = _start_trial(ctx, library)
            if isinstance(outcome, str):
                failures.append(outcome)
                break
            good.append(outcome)
        row: dict[str, Any] = {"failures": failures}
        if not good:
            row["status"] = failures[0] if failures else "no run"
            return row
        row.update(harness.summaries(good, ("ready",)))
        row["pss_mb"] = stats.median([g["pss_mb"] for g in good])
        row["processes"] = max(g["processes"] for g in good)
        leftovers = sum(g["leftovers"] for g in good)
        row["notes"] = [f"{leftovers} process(es) left after shutdown, killed"] if leftovers else []
        return row

    rows = harness.each_library(ctx, peers.LIBRARIES, "spawn", body)
    harness.ratios(rows, lambda row: row["ready"]["median_ms"])
    return {"workers": P7_WORKERS, "method": "spawn", "rows": rows}
