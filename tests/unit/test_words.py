"""The shared-word state machine (cancelk._slots), in one process: every
transition, and the races between a runner's begin/finish and a kill."""

from __future__ import annotations

import os
import threading

import pytest

from cancelk import _slots
from cancelk._slots import (
    CLAIMED,
    DONE,
    FRESH,
    KILL_CANCEL,
    KILL_TIMEOUT,
    RETURNED,
    TAKEN,
    SlotWords,
    job_of,
)

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def words():
    fd = _slots.create_fd(4)
    shared = SlotWords(fd, 4)
    os.close(fd)
    try:
        yield shared
    finally:
        shared.close()


def test_a_given_slot_names_its_runner(words):
    words.give(1, 7)
    assert words.state(1) == FRESH | 7
    assert job_of(words.state(1)) == 0
    assert words.started_ns(1) == 0


def test_begin_then_finish(words):
    words.give(0, 3)
    assert words.begin(0, FRESH | 3, 11)
    assert words.state(0) == 11 and job_of(11) == 11
    assert words.started_ns(0) > 0
    assert words.finish(0, 11)
    assert words.state(0) == 11 | DONE
    # the next job begins from the previous one's DONE word
    assert words.begin(0, 11 | DONE, 12)


def test_kill_of_a_running_job_beats_its_finish(words):
    words.give(0, 3)
    words.begin(0, FRESH | 3, 5)
    assert words.decide_kill(0, 5, KILL_TIMEOUT)
    assert words.state(0) == 5 | KILL_TIMEOUT
    assert not words.finish(0, 5), "a killed job must never report"
    assert not words.decide_kill(0, 5, KILL_CANCEL), "one kill decides, once"


def test_finish_beats_a_later_kill(words):
    words.give(0, 3)
    words.begin(0, FRESH | 3, 5)
    assert words.finish(0, 5)
    assert not words.decide_kill(0, 5, KILL_CANCEL)
    assert not words.decide_kill_claimed(0, 5, KILL_CANCEL, 3)


def test_a_claimed_job_not_begun_can_be_killed_before_it_begins(words):
    words.give(0, 3)
    words.offer(0, 1, 9)
    # A plain kill needs the job running...
    assert not words.decide_kill(0, 9, KILL_CANCEL)
    # ...a claimed one may be killed before it begins, and then never begins.
    assert words.claim(0, 1, 9)
    assert words.decide_kill_claimed(0, 9, KILL_CANCEL, 3)
    assert not words.begin(0, FRESH | 3, 9)


def test_claim_and_take_back_exclude_each_other(words):
    words.offer(0, 0, 7)
    assert words.take_back(0, 0, 7, TAKEN) == 7, "taken back now"
    assert not words.claim(0, 0, 7), "the runner skips it"
    assert words.take_back(0, 0, 7, TAKEN) == 7 | TAKEN, "a second cancel sees the first"
    words.offer(0, 1, 8)
    assert words.claim(0, 1, 8)
    assert words.take_back(0, 1, 8, RETURNED) == 8 | CLAIMED, "claimed: it stays"
    assert words.claim_word(0, 1) == 8 | CLAIMED


def test_the_supervisor_sees_whether_a_job_may_still_begin(words):
    words.offer(0, 0, 4)
    assert words.awaits_claim(0, 4)
    assert words.claim(0, 0, 4) and words.awaits_claim(0, 4)
    words.offer(0, 1, 5)
    assert words.take_back(0, 1, 5, TAKEN) == 5
    assert not words.awaits_claim(0, 5)
    words.offer(0, 1, 6)  # the word serves the next job
    assert not words.awaits_claim(0, 5) and words.awaits_claim(0, 6)


def _claim_after(go, words, seq, claimed):
    go.wait()
    claimed.append(words.claim(0, seq % 2, seq))


def test_claim_and_take_back_race_one_winner(words):
    for seq in range(1, 2001):
        words.offer(0, seq % 2, seq)
        go = threading.Barrier(2)
        claimed: list[bool] = []
        thread = threading.Thread(target=_claim_after, args=(go, words, seq, claimed))
        thread.start()
        go.wait()
        was = words.take_back(0, seq % 2, seq, TAKEN)
        thread.join()
        assert claimed[0] == (was == seq | CLAIMED), f"round {seq}: both or neither won"


def test_a_late_kill_never_hits_the_next_job(words):
    words.give(0, 3)
    words.begin(0, FRESH | 3, 5)
    words.finish(0, 5)
    words.begin(0, 5 | DONE, 6)
    assert not words.decide_kill_claimed(0, 5, KILL_CANCEL, 3)
    assert words.state(0) == 6


def test_a_kill_never_hits_the_next_runner(words):
    words.give(0, 3)
    words.begin(0, FRESH | 3, 5)
    words.give(0, 4)  # runner 3 died; runner 4 took the slot
    assert not words.decide_kill(0, 5, KILL_TIMEOUT)
    assert not words.decide_kill_claimed(0, 6, KILL_CANCEL, 3)


def test_slots_are_independent(words):
    for slot in range(4):
        words.give(slot, 10 + slot)
    words.begin(2, FRESH | 12, 1)
    assert words.decide_kill(2, 1, KILL_CANCEL)
    assert [job_of(words.state(s)) for s in range(4)] == [0, 0, 1, 0]


def _begin_after(go, words, before, seq, begun):
    go.wait()
    begun.append(words.begin(0, before, seq))


def test_decide_kill_between_begins_cas_is_not_lost(words):
    """The fixed race: the runner's begin() lands between the killer's load
    and its CAS; the killer must retry and still win, never lose both."""
    for seq in range(1, 2001):
        words.give(0, seq)  # a fresh runner (id seq) for each round
        before = FRESH | seq
        go = threading.Barrier(2)
        begun: list[bool] = []
        thread = threading.Thread(target=_begin_after, args=(go, words, before, seq, begun))
        thread.start()
        go.wait()
        killed = words.decide_kill_claimed(0, seq, KILL_CANCEL, seq)
        thread.join()
        assert killed, f"round {seq}: the kill lost to a begin()"
        assert words.state(0) == seq | KILL_CANCEL
        assert not words.finish(0, seq)


def test_slots_outside_the_page_and_use_after_close_raise_not_write():
    fd = _slots.create_fd(2)
    shared = SlotWords(fd, 2)
    os.close(fd)
    shared.give(1, 5)
    with pytest.raises(IndexError):
        shared.give(2, 5)  # one past the last slot: never another slot's word
    shared.close()
    with pytest.raises(IndexError):
        shared.begin(1, FRESH | 5, 9)  # the page is unmapped: no address is left
    with pytest.raises(IndexError):
        shared.decide_kill(1, 9, KILL_CANCEL)
