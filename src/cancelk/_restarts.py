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
any job can finish on it stops costing a process start per moment.  The policy
is pure logic: the manager thread asks it, with the number of jobs finished
so far; the errors that break the pool are made here too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from cancelk import _protocol
from cancelk.errors import RemoteTraceback

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

    def gave_up_error(self, pid: int, status: int | None) -> BrokenProcessPool:
        return BrokenProcessPool(
            f"the cancelk supervisor died {self.unhealthy} times in a row before "
            f"any job could finish on it (the last, pid {pid}: {status_text(status)})"
        )


def status_text(status: int | None) -> str:
    if status is None:
        return "status unknown: another handler reaped it"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def start_failed_error(
    pid: int, status: int | None, report: _protocol.StartFailed | None
) -> BaseException:
    """The error that breaks a pool whose supervisor could not start."""
    if report is None:
        return BrokenProcessPool(
            f"the cancelk supervisor (pid {pid}) ended before it was ready "
            f"({status_text(status)}) and sent no reason"
        )
    if report.main_guard:
        main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main module"
        what = (
            f"the cancelk supervisor could not start: it imports {main}, as the spawn and "
            f"forkserver start methods do, and that import started a process pool itself.\n"
            f"Put the code that starts the pool under\n\n"
            f'    if __name__ == "__main__":\n\n'
            f"as the multiprocessing documentation asks ('Safe importing of main module')."
        )
    else:
        lines = report.text.strip().splitlines()
        what = f"the cancelk supervisor could not start: {lines[-1] if lines else 'no reason'}"
    error = BrokenProcessPool(what)
    if report.text:
        error.__cause__ = RemoteTraceback(f'\n"""\n{report.text}"""')
    return error
