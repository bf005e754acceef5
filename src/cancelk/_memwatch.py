"""The supervisor's memory watch: jobs whose process tree must stay under a limit.

    SetMemoryLimit(slot, seq, n) ─► add(): watched while job seq runs
    the C loop also wakes every SAMPLE_NS while a watched job runs
    decided_kills(now, runner pids):
        one scan of /proc (``_core.tree_rss``): resident bytes of each
        watched runner's whole tree ─► the peak kept per job
        over its limit ─► the kill decided through the job's word (KILL_MEMORY)
        ─► (slot, seq, peak) for the supervisor to kill and report

Samples come every 5 ms, or ten times as long as a sample takes if that is
longer (a sample reads each watched tree's /proc files: ~20 us a process
here), so the watch costs at most about a tenth of a core.

Resident memory (RSS) is what is counted, so address space that is reserved
but never touched (a large mmap, numpy or JIT arenas) does not count, and the
interpreter's own pages do.  Sampling cannot stop a job before it crosses the
limit: how far past it a job gets depends on how fast it grows between two
samples (the benchmark measures it).  The kernel's cgroup memory controller
would stop it at the limit itself; it is not used because it is not
delegated to unprivileged processes on most hosts (here, only cgroup v1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from cancelk import _core
from cancelk._deadlines import Words
from cancelk._slots import KILL_MEMORY, job_of

SAMPLE_NS = 5_000_000  # 5 ms between samples while a limited job runs, at least
# ...and at least this many times as long as a sample took, so that watching
# many large trees never takes more than about a tenth of a core.
COST_FACTOR = 10

Sampler = Callable[[list[int]], "list[int] | None"]


@dataclass
class _Limit:
    seq: int
    nbytes: int
    peak: int = 0


class MemoryKill(NamedTuple):
    slot: int
    seq: int
    peak: int


class MemoryWatch:
    def __init__(
        self,
        words: Words,
        sample: Sampler = _core.tree_rss,
        clock: Callable[[], int] = _core.monotonic_ns,
    ) -> None:
        self.words = words
        self.sample = sample
        self.clock = clock
        self.limits: dict[int, _Limit] = {}
        self.due_ns = 0

    def add(self, slot: int, seq: int, nbytes: int, now: int) -> None:
        self.limits[slot] = _Limit(seq, nbytes)
        self.due_ns = now  # sample at once: a job may be over its limit already

    def drop_slot(self, slot: int) -> None:
        self.limits.pop(slot, None)

    def next_ns(self) -> int | None:
        return self.due_ns if self.limits else None

    def decided_kills(self, now: int, runner_pids: Mapping[int, int]) -> list[MemoryKill]:
        """Sample the running watched jobs if due; the kills this decided."""
        if not self.limits or now < self.due_ns:
            return []
        self.due_ns = now + SAMPLE_NS
        running = []
        for slot, limit in list(self.limits.items()):
            state = self.words.state(slot)
            if state == limit.seq and slot in runner_pids:
                running.append((slot, limit))
            elif job_of(state) >= limit.seq:
                del self.limits[slot]  # it ended: nothing more to watch
        if not running:
            return []
        began = self.clock()
        sizes = self.sample([runner_pids[slot] for slot, _ in running])
        took = self.clock() - began
        self.due_ns = now + max(SAMPLE_NS, COST_FACTOR * took)
        if sizes is None:
            return []  # no /proc: refused at submit, never reached
        kills = []
        for (slot, limit), size in zip(running, sizes):
            limit.peak = max(limit.peak, size)
            if size > limit.nbytes and self.words.decide_kill(slot, limit.seq, KILL_MEMORY):
                kills.append(MemoryKill(slot, limit.seq, limit.peak))
                del self.limits[slot]
        return kills
