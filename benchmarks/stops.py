"""How a library stops a running job: P3 time limits, P4 cancel, P5 the next job.

    P3  a 0.05 s time limit on (a) time.sleep, (b) a pure-Python spin, (c) a C call
        holding the GIL: deadline -> future done, -> job process gone
                                                           target p50 <= 0.5 ms, p99 <= 2 ms
    P4  cancel of a running time.sleep(10) job -> its process gone    target p99 <= 1 ms
        asyncio: cancel a task awaiting run_in_executor -> gone       target p99 <= 2 ms
    P5  1 worker: kill the running job -> the next queued job starts  target p50 <= 5 ms
        (fork, forkserver, spawn; also with an initializer that imports numpy)

The deadline of a P3 job is its own start + 50 ms (cancelk starts its clock a few
microseconds earlier, when the runner takes the job, so its figures are
pessimistic by that much; Pebble starts its clock when its manager thread hears
that the job began, later than the job's start).  "Done" is stamped by a
done-callback in whichever thread completes the future, "gone" when the job's
pidfd becomes readable (probes.py).  A job still running ``give_up`` (2 s) past
its deadline or cancel is reported as "not stopped after 2000 ms", killed by the
benchmark, and the pool is replaced.  P4 and P5 cancel a job 10 ms after it
reported its start.

cancelk's P3 and P4 trials are each followed, in the same pool, by their floor:
the same job, started the same way, SIGKILLed by the benchmark at the moment the
stop would begin (the deadline, or 10 ms after the start), timed until its pidfd
is readable.  The two alternate trial by trial, so what the machine does
meanwhile weighs on both alike; floor.py reports the overhead over this floor
as the median of the trials' differences.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import os
import signal
import sys
import time
from typing import Any, Callable

try:
    from benchmarks import harness, jobs, peers, probes
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import harness  # type: ignore[no-redef]
    import peers  # type: ignore[no-redef]
    import probes  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

__all__ = ["figure_p3", "figure_p4", "figure_p5"]

NEXT_JOB_LIMIT_S = 10.0  # P5: kill -> next job start
# P4/P5 cancel a job this long after it reported its start: a cancel lands on a
# job that is well under way (Deadpool learns a job's pid only after its start).
SETTLE_S = 0.01


def _timeout_trial(ctx: harness.Context, kind: str) -> harness.Trial:
    def trial(library: peers.Library, pool: Any) -> harness.Outcome:
        reports = ctx.reports
        token = reports.token()
        clock = probes.DoneClock()
        future = library.submit_timeout(
            pool, jobs.KINDS[kind], (reports.path, token, harness.LONG_JOB_S), harness.TIMEOUT_S
        )
        future.add_done_callback(clock)
        start = reports.wait(token, harness.START_LIMIT_S)
        if start is None:
            return f"the job did not start within {harness.START_LIMIT_S:.0f} s"
        pid, started = start
        watch = probes.Gone(pid)
        try:
            deadline = started + harness.TIMEOUT_NS
            until = deadline + ctx.give_up_ns
            gone = watch.wait(until)
            done = clock.wait(until)
        finally:
            watch.close()
        if gone is None:
            peers.kill_tree(pid)
            clock.wait(probes.now_ns() + 5_000_000_000)
            return f"not stopped after {ctx.give_up_ms} ms"
        if done is None:
            return f"process gone, future not done {ctx.give_up_ms} ms after the deadline"
        return {
            "done": done - deadline,
            "gone": gone - deadline,
            "all": max(done, gone) - deadline,
            "outcome": probes.outcome_name(future),
            "gone_before_watch": watch.already,
        }

    return trial


def _time_stop(
    ctx: harness.Context, pid: int, stop: Callable[[], Any]
) -> tuple[int, int, int | None, Any]:
    """``stop()``, timed until ``pid`` is gone: (began, stop returned, gone or
    None, what it returned), monotonic ns; a ``pid`` still there is killed."""
    watch = probes.Gone(pid)  # before the stop: the pid cannot be reused meanwhile
    try:
        began = probes.now_ns()
        returned = stop()
        called = probes.now_ns()
        gone = watch.wait(began + ctx.give_up_ns)
    finally:
        watch.close()
    if gone is None:
        peers.kill_tree(pid)
    return began, called, gone, returned


def _floor_trial(
    ctx: harness.Context, job: Callable[..., Any], kill_after_ns: int
) -> Callable[[peers.Library, Any], int | str]:
    """The kernel's part of a stop: ``job`` started as a trial's, its process
    SIGKILLed ``kill_after_ns`` after its start by the benchmark, ns to exited."""

    def trial(library: peers.Library, pool: Any) -> int | str:
        reports = ctx.reports
        token = reports.token()
        future = library.submit(pool, job, reports.path, token, harness.LONG_JOB_S)
        start = reports.wait(token, harness.START_LIMIT_S)
        if start is None:
            future.cancel()  # cancelk's cancel: queued or running, it goes
            return f"the floor's job did not start within {harness.START_LIMIT_S:.0f} s"
        pid, started = start
        time.sleep(max(0.0, (started + kill_after_ns - probes.now_ns()) / 1e9))
        began, _, gone, _ = _time_stop(ctx, pid, lambda: os.kill(pid, signal.SIGKILL))
        if gone is None:
            return f"a SIGKILLed runner ({pid}) had not exited after {ctx.give_up_ms} ms"
        future.exception(timeout=harness.RESULT_LIMIT_S)  # the job died
        return gone - began

    return trial


def _with_floor(
    trial: harness.Trial, floor: Callable[[peers.Library, Any], int | str], measure: str
) -> harness.Trial:
    """cancelk's trial, then its floor in the same pool (see the module's
    docstring); ``over_floor`` is the trial's ``measure`` minus its floor.  A
    floor that fails is noted; the trial's own figures still count."""

    def paired(library: peers.Library, pool: Any) -> harness.Outcome:
        outcome = trial(library, pool)
        if isinstance(outcome, str) or library.name != "cancelk":
            return outcome
        try:
            took = floor(library, pool)
        except Exception as why:
            took = f"{type(why).__name__}: {why}"
        if isinstance(took, str):
            return {**outcome, "floor_failed": took}
        return {**outcome, "floor": took, "over_floor": outcome[measure] - took}

    return paired


