"""I3: every future reaches exactly one final state, whatever happens.

Each future gets a done-callback that counts its calls and records the state
it saw; at the end every count must be exactly 1, the state must not have
changed since, and the outcome must be the one its job's kind calls for
(result, the job's exception, ProcessDiedError, ProcessTimeoutError,
ProcessCancelledError, BrokenProcessPool).

Faults injected:

- ``shutdown(cancel_futures=True)`` from another thread at a random moment
  while four threads submit a mix of jobs: the submit that comes too late
  raises RuntimeError (never hangs, never loses a future) and no future is
  left pending when shutdown returns (fork and spawn supervisors);
- eight threads submitting a mix of every outcome (segfaults, exits, time
  limits, cancels of running and queued jobs) into one pool;
- six threads calling ``cancel()`` on the same future at about the moment
  the job ends: all of them get the same answer, which matches the outcome;
- SIGKILL of the supervisor at a random moment with jobs running and queued;
- an initializer that always fails, and one that fails in half the runners,
  with threads submitting.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from cancelk import ProcessCancelledError, ProcessTimeout

import jobs
import procs
from jobs import RESULT_WAIT


class Ledger:
    """Futures with their kind and token, and what their done-callbacks saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[concurrent.futures.Future, str, str]] = []
        self.calls: dict[int, list[str]] = {}

    def add(self, future, kind, token):
        with self.lock:
            self.entries.append((future, kind, token))
        future.add_done_callback(self._done)

    def _done(self, future):
        state = "cancelled" if future.cancelled() else repr(future.exception(timeout=0))
        with self.lock:
            self.calls.setdefault(id(future), []).append(state)

    def check_once(self):
        """Every future done, its callback run once, its state unchanged."""
        pending = [t for f, _, t in self.entries if not f.done()]
        assert not pending, f"{len(pending)} futures never ended: {pending[:10]}"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                if all(len(self.calls.get(id(f), ())) >= 1 for f, _, _ in self.entries):
                    break
            time.sleep(0.01)
        time.sleep(0.05)  # a second call would come now
        with self.lock:
            for future, kind, token in self.entries:
                seen = self.calls.get(id(future), [])
                assert len(seen) == 1, f"{kind} {token}: done-callback ran {len(seen)} times"
                now = "cancelled" if future.cancelled() else repr(future.exception(timeout=0))
                assert seen[0] == now, f"{kind} {token}: ended as {seen[0]}, now {now}"

    def outcomes(self):
        counts: dict[str, int] = {}
        for future, _kind, _token in self.entries:
            name = outcome_of(future)
            counts[name] = counts.get(name, 0) + 1
        return counts


def outcome_of(future):
    if future.cancelled():
        return "cancelled"
    error = future.exception(timeout=0)
    return "result" if error is None else type(error).__name__


# what each kind of job may end as, when nobody cancels it
EXPECTED = {
    "result": {"result"},
    "spin": {"result"},
    "raise": {"RaceError"},
    "exit": {"ProcessDiedError"},
    "segv": {"ProcessDiedError"},
    "timeout": {"ProcessTimeoutError"},
    "cancel": {"cancelled"},
}


def submit_kind(exe, kind, token, rng):
    markers = (ProcessTimeout(rng.uniform(0.001, 0.02)),) if kind == "timeout" else ()
    return exe.submit(jobs.outcome_job, kind, token, *markers)


def check_outcome(future, kind, token, also=()):
    name = outcome_of(future)
    assert name in EXPECTED[kind] | set(also), f"{kind} {token} ended as {name}"
    if name == "result":
        assert future.result(timeout=0) == token, f"{kind} {token}: another job's result"
    if name == "cancelled":
        with pytest.raises(ProcessCancelledError):
            future.result(timeout=0)
    if name == "ProcessDiedError" and kind == "segv":
        assert future.exception(timeout=0).signal == signal.SIGSEGV


# -------------------------------------------------------------------------
# shutdown from another thread while threads submit


