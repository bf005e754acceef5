"""The shared job words: one small record per runner slot in a MAP_SHARED page.

    user process ─┐                      ┌─ runner (slot i)
                  ├── memfd / tmp file ──┤
    supervisor ───┘   mmap(MAP_SHARED)   └─ runner (slot j)

    STATE       FRESH|rid    runner rid was given the slot, no job yet
                seq          job seq is running
                seq|DONE     job seq finished (its result is being sent)
                seq|KILL_*   a kill of job seq was decided (time limit or deadline,
                             cancel, memory limit)
    STARTED_NS  CLOCK_MONOTONIC when the running job began (time limits count from it)
    CLAIM 0..5  seq          job seq was sent to the runner, which has not taken it
                seq|CLAIMED  the runner took it: it runs next (or runs, or ran)
                seq|TAKEN    a cancel took it back first: it never runs
                seq|RETURNED its runner died first: the pool queues it again

A slot holds at most six jobs at once, the one its runner runs and those
sent ahead of it (so the runner need not wait for the user process between
two jobs, and a burst of jobs crosses in few writes); each job has one of
the CLAIM words while it is the slot's.  A runner claims a job only when it
is about to begin it, so at most one claimed job waits at a time: the next.

Every transition is a compare-and-swap from a value that names the job (or,
before its first job, the runner), so "finished" and "killed" cannot both win,
nor "taken by the runner" and "taken back", and a late kill cannot hit the
next job or the next runner: once job seq is DONE, or the slot has a new
runner, no CAS expecting an older value succeeds (I1).
"""

from __future__ import annotations

import mmap
import os
import tempfile

from cancelk import _core

FRESH = 1 << 58
DONE = 1 << 59
KILL_TIMEOUT = 1 << 60
KILL_CANCEL = 1 << 61
KILL_MEMORY = 1 << 62
SEQ_MASK = (1 << 48) - 1
# What a CLAIM word adds to its job's seq (bits above SEQ_MASK, below FRESH).
CLAIMED = 1 << 55
TAKEN = 1 << 56
RETURNED = 1 << 57
CLAIM_WORDS = 6

_STATE, _STARTED_NS, _CLAIM = 0, 1, 2
_WORDS_PER_SLOT = 8  # STATE, STARTED_NS, six CLAIM words: each slot on a cache line of its own


def _size(slots: int) -> int:
    return max(mmap.PAGESIZE, slots * _WORDS_PER_SLOT * 8)


def create_fd(slots: int) -> int:
    """A file descriptor backing the shared page; nothing is left in /dev/shm."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cancelk-slots", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, _size(slots))
    return fd


class SlotWords:
    """Typed access to the per-slot words."""

    def __init__(self, fd: int, slots: int) -> None:
        self._map = mmap.mmap(fd, _size(slots), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._words: _core.SharedWords | None = _core.SharedWords(
            self._map, slots * _WORDS_PER_SLOT
        )
        # Each slot's words by address, checked once here: a job's begin and
        # finish are then two C calls in the runner, no index arithmetic.
        words = self._words
        self._state = [words.address(i * _WORDS_PER_SLOT + _STATE) for i in range(slots)]
        self._started = [words.address(i * _WORDS_PER_SLOT + _STARTED_NS) for i in range(slots)]
        self._claims = [
            [words.address(i * _WORDS_PER_SLOT + _CLAIM + w) for w in range(CLAIM_WORDS)]
            for i in range(slots)
        ]

    def state(self, slot: int) -> int:
        return _core.word_load(self._state[slot])

    def started_ns(self, slot: int) -> int:
        return _core.word_load(self._started[slot])

    def claim_word(self, slot: int, word: int) -> int:
        return _core.word_load(self._claims[slot][word])

    def offer(self, slot: int, word: int, seq: int) -> None:
        """User process: job ``seq`` is on its way to the slot's runner, under
        CLAIM ``word`` (whose last job is settled: taken, taken back or returned)."""
        _core.word_store(self._claims[slot][word], seq)

    def claim(self, slot: int, word: int, seq: int) -> bool:
        """Runner: take job ``seq`` to run it next; False if it was taken back
        (the runner skips it)."""
        return bool(_core.word_cas(self._claims[slot][word], seq, seq | CLAIMED))

    def take_back(self, slot: int, word: int, seq: int, mark: int) -> int:
        """Take job ``seq`` back before its runner claims it (``mark``: TAKEN
        or RETURNED).  Returns the word as it was: ``seq`` when taken back
        now, ``seq | CLAIMED`` when the runner has it, else what it holds."""
        address = self._claims[slot][word]
        while True:
            current = _core.word_load(address)
            if current != seq or _core.word_cas(address, seq, seq | mark):
                return current

    def awaits_claim(self, slot: int, seq: int) -> bool:
        """Supervisor: may job ``seq`` still begin here (sent, and not taken back)?"""
        return any(
            _core.word_load(address) in (seq, seq | CLAIMED) for address in self._claims[slot]
        )

    def begin(self, slot: int, before: int, seq: int) -> bool:
        """Runner: job ``seq`` starts; False if its kill was already decided."""
        _core.word_store(self._started[slot], _core.monotonic_ns())
        return bool(_core.word_cas(self._state[slot], before, seq))

    def finish(self, slot: int, seq: int) -> bool:
        """Runner: job ``seq`` is done; False if its kill won the race."""
        return bool(_core.word_cas(self._state[slot], seq, seq | DONE))

    def decide_kill(self, slot: int, seq: int, flag: int) -> bool:
        """Kill job ``seq`` if it runs."""
        return bool(_core.word_cas(self._state[slot], seq, seq | flag))

    def decide_kill_claimed(self, slot: int, seq: int, flag: int, runner_id: int) -> bool:
        """Kill job ``seq``, which runner ``runner_id`` claimed, if it runs or
        has not begun yet; False if it ended, or its runner is gone."""
        word = self._state[slot]
        while True:
            # A claimed job begins right after its predecessor's DONE (or
            # the runner's FRESH word): that value, or the job's own, may be
            # replaced by a kill.  Retry while it names the job or that moment.
            current = _core.word_load(word)
            waiting = (current & DONE and job_of(current) < seq) or current == FRESH | runner_id
            if current != seq and not waiting:
                return False
            if _core.word_cas(word, current, seq | flag):
                return True

    def give(self, slot: int, runner_id: int) -> None:
        """Supervisor: runner ``runner_id`` (unique, never reused) takes the slot."""
        _core.word_store(self._started[slot], 0)
        _core.word_store(self._state[slot], FRESH | runner_id)

    def close(self) -> None:
        # No address may outlive the mapping: a use after close is an
        # IndexError, never a write to unmapped memory.
        self._state, self._started, self._claims = [], [], []
        if self._words is not None:
            self._words.close()
            self._words = None
        self._map.close()


def job_of(state: int) -> int:
    """The job seq a STATE word names; 0 for a runner that has not begun one."""
    return 0 if state & FRESH else state & SEQ_MASK