def _floor_notes(good: list[dict[str, Any]]) -> list[str]:
    failed = collections.Counter(t["floor_failed"] for t in good if "floor_failed" in t)
    return [f"paired floor not measured ({n}x): {why}" for why, n in failed.items()]


def figure_p3(ctx: harness.Context) -> dict[str, Any]:
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
            ctx.say(f"P3 timeout precision, {harness.KIND_LABELS[kind]}: {library.name}")
            row: dict[str, Any] = {
                "library": library.label,
                "name": library.name,
                "kind": kind,
                "api": library.timeout_api,
            }
            try:
                keeper = harness.Keeper(library, 1, ctx.method)
                floor = _floor_trial(ctx, jobs.KINDS[kind], harness.TIMEOUT_NS)
                trial = _with_floor(_timeout_trial(ctx, kind), floor, "all")
                result = harness.run_trials(ctx, keeper, trial, plan.p3_trials)
            except Exception as why:
                row["status"] = f"error: {type(why).__name__}: {why}"
                rows.append(row)
                continue
            measures = ("done", "gone", "all", "floor", "over_floor")
            row.update(harness.summaries(result["good"], measures))
            row["outcomes"] = dict(collections.Counter(t["outcome"] for t in result["good"]))
            row["failures"] = result["failures"]
            row["notes"] = result["notes"] + _floor_notes(result["good"])
            rows.append(row)
    return {"method": ctx.method, "timeout_ms": harness.TIMEOUT_S * 1e3, "rows": rows}


def _cancel_trial(ctx: harness.Context) -> harness.Trial:
    def trial(library: peers.Library, pool: Any) -> harness.Outcome:
        reports = ctx.reports
        token = reports.token()
        clock = probes.DoneClock()
        future = library.submit(pool, jobs.sleep, reports.path, token, harness.LONG_JOB_S)
        future.add_done_callback(clock)
        start = reports.wait(token, harness.START_LIMIT_S)
        if start is None:
            return f"the job did not start within {harness.START_LIMIT_S:.0f} s"
        pid = start[0]
        time.sleep(SETTLE_S)
        began, called, gone, returned = _time_stop(ctx, pid, lambda: library.stop(pool, future))
        done = clock.wait(began + ctx.give_up_ns)
        if gone is None:
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


