"""Measure the executor figures: ``run(...)`` returns a JSON-ready dict.

Design section 5 (P1-P5, P7-P9) for ``cancelk.ProcessPoolExecutor`` beside the
stdlib pool and its peers, every library driven through its own API (peers.py);
a library that is not installed is listed as such.  Where each figure is
measured:

    speed.py    P1 round trip, P2 throughput, P8 cost per job and map(buffersize=)
    stops.py    P3 time limits, P4 cancel, P5 kill -> next job
    floor.py    the kernel's floor under P3 and P4 (measured after them, whenever
                either runs) and cancelk's overhead over it
    startup.py  P7 32 spawned workers ready, and their memory
    payloads.py P9 1 / 10 / 100 MB arguments and results: time, peak memory

How the times are taken: see probes.py (the FIFO of job starts, pidfds) and
stops.py.  The user process never busy-waits, so on a 2-core machine it does not
compete with the pool it measures.  The tables are report.py's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Callable

try:
    from benchmarks import floor, harness, payloads, peers, quiet, speed, startup, stats, stops
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import floor  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]
    import payloads  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]
    import quiet  # type: ignore[no-redef]
    import speed  # type: ignore[no-redef]
    import startup  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]
    import stops  # type: ignore[no-redef]

__all__ = ["EXECUTOR_FIGURES", "FIGURE_FUNCTIONS", "run"]

EXECUTOR_FIGURES = ("P1", "P2", "P3", "P4", "P5", "P7", "P8", "P9")

FIGURE_FUNCTIONS: dict[str, Callable[[harness.Context], dict[str, Any]]] = {
    "P1": speed.figure_p1,
    "P2": speed.figure_p2,
    "P3": stops.figure_p3,
    "P4": stops.figure_p4,
    "P5": stops.figure_p5,
    "P7": startup.figure_p7,
    "P8": speed.figure_p8,
    "P9": payloads.figure_p9,
    "floor": floor.figure_floor,
}


def _order(figures: Sequence[str]) -> list[str]:
    """The figures in the order asked, the floor right after the last of P3 / P4."""
    order = list(figures)
    stopping = [index for index, name in enumerate(order) if name in ("P3", "P4")]
    if stopping:
        order.insert(stopping[-1] + 1, "floor")
    return order


def run(
    figures: Sequence[str] = EXECUTOR_FIGURES,
    quick: bool = False,
    full: bool = False,
    start_method: str = "fork",
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
    capture: quiet.Uncaptured = quiet.UNCAPTURED,
) -> dict[str, Any]:
    """Measure the figures asked for; a JSON-ready dict (see ``report.format_report``).
    With a ``quiet.Capture``, errors the libraries write go into their rows' notes."""
    try:
        import psutil  # noqa: F401
    except ImportError as why:
        raise SystemExit(
            "the executor benchmark needs psutil: pip install 'cancelk[bench]'"
        ) from why
    say = progress or (lambda _message: None)
    plan = harness.make_plan(quick, full)
    machine = stats.machine_info()
    began = time.monotonic()
    ctx = harness.Context(plan, start_method, workers, say, capture)
    results: dict[str, Any] = {}
    try:
        for name in _order(figures):
            figure_began = time.monotonic()
            results[name] = FIGURE_FUNCTIONS[name](ctx)
            results[name]["elapsed_s"] = round(time.monotonic() - figure_began, 1)
        if "floor" in results:
            results["floor"]["over_floor"] = floor.over_floor(results)
    finally:
        ctx.reports.close()
    return {
        "benchmark": "cancelk.ProcessPoolExecutor beside its peers (P1-P5, P7-P9)",
        "machine": machine,
        "libraries": {
            lib.name: lib.version if lib.available else lib.why_unavailable
            for lib in peers.LIBRARIES
        },
        "config": {
            "start_method": start_method,
            "workers": workers,
            "quick": quick,
            "full": full,
            "plan": asdict(plan),
        },
        "figures": results,
        "elapsed_s": round(time.monotonic() - began, 1),
        "load_average_after": stats.machine_info()["load_average"],
    }
