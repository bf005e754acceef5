"""Benchmark of ``killable_wrapper`` inside the stdlib pool (design P6 and P3).

    user process                       host worker (stdlib ProcessPoolExecutor, 1 worker;
    ------------                       initializer sets CANCELK_BACKEND)
    round trips: submit(noop)  ----->  noop()
           vs submit(killable_wrapper, noop) -> fork job, wait in C, reap
    submit(measuring fn)       ----->  times N x noop() and N x killable_wrapper(noop)
                                       times killable_wrapper(job, timeout=50 ms):
                                         t0 = monotonic_ns(); deadline = t0 + 50 ms
                                         ProcessTimeoutError raised  -> "raised"
                                         every job process gone      -> "all gone"

P6: overhead per call = killable_wrapper(noop) - median(noop()), measured inside
the host worker and as a round trip from the user process.  Target <= 2 ms.

P3: overshoot past the deadline for a job that (a) sleeps, (b) spins in pure
Python, (c) holds the GIL in a C call (libc ``sleep`` through ``ctypes.PyDLL``),
(d) waits on a ``sleep`` grandchild.  Every job reports its pids over a pipe;
the host polls them after the exception.  A process counts as gone when it no
longer exists *or is a zombie*: a zombie runs nothing, and a reparented
grandchild is reaped by init (or a subreaper) on its own schedule, which is not
the wrapper's doing.  killable_wrapper counts its deadline from just before its
fork, slightly after t0, so the figures are pessimistic by that much.
Target: p50 <= 0.5 ms, p99 <= 2 ms.

The stdlib contrast: ``pool.submit(job).result(timeout=0.05)`` raises on time,
but the job (1 s long) keeps the worker busy; we watch for up to 1 s past the
deadline and report how long the worker stayed busy, or "still running".

Both C backends run (``pidfd`` and ``posix``), each in its own pool.

    python benchmarks/wrapper_bench.py [--quick] [--repeat N]
                                       [--start-method fork|forkserver|spawn] [--json FILE]

Importable: ``run(...)`` returns a dict, ``format_report(result)`` the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Union

import cancelk
from cancelk import ProcessTimeoutError, killable_wrapper

try:
    from benchmarks import stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import stats  # type: ignore[no-redef]

__all__ = ["BACKENDS", "KINDS", "Plan", "format_report", "main", "make_plan", "run"]

TIMEOUT_S = 0.05
TIMEOUT_NS = 50_000_000
KILLED_JOB_S = 10.0  # long enough never to end on its own before the 50 ms deadline
STDLIB_JOB_S = 1.0
STDLIB_WATCH_NS = 1_000_000_000  # how long past the deadline we watch a stdlib job
GONE_LIMIT_NS = 5_000_000_000
BACKENDS = ("pidfd", "posix")
KINDS = ("sleep", "spin", "gil_c_call", "grandchild")
KIND_LABELS = {
    "sleep": "(a) time.sleep",
    "spin": "(b) pure-Python spin",
    "gil_c_call": "(c) C call holding the GIL",
    "grandchild": "(d) sleep grandchild (Popen)",
}

Sample = Union[tuple[int, int], str]


# --------------------------------------------------------------------- jobs


def noop() -> None:
    """The job whose cost is nothing: what is measured is the machinery."""
    return None


def _report_pids(pid_fd: int, *pids: int) -> None:
    if pid_fd >= 0:
        os.write(pid_fd, (" ".join(map(str, pids)) + "\n").encode())


def sleep_job(pid_fd: int, seconds: float) -> None:
    _report_pids(pid_fd, os.getpid())
    time.sleep(seconds)


def spin_job(pid_fd: int, seconds: float) -> None:
    _report_pids(pid_fd, os.getpid())
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def gil_c_call_job(pid_fd: int, seconds: float) -> None:
    _report_pids(pid_fd, os.getpid())
    ctypes.PyDLL(None).sleep(math.ceil(seconds))  # PyDLL keeps the GIL during the call


def grandchild_job(pid_fd: int, seconds: float) -> None:
    child = subprocess.Popen(["sleep", str(seconds)])
    _report_pids(pid_fd, os.getpid(), child.pid)
    child.wait()


JOBS: dict[str, Callable[[int, float], None]] = {
    "sleep": sleep_job,
    "spin": spin_job,
    "gil_c_call": gil_c_call_job,
    "grandchild": grandchild_job,
}


# ------------------------------------------------------ in the host worker


def set_backend(backend: str) -> None:
    """Pool initializer: the backend every later killable_wrapper loop uses."""
    os.environ["CANCELK_BACKEND"] = backend


def worker_facts() -> dict[str, Any]:
    """What the host worker looks like; raises if the backend is unavailable."""
    from cancelk import _core

    return {
        "backend": _core.selected_backend(),
        "threads": threading.active_count(),
        "job_start": "fork" if threading.active_count() == 1 else "clean interpreter",
    }


def _fork_exit_reap() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)


def time_calls_in_worker(calls: int, warmup: int) -> dict[str, list[int]]:
    """Per-call ns of noop(), killable_wrapper(noop) and a bare fork, interleaved."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        noop()
        killable_wrapper(noop)
        _fork_exit_reap()
    direct: list[int] = []
    wrapped: list[int] = []
    forked: list[int] = []
    for _ in range(calls):
        t = clock()
        noop()
        direct.append(clock() - t)
        t = clock()
        killable_wrapper(noop)
        wrapped.append(clock() - t)
        t = clock()
        _fork_exit_reap()
        forked.append(clock() - t)
    return {"direct": direct, "wrapped": wrapped, "fork_floor": forked}


