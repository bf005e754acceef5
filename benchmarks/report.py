"""The report of the executor figures: header, one table per figure, verdicts.

    format_report(result)  the whole text for a ``figures.run`` result
    verdicts(result)       one line per target of design section 5, for cancelk

The tables themselves are in tables.py and stop_tables.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

try:
    from benchmarks import floor, harness, jobs, stats, stop_tables, tables
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import floor  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]
    import stop_tables  # type: ignore[no-redef]
    import tables  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

__all__ = ["format_header", "format_report", "verdicts"]

fmt = tables.fmt

TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "P1": tables.table_p1,
    "P2": tables.table_p2,
    "P3": stop_tables.table_p3,
    "P4": stop_tables.table_p4,
    "P5": stop_tables.table_p5,
    "floor": stop_tables.table_floor,
    "P7": tables.table_p7,
    "P8": tables.table_p8,
    "P9": tables.table_p9,
}


def _row(rows: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for row in rows:
        if row["name"] == name and "status" not in row:
            return row
    return None


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _versus_stdlib(
    rows: Sequence[dict[str, Any]], what: str, target: float, most: bool
) -> list[str]:
    """The verdict on cancelk's ``vs_stdlib`` ratio: at most (or at least) ``target``."""
    row = _row(rows, "cancelk")
    if not row or "vs_stdlib" not in row:
        return []
    ratio = row["vs_stdlib"]
    ok = ratio <= target if most else ratio >= target
    return [f"{what} {ratio:.2f}x stdlib (target {'<=' if most else '>='} {target:g}): {_met(ok)}"]


def _verdicts_p3(figure: dict[str, Any]) -> list[str]:
    lines = []
    for row in figure["rows"]:
        if row["name"] != "cancelk" or "kind" not in row or "status" in row:
            continue
        both = row["all"]
        ok = both["n"] > 0 and both["median_ms"] <= 0.5 and both["p99_ms"] <= 2.0
        lines.append(
            f"P3 {harness.KIND_LABELS[row['kind']]}: both p50 {fmt(both['median_ms'])} / p99 "
            f"{fmt(both['p99_ms'])} ms (target 0.5 / 2), failed trials "
            f"{len(row['failures'])}: {_met(ok and not row['failures'])}"
        )
    return lines


def _verdicts_p4(figure: dict[str, Any]) -> list[str]:
    lines = []
    for part, target in (("sync", 1.0), ("asyncio", 2.0)):
        row = _row(figure[part], "cancelk")
        if row:
            gone = row["gone"]
            ok = gone["n"] > 0 and gone["p99_ms"] <= target and not row["failures"]
            lines.append(
                f"P4 {part} cancel -> gone p99 {fmt(gone['p99_ms'])} ms "
                f"(target <= {target:g}): {_met(ok)}"
            )
    return lines


def _verdicts_p5(figure: dict[str, Any]) -> list[str]:
    lines = []
    for row in figure["rows"]:
        if row["name"] != "cancelk" or "status" in row:
            continue
        start = row["next_start"]
        ok = start["n"] > 0 and start["median_ms"] <= 5.0 and not row["failures"]
        lines.append(
            f"P5 {row['method']}, initializer {row['initializer']}: next job "
            f"starts p50 {fmt(start['median_ms'])} ms (target <= 5): {_met(ok)}"
        )
    return lines


def _verdicts_p7(figure: dict[str, Any]) -> list[str]:
    row = _row(figure["rows"], "cancelk")
    lines = _versus_stdlib(figure["rows"], "P7 start 32 workers (spawn)", 0.25, most=True)
    return [f"{line}; PSS {row['pss_mb']:.0f} MB" for line in lines] if row else []


def _verdicts_floor(figure: dict[str, Any]) -> list[str]:
    return [
        f"{row['what']}: p50 {fmt(row['cancelk_p50_ms'])}, floor "
        f"({row.get('floor', 'measured apart')}) {fmt(row['floor_p50_ms'])}, overhead "
        f"{row['overhead_ms']:+.3f} ms (target overhead <= "
        f"{floor.OVERHEAD_TARGET_MS:g}): {_met(row['met'])}"
        for row in figure.get("over_floor", [])
    ]


