"""P9: large payloads through the stdlib pool and cancelk, time and peak memory.

    1 / 10 / 100 MB (100 MB left out with --quick), three jobs (jobs.PAYLOADS):
        both    n bytes argument, n bytes result
        arg     n bytes argument, an int back
        result  an int argument, n bytes result
    per call: wall time of submit -> result (median, p99)
    per series: peak RSS growth of the user process and of the job process
                                     target cancelk <= 1.0 x stdlib, time and both memories

Each series (library x size x job) runs in a fresh interpreter of its own
(this module run as ``python -m benchmarks.payloads``) with a fresh pool: what
the benchmark process holds weighs on neither library, and no process starts
with a heap that an earlier series left full of freed blocks of just the
right size (reused, they would hide a copy from the high-water mark, by luck
of the allocator and of the order the series run in).  Memory is the kernel's high-water mark
(VmHWM): reset for the user process and every process of the pool just before
the series (``/proc/PID/clear_refs``), read after it; growth = high-water mark
- RSS at the reset, the job process's being the largest among the pool's
processes.  That needs Linux; elsewhere only the times are measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

try:
    from benchmarks import harness, jobs, peers
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import harness  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

__all__ = ["LIBRARIES", "figure_p9"]

LIBRARIES = ("stdlib", "cancelk")
MB = 2**20
CHILD_LIMIT_S = 600.0


# ------------------------------------------------ in the fresh interpreter


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _reset_peaks(pids: Sequence[int | str]) -> dict[int | str, int]:
    """Set each process's high-water mark to its RSS; their RSS then (empty if not Linux)."""
    rss: dict[int | str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            continue
        now = _status_kb(pid, "VmRSS")
        if now is not None:
            rss[pid] = now
    return rss


def _growth(base: dict[int | str, int], pids: Sequence[int | str]) -> tuple[int, int] | None:
    """(largest high-water mark, largest growth over the RSS at the reset) among ``pids``."""
    peaks = {pid: _status_kb(pid, "VmHWM") for pid in pids}
    known = {pid: peak for pid, peak in peaks.items() if peak is not None}
    if not base or not known:
        return None
    floor = min(base.values())  # a process started during the series grew from nothing known
    return max(known.values()), max(peak - base.get(pid, floor) for pid, peak in known.items())


def _trim() -> None:
    """Give the heap freed by the series before back to the system (glibc)."""
    gc.collect()
    with contextlib.suppress(AttributeError, OSError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def _series(library: peers.Library, spec: dict[str, Any], mb: int, variant: str) -> dict[str, Any]:
    n = mb * MB
    fn = jobs.PAYLOADS[variant]
    times: list[int] = []
    _trim()  # before the pool starts: a forked worker would inherit what the heap kept
    with peers.opened(library, spec["workers"], spec["method"]) as handle:
        harness.warm(library, handle.pool, spec["workers"])
        pool_pids = [process.pid for process in handle.scope.processes()]
        arg: Any = n if variant == "result" else jobs.zeros(n)
        base_user = _reset_peaks(["self"])
        base_pool = _reset_peaks(pool_pids)
        for index in range(spec["calls"][str(mb)] + 1):  # the first one warms the path
            began = time.perf_counter_ns()
            got = library.submit(handle.pool, fn, arg).result(timeout=harness.RESULT_LIMIT_S)
            took = time.perf_counter_ns() - began
            if (got if isinstance(got, int) else len(got)) != n:
                raise RuntimeError(f"wrong result for {mb} MB {variant}")
            del got
            if index:
                times.append(took)
        user = _growth(base_user, ["self"])
        job = _growth(base_pool, [process.pid for process in handle.scope.processes()])
    return {"size_mb": mb, "variant": variant, "times_ns": times, "user": user, "job": job}


def child(spec: dict[str, Any]) -> list[dict[str, Any]]:
    library = peers.by_name(spec["library"])
    return [_series(library, spec, spec["size_mb"], spec["variant"])]


# ------------------------------------------------------ in the benchmark


def _run_child(name: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    with tempfile.TemporaryDirectory(prefix="cancelk-bench-p9-") as folder:
        out = os.path.join(folder, "result.json")
        spec = {**spec, "library": name, "out": out}
        subprocess.run(
            [sys.executable, "-m", "benchmarks.payloads", json.dumps(spec)],
            env=env,
            timeout=CHILD_LIMIT_S,
            check=True,
        )
        with open(out, encoding="utf-8") as result:
            return list(json.load(result))


def _row(library: peers.Library, series: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "library": library.label,
        "name": library.name,
        "size_mb": series["size_mb"],
        "variant": series["variant"],
        "time": harness.summaries([{"t": t} for t in series["times_ns"]], ("t",))["t"],
    }
    for who in ("user", "job"):
        peak_growth = series[who]
        row[f"{who}_peak_mb"] = peak_growth[0] / MB if peak_growth else None
        row[f"{who}_growth_mb"] = peak_growth[1] / MB if peak_growth else None
    return row


def _ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_stdlib`` of each cancelk row: time p50 and both growths over the stdlib's."""
    stdlib = {(r["size_mb"], r["variant"]): r for r in rows if r["name"] == "stdlib"}
    for row in rows:
        base = stdlib.get((row["size_mb"], row["variant"]))
        if row["name"] == "stdlib" or base is None:
            continue
        pairs = {
            "time": (row["time"]["median_ms"], base["time"]["median_ms"]),
            "user": (row["user_growth_mb"], base["user_growth_mb"]),
            "job": (row["job_growth_mb"], base["job_growth_mb"]),
        }
        row["vs_stdlib"] = {
            what: mine / theirs if mine is not None and theirs else None
            for what, (mine, theirs) in pairs.items()
        }


def _series_order(row: dict[str, Any]) -> tuple[int, int, int]:
    """Size, then job, then the stdlib before cancelk; rows without figures last."""
    if "size_mb" not in row:
        return (1, 0, LIBRARIES.index(row["name"]))
    variant = list(jobs.PAYLOADS).index(row["variant"])
    return (0, row["size_mb"] * len(jobs.PAYLOADS) + variant, LIBRARIES.index(row["name"]))


def figure_p9(ctx: harness.Context) -> dict[str, Any]:
    plan = ctx.plan
    spec = {
        "method": ctx.method,
        "workers": ctx.workers,
        "sizes_mb": list(plan.p9_sizes_mb),
        "calls": {str(mb): calls for mb, calls in zip(plan.p9_sizes_mb, plan.p9_calls)},
    }
    rows: list[dict[str, Any]] = []
    for name in LIBRARIES:
        library = peers.by_name(name)
        if not library.available:
            rows.append({"library": library.label, "name": name, "status": library.why_unavailable})
            continue
        ctx.say(f"P9 payloads of {'/'.join(map(str, plan.p9_sizes_mb))} MB: {name}")
        with ctx.capture.heard() as heard:
            try:
                measured = [
                    _row(library, series)
                    for mb in plan.p9_sizes_mb
                    for variant in jobs.PAYLOADS
                    for series in _run_child(name, {**spec, "size_mb": mb, "variant": variant})
                ]
            except Exception as why:
                measured = [{"status": f"error: {type(why).__name__}: {why}"}]
        for row in measured:
            row.setdefault("library", library.label)
            row.setdefault("name", name)
            row["notes"] = heard
        rows += measured
    _ratios(rows)
    rows.sort(key=_series_order)
    memory = "VmHWM" if sys.platform.startswith("linux") else "not measured: needs Linux"
    return {**spec, "memory": memory, "rows": rows}


def _main(argv: Sequence[str]) -> int:
    spec = json.loads(argv[0])
    result = child(spec)
    with open(spec["out"], "w", encoding="utf-8") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
