"""Draw the executor benchmark's results: ``draw(result, "bench.png")`` writes that file.

    P3 timeout overshoot (deadline -> future done and process gone), per library
       and job kind: box plot with every sample on top, log scale
    P4 cancel latency (call -> process gone), sync and asyncio, per library
    P1 round trip: median bars with a p99 whisker
    P2 throughput: median bars

``result`` is what benchmarks/run.py collects (``{"executor": ..., "wrapper": ...}``)
or figures.run()'s dict itself.  Needs matplotlib (imported here only,
after the measurements, so it never weighs on them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["draw"]

FLOOR_MS = 0.001  # log scale: samples at or under zero are drawn here


def draw(result: dict[str, Any], path: str) -> str:
    """Write the plot to exactly ``path``; the format it has (PNG unless the name ends
    in another format matplotlib writes: savefig itself would add ``.png`` to a name
    without a suffix and refuse an unknown one)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as why:
        raise SystemExit(
            "plotting needs matplotlib: pip install matplotlib (or 'cancelk[bench]')"
        ) from why
    executor = result.get("executor", result)
    figures = executor.get("figures", {})
    panels = [name for name in ("P3", "P4", "P1", "P2") if name in figures]
    if not panels:
        raise SystemExit("nothing to plot: run at least one of P1, P2, P3, P4")
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.2 * len(panels)), squeeze=False)
    for axis, name in zip(axes[:, 0], panels):
        {"P3": _p3, "P4": _p4, "P1": _p1, "P2": _p2}[name](axis, figures[name])
    machine = executor.get("machine", {})
    fig.suptitle(
        f"cancelk benchmark - {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('python', '')}, load {machine.get('load_average')}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    suffix = os.path.splitext(path)[1][1:].lower()
    kind = suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
    with open(path, "wb") as out:
        fig.savefig(out, format=kind, dpi=110)
    plt.close(fig)
    return kind


def _positive(samples: Sequence[float]) -> list[float]:
    return [max(FLOOR_MS, s) for s in samples]


def _distributions(
    axis: Any,
    groups: list[tuple[str, list[float], str]],
    title: str,
    target_lines: Sequence[tuple[float, str]],
) -> None:
    """Box plot per group, samples jittered on top; a text in place of an empty group."""
    labels = [label for label, _, _ in groups]
    data = [_positive(samples) if samples else [math.nan] for _, samples, _ in groups]
    positions = list(range(1, len(groups) + 1))
    drawn = [(p, d) for p, d in zip(positions, data) if not math.isnan(d[0])]
    if drawn:
        axis.boxplot(
            [d for _, d in drawn],
            positions=[p for p, _ in drawn],
            widths=0.5,
            showfliers=False,
        )
    for position, (_, samples, note) in zip(positions, groups):
        if samples:
            width = 0.18
            count = len(samples)
            xs = [position - width + 2 * width * (i + 0.5) / count for i in range(count)]
            axis.scatter(xs, _positive(samples), s=6, alpha=0.5, color="tab:blue")
        else:
            axis.text(
                position,
                0.5,
                note,
                rotation=90,
                ha="center",
                va="center",
                fontsize=7,
                color="dimgray",
                transform=axis.get_xaxis_transform(),  # x in data, y in axes fraction
            )
    for value, label in target_lines:
        axis.axhline(value, linestyle="--", linewidth=0.8, color="tab:red")
        axis.text(0.5, value, f" {label}", color="tab:red", fontsize=7, va="bottom")
    axis.set_yscale("log")
    axis.set_xlim(0.3, len(groups) + 0.7)
    axis.set_xticks(positions)
    axis.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("ms (log)")
    axis.set_title(title, fontsize=10)


def _why_empty(row: dict[str, Any]) -> str:
    if "status" in row:
        return _wrap(str(row["status"]))
    failures = row.get("failures") or []
    return _wrap(str(failures[0])) if failures else "no sample"


def _wrap(text: str, width: int = 28) -> str:
    """Break a note into short lines (it is drawn vertically in a narrow column)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines[:3])


def _p3(axis: Any, figure: dict[str, Any]) -> None:
    groups = []
    for row in figure["rows"]:
        if "kind" not in row:
            groups.append((row["name"], [], _why_empty(row)))
            continue
        samples = row.get("all", {}).get("samples_ms", []) if "status" not in row else []
        groups.append((f"{row['name']}\n{row['kind']}", samples, _why_empty(row)))
    _distributions(
        axis,
        groups,
        "P3 timeout 50 ms: deadline -> future done and process gone",
        [(0.5, "p50 target"), (2.0, "p99 target")],
    )


def _p4(axis: Any, figure: dict[str, Any]) -> None:
    groups = []
    for part, label in (("sync", ""), ("asyncio", "asyncio ")):
        for row in figure[part]:
            samples = row.get("gone", {}).get("samples_ms", []) if "status" not in row else []
            api = row.get("api", "")
            name = f"{label}{row['name']}\n{api}" if part == "sync" else f"{label}{row['name']}"
            groups.append((name, samples, _why_empty(row)))
    _distributions(
        axis,
        groups,
        "P4 cancel of a running job -> its process gone",
        [(1.0, "sync p99 target"), (2.0, "asyncio p99 target")],
    )


def _bars(axis: Any, rows: list[dict[str, Any]], heights: list[float], errors: Any) -> None:
    names = [row["name"] for row in rows]
    axis.bar(names, heights, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    for index, row in enumerate(rows):
        if "status" in row:
            axis.text(index, 0, str(row["status"])[:30], rotation=90, ha="center", fontsize=7)


def _p1(axis: Any, figure: dict[str, Any]) -> None:
    rows = figure["rows"]
    medians = [row["summary"]["median_ms"] if "summary" in row else 0.0 for row in rows]
    p99 = [row["summary"]["p99_ms"] if "summary" in row else 0.0 for row in rows]
    errors = [[0.0] * len(rows), [max(0.0, hi - lo) for lo, hi in zip(medians, p99)]]
    _bars(axis, rows, medians, errors)
    axis.set_ylabel("ms")
    axis.set_title("P1 no-op round trip: median, whisker to p99", fontsize=10)


def _p2(axis: Any, figure: dict[str, Any]) -> None:
    rows = figure["rows"]
    rates = [row.get("jobs_per_s_median", 0.0) for row in rows]
    _bars(axis, rows, rates, None)
    axis.set_ylabel("jobs/s")
    axis.set_title(f"P2 throughput: {figure['jobs']} no-op jobs, median of runs", fontsize=10)
