"""The pool's logic against a model of its runners and supervisor, in random
interleavings: runners read their frames, claim (or skip), begin and finish
jobs by the shared words as runner.py does; the supervisor starts and kills runners; the
manager handles one event at a time; callers cancel and submit in between.

Every future must end once the callers stop, no job may begin twice or after
it was taken back, and the counters must add up.  A seed that fails is
printed, with the pool's state when it stuck."""

from __future__ import annotations

import os
import random
import signal
import types
from collections import deque

import pytest

from cancelk import _pool, _protocol, _slots, _wire
from cancelk.futures import Future
from cancelk.options import JobOptions

from .test_pool_logic import FakeIO, Harness

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def monotonic_ns(self) -> int:
        return int(self.now * 1e9)


class SimRunner:
    def __init__(self, slot: int, runner_id: int) -> None:
        self.slot, self.runner_id = slot, runner_id
        self.frames: deque[int] = deque()  # the seqs of the job frames it was sent
        self.running = 0  # the seq it runs
        self.began_at = 0.0  # when (the model's clock)
        self.before = _slots.FRESH | runner_id
        self.stuck = False  # lost a race: waits to be killed
        self.alive = True


class Model(FakeIO):
    """Runners, supervisor and manager inbox around a Harness's pool."""

    def __init__(self, h: Harness, clock: Clock) -> None:
        super().__init__()
        self.h, self.clock = h, clock
        self.runners: dict[int, SimRunner] = {}
        self.inbox: deque[tuple] = deque()
        self.began: dict[bytes, int] = {}  # a job's payload: times begun
        self.payloads: dict[int, bytes] = {}  # seq: the payload of the job sent under it
        self.limits: list[_protocol.SetTimeLimit] = []

    def send_job(self, slot: int, head: bytes, payload: bytes) -> None:
        super().send_job(slot, head, payload)
        self.payloads[self.jobs[-1][1]] = payload
        runner = self.runners.get(slot)
        if runner is not None and runner.alive:
            runner.frames.append(self.jobs[-1][1])

    # -- the supervisor ---------------------------------------------------------
    def supervise(self) -> None:
        while self.control:
            message = self.control.pop(0)
            if isinstance(message, _protocol.StartRunner):
                if message.slot not in self.runners:
                    self._start(message.slot)
            elif isinstance(message, _protocol.SetTimeLimit):
                self.limits.append(message)
            elif isinstance(message, _protocol.KillRunner):
                runner = self.runners.get(message.slot)
                if runner is not None and runner.runner_id == message.runner_id:
                    self.die(runner, -signal.SIGKILL)

    def enforce_limits(self) -> None:
        """As the supervisor's deadline book: a job past its limit is killed."""
        words, now = self.h.words, self.clock.now
        for limit in list(self.limits):
            runner = self.runners.get(limit.slot)
            if runner is None or runner.runner_id != limit.runner_id:
                self.limits.remove(limit)
                continue
            if words.state(limit.slot) != limit.seq:
                continue  # not begun yet, or ended
            if (now - runner.began_at) * 1e9 < limit.timeout_ns:
                continue
            self.limits.remove(limit)
            if words.decide_kill(limit.slot, limit.seq, _slots.KILL_TIMEOUT):
                self.inbox.append(("killed", limit.slot, limit.runner_id, limit.seq))
                self.die(runner, -signal.SIGKILL)

    def _start(self, slot: int) -> None:
        runner_id = self.h.next_runner
        self.h.next_runner += 1
        self.h.words.give(slot, runner_id)
        self.runners[slot] = SimRunner(slot, runner_id)
        self.inbox.append(("started", slot, runner_id))

    def die(self, runner: SimRunner, status: int) -> None:
        if runner.alive:
            runner.alive = False
            self.inbox.append(("exited", runner.slot, runner.runner_id, status))

    # -- runners ------------------------------------------------------------------
    def runner_step(self, runner: SimRunner) -> None:
        words = self.h.words
        if not runner.alive or runner.stuck:
            return
        if runner.running:
            seq, runner.running = runner.running, 0
            if not words.finish(runner.slot, seq):
                runner.stuck = True
                return
            runner.before = seq | _slots.DONE
            self.inbox.append(("result", runner.slot, runner.runner_id, seq))
            return
        if not runner.frames:
            return
        seq = runner.frames.popleft()
        if not words.claim(runner.slot, self.claim_words[seq], seq):
            return  # taken back: skipped
        if not words.begin(runner.slot, runner.before, seq):
            runner.stuck = True
            return
        payload = self.payloads[seq]
        self.began[payload] = self.began.get(payload, 0) + 1
        runner.running, runner.began_at = seq, self.clock.now

    # -- the manager ----------------------------------------------------------------
    def manage(self) -> None:
        if not self.inbox:
            return
        event = self.inbox.popleft()
        pool, out = self.h.pool, self.h.out
        if event[0] == "started":
            _, slot, runner_id = event
            pool.runner_started(slot, runner_id, 1000 + runner_id)
            self.h.runner_ready(slot)
        elif event[0] == "result":
            _, slot, runner_id, seq = event
            if pool.slots[slot].runner_id == runner_id:
                kind, outcome = _wire.encode_result(seq)
                pool.result_arrived(slot, seq, kind, memoryview(outcome), out)
        elif event[0] == "killed":
            _, slot, runner_id, seq = event
            pool.job_killed(slot, runner_id, seq, _slots.KILL_TIMEOUT, 0, out)
        else:
            _, slot, runner_id, status = event
            # the results it sent before it died are read first, as the manager does
            for pending in [e for e in self.inbox if e[0] == "result" and e[2] == runner_id]:
                self.inbox.remove(pending)
                kind, outcome = _wire.encode_result(pending[3])
                pool.result_arrived(slot, pending[3], kind, memoryview(outcome), out)
            pool.runner_exited(slot, runner_id, status, self.h.words.state(slot), None, out)
            del self.runners[slot]
            self._start(slot)  # the supervisor replaces a runner that exits
        if pool.pending:  # as the manager thread does after each event
            pool.fill_idle()
        elif pool.idle and pool.ahead:
            pool.take_over_sent_ahead()
        self.h.settle()


