"""Benchmark of ``cancelk.ProcessPoolExecutor`` beside the stdlib pool and its peers.

Design section 5 (P1-P5, P7, P8).  Every library is driven through its own API
(see peers.py); a library that is not installed is listed as such.

    P1  no-op round trip, submit -> result one at a time, warm pool   target <= 0.5 x stdlib
    P2  throughput: N no-op jobs submitted at once, then gathered     target >= 1.5 x stdlib
    P3  a 0.05 s time limit on (a) time.sleep, (b) a pure-Python spin, (c) a C call
        holding the GIL: deadline -> future done, -> job process gone
                                                           target p50 <= 0.5 ms, p99 <= 2 ms
    P4  cancel of a running time.sleep(10) job -> its process gone    target p99 <= 1 ms
        asyncio: cancel a task awaiting run_in_executor -> gone       target p99 <= 2 ms
    P5  1 worker: kill the running job -> the next queued job starts  target p50 <= 5 ms
        (fork, forkserver, spawn; also with an initializer that imports numpy)
    P7  spawn 32 workers: constructor -> 32 distinct pids answered    target <= 0.25 x stdlib
        and the pool's total PSS
    P8  cost per job at 10^3 .. 10^5 (10^6 with --full) jobs; map(fn, count(),
        buffersize=64) over an endless iterator keeps the user process's RSS bounded

How the times are taken.  A job that must be timed writes ``token pid
monotonic_ns`` to a FIFO as its first act (benchmarks/jobs.py); CLOCK_MONOTONIC
is shared by all processes.  The deadline of a P3 job is its own start + 50 ms
(cancelk starts its clock a few microseconds earlier, when the runner takes the
job, so its figures are pessimistic by that much; Pebble starts its clock when
its manager thread hears that the job began, later than the job's start).
"Done" is stamped by a done-callback in whichever thread completes the future.
"Gone" is stamped when the job's pidfd becomes readable, i.e. the process exited
(a zombie counts as gone: it runs nothing); without pidfds /proc is polled.
Waits are bounded: a job still running ``give_up`` (2 s) past its deadline or
cancel is reported as "not stopped after 2000 ms", killed by the benchmark, and
the pool is replaced.  A library gets ``attempts`` such failed trials per row,
not more.  P4 and P5 cancel a job 10 ms after it reported its start.  The user
process never busy-waits, so on a 2-core machine it does not compete with the
pool it measures.

Importable: ``run(...)`` returns a JSON-ready dict, ``format_report(result)``
the tables.  The command line is benchmarks/run.py (``python -m cancelk bench``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import importlib.util
import itertools
import math
import os
import select
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Union

try:
    from benchmarks import jobs, peers, stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import jobs  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]

__all__ = ["EXECUTOR_FIGURES", "Plan", "format_report", "make_plan", "run"]

EXECUTOR_FIGURES = ("P1", "P2", "P3", "P4", "P5", "P7", "P8")
START_METHODS = ("fork", "forkserver", "spawn")
TIMEOUT_S = 0.05
TIMEOUT_NS = 50_000_000
LONG_JOB_S = 10.0  # a job meant to be stopped: never ends on its own within a trial
START_LIMIT_S = 30.0  # a job must report its start within this (worker start included)
RESULT_LIMIT_S = 30.0
NEXT_JOB_LIMIT_S = 10.0  # P5: kill -> next job start
# P4/P5 cancel a job this long after it reported its start: a cancel lands on a
# job that is well under way (Deadpool learns a job's pid only after its start).
SETTLE_S = 0.01
# P5 trials start with the pool at rest (a pool may prepare a replacement worker in
# the background after a kill); back-to-back kills would measure something else.
P5_REST_S = 0.3
P7_WORKERS = 32
P7_LIMIT_S = 90.0
KIND_LABELS = {
    "sleep": "(a) time.sleep",
    "spin": "(b) pure-Python spin",
    "c_sleep": "(c) C call holding the GIL",
}

Outcome = Union[dict[str, Any], str]  # a trial's figures, or why it failed


# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Plan:
    """How many samples each figure gets."""

    p1_trips: int
    p1_warmup: int
    p2_jobs: int
    p2_repeats: int
    p3_trials: int  # per library and job kind
    p4_trials: int  # per library, sync and asyncio each
    attempts: int  # failed trials (job not stopped) allowed per row before giving up
    p5_trials: int
    p5_all_methods: bool
    p7_repeats: int
    p8_sizes: tuple[int, ...]
    p8_map_items: int
    give_up_s: float = 2.0


def make_plan(quick: bool = False, full: bool = False) -> Plan:
    """Default ~5 min on a busy 2-core machine; quick well under a minute."""
    if quick:
        return Plan(
            p1_trips=200,
            p1_warmup=20,
            p2_jobs=5000,
            p2_repeats=1,
            p3_trials=5,
            p4_trials=8,
            attempts=1,
            p5_trials=3,
            p5_all_methods=False,
            p7_repeats=1,
            p8_sizes=(1_000, 10_000),
            p8_map_items=20_000,
        )
    plan = Plan(
        p1_trips=1000,
        p1_warmup=100,
        p2_jobs=20_000,
        p2_repeats=3,
        p3_trials=30,
        p4_trials=50,
        attempts=2,
        p5_trials=6,
        p5_all_methods=True,
        p7_repeats=2,
        p8_sizes=(1_000, 10_000, 100_000),
        p8_map_items=200_000,
    )
    if full:
        plan = replace(plan, p8_sizes=(*plan.p8_sizes, 1_000_000))
    return plan


# ------------------------------------------------------- clocks and probes


def now_ns() -> int:
    return time.monotonic_ns()


class Reports:
    """The FIFO through which jobs report ``token pid start_ns``."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cancelk-bench-")
        self.path = os.path.join(self.dir, "starts")
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer keeps the FIFO from reporting hang-up between jobs.
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)
        self._partial = b""
        self.seen: dict[str, tuple[int, int]] = {}
        self._tokens = itertools.count(1)
        self._releases = itertools.count(1)

    def token(self) -> str:
        return f"t{next(self._tokens)}"

    def _pump(self, timeout_ms: int) -> None:
        if not self._poller.poll(timeout_ms):
            return
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            token, pid, started = line.decode().split()
            self.seen[token] = (int(pid), int(started))

    def collect(self, tokens: Sequence[str], timeout_s: float) -> dict[str, tuple[int, int]]:
        """Wait until every token reported (or the timeout); what was seen."""
        until = now_ns() + int(timeout_s * 1e9)
        while True:
            missing = [token for token in tokens if token not in self.seen]
            left_ms = (until - now_ns()) / 1e6
            if not missing or left_ms <= 0:
                return {token: self.seen[token] for token in tokens if token in self.seen}
            self._pump(max(1, math.ceil(left_ms)))

    def wait(self, token: str, timeout_s: float) -> tuple[int, int] | None:
        """(pid, start ns) of the job with ``token``; None if it did not start in time."""
        return self.collect([token], timeout_s).get(token)

    def release_channel(self) -> Release:
        return Release(os.path.join(self.dir, f"release{next(self._releases)}"))

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._keep)
        shutil.rmtree(self.dir, ignore_errors=True)