def _submit_until_refused(exe, ledger, refused, barrier, name, seed, kinds):
    local = random.Random(seed)
    barrier.wait()
    for i in range(10_000):
        kind = local.choice(kinds)
        token = f"{name}-{i}"
        try:
            future = submit_kind(exe, kind, token, local)
        except RuntimeError as why:
            refused.append(why)
            return
        ledger.add(future, kind, token)
        if local.random() < 0.05:
            future.cancel()
        time.sleep(local.uniform(0, 0.0005))


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shutdown_while_threads_submit_ends_every_future_once(make_pool, method, scale):
    rounds = scale(6 if method == "fork" else 3, 300)
    rng = random.Random(f"i3-shutdown-{method}")
    kinds = ["result", "spin", "raise", "exit", "timeout"]
    totals: dict[str, int] = {}
    late = 0
    worst_shutdown = 0.0
    for r in range(rounds):
        exe = make_pool(2, mp_context=method)
        exe.submit(jobs.outcome_job, "result", "warm").result(timeout=RESULT_WAIT)
        ledger = Ledger()
        refused = []
        barrier = threading.Barrier(5)

        threads = [
            threading.Thread(
                target=_submit_until_refused,
                args=(exe, ledger, refused, barrier, f"{r}-{n}", rng.random(), kinds),
                daemon=True,
            )
            for n in range(4)
        ]
        for t in threads:
            t.start()
        barrier.wait()
        time.sleep(rng.uniform(0, 0.05))
        start = time.monotonic()
        exe.shutdown(wait=True, cancel_futures=True)
        took = time.monotonic() - start
        worst_shutdown = max(worst_shutdown, took)
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a submit hung after shutdown"
        assert len(refused) == 4, f"only {len(refused)} of 4 late submits raised RuntimeError"
        late += len(refused)
        ledger.check_once()
        for future, kind, token in ledger.entries:
            check_outcome(future, kind, token, also={"cancelled"})
        for name, n in ledger.outcomes().items():
            totals[name] = totals.get(name, 0) + n
        with pytest.raises(RuntimeError):
            exe.submit(jobs.outcome_job, "result", "after")
    print(
        f"I3 shutdown while submitting [{method}]: {rounds} rounds, outcomes {totals}, "
        f"{late} late submits refused, worst shutdown {worst_shutdown * 1e3:.0f} ms"
    )
    assert totals.get("cancelled", 0) > 0 and totals.get("result", 0) > 0, totals


# -------------------------------------------------------------------------
# submit from many threads, every outcome