def _dump(model: Model, futures: list[Future]) -> str:
    pool, words = model.h.pool, model.h.words
    undone = [(f._cancelk_job and f._cancelk_job.seq, f._state) for f in futures if not f.done()]
    lines = [f"undone: {undone}"]
    for slot in pool.slots:
        runner = model.runners.get(slot.index)
        lines.append(
            f"slot {slot.index}: jobs={[(j.seq, j.taken_back) for j in slot.jobs]} "
            f"conn={slot.connected} ready={slot.ready} coming={slot.coming} "
            f"state={words.state(slot.index):#x} runner={runner and vars(runner)}"
        )
    lines.append(f"pending={[j.seq for j in pool.pending]} idle={[s.index for s in pool.idle]}")
    lines.append(f"roomy={[s.index for s in pool.roomy]} stats={pool.stats()}")
    lines.append(f"inbox={list(model.inbox)} control={model.control}")
    return "\n".join(lines)


def run_model(seed: int, size: int, monkeypatch: pytest.MonkeyPatch, jobs: int = 60) -> None:
    """One random run of ``jobs`` submits, cancels and runner deaths, then calm."""
    rng = random.Random(seed)
    clock = Clock()
    monkeypatch.setattr(_pool, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(_pool, "_core", types.SimpleNamespace(monotonic_ns=clock.monotonic_ns))
    h = Harness(size)
    model = Model(h, clock)
    h.io = h.pool.io = model
    futures: list[Future] = []
    seqs: dict[int, bytes] = {}  # id(future): its job's payload (the job unlinks when it ends)
    try:
        for _ in range(4000):
            calm = len(futures) >= jobs
            if not calm:
                _act(rng, h, model, futures, seqs)
            _step(rng, model, clock)
            if calm and all(f.done() for f in futures) and not model.inbox:
                break
        _check(seed, h, model, futures, seqs)
    finally:
        h.close()


def _act(rng, h: Harness, model: Model, futures: list[Future], seqs: dict[int, bytes]) -> None:
    """What the callers and the jobs do, now and then: submit, cancel, die."""
    roll = rng.random()
    if roll < 0.15:
        timed = rng.random() < 0.1
        options = JobOptions(timeout=rng.choice([0.002, 0.01])) if timed else None
        payload = b"job %d" % len(futures)
        futures.append(h.submit(options, payload))
        seqs[id(futures[-1])] = payload
    elif roll < 0.22 and futures:
        rng.choice(futures).cancel()
    elif roll < 0.25 and model.runners:
        model.die(rng.choice(list(model.runners.values())), 5 << 8)  # os._exit(5) in a job


def _step(rng, model: Model, clock: Clock) -> None:
    """One step of the processes: time passes, a runner moves, or the manager
    handles an event; the supervisor then acts on what it was sent."""
    roll = rng.random()
    if roll < 0.15:
        clock.now += rng.choice([0.0001, 0.001, 0.003, 0.006])
    elif roll < 0.55 and model.runners:
        model.runner_step(rng.choice(list(model.runners.values())))
    else:
        model.manage()
    model.supervise()
    model.enforce_limits()


def _check(seed: int, h: Harness, model: Model, futures: list[Future], seqs: dict[int, bytes]):
    undone = [f for f in futures if not f.done()]
    assert not undone, f"seed {seed}: {len(undone)} futures never ended\n{_dump(model, futures)}"
    twice = {seq: n for seq, n in model.began.items() if n > 1}
    assert not twice, f"seed {seed}: jobs begun twice {twice}"
    for future in futures:
        reason = future._cancel_reason
        if future.cancelled() and ("before it started" in reason or "before it began" in reason):
            assert seqs[id(future)] not in model.began, f"seed {seed}: a job cancelled before ran"
    stats = h.check_counts()
    assert stats["pending"] == 0 and stats["running"] == 0, f"seed {seed}: {stats}"


SEEDS = 20  # about 0.2 s per size; more with CANCELK_MODEL_SEEDS=1000


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize(
    "quick_s",
    [0.0, _pool.QUICK_S, float("inf")],
    ids=["one-ahead", "by-the-clock", "deep"],  # never, sometimes, always quick runners
)
def test_random_interleavings_end_every_future(size, quick_s, monkeypatch):
    for seed in range(int(os.environ.get("CANCELK_MODEL_SEEDS", SEEDS))):
        with monkeypatch.context() as patch:
            patch.setattr(_pool, "QUICK_S", quick_s)
            run_model(seed * 10 + size, size, patch)
