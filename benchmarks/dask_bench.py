"""Benchmark of cancelk.dask: per-task overhead on Dask, and client.cancel() -> gone.

    client (this process) --- scheduler --- 2 nanny workers, 1 thread each; each has
                                            executors "default" (Dask's thread pool),
                                            "cancelk" (CancelkPlugin) and "stdlib"
                                            (concurrent.futures.ProcessPoolExecutor,
                                            spawn, sized like the worker)

Overhead: the same no-op task, in the same cluster and run, through each of the
three worker executors, picked with ``dask.annotate(executor=...)``:
- round trip: ``client.submit(noop).result()`` one at a time, the executors
  taking turns, so that drift on the machine hits all three alike;
- batch: ``client.map(noop, range(N))`` waited for as a whole, time per task.
Overhead is the median minus the thread pool's median.

Cancel: a task under ``cancelk.dask.annotate()`` writes its pid and sleeps; the
client calls ``client.cancel(future)`` and watches the pid (a pidfd where the
kernel has them, else a tight poll of /proc): "gone" is when the process has
exited.  Then the next task is sent to the same worker and waited for: its
round trip shows that the worker's thread is free again.  The thread pool and
the stdlib pool cannot stop a running task: their ``client.cancel()`` leaves it
running to its end, holding the worker's thread (not measured, it would only
show the task's length).

Time limit: a task holding the GIL in a C call (libc ``sleep`` through
``ctypes.PyDLL``) under ``annotate(timeout=0.2)`` writes the wall time at which
its function starts; the figures are how long after that start + 0.2 s, and
after ``client.submit()`` + 0.2 s, the client sees ``ProcessTimeoutError``.
The limit counts from the job's start, a little before the function's (the
job unpickles the task first), so the first figure can be below zero.

    python -m benchmarks.dask_bench [--quick] [--workers N] [--json FILE]

Importable: ``run(...)`` returns a dict, ``format_report(result)`` the table.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import ctypes
import multiprocessing
import os
import select
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import cancelk

try:
    from benchmarks import stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import stats  # type: ignore[no-redef]

try:
    from distributed import WorkerPlugin

    import cancelk.dask
except ImportError:  # main() says what to install
    WorkerPlugin = object

__all__ = ["format_report", "main", "run"]

EXECUTORS = ("default", "cancelk", "stdlib")
LABELS = {
    "default": "Dask's thread pool (default)",
    "cancelk": "cancelk.dask (CancelkPlugin)",
    "stdlib": "stdlib ProcessPoolExecutor",
}
SLEEP_S = 60.0  # how long a cancelled task would run if nobody stopped it
TIMEOUT_S = 0.2
GONE_LIMIT_S = 10.0


# --------------------------------------------------------------------- tasks


def noop(x: Any = None) -> Any:
    return x


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def pid_then_sleep(path: str, seconds: float) -> None:
    _write(path, str(os.getpid()))
    time.sleep(seconds)


def start_then_gil_sleep(path: str, seconds: int) -> None:
    _write(path, repr(time.time()))
    ctypes.PyDLL(None).sleep(seconds)


# --------------------------------------------------------------- the cluster


class StdlibPoolPlugin(WorkerPlugin):  # type: ignore[misc,valid-type]
    """A stdlib process pool as the worker executor "stdlib", sized like the worker."""

    name = "stdlib-pool"

    def setup(self, worker: Any) -> None:
        pool = cf.ProcessPoolExecutor(
            worker.state.nthreads, mp_context=multiprocessing.get_context("spawn")
        )
        pool.submit(noop).result(timeout=120)  # start its processes now
        worker.executors["stdlib"] = pool

    def teardown(self, worker: Any) -> None:
        pool = worker.executors.pop("stdlib", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _annotate(kind: str) -> Any:
    import dask

    if kind == "cancelk":
        return cancelk.dask.annotate()
    return dask.annotate(executor=kind)


# ------------------------------------------------------------- measurements


def round_trips(client: Any, count: int, warmup: int) -> dict[str, list[int]]:
    samples: dict[str, list[int]] = {kind: [] for kind in EXECUTORS}
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        order = EXECUTORS[i % 3 :] + EXECUTORS[: i % 3]
        for kind in order:
            with _annotate(kind):
                start = clock()
                client.submit(noop, i, pure=False).result()
                took = clock() - start
            if i >= warmup:
                samples[kind].append(took)
    return samples


async def _executor_round_trips(dask_worker: Any, count: int, warmup: int) -> dict[str, list[int]]:
    """On the worker's event loop, as Worker.execute does it: Dask's task runner
    through each executor, one call at a time, the executors taking turns."""
    from dask._task_spec import Task
    from distributed.worker import _run_task_simple

    loop = asyncio.get_running_loop()
    samples: dict[str, list[int]] = {kind: [] for kind in EXECUTORS}
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        for kind in EXECUTORS:
            task = Task(("executor-round-trip", kind, i), noop, i)
            start = clock()
            await loop.run_in_executor(dask_worker.executors[kind], _run_task_simple, task, {}, 0.0)
            took = clock() - start
            if i >= warmup:
                samples[kind].append(took)
    return samples


def executor_round_trips(client: Any, count: int, warmup: int) -> dict[str, list[int]]:
    worker = sorted(client.scheduler_info()["workers"])[0]
    result = client.run(_executor_round_trips, count=count, warmup=warmup, workers=[worker])
    return dict(result[worker])


def batches(client: Any, tasks: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per task of ``client.map`` over ``tasks`` no-ops, per round."""
    from distributed import wait

    per_task: dict[str, list[float]] = {kind: [] for kind in EXECUTORS}
    for _ in range(rounds):
        for kind in EXECUTORS:
            with _annotate(kind):
                start = time.perf_counter_ns()
                futures = client.map(noop, range(tasks), pure=False)
                wait(futures)
                took = time.perf_counter_ns() - start
            assert all(f.status == "finished" for f in futures), kind
            del futures
            per_task[kind].append(took / tasks / 1000)
        client.run(_collect)
    return per_task


