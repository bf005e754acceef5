"""What every figure of the executor benchmark shares: the plan, the context, the trials.

    Plan         how many samples each figure gets (``make_plan``: default, quick, full)
    Context      plan, options, the report FIFO, the progress output of one run and
                 the capture of what the libraries write (quiet.py)
    Keeper       one pool of a library, replaced after a trial that left it in doubt
    run_trials   up to n good trials, at most ``attempts`` failed ones
    each_library a figure's body run once per library, its failure kept in the row
                 (both add the errors the library wrote meanwhile to the row's notes)

The limits below bound every wait: a library that does not stop a job fails
that trial, it does not hang the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable, Union

try:
    from benchmarks import jobs, peers, probes, quiet, stats
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import peers  # type: ignore[no-redef]
    import probes  # type: ignore[no-redef]
    import quiet  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]

    import jobs  # type: ignore[no-redef]

START_METHODS = ("fork", "forkserver", "spawn")
TIMEOUT_S = 0.05
TIMEOUT_NS = 50_000_000
LONG_JOB_S = 10.0  # a job meant to be stopped: never ends on its own within a trial
START_LIMIT_S = 30.0  # a job must report its start within this (worker start included)
RESULT_LIMIT_S = 30.0
# P5 trials start with the pool at rest (a pool may prepare a replacement worker in
# the background after a kill); back-to-back kills would measure something else.
P5_REST_S = 0.3
KIND_LABELS = {
    "sleep": "(a) time.sleep",
    "spin": "(b) pure-Python spin",
    "c_sleep": "(c) C call holding the GIL",
}

Outcome = Union[dict[str, Any], str]  # a trial's figures, or why it failed
Trial = Callable[["peers.Library", Any], Outcome]  # one trial on a live pool


@dataclass(frozen=True)
class Plan:
    """How many samples each figure gets; the defaults make the default run (~5 min)."""

    p1_trips: int = 1000
    p1_warmup: int = 100
    p2_jobs: int = 20_000
    p2_repeats: int = 5  # paired rounds: the machine moves every library by up to 2x between runs
    p3_trials: int = 30  # per library and job kind
    p4_trials: int = 50  # per library, sync and asyncio each
    floor_trials: int = 60  # kills of a runner-sized process (floor.py)
    attempts: int = 2  # failed trials (job not stopped) allowed per row before giving up
    p5_trials: int = 6
    p5_all_methods: bool = True
    p7_repeats: int = 2
    p8_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    p8_map_items: int = 200_000
    p9_sizes_mb: tuple[int, ...] = (1, 10, 100)
    p9_calls: tuple[int, ...] = (20, 10, 4)  # timed calls per job and size, in order
    give_up_s: float = 2.0


def make_plan(quick: bool = False, full: bool = False) -> Plan:
    """Default ~5 min on a busy 2-core machine; quick about a minute."""
    if quick:
        return replace(
            Plan(),
            p1_trips=200,
            p1_warmup=20,
            p2_jobs=3000,
            p2_repeats=3,
            p3_trials=5,
            p4_trials=8,
            floor_trials=15,
            attempts=1,
            p5_trials=3,
            p5_all_methods=False,
            p7_repeats=1,
            p8_sizes=(1_000, 10_000),
            p8_map_items=20_000,
            p9_sizes_mb=(1, 10),
            p9_calls=(6, 3),
        )
    plan = Plan()
    if full:
        plan = replace(plan, p8_sizes=(*plan.p8_sizes, 1_000_000))
    return plan


class Context:
    """What every figure needs: plan, options, the report FIFO, progress and the
    capture of what the libraries write."""

    def __init__(
        self,
        plan: Plan,
        method: str,
        workers: int,
        say: Callable[[str], None],
        capture: quiet.Uncaptured = quiet.UNCAPTURED,
    ) -> None:
        self.plan = plan
        self.method = method
        self.workers = workers
        self.say = say
        self.capture = capture  # the libraries' own output, see quiet.py
        self.reports = probes.Reports()
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
            warm(self.library, self.handle.pool, self.args[0])
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


def warm(library: peers.Library, pool: Any, workers: int) -> None:
    """Start the workers: a few rounds of no-op jobs."""
    futures = [library.submit(pool, jobs.noop) for _ in range(4 * workers)]
    for future in futures:
        future.result(timeout=START_LIMIT_S)


def run_trials(
    ctx: Context, keeper: Keeper, trial: Trial, n: int, rest_s: float = 0.0
) -> dict[str, Any]:
    """Up to ``n`` good trials, ``rest_s`` apart; stop after ``plan.attempts`` failed
    ones (the pool is replaced after each)."""
    good: list[dict[str, Any]] = []
    failures: list[str] = []
    with ctx.capture.heard() as heard:
        try:
            while len(good) < n and len(failures) < ctx.plan.attempts:
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
    return {"good": good, "failures": failures, "notes": keeper.notes() + heard}


def summaries(good: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        samples = [trial[key] for trial in good if trial.get(key) is not None]
        out[key] = stats.summarize(samples)
        out[key]["samples_ms"] = [round(s / 1e6, 4) for s in samples]
    return out


def each_library(
    ctx: Context,
    libraries: Sequence[peers.Library],
    method: str,
    body: Callable[[peers.Library], dict[str, Any]],
) -> list[dict[str, Any]]:
    """A row per library: ``body``'s figures, or why there are none."""
    rows = []
    for library in libraries:
        row: dict[str, Any] = {"library": library.label, "name": library.name}
        row["notes"] = [library.method_note(method)] if library.method_note(method) else []
        if not library.available:
            row["status"] = library.why_unavailable
            rows.append(row)
            continue
        with ctx.capture.heard() as heard:
            try:
                measured = body(library)
                measured["notes"] = row["notes"] + measured.get("notes", [])
                row.update(measured)
            except Exception as why:
                row["status"] = f"error: {type(why).__name__}: {why}"
        row["notes"] += heard
        rows.append(row)
    return rows


def handle_notes(handle: peers.Opened) -> list[str]:
    notes = [handle.shutdown_error] if handle.shutdown_error else []
    if handle.leftovers:
        notes.append(f"{handle.leftovers} process(es) left after shutdown, killed")
    return notes


def ratios(rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> None:
    """``vs_stdlib`` on every measured row: value / stdlib's value."""
    base = next((row for row in rows if row["name"] == "stdlib" and "status" not in row), None)
    for row in rows:
        if base is None or "status" in row:
            continue
        row["vs_stdlib"] = value(row) / value(base)
