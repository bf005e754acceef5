"""What every process cancelk forks does first, before any user code runs.

parent --os.fork()--> child: forget_parent_signals()  (I9)
                             own process group         (so one kill reaches the tree)
                             parent-death signal       (no orphans, Linux)
"""

from __future__ import annotations

import signal
import sys
from multiprocessing import spawn

from cancelk import _core


def forget_parent_signals() -> None:
    """Drop the parent's Python signal handlers and wakeup fd.

    A forked child shares the parent's asyncio self-pipe; if its wakeup fd
    stayed set, a signal in the child would wake the parent's event loop and
    run the parent's handlers there (I9).  Only signals that have a handler
    at the OS level can have a Python one: asking the kernel first spares the
    child a Python query per signal (with its copy-on-write faults).
    """
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    handled, ignored = _core.signal_dispositions()
    for signum in handled:
        try:
            handler = signal.getsignal(signum)
        except (ValueError, OSError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (ValueError, OSError):
                continue
    # Ignored dispositions survive exec(); a job's subprocesses must not
    # inherit a supervisor's "ignore SIGINT".
    if signal.SIGINT in ignored or signal.getsignal(signal.SIGINT) is not (
        signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def become_job_process(parent: int) -> None:
    """Run in a job process freshly forked by ``parent``: own group, and
    when the parent dies, the job dies with everything it started.

    It also becomes a child subreaper (Linux), so whatever the job starts
    stays in its tree even if it daemonizes, and a kill can find it.
    """
    forget_parent_signals()
    _core.become_group_leader()
    _core.set_child_subreaper()
    _core.die_with_parent(parent)  # after the line above: orphans must come to us


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def main_preparation(name: str) -> dict[str, object]:
    """What a fresh interpreter needs to import ``__main__`` as spawn does.

    The authkey is left out: it refuses to pickle outside multiprocessing's
    own spawning, and nothing cancelk starts uses it.
    """
    data: dict[str, object] = spawn.get_preparation_data(name)
    data.pop("authkey", None)
    return data
