"""The report of the killable_wrapper benchmark: P6 and P3 tables, the stdlib
contrast and the verdicts, for a ``wrapper_bench.run`` result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from benchmarks import stats
    from benchmarks.wrapper_jobs import KIND_LABELS, KINDS
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import stats  # type: ignore[no-redef]
    from wrapper_jobs import KIND_LABELS, KINDS  # type: ignore[no-redef]

__all__ = ["format_report"]


def _cells(summary: dict[str, Any]) -> list[str]:
    return [stats.format_ms(summary["median_ms"]), stats.format_ms(summary["p99_ms"])]


def _backend_columns(backends: Sequence[str]) -> list[str]:
    return [f"{b} {what}" for b in backends for what in ("p50", "p99")]


P6_TARGET_MS = 0.5  # the design's raised P6 figure (it was 2 ms)
OVERHEAD_TARGET_MS = 0.3  # P3 over its floor: the design's raised P3

P6_ROWS = (
    ("p6_in_worker", "noop", "in worker: noop()"),
    ("p6_in_worker", "killable_wrapper", "in worker: killable_wrapper(noop)"),
    ("p6_in_worker", "overhead", "in worker: OVERHEAD"),
    ("p6_in_worker", "back_to_back", "in worker: back to back (standbys' pace)"),
    ("p6_in_worker", "after_fork_overhead", "in worker: OVERHEAD after a fork of it"),
    ("p6_in_worker", "fresh", "in worker: forked at the call (fresh=True)"),
    ("p6_in_worker", "fresh_overhead", "in worker: OVERHEAD, forked at the call"),
    ("p6_in_worker", "fork_exit_reap", "in worker: bare fork+_exit+waitpid"),
    ("p6_in_worker", "handoff_floor", "in worker: FLOOR, job to an idle pre-forked copy"),
    ("p6_round_trip", "plain", "round trip: submit(noop)"),
    ("p6_round_trip", "killable_wrapper", "round trip: submit(killable_wrapper, noop)"),
    ("p6_round_trip", "overhead", "round trip: OVERHEAD"),
)


def _p6_table(measured: dict[str, Any]) -> str:
    names = list(measured)
    rows = []
    for section, key, label in P6_ROWS:
        if any(key not in measured[name][section] for name in names):
            continue  # a result from before the row existed
        row = [label, str(measured[names[0]][section][key]["n"])]
        for name in names:
            row += _cells(measured[name][section][key])
        rows.append(row)
    return stats.format_table(["figure (ms)", "n", *_backend_columns(names)], rows)


P3_ROWS = (
    ("raised", "raised"),
    ("gone", "all gone"),
    ("floor", "floor: killed"),
    ("over_floor", "OVER FLOOR"),
)


def _p3_table(measured: dict[str, Any]) -> str:
    names = list(measured)
    rows = []
    if all("p3_floor" in measured[name] for name in names):
        floor = measured[names[0]]["p3_floor"]
        size = f", {floor['child_rss_mb']:.0f} MB" if floor["child_rss_mb"] else ""
        row = [f"fresh fork of the worker{size}, killed at once", "exited", str(floor["exit"]["n"])]
        for name in names:
            row += _cells(measured[name]["p3_floor"]["exit"])
        rows.append(row)
    for kind in KINDS:
        for key, what in P3_ROWS:
            if any(key not in measured[name]["p3"][kind] for name in names):
                continue  # no pidfds: no paired floor
            row = [KIND_LABELS[kind] if key == "raised" else "", what]
            row.append(str(measured[names[0]]["p3"][kind][key]["n"]))
            for name in names:
                row += _cells(measured[name]["p3"][kind][key])
            rows.append(row)
    headers = ["job (killable_wrapper_timeout=0.05)", "deadline ->", "n", *_backend_columns(names)]
    return stats.format_table(headers, rows)


def _stdlib_table(stdlib: dict[str, Any], watch_ms: float) -> str:
    rows = []
    for kind in KINDS:
        figures = stdlib[kind]
        still = figures["still_running_after_watch"]
        busy = figures["busy_after_deadline"]
        if still:
            verdict = f"still running after {watch_ms:.0f} ms ({still}/{still + busy['n']})"
        else:
            verdict = "never stopped: the job ran to its natural end"
        rows.append(
            [
                KIND_LABELS[kind],
                str(figures["raised"]["n"]),
                stats.format_ms(figures["raised"]["median_ms"]),
                stats.format_ms(busy["median_ms"], 1),
                verdict,
            ]
        )
    headers = ["job (1 s long)", "n", "raised p50", "busy past deadline p50", "what happened"]
    return stats.format_table(headers, rows)


def _verdicts(measured: dict[str, Any]) -> list[str]:
    lines = []
    for name, result in measured.items():
        overhead = result["p6_in_worker"]["overhead"]
        ok6 = overhead["median_ms"] <= P6_TARGET_MS
        worst = max(KINDS, key=lambda kind: result["p3"][kind]["gone"]["p99_ms"])
        gone = result["p3"][worst]["gone"]
        worst50 = max(result["p3"][kind]["gone"]["median_ms"] for kind in KINDS)
        ok3 = gone["p99_ms"] <= 2.0 and worst50 <= 0.5
        failures = sum(len(result["p3"][kind]["failures"]) for kind in KINDS)
        overs = [result["p3"][kind].get("over_floor", {}).get("median_ms") for kind in KINDS]
        over = ""
        if all(value is not None and value == value for value in overs):  # none NaN
            worst_over = max(overs)
            met = worst_over <= OVERHEAD_TARGET_MS
            over = (
                f"; P3 over the paired floor, worst p50 {worst_over:.3f} ms "
                f"(target <= {OVERHEAD_TARGET_MS}) {'MET' if met else 'NOT MET'}"
            )
        handoff = result["p6_in_worker"].get("handoff_floor", {}).get("median_ms")
        handoff_note = f" (floor, a bare hand-off: {handoff:.3f})" if handoff is not None else ""
        lines.append(
            f"{name}: P6 overhead p50 {overhead['median_ms']:.3f} ms{handoff_note} "
            f"(target <= {P6_TARGET_MS}) {'MET' if ok6 else 'NOT MET'}; "
            f"P3 worst all-gone p50 {worst50:.3f} / p99 {gone['p99_ms']:.3f} ms "
            f"({KIND_LABELS[worst]}; target 0.5 / 2) {'MET' if ok3 else 'NOT MET'}{over}; "
            f"failed trials: {failures}"
        )
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The terminal table for a ``run()`` result."""
    machine = result["machine"]
    config = result["config"]
    measured = {k: v for k, v in result["backends"].items() if "skipped" not in v}
    skipped = {k: v["skipped"] for k, v in result["backends"].items() if "skipped" in v}
    head = [
        f"cancelk {result['cancelk_version']} - {result['benchmark']}",
        stats.machine_line(machine),
        f"host pool: stdlib ProcessPoolExecutor(max_workers=1), start method "
        f"{config['start_method']}; plan {config['plan']}",
    ]
    for name, why in skipped.items():
        head.append(f"backend {name} skipped: {why}")
    parts = ["\n".join(head)]
    if measured:
        facts = ", ".join(
            f"{name}: job start by {r['worker']['job_start']}"
            + (f", worker {r['worker']['rss_mb']:.0f} MB" if r["worker"].get("rss_mb") else "")
            for name, r in measured.items()
        )
        parts.append(
            f"P6  killable_wrapper overhead per call (overhead = call - median "
            f"baseline); {facts}\n" + _p6_table(measured)
        )
        parts.append(
            "P3  timeout overshoot, ms past the 50 ms deadline (zombie = gone)\n"
            + _p3_table(measured)
        )
    parts.append(
        "stdlib contrast: pool.submit(job).result(timeout=0.05), ms past the 50 ms "
        "deadline\n" + _stdlib_table(result["stdlib"], config["stdlib_watch_ms"])
    )
    if measured:
        parts.append("\n".join(_verdicts(measured)))
    parts.append(stats.elapsed_line(result))
    return "\n\n".join(parts)