def _is_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return _is_gone_portable(pid)
    fields = data.rpartition(b")")[2].split()
    return not fields or fields[0] in (b"Z", b"X")


def _is_gone_portable(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_HAVE_PROC = os.path.isdir("/proc/self")


def _wait_gone(pids: Sequence[int]) -> int | None:
    """Tight poll until every pid is gone; monotonic ns then, None past the limit."""
    check = _is_gone if _HAVE_PROC else _is_gone_portable
    limit = time.monotonic_ns() + GONE_LIMIT_NS
    pending = list(pids)
    while True:
        pending = [pid for pid in pending if not check(pid)]
        now = time.monotonic_ns()
        if not pending:
            return now
        if now > limit:
            return None


def _read_pids(read_fd: int) -> list[int]:
    os.set_blocking(read_fd, False)
    try:
        text = os.read(read_fd, 4096).decode()
    except BlockingIOError:
        return []
    return [int(word) for word in text.split()]


def _one_timeout_trial(job: Callable[[int, float], None]) -> Sample:
    """(raised, all gone) in ns past the deadline, or why the trial failed."""
    read_fd, write_fd = os.pipe()
    try:
        t0 = time.monotonic_ns()
        try:
            killable_wrapper(job, write_fd, KILLED_JOB_S, killable_wrapper_timeout=TIMEOUT_S)
        except ProcessTimeoutError:
            raised = time.monotonic_ns()
        except Exception as why:
            return f"{type(why).__name__}: {why}"
        else:
            return "the job ended on its own"
        pids = _read_pids(read_fd)
        if not pids:
            return "the job was killed before it reported its pids"
        gone = _wait_gone(pids)
        if gone is None:
            return "a job process was still alive 5 s after the timeout"
    finally:
        os.close(read_fd)
        os.close(write_fd)
    deadline = t0 + TIMEOUT_NS
    return raised - deadline, gone - deadline


def timeout_trials_in_worker(kind: str, trials: int, warmup: int) -> dict[str, Any]:
    """Run the timeout trial ``warmup + trials`` times; keep the last ``trials``."""
    job = JOBS[kind]
    raised: list[int] = []
    gone: list[int] = []
    failures: list[str] = []
    for index in range(warmup + trials):
        sample = _one_timeout_trial(job)
        if isinstance(sample, str):
            failures.append(sample)
        elif index >= warmup:
            raised.append(sample[0])
            gone.append(sample[1])
    return {"raised": raised, "gone": gone, "failures": failures}


# ---------------------------------------------------- in the user process


@dataclass(frozen=True)
class Plan:
    """How many samples each figure gets."""

    calls: int  # killable_wrapper(noop) calls timed inside the host worker
    round_trips: int  # submit -> result pairs (plain, wrapped) from the user process
    timeout_trials: int  # per P3 variant and backend
    stdlib_trials: int  # 1 s stdlib jobs per variant
    warmup_calls: int
    warmup_trials: int


def make_plan(quick: bool = False, repeat: int | None = None) -> Plan:
    """Default ~60 s on 2 cores, quick ~10 s; ``repeat`` sets the timeout trials
    per variant, with 10x as many timed calls and 5x as many round trips."""
    if quick:
        plan = Plan(200, 100, 10, 1, 20, 1)
    else:
        plan = Plan(1000, 400, 70, 2, 50, 2)
    if repeat is not None:
        if repeat < 1:
            raise ValueError("--repeat must be at least 1")
        plan = replace(plan, calls=10 * repeat, round_trips=5 * repeat, timeout_trials=repeat)
    return plan


def time_round_trips(pool: cf.Executor, pairs: int, warmup: int) -> dict[str, list[int]]:
    """Interleaved ns of submit(noop).result() and submit(killable_wrapper, noop).result()."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        pool.submit(noop).result()
        pool.submit(killable_wrapper, noop).result()
    plain: list[int] = []
    wrapped: list[int] = []
    for _ in range(pairs):
        t = clock()
        pool.submit(noop).result()
        plain.append(clock() - t)
        t = clock()
        pool.submit(killable_wrapper, noop).result()
        wrapped.append(clock() - t)
    return {"plain": plain, "wrapped": wrapped}


def _overhead(wrapped: Sequence[int], baseline: Sequence[int]) -> list[float]:
    base = stats.median(baseline)
    return [w - base for w in wrapped]


def _make_pool(start_method: str, backend: str | None = None) -> cf.ProcessPoolExecutor:
    context = multiprocessing.get_context(start_method)
    if backend is None:
        return cf.ProcessPoolExecutor(max_workers=1, mp_context=context)
    return cf.ProcessPoolExecutor(
        max_workers=1, mp_context=context, initializer=set_backend, initargs=(backend,)
    )


def measure_backend(backend: str, plan: Plan, start_method: str) -> dict[str, Any]:
    """P6 and P3 for one C backend, in a fresh stdlib pool."""
    with _make_pool(start_method, backend) as pool:
        try:
            facts = pool.submit(worker_facts).result()
        except (RuntimeError, ValueError) as why:
            return {"skipped": str(why)}
        calls = pool.submit(time_calls_in_worker, plan.calls, plan.warmup_calls).result()
        trips = time_round_trips(pool, plan.round_trips, plan.warmup_calls)
        timeouts = {
            kind: pool.submit(
                timeout_trials_in_worker, kind, plan.timeout_trials, plan.warmup_trials
            ).result()
            for kind in KINDS
        }
    return {
        "worker": facts,
        "p6_in_worker": {
            "noop": stats.summarize(calls["direct"]),
            "killable_wrapper": stats.summarize(calls["wrapped"]),
            "overhead": stats.summarize(_overhead(calls["wrapped"], calls["direct"])),
            "fork_exit_reap": stats.summarize(calls["fork_floor"]),
        },
        "p6_round_trip": {
            "plain": stats.summarize(trips["plain"]),
            "killable_wrapper": stats.summarize(trips["wrapped"]),
            "overhead": stats.summarize(_overhead(trips["wrapped"], trips["plain"])),
        },
        "p3": {
            kind: {
                "raised": stats.summarize(result["raised"]),
                "gone": stats.summarize(result["gone"]),
                "failures": result["failures"],
            }
            for kind, result in timeouts.items()
        },
    }


def _stdlib_trial(pool: cf.Executor, kind: str) -> tuple[float, float | None]:
    """(raise overshoot, busy after deadline or None if still running) in ns."""
    t0 = time.monotonic_ns()
    future = pool.submit(JOBS[kind], -1, STDLIB_JOB_S)
    try:
        future.result(timeout=TIMEOUT_S)
    except cf.TimeoutError:
        raised = time.monotonic_ns()
    else:
        raise RuntimeError(f"the stdlib {kind} job ended before its 50 ms timeout")
    deadline = t0 + TIMEOUT_NS
    watch_s = max(0.0, (deadline + STDLIB_WATCH_NS - time.monotonic_ns()) / 1e9)
    done, _ = cf.wait([future], timeout=watch_s)
    busy = time.monotonic_ns() - deadline if done else None
    future.result()  # a still-running job ends on its own (it is 1 s long)
    return raised - deadline, busy


def measure_stdlib(plan: Plan, start_method: str) -> dict[str, Any]:
    """What the stdlib offers: result(timeout) raises, the job runs on."""
    out: dict[str, Any] = {}
    with _make_pool(start_method) as pool:
        pool.submit(noop).result()  # start the worker outside the timings
        for kind in KINDS:
            trials = [_stdlib_trial(pool, kind) for _ in range(plan.stdlib_trials)]
            busy = [b for _, b in trials if b is not None]
            out[kind] = {
                "raised": stats.summarize([r for r, _ in trials]),
                "busy_after_deadline": stats.summarize(busy),
                "still_running_after_watch": len(trials) - len(busy),
            }
    return out


def run(
    quick: bool = False,
    repeat: int | None = None,
    start_method: str = "fork",
    backends: Sequence[str] = BACKENDS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure everything; a JSON-ready dict (see ``format_report``)."""
    say = progress or (lambda _message: None)
    plan = make_plan(quick, repeat)
    machine = stats.machine_info()
    began = time.monotonic()
    results: dict[str, Any] = {}
    for backend in backends:
        say(f"killable_wrapper, {backend} backend ...")
        results[backend] = measure_backend(backend, plan, start_method)
    say("stdlib result(timeout) contrast ...")
    stdlib = measure_stdlib(plan, start_method)
    return {
        "benchmark": "killable_wrapper (P3, P6)",
        "cancelk_version": cancelk.__version__,
        "machine": machine,
        "config": {
            "start_method": start_method,
            "quick": quick,
            "timeout_ms": TIMEOUT_NS / 1e6,
            "stdlib_job_ms": STDLIB_JOB_S * 1e3,
            "stdlib_watch_ms": STDLIB_WATCH_NS / 1e6,
            "plan": asdict(plan),
        },
        "backends": results,
        "stdlib": stdlib,
        "elapsed_s": round(time.monotonic() - began, 1),
        "load_average_after": stats.machine_info()["load_average"],
    }


# ------------------------------------------------------------------ report


def _cells(summary: dict[str, Any]) -> list[str]:
    return [stats.format_ms(summary["median_ms"]), stats.format_ms(summary["p99_ms"])]


def _backend_columns(backends: Sequence[str]) -> list[str]:
    return [f"{b} {what}" for b in backends for what in ("p50", "p99")]


P6_ROWS = (
    ("p6_in_worker", "noop", "in worker: noop()"),
    ("p6_in_worker", "killable_wrapper", "in worker: killable_wrapper(noop)"),
    ("p6_in_worker", "overhead", "in worker: OVERHEAD"),
    ("p6_in_worker", "fork_exit_reap", "in worker: bare fork+_exit+waitpid"),
    ("p6_round_trip", "plain", "round trip: submit(noop)"),
    ("p6_round_trip", "killable_wrapper", "round trip: submit(killable_wrapper, noop)"),
    ("p6_round_trip", "overhead", "round trip: OVERHEAD"),
)


def _p6_table(measured: dict[str, Any]) -> str:
    names = list(measured)
    rows = []
    for section, key, label in P6_ROWS:
        row = [label, str(measured[names[0]][section][key]["n"])]
        for name in names:
            row += _cells(measured[name][section][key])
        rows.append(row)
    return stats.format_table(["figure (ms)", "n", *_backend_columns(names)], rows)


def _p3_table(measured: dict[str, Any]) -> str:
    names = list(measured)
    rows = []
    for kind in KINDS:
        for key, what in (("raised", "raised"), ("gone", "all gone")):
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
        ok6 = overhead["median_ms"] <= 2.0
        worst = max(KINDS, key=lambda kind: result["p3"][kind]["gone"]["p99_ms"])
        gone = result["p3"][worst]["gone"]
        worst50 = max(result["p3"][kind]["gone"]["median_ms"] for kind in KINDS)
        ok3 = gone["p99_ms"] <= 2.0 and worst50 <= 0.5
        failures = sum(len(result["p3"][kind]["failures"]) for kind in KINDS)
        lines.append(
            f"{name}: P6 overhead p50 {overhead['median_ms']:.3f} ms (target <= 2) "
            f"{'MET' if ok6 else 'NOT MET'}; P3 worst all-gone p50 {worst50:.3f} / "
            f"p99 {gone['p99_ms']:.3f} ms ({KIND_LABELS[worst]}; target 0.5 / 2) "
            f"{'MET' if ok3 else 'NOT MET'}; failed trials: {failures}"
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
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']} "
        f"{machine['kernel']} {machine['machine']}, {machine['python']}",
        f"host pool: stdlib ProcessPoolExecutor(max_workers=1), start method "
        f"{config['start_method']}; plan {config['plan']}",
    ]
    for name, why in skipped.items():
        head.append(f"backend {name} skipped: {why}")
    parts = ["\n".join(head)]
    if measured:
        facts = ", ".join(
            f"{name}: job start by {r['worker']['job_start']}" for name, r in measured.items()
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
    parts.append(
        f"elapsed {result['elapsed_s']} s; load average before {machine['load_average']}, "
        f"after {result['load_average_after']} (other work on the machine widens the tails)"
    )
    return "\n\n".join(parts)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (~10 s)")
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help="timeout trials per variant (10N calls, 5N round trips)",
    )
    parser.add_argument(
        "--start-method", default="fork", choices=multiprocessing.get_all_start_methods()
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    result = run(
        quick=args.quick,
        repeat=args.repeat,
        start_method=args.start_method,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(format_report(result))
    if args.json:
        stats.dump_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
