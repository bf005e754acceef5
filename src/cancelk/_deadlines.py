"""The supervisor's book of deadlines: when each job must be killed.

    SetTimeLimit(slot, seq, t) ─► add_time_limit: ends t after the job's start
    SetDeadline(slot, seq, at) ─► add_deadline: ends at ``at``, whatever happened
    GraceCancel(slot, seq, g)  ─► add_grace: ends g from now
    the C loop sleeps until next_ns()
    decided_kills(now) ─► for each deadline passed: the job has not begun yet?
                           move it (a limit counts from the start), or drop
                           it if the job was taken back and never begins;
                           else decide the kill through the job's shared word
                           ─► (slot, seq, flag) for the supervisor to kill and report

Time is CLOCK_MONOTONIC in nanoseconds, the clock every process of the pool
shares (``_core.monotonic_ns``), so a runner's recorded start and the user
process's requests compare directly.  Only the shared words are read; the
book itself is plain data, tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from cancelk._slots import KILL_CANCEL, KILL_TIMEOUT, job_of

_RETRY_NS = 1_000_000  # a fixed deadline whose job has not begun is tried again 1 ms on


class Words(Protocol):
    """The part of ``_slots.SlotWords`` the book reads and decides through."""

    def state(self, slot: int) -> int: ...

    def started_ns(self, slot: int) -> int: ...

    def decide_kill(self, slot: int, seq: int, flag: int) -> bool: ...

    def awaits_claim(self, slot: int, seq: int) -> bool: ...


@dataclass(order=True)
class Deadline:
    at_ns: int
    seq: int = field(compare=False)
    flag: int = field(compare=False)  # KILL_TIMEOUT or KILL_CANCEL
    span_ns: int | None = field(compare=False)  # the limit or grace; None: a fixed time


class DecidedKill(NamedTuple):
    slot: int
    seq: int
    flag: int


class DeadlineBook:
    def __init__(self, words: Words) -> None:
        self.words = words
        self.by_slot: dict[int, list[Deadline]] = {}

    def add_time_limit(self, slot: int, seq: int, limit_ns: int, now: int) -> None:
        """Job ``seq`` may run ``limit_ns`` from its start.

        The limit is sent once the job is on its way to the runner, so the job
        has often begun by now: count from its start, not from this message,
        or every kill would be late by the message's trip.
        """
        if self.words.state(slot) == seq:
            at = min(now, self.words.started_ns(slot)) + limit_ns
        else:
            at = now + limit_ns  # moved to its start when it comes due (_moved)
        self._add(slot, Deadline(at, seq, KILL_TIMEOUT, limit_ns))

    def add_deadline(self, slot: int, seq: int, at_ns: int) -> None:
        """Job ``seq`` must be gone at ``at_ns``, queue time included."""
        self._add(slot, Deadline(at_ns, seq, KILL_TIMEOUT, None))

    def add_grace(self, slot: int, seq: int, grace_ns: int, now: int) -> None:
        """Job ``seq`` was cancelled: kill it ``grace_ns`` from now if it still runs."""
        self._add(slot, Deadline(now + grace_ns, seq, KILL_CANCEL, grace_ns))

    def _add(self, slot: int, deadline: Deadline) -> None:
        # A slot's jobs have rising seqs, so the deadlines of jobs older than
        # the one it runs now are moot: dropping them keeps the book bounded
        # however long the limits are.  (Jobs sent ahead have later seqs.)
        current = job_of(self.words.state(slot))
        kept = [d for d in self.by_slot.get(slot, ()) if d.seq >= current]
        kept.append(deadline)
        self.by_slot[slot] = kept

    def drop_slot(self, slot: int) -> None:
        """The slot's runner is gone: its deadlines with it."""
        self.by_slot.pop(slot, None)

    def next_ns(self) -> int | None:
        earliest = [min(book) for book in self.by_slot.values() if book]
        return min(earliest).at_ns if earliest else None

    def decided_kills(self, now: int) -> list[DecidedKill]:
        """Deadlines passed by ``now`` whose kill this call decided."""
        decided = []
        for slot, book in list(self.by_slot.items()):
            kept = []
            for deadline in book:
                if deadline.at_ns > now:
                    kept.append(deadline)
                elif self._never_begins(slot, deadline):
                    continue
                elif self._moved(slot, deadline, now):
                    kept.append(deadline)
                elif self.words.decide_kill(slot, deadline.seq, deadline.flag):
                    decided.append(DecidedKill(slot, deadline.seq, deadline.flag))
                # else: the job finished first; the deadline is moot
            if kept:
                self.by_slot[slot] = kept
            else:
                del self.by_slot[slot]
        return decided

    def _never_begins(self, slot: int, deadline: Deadline) -> bool:
        """Its job has not begun, and was taken back (cancelled, or queued
        again after its runner died): it will not begin here."""
        began = job_of(self.words.state(slot)) >= deadline.seq
        return not began and not self.words.awaits_claim(slot, deadline.seq)

    def _moved(self, slot: int, deadline: Deadline, now: int) -> bool:
        """Move a deadline whose job has not begun, or (time limits) began later."""
        state = self.words.state(slot)
        if job_of(state) < deadline.seq:
            # Not begun yet: a kill cannot be decided before it begins.  A
            # fixed deadline is tried again at once, a span counts from then.
            deadline.at_ns = now + (deadline.span_ns or _RETRY_NS)
            return True
        if deadline.span_ns is None:
            return False
        if deadline.flag == KILL_TIMEOUT and state == deadline.seq:
            ends = self.words.started_ns(slot) + deadline.span_ns
            if ends > now:
                deadline.at_ns = ends
                return True
        return False
