"""Shared helpers for the benchmarks: summaries, machine description, table, JSON.

    samples (ns) --summarize--> {"n", "median_ms", "p99_ms", "min_ms", "max_ms"}
    rows of cells --format_table--> aligned text for the terminal
    machine_info() --machine_line--> the header line; a result --elapsed_line--> the last
    result dict --dump_json--> file

Percentiles use the nearest-rank method: p99 of fewer than 100 samples is the
largest one, which is what an honest p99 of a small run can say.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "dump_json",
    "elapsed_line",
    "format_ms",
    "format_table",
    "machine_info",
    "machine_line",
    "median",
    "percentile",
    "summarize",
]

NS_PER_MS = 1_000_000


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def median(samples: Sequence[float]) -> float:
    """The middle value (mean of the two middle ones for an even count); NaN if empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2


def summarize(samples_ns: Sequence[float]) -> dict[str, Any]:
    """Median, p99, min and max in milliseconds, with the sample count."""
    as_ms = [s / NS_PER_MS for s in samples_ns]
    return {
        "n": len(as_ms),
        "median_ms": median(as_ms),
        "p99_ms": percentile(as_ms, 99),
        "min_ms": min(as_ms) if as_ms else math.nan,
        "max_ms": max(as_ms) if as_ms else math.nan,
    }


def format_ms(value: float | None, digits: int = 3) -> str:
    """A millisecond figure for a table cell; '-' when there is none."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, kernel, Python, load at the start."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable_bits": 64 if sys.maxsize > 2**32 else 32,
        "load_average": _load_average(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """``machine_info()`` in one line of a report's header."""
    return (
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']} "
        f"{machine['kernel']} {machine['machine']}, {machine['python']}"
    )


def elapsed_line(result: dict[str, Any]) -> str:
    """The last line of a report: how long the run took, how busy the machine was."""
    return (
        f"elapsed {result['elapsed_s']} s; load average before "
        f"{result['machine']['load_average']}, after {result['load_average_after']} "
        "(other work on the machine widens the tails)"
    )


def _load_average() -> list[float] | None:
    """1, 5, 15 minute load: a busy machine explains noisy tails."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def dump_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN becomes null)."""
    with open(path, "w", encoding="utf-8") as out:
        json.dump(_no_nan(data), out, indent=2, sort_keys=True)
        out.write("\n")


def _no_nan(data: Any) -> Any:
    if isinstance(data, float) and math.isnan(data):
        return None
    if isinstance(data, dict):
        return {key: _no_nan(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_no_nan(value) for value in data]
    return data