def _verdicts_p8(figure: dict[str, Any]) -> list[str]:
    row = _row(figure["rows"], "cancelk")
    if not row:
        return []
    lines = []
    flat = row["flatness"]
    if not math.isnan(flat):
        lines.append(
            f"P8 cost per job largest/smallest count {flat:.2f} "
            f"(flat taken as <= 1.5): {_met(flat <= 1.5)}"
        )
    mapped = row["map"]
    if "growth_after_10pct_mb" in mapped:
        growth = mapped["growth_after_10pct_mb"]
        lines.append(
            f"P8 map(buffersize=64) RSS growth after the first 10%: "
            f"{growth:+.1f} MB over {mapped['items']:,} results (bounded taken "
            f"as < 10 MB): {_met(growth < 10)}"
        )
    return lines


P9_MEASURES = {
    "time": "time per call (p50)",
    "user": "user process peak RSS growth",
    "job": "job process peak RSS growth",
}


def _worst_ratio(rows: Sequence[dict[str, Any]], what: str) -> tuple[float, str] | None:
    """The largest cancelk / stdlib ratio of one P9 measure, and which series it is."""
    ratios = [
        (row["vs_stdlib"][what], f"{row['size_mb']} MB {jobs.PAYLOAD_LABELS[row['variant']]}")
        for row in rows
        if row.get("vs_stdlib", {}).get(what) is not None
    ]
    return max(ratios) if ratios else None


def _verdicts_p9(figure: dict[str, Any]) -> list[str]:
    worst = {what: _worst_ratio(figure["rows"], what) for what in P9_MEASURES}
    return [
        f"P9 {P9_MEASURES[what]}: worst {ratio:.2f}x stdlib ({where}; target <= 1.0): "
        f"{_met(ratio <= 1.0)}"
        for what, found in worst.items()
        if found
        for ratio, where in [found]
    ]


P2_VERSUS_PEBBLE = 1.2


def _verdicts_p2(figure: dict[str, Any]) -> list[str]:
    lines = _versus_stdlib(figure["rows"], "P2 throughput", 1.5, most=False)
    versus = figure.get("versus_pebble")
    if versus:
        rounds = ", ".join(f"{ratio:.2f}" for ratio in versus["by_round"])
        lines.append(
            f"P2 throughput {versus['of_medians']:.2f}x {versus['peer']} (of the medians; "
            f"target >= {P2_VERSUS_PEBBLE:g}): {_met(versus['of_medians'] >= P2_VERSUS_PEBBLE)}; "
            f"round by round {rounds}"
        )
    return lines


VERDICTS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "P1": lambda figure: _versus_stdlib(figure["rows"], "P1 round trip", 0.5, most=True),
    "P2": _verdicts_p2,
    "P3": _verdicts_p3,
    "P4": _verdicts_p4,
    "floor": _verdicts_floor,
    "P5": _verdicts_p5,
    "P7": _verdicts_p7,
    "P8": _verdicts_p8,
    "P9": _verdicts_p9,
}


def verdicts(result: dict[str, Any]) -> list[str]:
    """One line per target, for cancelk."""
    figures = result["figures"]
    return [line for name in VERDICTS if name in figures for line in VERDICTS[name](figures[name])]


def format_header(result: dict[str, Any]) -> str:
    libraries = ", ".join(f"{name} {version}" for name, version in result["libraries"].items())
    return "\n".join(
        [
            stats.machine_line(result["machine"]),
            f"libraries: {libraries}",
            f"load average at start {result['machine']['load_average']}",
        ]
    )


def format_report(result: dict[str, Any]) -> str:
    """The terminal tables for a ``figures.run`` result."""
    config = result["config"]
    parts = [
        f"cancelk.ProcessPoolExecutor benchmark - start method {config['start_method']}, "
        f"{config['workers']} workers{' (quick)' if config['quick'] else ''}\n"
        + format_header(result)
    ]
    for name, figure in result["figures"].items():
        parts.append(TABLES[name](figure) + f"\n({name} took {figure['elapsed_s']} s)")
    lines = verdicts(result)
    if lines:
        parts.append("targets (cancelk):\n" + "\n".join(f"  {line}" for line in lines))
    parts.append(stats.elapsed_line(result))
    return "\n\n".join(parts)
