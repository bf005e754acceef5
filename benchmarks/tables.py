"""The terminal tables of the executor figures that measure speed, start-up, payloads.

    P1 round trip, P2 throughput, P7 32 workers ready, P8 cost per job and map(),
    P9 large payloads

and the cell helpers every table shares (stop_tables.py holds P3-P5).  Each
table takes the figure's dict as ``figures.run`` left it in ``result["figures"]``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable

try:
    from benchmarks import jobs, stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import stats  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

__all__ = [
    "fmt",
    "ms_cells",
    "notes_cell",
    "ratio_cell",
    "status_or",
    "table",
    "table_p1",
    "table_p2",
    "table_p7",
    "table_p8",
    "table_p9",
]

fmt = stats.format_ms


def status_or(
    row: dict[str, Any], width: int, cells: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """The row's cells, or dashes and its status in the last (notes) cell."""
    if "status" in row:
        notes = notes_cell(row)
        return [*["-"] * (width - 1), row["status"] + (f"; {notes}" if notes else "")]
    return cells(row)


def ratio_cell(row: dict[str, Any]) -> str:
    value = row.get("vs_stdlib")
    return "-" if value is None else f"{value:.2f}x"


def notes_cell(row: dict[str, Any]) -> str:
    parts = []
    failures = row.get("failures") or []
    if failures:
        counted = collections.Counter(failures)
        parts += [f"{what} ({n}x)" if n > 1 else what for what, n in counted.items()]
    parts += row.get("notes") or []
    return "; ".join(parts)


def table(
    title: str,
    head: Sequence[str],
    rows: Iterable[dict[str, Any]],
    cells: Callable[[dict[str, Any]], list[str]],
    lead: Sequence[str] = ("library",),
) -> str:
    """The title, then a line per row: the row's ``lead`` fields, then its cells (or
    dashes and its status, see ``status_or``)."""
    width = len(head) - len(lead)
    lines = [[*(str(row[key]) for key in lead), *status_or(row, width, cells)] for row in rows]
    return title + "\n" + stats.format_table(head, lines)


def ms_cells(summary: dict[str, Any] | None) -> list[str]:
    if not summary or not summary.get("n"):
        return ["-", "-"]
    return [fmt(summary["median_ms"]), fmt(summary["p99_ms"])]


def table_p1(figure: dict[str, Any]) -> str:
    return table(
        f"P1  no-op round trip, submit -> result one at a time ({figure['workers']} workers, "
        f"{figure['method']}, warm)   target cancelk <= 0.5x stdlib",
        ["library", "n", "p50 ms", "p99 ms", "p50 vs stdlib", "notes"],
        figure["rows"],
        lambda r: [
            str(r["summary"]["n"]),
            *ms_cells(r["summary"]),
            ratio_cell(r),
            notes_cell(r),
        ],
    )


def table_p2(figure: dict[str, Any]) -> str:
    return table(
        f"P2  throughput: {figure['jobs']} no-op jobs submitted, then gathered "
        f"({figure['workers']} workers, {figure['method']}; rounds of one run per library, "
        "each in a fresh pool)   target cancelk >= 1.5x stdlib"
        + (", >= 1.2x Pebble" if figure.get("versus_pebble") else ""),
        ["library", "runs", "jobs/s p50", "jobs/s worst", "us/job", "vs stdlib", "notes"],
        figure["rows"],
        lambda r: [
            str(r["runs"]),
            f"{r['jobs_per_s_median']:.0f}",
            f"{r['jobs_per_s_worst']:.0f}",
            f"{r['us_per_job_median']:.1f}",
            ratio_cell(r),
            notes_cell(r),
        ],
    )


def table_p7(figure: dict[str, Any]) -> str:
    return table(
        f"P7  start {figure['workers']} workers with spawn: constructor -> {figure['workers']} "
        "distinct worker pids answered; total PSS of the pool's processes   target cancelk "
        "<= 0.25x stdlib",
        [
            "library",
            "n",
            "ready p50 ms",
            "ready max ms",
            "vs stdlib",
            "PSS MB",
            "processes",
            "notes",
        ],
        figure["rows"],
        lambda r: [
            str(r["ready"]["n"]),
            fmt(r["ready"]["median_ms"], 0),
            fmt(r["ready"]["max_ms"], 0),
            ratio_cell(r),
            f"{r['pss_mb']:.0f}",
            str(r["processes"]),
            notes_cell(r),
        ],
    )


def table_p8(figure: dict[str, Any]) -> str:
    sizes: list[str] = []
    for row in figure["rows"]:
        sizes += [size for size in row.get("us_per_job", {}) if size not in sizes]
    part = table(
        f"P8  cost per job at growing counts ({figure['workers']} workers, {figure['method']}, "
        f"at most {figure['window']} jobs in flight)   target: flat",
        ["library", *[f"us/job @{int(s):,}" for s in sizes], "largest/smallest", "notes"],
        figure["rows"],
        lambda r: [
            *[f"{r['us_per_job'][s]:.1f}" if s in r["us_per_job"] else "-" for s in sizes],
            "-" if math.isnan(r["flatness"]) else f"{r['flatness']:.2f}",
            notes_cell(r),
        ],
    )
    mapped = [{"library": row["library"], **row["map"]} for row in figure["rows"] if row.get("map")]
    return (
        part
        + "\n\n"
        + table(
            "P8  map(fn, itertools.count(), buffersize=64): user process RSS while taking "
            "results   target: bounded",
            [
                "library",
                "results",
                "s",
                "RSS start MB",
                "RSS max MB",
                "growth MB",
                "growth after 10% MB",
                "notes",
            ],
            mapped,
            lambda m: [
                f"{m['items']:,}",
                f"{m['seconds']:.1f}",
                f"{m['rss_start_mb']:.1f}",
                f"{m['rss_max_mb']:.1f}",
                f"{m['growth_mb']:+.1f}",
                f"{m['growth_after_10pct_mb']:+.1f}",
                "",
            ],
        )
    )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_p9(figure: dict[str, Any]) -> str:
    rows = [
        {
            **row,
            "size": f"{row['size_mb']} MB" if "size_mb" in row else "-",
            "job": jobs.PAYLOAD_LABELS.get(row.get("variant", ""), "-"),
        }
        for row in figure["rows"]
    ]
    return table(
        f"P9  large payloads: n bytes as argument and/or result ({figure['workers']} workers, "
        f"{figure['method']}; a fresh interpreter per library, a fresh pool per series): ms "
        "per call; peak RSS and its growth during the series, of the user process and of the "
        f"job process (memory: {figure['memory']})   target cancelk <= 1.0x stdlib",
        [
            "size",
            "job",
            "library",
            "n",
            "p50 ms",
            "p99 ms",
            "vs stdlib",
            "user peak MB",
            "user +MB",
            "vs stdlib",
            "job peak MB",
            "job +MB",
            "vs stdlib",
            "notes",
        ],
        rows,
        lambda r: [
            str(r["time"]["n"]),
            *ms_cells(r["time"]),
            _times(r.get("vs_stdlib", {}).get("time")),
            _mb(r["user_peak_mb"]),
            _mb(r["user_growth_mb"]),
            _times(r.get("vs_stdlib", {}).get("user")),
            _mb(r["job_peak_mb"]),
            _mb(r["job_growth_mb"]),
            _times(r.get("vs_stdlib", {}).get("job")),
            notes_cell(r),
        ],
        lead=("size", "job", "library"),
    )