class Release:
    """A FIFO that ``jobs.hold`` jobs wait on until one byte is written to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.mkfifo(path)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._write = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

    def open(self) -> None:
        os.write(self._write, b"x")  # stays in the pipe: every waiting job sees POLLIN

    def close(self) -> None:
        os.close(self._write)
        os.close(self._read)
        os.unlink(self.path)


def _proc_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return not fields or fields[0] in (b"Z", b"X")


class Gone:
    """When a process exited (zombie or reaped): pidfd readiness, else /proc polling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        self.at: int | None = None
        self.already = False
        try:
            self.fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
        except ProcessLookupError:
            self.at, self.already = now_ns(), True
        except (AttributeError, OSError):
            self.fd = None

    def wait(self, until_ns: int) -> int | None:
        """Monotonic ns at which the process was seen gone; None if alive at ``until_ns``."""
        if self.at is not None:
            return self.at
        if self.fd is not None:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            while True:
                left_ms = (until_ns - now_ns()) / 1e6
                if poller.poll(max(0, math.ceil(left_ms))):
                    self.at = now_ns()
                    return self.at
                if left_ms <= 0:
                    return None
        while now_ns() < until_ns:
            if _proc_gone(self.pid):
                self.at = now_ns()
                return self.at
            time.sleep(0.0001)
        return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class DoneClock:
    """A done-callback that stamps when the future completed."""

    def __init__(self) -> None:
        self.at: int | None = None
        self._event = threading.Event()

    def __call__(self, _future: Any) -> None:
        if self.at is None:
            self.at = now_ns()
        self._event.set()

    def wait(self, until_ns: int) -> int | None:
        self._event.wait(max(0.0, (until_ns - now_ns()) / 1e9))
        return self.at


def _outcome_name(future: cf.Future[Any]) -> str:
    if future.cancelled():
        return "cancelled"
    try:
        error = future.exception(timeout=0)
    except BaseException as why:  # cancelk raises ProcessCancelledError here
        return type(why).__name__
    return "result" if error is None else type(error).__name__


# ------------------------------------------------------------- context


class Context:
    """What every figure needs: plan, options, the report FIFO, progress output."""

    def __init__(self, plan: Plan, method: str, workers: int, say: Callable[[str], None]) -> None:
        self.plan = plan
        self.method = method
        self.workers = workers
        self.say = say
        self.reports = Reports()
        self.give_up_ns = int(plan.give_up_s * 1e9)
        self.give_up_ms = int(plan.give_up_s * 1000)


