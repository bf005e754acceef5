"""The supervisor restart policy (cancelk._restarts)."""

from __future__ import annotations

import pytest

from cancelk._restarts import GIVE_UP_AFTER, HEALTHY_AFTER, RestartPolicy

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_supervisor_that_finished_a_job_is_replaced_at_once_forever():
    policy, finished = RestartPolicy(Clock()), 0
    for _ in range(10 * GIVE_UP_AFTER):
        policy.started(finished)
        policy.ready()
        finished += 1
        assert policy.died(finished) == 0.0


def test_one_that_served_long_enough_counts_as_healthy_without_a_job():
    clock = Clock()
    policy = RestartPolicy(clock)
    for _ in range(10 * GIVE_UP_AFTER):
        policy.started(0)
        policy.ready()
        clock.now += HEALTHY_AFTER
        assert policy.died(0) == 0.0


def test_deaths_without_progress_back_off_then_give_up():
    clock = Clock()
    policy = RestartPolicy(clock)
    delays = []
    while True:
        policy.started(7)
        policy.ready()
        clock.now += 0.01
        delay = policy.died(7)
        if delay is None:
            break
        delays.append(delay)
        clock.now += delay
    assert len(delays) == GIVE_UP_AFTER - 1
    assert delays[0] == 0.0  # the first death is answered at once
    assert all(b > a for a, b in zip(delays, delays[1:])), delays
    assert sum(delays) < 10


def test_progress_resets_the_count():
    policy = RestartPolicy(Clock())
    for _ in range(GIVE_UP_AFTER - 1):
        policy.started(0)
        policy.ready()
        assert policy.died(0) is not None
    policy.started(0)
    policy.ready()
    assert policy.died(1) == 0.0  # a job finished on this one
    assert policy.unhealthy == 0
