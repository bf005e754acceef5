"""When a pool starts another supervisor after one died, and when it gives up.

    supervisor started ──StartFailed, EOF──► never restarted: the pool breaks
           │                                 with the reason it sent
           └─SupervisorReady─► serving ──death──► healthy (a job finished on it,
                                                  or it served HEALTHY_AFTER s)?
                                   yes: start another at once, count reset
                                   no:  count += 1; start another after
                                        0, 0.1, 0.3, 0.9, 2.7 s; the pool
                                        breaks at GIVE_UP_AFTER in a row

A supervisor killed from outside now and then (a test, an operator, the OOM
killer) is replaced at once, forever; one that dies again and again before
any job can finish on it stops costing a process start per moment.  Pure
logic: the manager thread asks it, with the number of jobs finished so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable

GIVE_UP_AFTER = 6  # unhealthy deaths in a row
HEALTHY_AFTER = 5.0  # seconds of serving that make a supervisor's death a chance event
_FIRST_DELAY = 0.1
_MAX_DELAY = 3.0


class RestartPolicy:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.unhealthy = 0  # deaths in a row of supervisors that did nothing
        self._finished_at_start = 0
        self._ready_at: float | None = None

    def started(self, finished: int) -> None:
        """A supervisor was started; ``finished``: jobs finished in the pool so far."""
        self._finished_at_start = finished
        self._ready_at = None

    def ready(self) -> None:
        self._ready_at = self._clock()

    def died(self, finished: int) -> float | None:
        """A ready supervisor died: seconds to wait before starting the next
        one, or None when the pool should give up."""
        served = 0.0 if self._ready_at is None else self._clock() - self._ready_at
        if finished > self._finished_at_start or served >= HEALTHY_AFTER:
            self.unhealthy = 0
            return 0.0
        self.unhealthy += 1
        if self.unhealthy >= GIVE_UP_AFTER:
            return None
        if self.unhealthy == 1:
            return 0.0
        return float(min(_FIRST_DELAY * 3 ** (self.unhealthy - 2), _MAX_DELAY))
