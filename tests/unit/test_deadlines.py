"""The supervisor's deadline arithmetic (cancelk._deadlines) against fake words."""

from __future__ import annotations

import pytest

from cancelk._deadlines import DeadlineBook, DecidedKill
from cancelk._slots import DONE, FRESH, KILL_CANCEL, KILL_TIMEOUT

pytestmark = pytest.mark.timeout(10)

MS = 1_000_000


class FakeWords:
    """Slot words as plain ints: state and start time per slot, CAS semantics."""

    def __init__(self) -> None:
        self.states: dict[int, int] = {}
        self.starts: dict[int, int] = {}
        self.taken_back: set[int] = set()  # seqs taken back before they began

    def state(self, slot: int) -> int:
        return self.states.get(slot, FRESH | 1)

    def started_ns(self, slot: int) -> int:
        return self.starts.get(slot, 0)

    def decide_kill(self, slot: int, seq: int, flag: int) -> bool:
        if self.state(slot) != seq:
            return False
        self.states[slot] = seq | flag
        return True

    def awaits_claim(self, slot: int, seq: int) -> bool:
        return seq not in self.taken_back

    def begin(self, slot: int, seq: int, at: int) -> None:
        self.states[slot], self.starts[slot] = seq, at


@pytest.fixture
def words():
    return FakeWords()


@pytest.fixture
def book(words):
    return DeadlineBook(words)


def test_a_limit_counts_from_the_jobs_start_not_from_the_message(words, book):
    words.begin(0, 5, at=100 * MS)
    book.add_time_limit(0, 5, 50 * MS, now=130 * MS)  # the message came 30 ms late
    assert book.next_ns() == 150 * MS
    assert book.decided_kills(149 * MS) == []
    assert book.decided_kills(150 * MS) == [DecidedKill(0, 5, KILL_TIMEOUT)]
    assert words.state(0) == 5 | KILL_TIMEOUT
    assert book.next_ns() is None


def test_a_limit_for_a_job_not_begun_moves_to_its_start(words, book):
    book.add_time_limit(0, 5, 50 * MS, now=0)
    assert book.next_ns() == 50 * MS
    assert book.decided_kills(50 * MS) == []  # not begun: moved, not killed
    assert book.next_ns() == 100 * MS
    words.begin(0, 5, at=80 * MS)
    assert book.decided_kills(100 * MS) == []  # began at 80: ends at 130
    assert book.next_ns() == 130 * MS
    assert book.decided_kills(130 * MS) == [DecidedKill(0, 5, KILL_TIMEOUT)]


def test_a_job_that_finished_first_is_not_killed(words, book):
    words.begin(0, 5, at=0)
    book.add_time_limit(0, 5, 10 * MS, now=0)
    words.states[0] = 5 | DONE
    assert book.decided_kills(20 * MS) == []
    assert book.next_ns() is None, "a moot deadline is dropped"


def test_a_grace_counts_from_the_cancel(words, book):
    words.begin(0, 5, at=0)
    book.add_grace(0, 5, 200 * MS, now=1000 * MS)
    assert book.next_ns() == 1200 * MS
    assert book.decided_kills(1200 * MS) == [DecidedKill(0, 5, KILL_CANCEL)]


def test_the_earlier_of_limit_and_grace_kills(words, book):
    words.begin(0, 5, at=0)
    book.add_time_limit(0, 5, 100 * MS, now=0)
    book.add_grace(0, 5, 20 * MS, now=10 * MS)
    assert book.next_ns() == 30 * MS
    assert book.decided_kills(30 * MS) == [DecidedKill(0, 5, KILL_CANCEL)]
    # the limit then finds the job's word decided: not killed twice
    assert book.decided_kills(100 * MS) == []


def test_a_new_jobs_deadline_drops_the_older_jobs_ones(words, book):
    words.begin(0, 5, at=0)
    book.add_time_limit(0, 5, 10_000 * MS, now=0)
    words.states[0] = 5 | DONE
    words.begin(0, 6, at=5 * MS)
    book.add_time_limit(0, 6, 50 * MS, now=5 * MS)
    assert book.by_slot[0] == [d for d in book.by_slot[0] if d.seq == 6]
    assert book.next_ns() == 55 * MS


def test_dropping_a_slot_forgets_its_deadlines(words, book):
    book.add_time_limit(0, 5, 10 * MS, now=0)
    book.add_time_limit(1, 6, 20 * MS, now=0)
    book.drop_slot(0)
    assert book.next_ns() == 20 * MS


def test_slots_come_due_independently(words, book):
    for slot in range(3):
        words.begin(slot, 10 + slot, at=0)
        book.add_time_limit(slot, 10 + slot, (slot + 1) * 10 * MS, now=0)
    assert book.decided_kills(20 * MS) == [
        DecidedKill(0, 10, KILL_TIMEOUT),
        DecidedKill(1, 11, KILL_TIMEOUT),
    ]
    assert book.next_ns() == 30 * MS


def test_a_fixed_deadline_does_not_move_with_the_jobs_start(words, book):
    book.add_deadline(0, 5, 100 * MS)
    assert book.decided_kills(100 * MS) == []  # not begun: tried again 1 ms on
    assert book.next_ns() == 101 * MS
    words.begin(0, 5, at=100 * MS)
    assert book.decided_kills(101 * MS) == [DecidedKill(0, 5, KILL_TIMEOUT)]


def test_a_deadline_and_a_time_limit_the_earlier_wins(words, book):
    words.begin(0, 5, at=0)
    book.add_time_limit(0, 5, 500 * MS, now=0)
    book.add_deadline(0, 5, 200 * MS)
    assert book.next_ns() == 200 * MS
    assert book.decided_kills(200 * MS) == [DecidedKill(0, 5, KILL_TIMEOUT)]
    assert book.decided_kills(500 * MS) == []


def test_the_limit_of_a_job_sent_ahead_keeps_the_running_jobs_limit(words, book):
    words.begin(0, 5, at=0)
    book.add_time_limit(0, 5, 50 * MS, now=0)
    book.add_time_limit(0, 6, 10 * MS, now=1 * MS)  # job 6 waits behind job 5
    assert book.decided_kills(11 * MS) == []  # 6 has not begun: its limit moves
    assert book.decided_kills(50 * MS) == [DecidedKill(0, 5, KILL_TIMEOUT)]
    words.begin(0, 6, at=52 * MS)
    assert book.decided_kills(61 * MS) == []
    assert book.decided_kills(62 * MS) == [DecidedKill(0, 6, KILL_TIMEOUT)]


def test_the_limit_of_a_job_taken_back_before_it_began_is_dropped(words, book):
    words.begin(0, 5, at=0)
    book.add_time_limit(0, 6, 10 * MS, now=0)  # sent ahead behind job 5
    words.taken_back.add(6)  # cancelled before the runner claimed it
    assert book.decided_kills(10 * MS) == []
    assert book.next_ns() is None
