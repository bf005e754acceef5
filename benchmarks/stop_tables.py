"""The terminal tables of the executor figures that stop jobs: P3, P4, P5, and the
kernel's floor under P3/P4 with cancelk's overhead over it."""

from __future__ import annotations

from typing import Any

try:
    from benchmarks import floor, harness
    from benchmarks.tables import fmt, ms_cells, notes_cell, table
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import floor  # type: ignore[no-redef]
    import harness  # type: ignore[no-redef]
    from tables import fmt, ms_cells, notes_cell, table  # type: ignore[no-redef]

__all__ = ["table_floor", "table_p3", "table_p4", "table_p5"]


def table_p3(figure: dict[str, Any]) -> str:
    rows = [
        {**row, "job": harness.KIND_LABELS[row["kind"]] if "kind" in row else "-"}
        for row in figure["rows"]
    ]
    return table(
        f"P3  timeout precision: limit {figure['timeout_ms']:.0f} ms, ms from the deadline "
        f"(job start + 50 ms) until the future is done / the job's process is gone / both "
        f"({figure['method']}, 1 worker)   target cancelk both p50 <= 0.5, p99 <= 2",
        [
            "library",
            "job",
            "n",
            "done p50",
            "done p99",
            "gone p50",
            "gone p99",
            "both p50",
            "both p99",
            "notes",
        ],
        rows,
        lambda r: [
            str(r["all"]["n"]),
            *ms_cells(r["done"]),
            *ms_cells(r["gone"]),
            *ms_cells(r["all"]),
            notes_cell(r),
        ],
        lead=("library", "job"),
    )


def _returned(row: dict[str, Any]) -> str:
    returned = row.get("returned") or {}
    return ", ".join(f"{k}" if len(returned) == 1 else f"{k} {v}x" for k, v in returned.items())


def table_p4(figure: dict[str, Any]) -> str:
    sync = table(
        f"P4  cancel of a running time.sleep(10) job: ms from the call until the future is done "
        f"/ the job's process is gone ({figure['method']}, 1 worker)   target cancelk gone "
        f"p99 <= 1",
        [
            "library",
            "stop call",
            "n",
            "returned",
            "call p50",
            "call p99",
            "done p50",
            "done p99",
            "gone p50",
            "gone p99",
            "notes",
        ],
        figure["sync"],
        lambda r: [
            str(r["gone"]["n"]),
            _returned(r) or "-",
            *ms_cells(r["call"]),
            *ms_cells(r["done"]),
            *ms_cells(r["gone"]),
            notes_cell(r),
        ],
        lead=("library", "api"),
    )
    asyncio_part = table(
        "P4  asyncio: task awaiting loop.run_in_executor(exe, job sleeping 10 s) cancelled: ms "
        "until the task is done / the job's process is gone   target cancelk gone p99 <= 2",
        ["library", "n", "task done p50", "task done p99", "gone p50", "gone p99", "notes"],
        figure["asyncio"],
        lambda r: [str(r["gone"]["n"]), *ms_cells(r["done"]), *ms_cells(r["gone"]), notes_cell(r)],
    )
    return sync + "\n\n" + asyncio_part


def table_p5(figure: dict[str, Any]) -> str:
    numpy_note = figure["numpy"]
    if figure.get("numpy_in_user_process"):
        numpy_note += "; numpy was already imported in the user process"
    return table(
        "P5  1 worker: running job killed (cancel) -> the queued job starts, ms; trials "
        f"{harness.P5_REST_S:g} s apart   target cancelk p50 <= 5 (numpy {numpy_note})",
        ["start method", "initializer", "library", "n", "p50 ms", "p99 ms", "notes"],
        figure["rows"],
        lambda r: [str(r["next_start"]["n"]), *ms_cells(r["next_start"]), notes_cell(r)],
        lead=("method", "initializer", "library"),
    )


def table_floor(figure: dict[str, Any]) -> str:
    title = "P3/P4 kernel floor"
    if "status" in figure:
        measured = f"{title}: not measured apart: {figure['status']}"
    else:
        measured = _table_floor_apart(figure, title)
    apart = (
        "a runner SIGKILLed by the benchmark"
        if figure.get("runner_exit", {}).get("n")
        else "a process of a runner's size"
    )
    over = table(
        f"cancelk over the floor   target overhead <= {floor.OVERHEAD_TARGET_MS:g} ms at p50\n"
        "  floor 'paired': each trial followed, in the same pool, by the same job SIGKILLed by "
        "the benchmark; overhead = the median of the trials' differences\n"
        f"  floor 'measured apart': {apart}; overhead = cancelk p50 - floor p50",
        [
            "figure",
            "n",
            "cancelk p50",
            "floor p50",
            "overhead",
            "cancelk p99",
            "floor p99",
            "floor",
        ],
        figure.get("over_floor", []),
        lambda r: [
            str(r["n"]),
            fmt(r["cancelk_p50_ms"]),
            fmt(r["floor_p50_ms"]),
            f"{r['overhead_ms']:+.3f}",
            fmt(r["cancelk_p99_ms"]),
            fmt(r["floor_p99_ms"]),
            f"{r.get('floor', 'measured apart')}, n={r.get('floor_n', '?')}",
        ],
        lead=("what",),
    )
    return measured + "\n\n" + over


def _table_floor_apart(figure: dict[str, Any], title: str) -> str:
    floor_mb = figure["floor_rss_mb"]
    sizes = f"a cancelk runner {figure['runner_rss_mb']:.1f} MB RSS, " + (
        f"the killed process {floor_mb:.1f} MB" if floor_mb is not None else "killed process"
    )
    wait = "its pidfd is readable (exited)" if figure["clock"] == "pidfd" else "waitpid returns"
    return table(
        f"{title} ({figure['method']}), measured apart: fork a process of a runner's size "
        f"({sizes}), SIGKILL it, ms until {wait} / until it is reaped",
        ["measure", "n", "p50 ms", "p99 ms", "notes"],
        [
            {"measure": "SIGKILL -> exited", **figure["exit"], "notes": figure["notes"]},
            {"measure": "SIGKILL -> reaped", **figure["reaped"]},
            *(
                [{"measure": "a runner itself: SIGKILL -> exited", **figure["runner_exit"]}]
                if figure.get("runner_exit", {}).get("n")
                else []
            ),
        ],
        lambda r: [str(r["n"]), *ms_cells(r), notes_cell(r)],
        lead=("measure",),
    )