def _collect() -> None:
    import gc

    gc.collect()


def _read_when_there(path: str, limit: float = 60.0) -> str:
    deadline = time.monotonic() + limit
    while True:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        if time.monotonic() > deadline:
            raise RuntimeError(f"the task never wrote {path}")
        time.sleep(0.001)


def _gone_at(pid: int) -> int | None:
    """perf_counter_ns when ``pid`` has exited (None past the limit)."""
    open_pidfd = getattr(os, "pidfd_open", None)
    if open_pidfd is not None:
        try:
            fd = open_pidfd(pid)
        except ProcessLookupError:
            return time.perf_counter_ns()
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                ready, _, _ = select.select([fd], [], [], GONE_LIMIT_S)
                return time.perf_counter_ns() if ready else None
            finally:
                os.close(fd)
    limit = time.perf_counter_ns() + int(GONE_LIMIT_S * 1e9)
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                state = stat.read().rpartition(b")")[2].split()[:1]
        except OSError:
            return time.perf_counter_ns()
        if state in ([b"Z"], [b"X"]):
            return time.perf_counter_ns()
        if time.perf_counter_ns() > limit:
            return None


def cancels(client: Any, trials: int, workdir: str) -> dict[str, Any]:
    worker = sorted(client.scheduler_info()["workers"])[0]
    gone: list[int] = []
    next_task: list[int] = []
    failures: list[str] = []
    for n in range(trials):
        path = os.path.join(workdir, f"cancel-{n}")
        with cancelk.dask.annotate():
            future = client.submit(pid_then_sleep, path, SLEEP_S, pure=False, workers=[worker])
        pid = int(_read_when_there(path))
        time.sleep(0.02)  # let the task settle into its sleep
        start = time.perf_counter_ns()
        client.cancel(future)
        ended = _gone_at(pid)
        if ended is None:
            failures.append(f"trial {n}: pid {pid} still there after {GONE_LIMIT_S} s")
            continue
        gone.append(ended - start)
        with cancelk.dask.annotate():
            client.submit(noop, n, pure=False, workers=[worker]).result(timeout=60)
        next_task.append(time.perf_counter_ns() - start)
    return {"gone": gone, "next_task_done": next_task, "failures": failures}


