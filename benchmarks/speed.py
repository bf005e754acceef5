"""How fast a warm pool runs no-op jobs: P1 round trip, P2 throughput, P8 scale.

    P1  submit -> result one at a time, warm pool             target <= 0.5 x stdlib
    P2  N no-op jobs submitted at once, then gathered         target >= 1.5 x stdlib
    P8  cost per job at 10^3 .. 10^5 (10^6 with --full) jobs; map(fn, count(),
        buffersize=64) over an endless iterator keeps the user process's RSS bounded

Each returns a JSON-ready dict with one row per library (see report.py).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import math
import sys
import time
from typing import Any

try:
    from benchmarks import harness, jobs, peers, stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import harness  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

__all__ = ["figure_p1", "figure_p2", "figure_p8"]


def figure_p1(ctx: harness.Context) -> dict[str, Any]:
    plan = ctx.plan

    def body(library: peers.Library) -> dict[str, Any]:
        ctx.say(f"P1 round trip: {library.name}")
        clock = time.perf_counter_ns
        samples: list[int] = []
        with peers.opened(library, ctx.workers, ctx.method) as handle:
            pool = handle.pool
            harness.warm(library, pool, ctx.workers)
            for _ in range(plan.p1_warmup):
                library.submit(pool, jobs.noop).result(timeout=harness.RESULT_LIMIT_S)
            for _ in range(plan.p1_trips):
                start = clock()
                library.submit(pool, jobs.noop).result(timeout=harness.RESULT_LIMIT_S)
                samples.append(clock() - start)
        return {"summary": stats.summarize(samples), "notes": harness.handle_notes(handle)}

    rows = harness.each_library(ctx, peers.LIBRARIES, ctx.method, body)
    harness.ratios(rows, lambda row: row["summary"]["median_ms"])
    return {"workers": ctx.workers, "method": ctx.method, "rows": rows}


def _throughput_run(
    library: peers.Library, pool: Any, n: int, window: int | None = None
) -> int | str:
    """ns to run ``n`` no-op jobs (all submitted, then gathered; or ``window`` in flight)."""
    limit_s = max(60.0, n / 500)
    clock = time.perf_counter_ns
    start = clock()
    end_by = time.monotonic() + limit_s
    if window is None:
        futures = [library.submit(pool, jobs.noop) for _ in range(n)]
        done, not_done = cf.wait(futures, timeout=max(0.0, end_by - time.monotonic()))
        if not_done:
            return f"{len(done)} of {n} jobs done after {limit_s:.0f} s"
        for future in futures:
            future.result()
        return clock() - start
    flight: collections.deque[cf.Future[Any]] = collections.deque()
    for _ in range(n):
        flight.append(library.submit(pool, jobs.noop))
        if len(flight) >= window:
            flight.popleft().result(timeout=max(0.0, end_by - time.monotonic()))
    while flight:
        flight.popleft().result(timeout=max(0.0, end_by - time.monotonic()))
    return clock() - start


def figure_p2(ctx: harness.Context) -> dict[str, Any]:
    """Rounds of one run per library, each in a fresh pool, the order reversed
    every other round: what the machine does meanwhile weighs on every library
    alike, and neighbours (cancelk and Pebble) run next to each other, each
    first in turn, so each round gives a ratio of runs made side by side."""
    plan = ctx.plan
    libraries = list(peers.LIBRARIES)
    runs: dict[str, list[int]] = {library.name: [] for library in libraries}
    failures: dict[str, str] = {}
    notes: dict[str, list[str]] = {library.name: [] for library in libraries}
    for round_index in range(plan.p2_repeats):
        for library in libraries[:: -1 if round_index % 2 else 1]:
            if not library.available or library.name in failures:
                continue
            ctx.say(
                f"P2 throughput, {plan.p2_jobs} jobs, round {round_index + 1} of "
                f"{plan.p2_repeats}: {library.name}"
            )
            took = _p2_round(ctx, library, notes[library.name])
            if isinstance(took, str):
                failures[library.name] = took
            else:
                runs[library.name].append(took)

    def body(library: peers.Library) -> dict[str, Any]:
        row: dict[str, Any] = {"notes": list(dict.fromkeys(notes[library.name]))}
        if library.name in failures:
            row["status"] = f"did not finish: {failures[library.name]}"
            return row
        rates = [plan.p2_jobs / (ns / 1e9) for ns in runs[library.name]]
        row.update(
            {
                "runs": len(rates),
                "jobs_per_s": rates,
                "jobs_per_s_median": stats.median(rates),
                "jobs_per_s_worst": min(rates),
                "us_per_job_median": stats.median(runs[library.name]) / plan.p2_jobs / 1e3,
            }
        )
        return row

    rows = harness.each_library(ctx, libraries, ctx.method, body)
    harness.ratios(rows, lambda row: row["jobs_per_s_median"])
    figure = {"workers": ctx.workers, "method": ctx.method, "jobs": plan.p2_jobs, "rows": rows}
    figure["versus_pebble"] = _versus(rows, "pebble")
    return figure


def _p2_round(ctx: harness.Context, library: peers.Library, notes: list[str]) -> int | str:
    """ns for one run of ``plan.p2_jobs`` no-op jobs in a fresh, warm pool, or why not."""
    with ctx.capture.heard() as heard:
        try:
            with peers.opened(library, ctx.workers, ctx.method) as handle:
                harness.warm(library, handle.pool, ctx.workers)
                took = _throughput_run(library, handle.pool, ctx.plan.p2_jobs)
            notes.extend(harness.handle_notes(handle))
        except Exception as why:
            took = f"error: {type(why).__name__}: {why}"
    notes.extend(heard)
    return took


def _versus(rows: list[dict[str, Any]], peer: str) -> dict[str, Any] | None:
    """cancelk's rate over ``peer``'s: of the medians, and round by round."""
    mine = next((r for r in rows if r["name"] == "cancelk" and "status" not in r), None)
    theirs = next((r for r in rows if r["name"] == peer and "status" not in r), None)
    if mine is None or theirs is None:
        return None
    by_round = [a / b for a, b in zip(mine["jobs_per_s"], theirs["jobs_per_s"])]
    return {
        "peer": theirs["library"],
        "of_medians": mine["jobs_per_s_median"] / theirs["jobs_per_s_median"],
        "by_round": by_round,
        "worst_round": min(by_round),
    }


def _map_rss(library: peers.Library, pool: Any, items: int) -> dict[str, Any]:
    import psutil

    me = psutil.Process()
    step = max(1, items // 50)
    limit_s = max(120.0, items / 500)
    samples: list[int] = [me.memory_info().rss]
    results = pool.map(jobs.identity, itertools.count(), buffersize=64)
    began = time.monotonic()
    taken = 0
    try:
        for taken, value in enumerate(results, 1):
            if value != taken - 1:
                return {"status": f"wrong result {value!r} at {taken - 1}"}
            if taken % step == 0:
                samples.append(me.memory_info().rss)
                if time.monotonic() - began > limit_s:
                    break
            if taken >= items:
                break
    finally:
        results.close()
    elapsed = time.monotonic() - began
    mb = [s / 2**20 for s in samples]
    warm = mb[min(len(mb) - 1, max(1, len(mb) // 10))]
    return {
        "items": taken,
        "seconds": elapsed,
        "rss_start_mb": mb[0],
        "rss_after_10pct_mb": warm,
        "rss_max_mb": max(mb),
        "rss_end_mb": mb[-1],
        "growth_mb": mb[-1] - mb[0],
        "growth_after_10pct_mb": mb[-1] - warm,
        "rss_samples_mb": [round(m, 2) for m in mb],
    }


def figure_p8(ctx: harness.Context) -> dict[str, Any]:
    plan = ctx.plan
    libraries = [peers.by_name("stdlib"), peers.by_name("cancelk")]

    def body(library: peers.Library) -> dict[str, Any]:
        per_job: dict[str, float] = {}
        failures: list[str] = []
        with peers.opened(library, ctx.workers, ctx.method) as handle:
            harness.warm(library, handle.pool, ctx.workers)
            for n in plan.p8_sizes:
                ctx.say(f"P8 cost per job, {n} jobs: {library.name}")
                took = _throughput_run(library, handle.pool, n, window=4096)
                if isinstance(took, str):
                    failures.append(took)
                    break
                per_job[str(n)] = took / n / 1e3
            if _has_buffersize(library):
                ctx.say(f"P8 map(buffersize=64) over count(), {plan.p8_map_items}: {library.name}")
                mapped: dict[str, Any] = _map_rss(library, handle.pool, plan.p8_map_items)
            else:
                mapped = {
                    "status": "map(buffersize=) needs Python 3.14 "
                    f"(this is {sys.version.split()[0]})"
                }
        values = list(per_job.values())
        row: dict[str, Any] = {
            "us_per_job": per_job,
            "flatness": values[-1] / values[0] if len(values) > 1 else math.nan,
            "map": mapped,
            "failures": failures,
            "notes": harness.handle_notes(handle),
        }
        return row

    rows = harness.each_library(ctx, libraries, ctx.method, body)
    return {"workers": ctx.workers, "method": ctx.method, "window": 4096, "rows": rows}


def _has_buffersize(library: peers.Library) -> bool:
    if library.name == "cancelk":
        return True
    return library.name == "stdlib" and sys.version_info >= (3, 14)
