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

Every transition is a compare-and-swap from a value that names the job (or,
before its first job, the runner), so "finished" and "killed" cannot both win,
and a late kill cannot hit the next job or the next runner: once job seq is
DONE, or the slot has a new runner, no CAS expecting an older value succeeds (I1).
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

_STATE, _STARTED_NS = 0, 1
_WORDS_PER_SLOT = 4  # two spare words keep each slot on its own 32 bytes


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

    def state(self, slot: int) -> int:
        return _core.word_load(self._state[slot])

    def started_ns(self, slot: int) -> int:
        return _core.word_load(self._started[slot])

    def begin(self, slot: int, before: int, seq: int) -> bool:
        """Runner: job ``seq`` starts; False if its kill was already decided."""
        _core.word_store(self._started[slot], _core.monotonic_ns())
        return bool(_core.word_cas(self._state[slot], before, seq))

    def finish(self, slot: int, seq: int) -> bool:
        """Runner: job ``seq`` is done; False if its kill won the race."""
        return bool(_core.word_cas(self._state[slot], seq, seq | DONE))

    def decide_kill(self, slot: int, seq: int, flag: int, before: int | None = None) -> bool:
        """Kill job ``seq`` if it runs, or (given what preceded it) has not begun."""
        word = self._state[slot]
        while True:
            # Retry while the word names this job: the runner's begin() may
            # move it from ``before`` to ``seq`` between a load and a CAS.
            current = _core.word_load(word)
            if current != seq and (before is None or current != before):
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
        self._state, self._started = [], []
        if self._words is not None:
            self._words.close()
            self._words = None
        self._map.close()


def job_of(state: int) -> int:
    """The job seq a STATE word names; 0 for a runner that has not begun one."""
    return 0 if state & FRESH else state & SEQ_MASK