class Keeper:
    """One pool of a library, replaced after a trial that left it in doubt."""

    def __init__(
        self,
        library: peers.Library,
        workers: int,
        method: str,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.library = library
        self.args = (workers, method, initializer, initargs)
        self.handle: peers.Opened | None = None
        self.leftovers = 0
        self.errors: list[str] = []
        self.pools = 0

    def get(self) -> Any:
        if self.handle is None:
            self.handle = peers.open_pool(self.library, *self.args)
            self.pools += 1
            _warm(self.library, self.handle.pool, self.args[0])
        return self.handle.pool

    def reset(self) -> None:
        if self.handle is None:
            return
        peers.close(self.handle)
        self.leftovers += self.handle.leftovers
        if self.handle.shutdown_error:
            self.errors.append(self.handle.shutdown_error)
        self.handle = None

    def notes(self) -> list[str]:
        notes = list(dict.fromkeys(self.errors))
        method_note = self.library.method_note(self.args[1])
        if method_note:
            notes.insert(0, method_note)
        if self.leftovers:
            notes.append(f"{self.leftovers} process(es) left after shutdown, killed")
        return notes


def _warm(library: peers.Library, pool: Any, workers: int) -> None:
    """Start the workers: a few rounds of no-op jobs."""
    futures = [library.submit(pool, jobs.noop) for _ in range(4 * workers)]
    for future in futures:
        future.result(timeout=START_LIMIT_S)


def run_trials(
    keeper: Keeper,
    trial: Callable[[peers.Library, Any], Outcome],
    n: int,
    attempts: int,
    rest_s: float = 0.0,
) -> dict[str, Any]:
    """Up to ``n`` good trials, ``rest_s`` apart; stop after ``attempts`` failed ones
    (the pool is replaced after each)."""
    good: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        while len(good) < n and len(failures) < attempts:
            try:
                pool = keeper.get()
                # Every trial, the first included, starts with the pool at rest.
                time.sleep(rest_s)
                outcome = trial(keeper.library, pool)
            except Exception as why:
                outcome = f"{type(why).__name__}: {why}"
            if isinstance(outcome, str):
                failures.append(outcome)
                keeper.reset()
            else:
                good.append(outcome)
    finally:
        keeper.reset()
    return {"good": good, "failures": failures, "notes": keeper.notes()}


def _summaries(good: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        samples = [trial[key] for trial in good if trial.get(key) is not None]
        out[key] = stats.summarize(samples)
        out[key]["samples_ms"] = [round(s / 1e6, 4) for s in samples]
    return out


def _each_library(
    libraries: Sequence[peers.Library],
    method: str,
    body: Callable[[peers.Library], dict[str, Any]],
) -> list[dict[str, Any]]:
    rows = []
    for library in libraries:
        row: dict[str, Any] = {"library": library.label, "name": library.name}
        row["notes"] = [library.method_note(method)] if library.method_note(method) else []
        if not library.available:
            row["status"] = library.why_unavailable
        else:
            try:
                measured = body(library)
                measured["notes"] = row["notes"] + measured.get("notes", [])
                row.update(measured)
            except Exception as why:
                row["status"] = f"error: {type(why).__name__}: {why}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------- P1, P2


def figure_p1(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan

    def body(library: peers.Library) -> dict[str, Any]:
        ctx.say(f"P1 round trip: {library.name}")
        clock = time.perf_counter_ns
        samples: list[int] = []
        with peers.opened(library, ctx.workers, ctx.method) as handle:
            pool = handle.pool
            _warm(library, pool, ctx.workers)
            for _ in range(plan.p1_warmup):
                library.submit(pool, jobs.noop).result(timeout=RESULT_LIMIT_S)
            for _ in range(plan.p1_trips):
                start = clock()
                library.submit(pool, jobs.noop).result(timeout=RESULT_LIMIT_S)
                samples.append(clock() - start)
        return {"summary": stats.summarize(samples), "notes": _handle_notes(handle)}

    rows = _each_library(peers.LIBRARIES, ctx.method, body)
    _ratios(rows, lambda row: row["summary"]["median_ms"])
    return {"workers": ctx.workers, "method": ctx.method, "rows": rows}


def _handle_notes(handle: peers.Opened) -> list[str]:
    notes = [handle.shutdown_error] if handle.shutdown_error else []
    if handle.leftovers:
        notes.append(f"{handle.leftovers} process(es) left after shutdown, killed")
    return notes


def _ratios(rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> None:
    """``vs_stdlib`` on every measured row: value / stdlib's value."""
    base = next((row for row in rows if row["name"] == "stdlib" and "status" not in row), None)
    for row in rows:
        if base is None or "status" in row:
            continue
        row["vs_stdlib"] = value(row) / value(base)


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


def figure_p2(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan

    def body(library: peers.Library) -> dict[str, Any]:
        ctx.say(f"P2 throughput, {plan.p2_jobs} jobs: {library.name}")
        runs: list[int] = []
        failure = ""
        with peers.opened(library, ctx.workers, ctx.method) as handle:
            _warm(library, handle.pool, ctx.workers)
            for _ in range(plan.p2_repeats):
                took = _throughput_run(library, handle.pool, plan.p2_jobs)
                if isinstance(took, str):
                    failure = took
                    break
                runs.append(took)
        row: dict[str, Any] = {"notes": _handle_notes(handle)}
        if failure:
            row["status"] = f"did not finish: {failure}"
            return row
        rates = [plan.p2_jobs / (ns / 1e9) for ns in runs]
        row.update(
            {
                "runs": len(runs),
                "jobs_per_s_median": stats.median(rates),
                "jobs_per_s_worst": min(rates),
                "us_per_job_median": stats.median(runs) / plan.p2_jobs / 1e3,
            }
        )
        return row

    rows = _each_library(peers.LIBRARIES, ctx.method, body)
    _ratios(rows, lambda row: row["jobs_per_s_median"])
    return {"workers": ctx.workers, "method": ctx.method, "jobs": plan.p2_jobs, "rows": rows}


# ------------------------------------------------------------------- P3


def _timeout_trial(ctx: Context, kind: str) -> Callable[[peers.Library, Any], Outcome]:
    def trial(library: peers.Library, pool: Any) -> Outcome:
        reports = ctx.reports
        token = reports.token()
        clock = DoneClock()
        future = library.submit_timeout(
            pool, jobs.KINDS[kind], (reports.path, token, LONG_JOB_S), TIMEOUT_S
        )
        future.add_done_callback(clock)
        start = reports.wait(token, START_LIMIT_S)
        if start is None:
            return f"the job did not start within {START_LIMIT_S:.0f} s"
        pid, started = start
        watch = Gone(pid)
        try:
            deadline = started + TIMEOUT_NS
            until = deadline + ctx.give_up_ns
            gone = watch.wait(until)
            done = clock.wait(until)
        finally:
            watch.close()
        if gone is None:
            peers.kill_tree(pid)
            clock.wait(now_ns() + 5_000_000_000)
            return f"not stopped after {ctx.give_up_ms} ms"
        if done is None:
            return f"process gone, future not done {ctx.give_up_ms} ms after the deadline"
        return {
            "done": done - deadline,
            "gone": gone - deadline,
            "all": max(done, gone) - deadline,
            "outcome": _outcome_name(future),
            "gone_before_watch": watch.already,
        }

    return trial


def figure_p3(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    rows: list[dict[str, Any]] = []
    for library in peers.LIBRARIES:
        if not library.available:
            rows.append(
                {"library": library.label, "name": library.name, "status": library.why_unavailable}
            )
            continue
        if library.timeout_api is None:
            rows.append(
                {
                    "library": library.label,
                    "name": library.name,
                    "status": "no per-job timeout: job runs to its end",
                }
            )
            continue
        for kind in jobs.KINDS:
            ctx.say(f"P3 timeout precision, {KIND_LABELS[kind]}: {library.name}")
            row: dict[str, Any] = {
                "library": library.label,
                "name": library.name,
                "kind": kind,
                "api": library.timeout_api,
            }
            try:
                keeper = Keeper(library, 1, ctx.method)
                result = run_trials(
                    keeper, _timeout_trial(ctx, kind), plan.p3_trials, plan.attempts
                )
            except Exception as why:
                row["status"] = f"error: {type(why).__name__}: {why}"
                rows.append(row)
                continue
            row.update(_summaries(result["good"], ("done", "gone", "all")))
            row["outcomes"] = dict(collections.Counter(t["outcome"] for t in result["good"]))
            row["failures"] = result["failures"]
            row["notes"] = result["notes"]
            rows.append(row)
    return {"method": ctx.method, "timeout_ms": TIMEOUT_S * 1e3, "rows": rows}


# ------------------------------------------------------------------- P4


def _cancel_trial(ctx: Context) -> Callable[[peers.Library, Any], Outcome]:
    def trial(library: peers.Library, pool: Any) -> Outcome:
        reports = ctx.reports
        token = reports.token()
        clock = DoneClock()
        future = library.submit(pool, jobs.sleep, reports.path, token, LONG_JOB_S)
        future.add_done_callback(clock)
        start = reports.wait(token, START_LIMIT_S)
        if start is None:
            return f"the job did not start within {START_LIMIT_S:.0f} s"
        pid = start[0]
        watch = Gone(pid)
        time.sleep(SETTLE_S)
        try:
            began = now_ns()
            returned = library.stop(pool, future)
            called = now_ns()
            gone = watch.wait(began + ctx.give_up_ns)
            done = clock.wait(began + ctx.give_up_ns)
        finally:
            watch.close()
        if gone is None:
            peers.kill_tree(pid)
            return f"{library.stop_api} returned {returned}; not stopped after {ctx.give_up_ms} ms"
        if done is None:
            return f"process gone, future not done after {ctx.give_up_ms} ms"
        return {
            "returned": returned,
            "call": called - began,
            "done": done - began,
            "gone": gone - began,
        }

    return trial


def _asyncio_trial(ctx: Context) -> Callable[[peers.Library, Any], Outcome]:
    async def attempt(library: peers.Library, pool: Any) -> Outcome:
        loop = asyncio.get_running_loop()
        reports = ctx.reports
        token = reports.token()
        executor, lead = library.asyncio_submit(pool)

        async def job() -> Any:
            return await loop.run_in_executor(
                executor, jobs.sleep, *lead, reports.path, token, LONG_JOB_S
            )

        task = asyncio.ensure_future(job())
        task_done: list[int] = []
        task.add_done_callback(lambda _task: task_done.append(now_ns()))
        start = await loop.run_in_executor(None, reports.wait, token, START_LIMIT_S)
        if start is None:
            task.cancel()
            return f"the job did not start within {START_LIMIT_S:.0f} s"
        pid = start[0]
        watch = Gone(pid)
        try:
            watcher = loop.run_in_executor(None, watch.wait, now_ns() + ctx.give_up_ns + 10**7)
            await asyncio.sleep(0.01)  # the watcher thread is waiting on the pidfd by now
            began = now_ns()
            task.cancel()
            await asyncio.wait([task], timeout=ctx.plan.give_up_s)
            gone = await watcher
        finally:
            watch.close()
        if gone is None:
            peers.kill_tree(pid)
            state = "cancelled" if task.cancelled() else "not cancelled"
            return f"task {state}; job not stopped after {ctx.give_up_ms} ms"
        return {
            "done": task_done[0] - began if task_done else None,
            "gone": gone - began,
        }

    def trial(library: peers.Library, pool: Any) -> Outcome:
        return asyncio.run(attempt(library, pool))

    return trial


def figure_p4(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    variants: list[peers.Library] = list(peers.LIBRARIES)
    deadpool = peers.DeadpoolCancel()
    if deadpool.available:
        variants.append(deadpool)
    sync_rows: list[dict[str, Any]] = []
    async_rows: list[dict[str, Any]] = []
    for library in variants:
        base: dict[str, Any] = {
            "library": library.label,
            "name": library.name,
            "api": library.stop_api,
        }
        if not library.available:
            sync_rows.append({**base, "status": library.why_unavailable})
            async_rows.append({**base, "api": "task.cancel()", "status": library.why_unavailable})
            continue
        ctx.say(f"P4 cancel -> gone ({library.stop_api}): {library.name}")
        sync_rows.append({**base, **_p4_row(ctx, library, _cancel_trial(ctx), plan)})
        if isinstance(library, peers.DeadpoolCancel):
            continue  # the asyncio path of Deadpool is Future.cancel() already
        ctx.say(f"P4 asyncio task cancel -> gone: {library.name}")
        row = _p4_row(ctx, library, _asyncio_trial(ctx), plan)
        async_rows.append({**base, "api": "task.cancel()", **row})
    return {"method": ctx.method, "sync": sync_rows, "asyncio": async_rows}


def _p4_row(
    ctx: Context,
    library: peers.Library,
    trial: Callable[[peers.Library, Any], Outcome],
    plan: Plan,
) -> dict[str, Any]:
    try:
        result = run_trials(Keeper(library, 1, ctx.method), trial, plan.p4_trials, plan.attempts)
    except Exception as why:
        return {"status": f"error: {type(why).__name__}: {why}"}
    row = _summaries(result["good"], ("call", "done", "gone"))
    returned = collections.Counter(t["returned"] for t in result["good"] if "returned" in t)
    row["returned"] = {str(k): v for k, v in returned.items()}
    row["failures"] = result["failures"]
    row["notes"] = result["notes"]
    return row


# ------------------------------------------------------------------- P5


def _restart_trial(ctx: Context) -> Callable[[peers.Library, Any], Outcome]:
    def trial(library: peers.Library, pool: Any) -> Outcome:
        reports = ctx.reports
        first, second = reports.token(), reports.token()
        victim = library.submit(pool, jobs.sleep, reports.path, first, LONG_JOB_S)
        queued = library.submit(pool, jobs.report, reports.path, second)
        start = reports.wait(first, START_LIMIT_S)
        if start is None:
            return f"the first job did not start within {START_LIMIT_S:.0f} s"
        watch = Gone(start[0])
        time.sleep(SETTLE_S)
        try:
            began = now_ns()
            library.stop(pool, victim)
            gone = watch.wait(began + ctx.give_up_ns)
        finally:
            watch.close()
        if gone is None:
            peers.kill_tree(start[0])
            return f"{library.stop_api}: not stopped after {ctx.give_up_ms} ms"
        following = reports.wait(second, NEXT_JOB_LIMIT_S)
        if following is None:
            return f"the next job did not start within {NEXT_JOB_LIMIT_S * 1000:.0f} ms of the kill"
        queued.result(timeout=RESULT_LIMIT_S)
        return {"next_start": following[1] - began}

    return trial


def figure_p5(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    methods = START_METHODS if plan.p5_all_methods else (ctx.method,)
    have_numpy = importlib.util.find_spec("numpy") is not None
    inits: list[tuple[str, Callable[..., Any] | None]] = [("none", None)]
    if have_numpy:
        inits.append(("import numpy", jobs.import_numpy))
    rows: list[dict[str, Any]] = []
    for method in methods:
        for init_name, initializer in inits:
            for library in peers.LIBRARIES:
                base = {
                    "library": library.label,
                    "name": library.name,
                    "method": method,
                    "initializer": init_name,
                    "api": library.stop_api,
                }
                if not library.available:
                    rows.append({**base, "status": library.why_unavailable})
                    continue
                if library.name in ("stdlib", "loky"):
                    rows.append(
                        {
                            **base,
                            "status": "cannot kill a running job "
                            "(cancel() returns False): nothing to measure",
                        }
                    )
                    continue
                ctx.say(f"P5 kill -> next job starts, {method}, init {init_name}: {library.name}")
                try:
                    keeper = Keeper(library, 1, method, initializer)
                    result = run_trials(
                        keeper, _restart_trial(ctx), plan.p5_trials, plan.attempts, P5_REST_S
                    )
                except Exception as why:
                    rows.append({**base, "status": f"error: {type(why).__name__}: {why}"})
                    continue
                row = {**base, **_summaries(result["good"], ("next_start",))}
                row["failures"] = result["failures"]
                row["notes"] = result["notes"]
                rows.append(row)
    return {
        "rows": rows,
        "numpy": "installed" if have_numpy else "not installed: numpy rows skipped",
        "numpy_in_user_process": "numpy" in sys.modules,
    }


# ------------------------------------------------------------------- P7


def _pool_pss(processes: Sequence[Any]) -> tuple[float, int]:
    import psutil

    total = 0
    counted = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
            counted += 1
        except (psutil.Error, AttributeError):
            continue
    return total / 2**20, counted


def _start_trial(ctx: Context, library: peers.Library) -> Outcome:
    reports = ctx.reports
    release = reports.release_channel()
    tokens = [reports.token() for _ in range(P7_WORKERS)]
    scope = peers.ProcessScope()
    began = now_ns()
    handle = peers.Opened(library, library.make(P7_WORKERS, "spawn"), scope)
    try:
        futures = [
            library.submit(handle.pool, jobs.hold, reports.path, token, release.path, P7_LIMIT_S)
            for token in tokens
        ]
        seen = reports.collect(tokens, P7_LIMIT_S)
        ready = now_ns()
        pids = {pid for pid, _ in seen.values()}
        pss_mb, processes = _pool_pss(scope.processes())
        release.open()
        cf.wait(futures, timeout=RESULT_LIMIT_S)
    finally:
        peers.close(handle)
        release.close()
    if len(pids) < P7_WORKERS:
        return f"only {len(pids)} distinct workers answered within {P7_LIMIT_S:.0f} s"
    return {
        "ready": ready - began,
        "pss_mb": pss_mb,
        "processes": processes,
        "leftovers": handle.leftovers,
    }


def figure_p7(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan

    def body(library: peers.Library) -> dict[str, Any]:
        good: list[dict[str, Any]] = []
        failures: list[str] = []
        for index in range(plan.p7_repeats):
            ctx.say(f"P7 start {P7_WORKERS} workers (spawn), run {index + 1}: {library.name}")
            outcome = _start_trial(ctx, library)
            if isinstance(outcome, str):
                failures.append(outcome)
                break
            good.append(outcome)
        row: dict[str, Any] = {"failures": failures}
        if not good:
            row["status"] = failures[0] if failures else "no run"
            return row
        row.update(_summaries(good, ("ready",)))
        row["pss_mb"] = stats.median([g["pss_mb"] for g in good])
        row["processes"] = max(g["processes"] for g in good)
        leftovers = sum(g["leftovers"] for g in good)
        row["notes"] = [f"{leftovers} process(es) left after shutdown, killed"] if leftovers else []
        return row

    rows = _each_library(peers.LIBRARIES, "spawn", body)
    _ratios(rows, lambda row: row["ready"]["median_ms"])
    return {"workers": P7_WORKERS, "method": "spawn", "rows": rows}


# ------------------------------------------------------------------- P8


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


def figure_p8(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    libraries = [peers.by_name("stdlib"), peers.by_name("cancelk")]

    def body(library: peers.Library) -> dict[str, Any]:
        per_job: dict[str, float] = {}
        failures: list[str] = []
        with peers.opened(library, ctx.workers, ctx.method) as handle:
            _warm(library, handle.pool, ctx.workers)
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
            "notes": _handle_notes(handle),
        }
        return row

    rows = _each_library(libraries, ctx.method, body)
    return {"workers": ctx.workers, "method": ctx.method, "window": 4096, "rows": rows}


def _has_buffersize(library: peers.Library) -> bool:
    if library.name == "cancelk":
        return True
    return library.name == "stdlib" and sys.version_info >= (3, 14)


# ------------------------------------------------------------------- run

FIGURE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "P1": figure_p1,
    "P2": figure_p2,
    "P3": figure_p3,
    "P4": figure_p4,
    "P5": figure_p5,
    "P7": figure_p7,
    "P8": figure_p8,
}


def run(
    figures: Sequence[str] = EXECUTOR_FIGURES,
    quick: bool = False,
    full: bool = False,
    start_method: str = "fork",
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the figures asked for; a JSON-ready dict (see ``format_report``)."""
    try:
        import psutil  # noqa: F401
    except ImportError as why:
        raise SystemExit(
            "the executor benchmark needs psutil: pip install 'cancelk[bench]'"
        ) from why
    say = progress or (lambda _message: None)
    plan = make_plan(quick, full)
    machine = stats.machine_info()
    began = time.monotonic()
    ctx = Context(plan, start_method, workers, say)
    results: dict[str, Any] = {}
    try:
        for name in figures:
            figure_began = time.monotonic()
            results[name] = FIGURE_FUNCTIONS[name](ctx)
            results[name]["elapsed_s"] = round(time.monotonic() - figure_began, 1)
    finally:
        ctx.reports.close()
    return {
        "benchmark": "cancelk.ProcessPoolExecutor beside its peers (P1-P5, P7, P8)",
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


# ------------------------------------------------------------------ report

fmt = stats.format_ms


def _status_or(
    row: dict[str, Any], width: int, cells: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """The row's cells, or dashes and its status in the last (notes) cell."""
    if "status" in row:
        notes = _notes(row)
        return [*["-"] * (width - 1), row["status"] + (f"; {notes}" if notes else "")]
    return cells(row)


def _ratio(row: dict[str, Any]) -> str:
    value = row.get("vs_stdlib")
    return "-" if value is None else f"{value:.2f}x"


def _notes(row: dict[str, Any]) -> str:
    parts = []
    failures = row.get("failures") or []
    if failures:
        counted = collections.Counter(failures)
        parts += [f"{what} ({n}x)" if n > 1 else what for what, n in counted.items()]
    parts += row.get("notes") or []
    return "; ".join(parts)


def _table_p1(figure: dict[str, Any]) -> str:
    rows = []
    for row in figure["rows"]:
        rows.append(
            [
                row["library"],
                *_status_or(
                    row,
                    5,
                    lambda r: [
                        str(r["summary"]["n"]),
                        fmt(r["summary"]["median_ms"]),
                        fmt(r["summary"]["p99_ms"]),
                        _ratio(r),
                        _notes(r),
                    ],
                ),
            ]
        )
    head = ["library", "n", "p50 ms", "p99 ms", "p50 vs stdlib", "notes"]
    return (
        f"P1  no-op round trip, submit -> result one at a time ({figure['workers']} workers, "
        f"{figure['method']}, warm)   target cancelk <= 0.5x stdlib\n"
        + stats.format_table(head, rows)
    )


def _table_p2(figure: dict[str, Any]) -> str:
    rows = []
    for row in figure["rows"]:
        rows.append(
            [
                row["library"],
                *_status_or(
                    row,
                    6,
                    lambda r: [
                        str(r["runs"]),
                        f"{r['jobs_per_s_median']:.0f}",
                        f"{r['jobs_per_s_worst']:.0f}",
                        f"{r['us_per_job_median']:.1f}",
                        _ratio(r),
                        _notes(r),
                    ],
                ),
            ]
        )
    head = ["library", "runs", "jobs/s p50", "jobs/s worst", "us/job", "vs stdlib", "notes"]
    return (
        f"P2  throughput: {figure['jobs']} no-op jobs submitted, then gathered "
        f"({figure['workers']} workers, {figure['method']})   target cancelk >= 1.5x stdlib\n"
        + stats.format_table(head, rows)
    )


def _cells(summary: dict[str, Any] | None) -> list[str]:
    if not summary or not summary.get("n"):
        return ["-", "-"]
    return [fmt(summary["median_ms"]), fmt(summary["p99_ms"])]


def _table_p3(figure: dict[str, Any]) -> str:
    rows = []
    for row in figure["rows"]:
        if "kind" not in row:
            rows.append([row["library"], "-", *["-"] * 7, row.get("status", "")])
            continue
        label = KIND_LABELS[row["kind"]]
        if "status" in row:
            rows.append([row["library"], label, *["-"] * 7, row["status"]])
            continue
        rows.append(
            [
                row["library"],
                label,
                str(row["all"]["n"]),
                *_cells(row["done"]),
                *_cells(row["gone"]),
                *_cells(row["all"]),
                _notes(row),
            ]
        )
    head = [
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
    ]
    return (
        f"P3  timeout precision: limit {figure['timeout_ms']:.0f} ms, ms from the deadline "
        f"(job start + 50 ms) until the future is done / the job's process is gone / both "
        f"({figure['method']}, 1 worker)   target cancelk both p50 <= 0.5, p99 <= 2\n"
        + stats.format_table(head, rows)
    )


def _returned(row: dict[str, Any]) -> str:
    returned = row.get("returned") or {}
    return ", ".join(f"{k}" if len(returned) == 1 else f"{k} {v}x" for k, v in returned.items())


def _table_p4(figure: dict[str, Any]) -> str:
    rows = []
    for row in figure["sync"]:
        rows.append(
            [
                row["library"],
                row["api"],
                *_status_or(
                    row,
                    9,
                    lambda r: [
                        str(r["gone"]["n"]),
                        _returned(r) or "-",
                        *_cells(r["call"]),
                        *_cells(r["done"]),
                        *_cells(r["gone"]),
                        _notes(r),
                    ],
                ),
            ]
        )
    head = [
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
    ]
    sync = (
        f"P4  cancel of a running time.sleep(10) job: ms from the call until the future is done "
        f"/ the job's process is gone ({figure['method']}, 1 worker)   target cancelk gone "
        f"p99 <= 1\n" + stats.format_table(head, rows)
    )
    rows = []
    for row in figure["asyncio"]:
        rows.append(
            [
                row["library"],
                *_status_or(
                    row,
                    6,
                    lambda r: [
                        str(r["gone"]["n"]),
                        *_cells(r["done"]),
                        *_cells(r["gone"]),
                        _notes(r),
                    ],
                ),
            ]
        )
    head = ["library", "n", "task done p50", "task done p99", "gone p50", "gone p99", "notes"]
    asyncio_part = (
        "P4  asyncio: task awaiting loop.run_in_executor(exe, job sleeping 10 s) cancelled: ms "
        "until the task is done / the job's process is gone   target cancelk gone p99 <= 2\n"
        + stats.format_table(head, rows)
    )
    return sync + "\n\n" + asyncio_part


def _table_p5(figure: dict[str, Any]) -> str:
    rows = []
    for row in figure["rows"]:
        rows.append(
            [
                row["method"],
                row["initializer"],
                row["library"],
                *_status_or(
                    row,
                    4,
                    lambda r: [
                        str(r["next_start"]["n"]),
                        *_cells(r["next_start"]),
                        _notes(r),
                    ],
                ),
            ]
        )
    head = ["start method", "initializer", "library", "n", "p50 ms", "p99 ms", "notes"]
    numpy_note = figure["numpy"]
    if figure.get("numpy_in_user_process"):
        numpy_note += "; numpy was already imported in the user process"
    return (
        "P5  1 worker: running job killed (cancel) -> the queued job starts, ms; trials "
        f"{P5_REST_S:g} s apart   target "
        f"cancelk p50 <= 5 (numpy {numpy_note})\n" + stats.format_table(head, rows)
    )


def _table_p7(figure: dict[str, Any]) -> str:
    rows = []
    for row in figure["rows"]:
        rows.append(
            [
                row["library"],
                *_status_or(
                    row,
                    7,
                    lambda r: [
                        str(r["ready"]["n"]),
                        fmt(r["ready"]["median_ms"], 0),
                        fmt(r["ready"]["max_ms"], 0),
                        _ratio(r),
                        f"{r['pss_mb']:.0f}",
                        str(r["processes"]),
                        _notes(r),
                    ],
                ),
            ]
        )
    head = [
        "library",
        "n",
        "ready p50 ms",
        "ready max ms",
        "vs stdlib",
        "PSS MB",
        "processes",
        "notes",
    ]
    return (
        f"P7  start {figure['workers']} workers with spawn: constructor -> {figure['workers']} "
        "distinct worker pids answered; total PSS of the pool's processes   target cancelk "
        "<= 0.25x stdlib\n" + stats.format_table(head, rows)
    )


def _table_p8(figure: dict[str, Any]) -> str:
    rows = []
    sizes: list[str] = []
    for row in figure["rows"]:
        for size in row.get("us_per_job", {}):
            if size not in sizes:
                sizes.append(size)
    for row in figure["rows"]:
        rows.append(
            [
                row["library"],
                *_status_or(
                    row,
                    len(sizes) + 2,
                    lambda r: [
                        *[
                            f"{r['us_per_job'][s]:.1f}" if s in r["us_per_job"] else "-"
                            for s in sizes
                        ],
                        "-" if math.isnan(r["flatness"]) else f"{r['flatness']:.2f}",
                        _notes(r),
                    ],
                ),
            ]
        )
    head = ["library", *[f"us/job @{int(s):,}" for s in sizes], "largest/smallest", "notes"]
    part = (
        f"P8  cost per job at growing counts ({figure['workers']} workers, {figure['method']}, "
        f"at most {figure['window']} jobs in flight)   target: flat\n"
        + stats.format_table(head, rows)
    )
    rows = []
    for row in figure["rows"]:
        mapped = row.get("map")
        if not mapped:
            continue
        if "status" in mapped:
            rows.append([row["library"], *["-"] * 6, mapped["status"]])
            continue
        rows.append(
            [
                row["library"],
                f"{mapped['items']:,}",
                f"{mapped['seconds']:.1f}",
                f"{mapped['rss_start_mb']:.1f}",
                f"{mapped['rss_max_mb']:.1f}",
                f"{mapped['growth_mb']:+.1f}",
                f"{mapped['growth_after_10pct_mb']:+.1f}",
                "",
            ]
        )
    head = [
        "library",
        "results",
        "s",
        "RSS start MB",
        "RSS max MB",
        "growth MB",
        "growth after 10% MB",
        "notes",
    ]
    part += (
        "\n\nP8  map(fn, itertools.count(), buffersize=64): user process RSS while taking "
        "results   target: bounded\n" + stats.format_table(head, rows)
    )
    return part


TABLES = {
    "P1": _table_p1,
    "P2": _table_p2,
    "P3": _table_p3,
    "P4": _table_p4,
    "P5": _table_p5,
    "P7": _table_p7,
    "P8": _table_p8,
}


def _row(rows: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for row in rows:
        if row["name"] == name and "status" not in row:
            return row
    return None


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def verdicts(result: dict[str, Any]) -> list[str]:
    """One line per target, for cancelk."""
    figures = result["figures"]
    lines = []
    if "P1" in figures:
        row = _row(figures["P1"]["rows"], "cancelk")
        if row and "vs_stdlib" in row:
            lines.append(
                f"P1 round trip {row['vs_stdlib']:.2f}x stdlib (target <= 0.5): "
                f"{_met(row['vs_stdlib'] <= 0.5)}"
            )
    if "P2" in figures:
        row = _row(figures["P2"]["rows"], "cancelk")
        if row and "vs_stdlib" in row:
            lines.append(
                f"P2 throughput {row['vs_stdlib']:.2f}x stdlib (target >= 1.5): "
                f"{_met(row['vs_stdlib'] >= 1.5)}"
            )
    if "P3" in figures:
        for row in figures["P3"]["rows"]:
            if row["name"] != "cancelk" or "kind" not in row or "status" in row:
                continue
            both = row["all"]
            ok = both["n"] > 0 and both["median_ms"] <= 0.5 and both["p99_ms"] <= 2.0
            lines.append(
                f"P3 {KIND_LABELS[row['kind']]}: both p50 {fmt(both['median_ms'])} / p99 "
                f"{fmt(both['p99_ms'])} ms (target 0.5 / 2), failed trials "
                f"{len(row['failures'])}: {_met(ok and not row['failures'])}"
            )
    if "P4" in figures:
        for part, target in (("sync", 1.0), ("asyncio", 2.0)):
            row = _row(figures["P4"][part], "cancelk")
            if row:
                gone = row["gone"]
                ok = gone["n"] > 0 and gone["p99_ms"] <= target and not row["failures"]
                lines.append(
                    f"P4 {part} cancel -> gone p99 {fmt(gone['p99_ms'])} ms "
                    f"(target <= {target:g}): {_met(ok)}"
                )
    if "P5" in figures:
        for row in figures["P5"]["rows"]:
            if row["name"] != "cancelk" or "status" in row:
                continue
            start = row["next_start"]
            ok = start["n"] > 0 and start["median_ms"] <= 5.0 and not row["failures"]
            lines.append(
                f"P5 {row['method']}, initializer {row['initializer']}: next job "
                f"starts p50 {fmt(start['median_ms'])} ms (target <= 5): {_met(ok)}"
            )
    if "P7" in figures:
        row = _row(figures["P7"]["rows"], "cancelk")
        if row and "vs_stdlib" in row:
            lines.append(
                f"P7 start 32 workers (spawn) {row['vs_stdlib']:.2f}x stdlib "
                f"(target <= 0.25): {_met(row['vs_stdlib'] <= 0.25)}; PSS "
                f"{row['pss_mb']:.0f} MB"
            )
    if "P8" in figures:
        row = _row(figures["P8"]["rows"], "cancelk")
        if row:
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


def format_header(result: dict[str, Any]) -> str:
    machine = result["machine"]
    libraries = ", ".join(f"{name} {version}" for name, version in result["libraries"].items())
    return "\n".join(
        [
            f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']} "
            f"{machine['kernel']} {machine['machine']}, {machine['python']}",
            f"libraries: {libraries}",
            f"load average at start {machine['load_average']}",
        ]
    )


def format_report(result: dict[str, Any]) -> str:
    """The terminal tables for a ``run()`` result."""
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
    parts.append(
        f"elapsed {result['elapsed_s']} s; load average before "
        f"{result['machine']['load_average']}, after {result['load_average_after']} "
        "(other work on the machine widens the tails)"
    )
    return "\n\n".join(parts)


if __name__ == "__main__":
    try:
        from benchmarks.run import main
    except ImportError:
        from run import main  # type: ignore[no-redef]
    sys.exit(main(sys.argv[1:]))