def _asyncio_trial(ctx: harness.Context) -> harness.Trial:
    async def attempt(library: peers.Library, pool: Any) -> harness.Outcome:
        loop = asyncio.get_running_loop()
        reports = ctx.reports
        token = reports.token()
        executor, lead = library.asyncio_submit(pool)

        async def job() -> Any:
            return await loop.run_in_executor(
                executor, jobs.sleep, *lead, reports.path, token, harness.LONG_JOB_S
            )

        task = asyncio.ensure_future(job())
        task_done: list[int] = []
        task.add_done_callback(lambda _task: task_done.append(probes.now_ns()))
        start = await loop.run_in_executor(None, reports.wait, token, harness.START_LIMIT_S)
        if start is None:
            task.cancel()
            return f"the job did not start within {harness.START_LIMIT_S:.0f} s"
        pid = start[0]
        watch = probes.Gone(pid)
        try:
            watcher = loop.run_in_executor(
                None, watch.wait, probes.now_ns() + ctx.give_up_ns + 10**7
            )
            await asyncio.sleep(0.01)  # the watcher thread is waiting on the pidfd by now
            began = probes.now_ns()
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

    def trial(library: peers.Library, pool: Any) -> harness.Outcome:
        return asyncio.run(attempt(library, pool))

    return trial


def figure_p4(ctx: harness.Context) -> dict[str, Any]:
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
        floor = _floor_trial(ctx, jobs.sleep, int(SETTLE_S * 1e9))
        ctx.say(f"P4 cancel -> gone ({library.stop_api}): {library.name}")
        trial = _with_floor(_cancel_trial(ctx), floor, "gone")
        sync_rows.append({**base, **_p4_row(ctx, library, trial, plan)})
        if isinstance(library, peers.DeadpoolCancel):
            continue  # the asyncio path of Deadpool is Future.cancel() already
        ctx.say(f"P4 asyncio task cancel -> gone: {library.name}")
        row = _p4_row(ctx, library, _with_floor(_asyncio_trial(ctx), floor, "gone"), plan)
        async_rows.append({**base, "api": "task.cancel()", **row})
    return {"method": ctx.method, "sync": sync_rows, "asyncio": async_rows}


def _p4_row(
    ctx: harness.Context,
    library: peers.Library,
    trial: harness.Trial,
    plan: harness.Plan,
) -> dict[str, Any]:
    try:
        result = harness.run_trials(
            ctx, harness.Keeper(library, 1, ctx.method), trial, plan.p4_trials
        )
    except Exception as why:
        return {"status": f"error: {type(why).__name__}: {why}"}
    row = harness.summaries(result["good"], ("call", "done", "gone", "floor", "over_floor"))
    returned = collections.Counter(t["returned"] for t in result["good"] if "returned" in t)
    row["returned"] = {str(k): v for k, v in returned.items()}
    row["failures"] = result["failures"]
    row["notes"] = result["notes"] + _floor_notes(result["good"])
    return row


def _restart_trial(ctx: harness.Context) -> harness.Trial:
    def trial(library: peers.Library, pool: Any) -> harness.Outcome:
        reports = ctx.reports
        first, second = reports.token(), reports.token()
        victim = library.submit(pool, jobs.sleep, reports.path, first, harness.LONG_JOB_S)
        queued = library.submit(pool, jobs.report, reports.path, second)
        start = reports.wait(first, harness.START_LIMIT_S)
        if start is None:
            return f"the first job did not start within {harness.START_LIMIT_S:.0f} s"
        watch = probes.Gone(start[0])
        time.sleep(SETTLE_S)
        try:
            began = probes.now_ns()
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
        queued.result(timeout=harness.RESULT_LIMIT_S)
        return {"next_start": following[1] - began}

    return trial


def figure_p5(ctx: harness.Context) -> dict[str, Any]:
    plan = ctx.plan
    methods = harness.START_METHODS if plan.p5_all_methods else (ctx.method,)
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
                    keeper = harness.Keeper(library, 1, method, initializer)
                    result = harness.run_trials(
                        ctx, keeper, _restart_trial(ctx), plan.p5_trials, harness.P5_REST_S
                    )
                except Exception as why:
                    rows.append({**base, "status": f"error: {type(why).__name__}: {why}"})
                    continue
                row = {**base, **harness.summaries(result["good"], ("next_start",))}
                row["failures"] = result["failures"]
                row["notes"] = result["notes"]
                rows.append(row)
    return {
        "rows": rows,
        "numpy": "installed" if have_numpy else "not installed: numpy rows skipped",
        "numpy_in_user_process": "numpy" in sys.modules,
    }
