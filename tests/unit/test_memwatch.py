"""The supervisor's memory watch (cancelk._memwatch) with a fake sampler."""

from __future__ import annotations

import pytest

from cancelk._memwatch import COST_FACTOR, SAMPLE_NS, MemoryKill, MemoryWatch
from cancelk._slots import DONE, KILL_MEMORY

from .test_deadlines import MS, FakeWords


def frozen_clock() -> int:
    return 0


pytestmark = pytest.mark.timeout(10)


class FakeSampler:
    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.calls: list[list[int]] = []

    def __call__(self, pids: list[int]) -> list[int]:
        self.calls.append(list(pids))
        return [self.sizes.get(pid, 0) for pid in pids]


@pytest.fixture
def setup():
    words, sampler = FakeWords(), FakeSampler()
    return words, sampler, MemoryWatch(words, sampler, frozen_clock)


def test_a_job_over_its_limit_is_killed_with_its_peak(setup):
    words, sampler, watch = setup
    words.begin(0, 5, at=0)
    watch.add(0, 5, 1000, now=0)
    sampler.sizes[100] = 900
    assert watch.decided_kills(0, {0: 100}) == []
    sampler.sizes[100] = 1500
    assert watch.decided_kills(SAMPLE_NS, {0: 100}) == [MemoryKill(0, 5, 1500)]
    assert words.state(0) == 5 | KILL_MEMORY
    assert watch.next_ns() is None, "nothing left to watch"


def test_samples_come_every_interval_and_all_jobs_in_one_scan(setup):
    words, sampler, watch = setup
    for slot in range(3):
        words.begin(slot, 10 + slot, at=0)
        watch.add(slot, 10 + slot, 10**9, now=0)
    assert watch.decided_kills(0, {0: 100, 1: 101, 2: 102}) == []
    assert sampler.calls == [[100, 101, 102]]
    assert watch.next_ns() == SAMPLE_NS
    assert watch.decided_kills(SAMPLE_NS - 1, {0: 100, 1: 101, 2: 102}) == []
    assert len(sampler.calls) == 1, "not due yet: no scan"


def test_a_job_not_begun_is_not_sampled_and_an_ended_one_is_dropped(setup):
    words, sampler, watch = setup
    watch.add(0, 5, 1000, now=0)  # the runner has not begun job 5
    sampler.sizes[100] = 10**9
    assert watch.decided_kills(0, {0: 100}) == [] and sampler.calls == []
    words.begin(0, 5, at=MS)
    words.states[0] = 5 | DONE  # it finished before the next sample
    assert watch.decided_kills(SAMPLE_NS, {0: 100}) == []
    assert watch.next_ns() is None


def test_a_finished_job_is_never_killed(setup):
    words, sampler, watch = setup
    words.begin(0, 5, at=0)
    watch.add(0, 5, 1000, now=0)
    sampler.sizes[100] = 5000
    words.states[0] = 5 | DONE  # finished between the add and the sample
    assert watch.decided_kills(0, {0: 100}) == []


def test_a_costly_sample_spaces_the_next_ones(setup):
    words, sampler, _ = setup
    ticks = iter([0, 3 * MS])  # the sample takes 3 ms
    watch = MemoryWatch(words, sampler, lambda: next(ticks))
    words.begin(0, 5, at=0)
    watch.add(0, 5, 10**9, now=0)
    watch.decided_kills(0, {0: 100})
    assert watch.next_ns() == COST_FACTOR * 3 * MS