def timeouts(client: Any, trials: int, workdir: str) -> dict[str, Any]:
    after_start: list[float] = []
    after_submit: list[float] = []
    failures: list[str] = []
    for n in range(trials):
        path = os.path.join(workdir, f"timeout-{n}")
        submitted = time.time()
        with cancelk.dask.annotate(timeout=TIMEOUT_S):
            future = client.submit(start_then_gil_sleep, path, 30, pure=False)
        try:
            future.result(timeout=60)
        except cancelk.ProcessTimeoutError:
            seen = time.time()
        else:
            failures.append(f"trial {n}: no ProcessTimeoutError")
            continue
        started = float(_read_when_there(path))
        after_start.append((seen - (started + TIMEOUT_S)) * 1e9)
        after_submit.append((seen - (submitted + TIMEOUT_S)) * 1e9)
    return {"after_start": after_start, "after_submit": after_submit, "failures": failures}


# ------------------------------------------------------------------ driver


def run(
    quick: bool = False, workers: int = 2, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    import dask
    import distributed
    from distributed import Client, LocalCluster

    say = progress or (lambda message: None)
    plan = (
        {
            "in_worker": 200,
            "round_trips": 60,
            "warmup": 10,
            "batch": 500,
            "rounds": 2,
            "cancels": 10,
            "timeouts": 5,
        }
        if quick
        else {
            "in_worker": 1000,
            "round_trips": 300,
            "warmup": 30,
            "batch": 2000,
            "rounds": 3,
            "cancels": 40,
            "timeouts": 20,
        }
    )
    machine = stats.machine_info()
    began = time.monotonic()
    say(f"starting a LocalCluster: {workers} nanny workers, 1 thread each ...")
    # The stdlib pool cannot start children in a daemonic process; cancelk
    # can, but both get the same workers here.
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    client = Client(cluster)
    try:
        client.register_plugin(cancelk.dask.CancelkPlugin())
        client.register_plugin(StdlibPoolPlugin())
        with tempfile.TemporaryDirectory(prefix="cancelk-dask-bench-") as workdir:
            say(f"executor round trips in a worker: {plan['in_worker']} per executor ...")
            in_worker = executor_round_trips(client, plan["in_worker"], plan["warmup"])
            say(f"task round trips: {plan['round_trips']} per executor ...")
            trips = round_trips(client, plan["round_trips"], plan["warmup"])
            say(f"batches: {plan['rounds']} x {plan['batch']} tasks per executor ...")
            per_task = batches(client, plan["batch"], plan["rounds"])
            say(f"cancel -> gone: {plan['cancels']} trials ...")
            cancel = cancels(client, plan["cancels"], workdir)
            say(f"time limit {TIMEOUT_S} s on a GIL-holding call: {plan['timeouts']} trials ...")
            limit = timeouts(client, plan["timeouts"], workdir)
    finally:
        client.close()
        cluster.close()
    return {
        "benchmark": "cancelk.dask",
        "cancelk_version": cancelk.__version__,
        "dask_version": dask.__version__,
        "distributed_version": distributed.__version__,
        "machine": machine,
        "config": {"workers": workers, "threads_per_worker": 1, "plan": plan},
        "in_worker": {kind: stats.summarize(s) for kind, s in in_worker.items()},
        "round_trip": {kind: stats.summarize(s) for kind, s in trips.items()},
        "batch_us_per_task": {
            kind: {"median": stats.median(v), "runs": v} for kind, v in per_task.items()
        },
        "cancel": {
            "gone": stats.summarize(cancel["gone"]),
            "next_task_done": stats.summarize(cancel["next_task_done"]),
            "failures": cancel["failures"],
        },
        "timeout": {
            "after_start": stats.summarize(limit["after_start"]),
            "after_submit": stats.summarize(limit["after_submit"]),
            "failures": limit["failures"],
        },
        "elapsed_s": round(time.monotonic() - began, 1),
        "load_average_after": stats.machine_info()["load_average"],
    }


def _cell(summary: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """'p50 (p99)' in ms, and the p50 overhead over the thread pool in us."""
    text = f"{stats.format_ms(summary['median_ms'])} ({stats.format_ms(summary['p99_ms'])})"
    if base is None:
        return [text, "-"]
    return [text, f"{(summary['median_ms'] - base['median_ms']) * 1000:+.0f}"]


def format_report(result: dict[str, Any]) -> str:
    machine = result["machine"]
    config = result["config"]
    in_worker = result["in_worker"]
    trips = result["round_trip"]
    per_task = result["batch_us_per_task"]
    head = (
        f"cancelk {result['cancelk_version']} - {result['benchmark']}, dask "
        f"{result['dask_version']}, distributed {result['distributed_version']}\n"
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']} "
        f"{machine['kernel']}, {machine['python']}\n"
        f"cluster: LocalCluster, {config['workers']} nanny workers x 1 thread; plan "
        f"{config['plan']}"
    )
    rows = []
    for kind in EXECUTORS:
        base = None if kind == "default" else "default"
        batch = per_task[kind]["median"]
        rows.append(
            [
                LABELS[kind],
                *_cell(in_worker[kind], in_worker[base] if base else None),
                *_cell(trips[kind], trips[base] if base else None),
                f"{batch:.0f}",
                "-" if base is None else f"{batch - per_task['default']['median']:+.0f}",
            ]
        )
    overhead = "per-task overhead (ms p50 (p99); overhead: p50 over the thread pool, us)\n"
    overhead += stats.format_table(
        [
            "worker executor",
            "in the worker",
            "overhead",
            "client round trip",
            "overhead",
            "batch us/task",
            "overhead",
        ],
        rows,
    )
    cancel = result["cancel"]
    limit = result["timeout"]

    def line(label: str, summary: dict[str, Any]) -> list[Any]:
        return [
            label,
            stats.format_ms(summary["median_ms"], 1),
            stats.format_ms(summary["p99_ms"], 1),
            summary["n"],
        ]

    stops = stats.format_table(
        ["cancelk.dask stops", "p50 ms", "p99 ms", "n"],
        [
            line("client.cancel() -> the task's process gone", cancel["gone"]),
            line("client.cancel() -> next task done on that worker", cancel["next_task_done"]),
            line(
                f"timeout {TIMEOUT_S} s, GIL held: error at client - task start - limit",
                limit["after_start"],
            ),
            line(
                f"timeout {TIMEOUT_S} s, GIL held: error at client - submit - limit",
                limit["after_submit"],
            ),
        ],
    )
    notes = [
        "in the worker: Dask's task runner through the executor on the worker's event loop, "
        "as Worker.execute calls it; client round trip: client.submit(noop).result(); batch: "
        "client.map over the batch, per task.",
        "Dask's thread pool and the stdlib pool: client.cancel() leaves a running task "
        "running to its end (no figure); neither has a per-task time limit.",
    ]
    for failure in cancel["failures"] + limit["failures"]:
        notes.append(f"failure: {failure}")
    notes.append(
        f"elapsed {result['elapsed_s']} s; load average before {machine['load_average']}, "
        f"after {result['load_average_after']}"
    )
    return "\n\n".join([head, overhead, stops, "\n".join(notes)])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (about 30 s)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        import distributed  # noqa: F401
    except ImportError:
        print("needs Dask: pip install 'cancelk[dask]'", file=sys.stderr)
        return 2
    result = run(quick=args.quick, workers=args.workers, progress=say)
    print(format_report(result), flush=True)
    if args.json:
        stats.dump_json(args.json, result)
        say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    # Run the module's importable copy: the workers unpickle its tasks and
    # plugin by name (benchmarks.dask_bench), which __main__ would not be.
    from benchmarks import dask_bench

    sys.exit(dask_bench.main())