@pytest.mark.stress
@pytest.mark.timeout(120)
def test_submit_from_many_threads_every_outcome_once(make_pool, backend, scale):
    per_thread = scale(30, 3000)
    rng = random.Random(f"i3-threads-{backend}")
    kinds = list(EXPECTED)
    weights = [30, 30, 10, 5, 5, 10, 10]
    exe = make_pool(2)
    ledger = Ledger()
    errors = []

    def submitter(n, seed):
        local = random.Random(seed)
        mine = []
        try:
            for i in range(per_thread):
                kind = local.choices(kinds, weights)[0]
                token = f"{n}-{i}"
                future = submit_kind(exe, kind, token, local)
                ledger.add(future, kind, token)
                mine.append((future, kind))
                if kind == "cancel" and local.random() < 0.5:
                    future.cancel()  # most likely still queued
            for future, kind in mine:
                if kind == "cancel" and not future.done():
                    procs.wait_running(future)
                    assert future.cancel()
        except BaseException as why:  # reported by the main thread
            errors.append(why)

    threads = [threading.Thread(target=submitter, args=(n, rng.random())) for n in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(RESULT_WAIT * 2)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    _done, not_done = concurrent.futures.wait(
        [f for f, _, _ in ledger.entries], timeout=RESULT_WAIT
    )
    assert not not_done, f"{len(not_done)} futures never ended"
    elapsed = time.monotonic() - start
    ledger.check_once()
    for future, kind, token in ledger.entries:
        check_outcome(future, kind, token)
    stats = exe.stats()
    print(
        f"I3 submit from 8 threads [{backend}]: {len(ledger.entries)} jobs in {elapsed:.1f} s, "
        f"outcomes {ledger.outcomes()}; stats {stats}"
    )
    assert stats["submitted"] == len(ledger.entries) == 8 * per_thread
    exe.shutdown(wait=True)
    assert all(f.done() for f, _, _ in ledger.entries)


# -------------------------------------------------------------------------
# cancel() from many threads on the same future


@pytest.mark.stress
@pytest.mark.timeout(90)
def test_cancel_from_many_threads_on_one_future_gives_one_answer(make_pool, backend, scale):
    iterations = scale(60, 6000)
    rng = random.Random(f"i3-cancels-{backend}")
    exe = make_pool(1)
    exe.submit(jobs.token_spin, "warm", 0).result(timeout=RESULT_WAIT)
    ledger = Ledger()
    workers = 6
    go = threading.Barrier(workers + 1)
    answers: list = [None] * workers
    target_box: list = [None]
    delays: list = [0.0] * workers
    stop = False

    def canceller(n):
        while True:
            go.wait()
            if stop:
                return
            end = time.perf_counter() + delays[n]
            while time.perf_counter() < end:
                pass
            answers[n] = target_box[0].cancel()
            go.wait()

    threads = [threading.Thread(target=canceller, args=(n,), daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    counts = {"cancelled": 0, "result": 0}
    mixed = []
    try:
        for i in range(iterations):
            length = rng.uniform(0, 0.003)
            future = exe.submit(jobs.token_spin, f"T{i}", length)
            ledger.add(future, "spin", f"T{i}")
            target_box[0] = future
            for n in range(workers):
                delays[n] = rng.uniform(0, 0.003)
            go.wait()  # start
            go.wait()  # all answered
            got = list(answers)
            concurrent.futures.wait([future], timeout=RESULT_WAIT)
            if future.cancelled():
                counts["cancelled"] += 1
                if not all(got):
                    mixed.append((i, got))
            else:
                counts["result"] += 1
                assert future.result(timeout=0)[0] == f"T{i}"
                assert not any(got), f"iteration {i}: cancel() said True, the job finished"
    finally:
        stop = True
        go.wait(timeout=10)
        for t in threads:
            t.join(10)
    ledger.check_once()
    print(
        f"I3 cancel from {workers} threads [{backend}]: {iterations} futures, {counts}; "
        f"cancelled futures where some cancel() said False: {len(mixed)}"
    )
    assert not mixed, (
        f"{len(mixed)} futures were cancelled (the job killed) while some concurrent "
        f"cancel() calls returned False, e.g. {mixed[:3]}"
    )


@pytest.mark.stress
@pytest.mark.timeout(90)
def test_concurrent_cancels_of_a_running_job_all_answer_true(make_pool, scale):
    """A3: on a running job (grace 0) cancel() kills it and returns True. Eight
    threads cancel the same running (sleeping) job at once, with a tiny GIL
    switch interval so that they interleave inside cancel(): each answer must
    be True, as the future ends cancelled."""
    iterations = scale(150, 15000)
    exe = make_pool(1)
    exe.submit(jobs.token_spin, "warm", 0).result(timeout=RESULT_WAIT)
    workers = 8
    mixed = []
    interval = sys.getswitchinterval()
    try:
        for i in range(iterations):
            future = exe.submit(jobs.token_sleep, i, 60)
            procs.wait_running(future)
            answers = []
            barrier = threading.Barrier(workers)
            threads = [
                threading.Thread(target=_cancel_after_barrier, args=(future, barrier, answers))
                for _ in range(workers)
            ]
            sys.setswitchinterval(1e-6)
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            sys.setswitchinterval(interval)
            assert future.cancelled()
            if not all(answers):
                mixed.append((i, answers))
                if len(mixed) >= 3:
                    break
    finally:
        sys.setswitchinterval(interval)
    print(
        f"I3 concurrent cancels of a running job: {i + 1} jobs killed, "
        f"{len(mixed)} with some cancel() answering False: {mixed}"
    )
    assert not mixed, (
        f"cancel() returned False although the job was killed by a concurrent cancel() "
        f"and the future ended cancelled: {mixed}"
    )


def _cancel_after_barrier(future, barrier, answers):
    barrier.wait()
    answers.append(future.cancel())


# -------------------------------------------------------------------------
# the supervisor is killed mid-run


@pytest.mark.stress
@pytest.mark.timeout(120)
def test_supervisor_killed_mid_run_every_future_ends_once(make_pool, backend, scale):
    rounds = scale(6, 600)
    rng = random.Random(f"i3-supervisor-{backend}")
    exe = make_pool(2)
    ledger = Ledger()
    totals: dict[str, int] = {}
    worst = 0.0
    for r in range(rounds):
        probe = exe.submit(jobs.token_sleep, "probe", 0.05)
        supervisor = procs.supervisor_of(procs.wait_running(probe))
        probe.result(timeout=RESULT_WAIT)
        batch = []
        for i in range(12):
            kind = rng.choice(["result", "spin", "raise", "sleepy"])
            token = f"{r}-{i}"
            if kind == "sleepy":
                future = exe.submit(jobs.token_sleep, token, rng.uniform(0.005, 0.05))
            else:
                future = submit_kind(exe, kind, token, rng)
            ledger.add(future, kind, token)
            batch.append((future, kind, token))
        time.sleep(rng.uniform(0, 0.04))
        running = [f for f, _, _ in batch if f.running()]
        start = time.monotonic()
        supervisor.kill()
        _done, not_done = concurrent.futures.wait(running, timeout=RESULT_WAIT)
        assert not not_done, "running futures hang after the supervisor died"
        worst = max(worst, time.monotonic() - start)
        _done, not_done = concurrent.futures.wait([f for f, _, _ in batch], timeout=RESULT_WAIT)
        assert not not_done, "queued futures hang after the supervisor died"
        for future, kind, token in batch:
            name = outcome_of(future)
            if kind == "sleepy":
                assert name in ("result", "ProcessDiedError"), name
                if name == "result":
                    assert future.result(timeout=0)[0] == token
            else:
                check_outcome(future, kind, token, also={"ProcessDiedError"})
            if name == "ProcessDiedError" and kind in ("result", "spin", "raise", "sleepy"):
                assert "supervisor" in str(future.exception(timeout=0))
        # a job submitted before the pool saw the death would run on the dead
        # supervisor's runner (and fail): the next round starts on the new one
        deadline = time.monotonic() + RESULT_WAIT
        while exe.stats()["supervisors_started"] < r + 2 and time.monotonic() < deadline:
            time.sleep(0.002)
    exe.shutdown(wait=True)
    ledger.check_once()
    for name, n in ledger.outcomes().items():
        totals[name] = totals.get(name, 0) + n
    stats = exe.stats()
    print(
        f"I3 supervisor killed [{backend}]: {rounds} kills, outcomes {totals}, worst "
        f"running-future end after the kill {worst * 1e3:.1f} ms; stats {stats}"
    )
    assert stats["supervisors_started"] == rounds + 1
    assert totals.get("ProcessDiedError", 0) > 0 and totals.get("result", 0) > 0, totals


# -------------------------------------------------------------------------
# initializer failures


@pytest.mark.timeout(60)
def test_a_submit_that_races_the_pool_breaking_raises_broken_process_pool(make_pool, monkeypatch):
    """A submit that passed its usability check just before the pool broke and
    stopped must say the pool is broken, not that it was shut down."""
    exe = make_pool(1, initializer=jobs.init_fail_always, initargs=("init boom",))
    first = exe.submit(jobs.outcome_job, "result", "first")
    with pytest.raises(BrokenProcessPool):
        first.result(timeout=RESULT_WAIT)
    manager = exe._manager
    give_up = time.monotonic() + RESULT_WAIT
    while not manager.io.stopped and time.monotonic() < give_up:
        time.sleep(0.01)
    assert manager.io.stopped
    monkeypatch.setattr(manager, "check_usable", lambda: None)  # as if checked before the break
    with pytest.raises(BrokenProcessPool, match="broken") as raised:
        exe.submit(jobs.outcome_job, "result", "late")
    assert isinstance(raised.value.__cause__, BrokenProcessPool)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("initializer", ["always", "half"])
def test_initializer_failure_with_threads_submitting_ends_every_future_once(make_pool, initializer):
    fail = jobs.init_fail_always if initializer == "always" else jobs.init_fail_on_odd_pid
    exe = make_pool(2, initializer=fail, initargs=("init boom",))
    ledger = Ledger()
    refused = []

    def submitter(n):
        for i in range(40):
            try:
                future = exe.submit(jobs.outcome_job, "result", f"{n}-{i}")
            except BrokenProcessPool as why:
                refused.append(why)
                return
            ledger.add(future, "result", f"{n}-{i}")
            time.sleep(0.001)

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RESULT_WAIT)
    assert not any(t.is_alive() for t in threads)
    _done, not_done = concurrent.futures.wait(
        [f for f, _, _ in ledger.entries], timeout=RESULT_WAIT
    )
    assert not not_done, f"{len(not_done)} futures hang after initializer failures"
    ledger.check_once()
    outcomes = ledger.outcomes()
    for future, _kind, token in ledger.entries:
        name = outcome_of(future)
        assert name in ("result", "BrokenProcessPool"), (token, name)
        if name == "result":
            assert future.result(timeout=0) == token
    if initializer == "always":
        assert outcomes.get("result", 0) == 0
        assert refused or outcomes.get("BrokenProcessPool", 0) > 0
        with pytest.raises(BrokenProcessPool):
            exe.submit(jobs.outcome_job, "result", "late")
    exe.shutdown(wait=True)
    assert all(f.done() for f, _, _ in ledger.entries)
    print(
        f"I3 initializer {initializer}: {len(ledger.entries)} futures, outcomes {outcomes}, "
        f"{len(refused)} submits refused with BrokenProcessPool"
    )
