"""The process in which floor.py measures the kernel's floor (run as a script).

    python -I floor_host.py TARGET_BYTES TRIALS WARMUP

It grows until a fork of it is TARGET_BYTES resident (a bytearray, every page
written), then, per trial: forks a child (a copy of itself, so of that size),
waits until the child runs, SIGKILLs it and takes the time until the child's
pidfd is readable (it exited: what the benchmark calls gone) and until waitpid
returned it (reaped).  Without pidfds (not Linux) only the reap is timed, and
the exit figure is the reap's.  One JSON object goes to stdout:

    {"clock": "pidfd" | "waitpid", "exit_ns": [...], "reaped_ns": [...],
     "child_rss": [bytes at the kill, per trial, when /proc tells]}

It imports only modules every interpreter has loaded anyway, so it can match
a small runner as well as a large one.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
_ballast: list[bytearray] = []


def rss(pid: int | str = "self") -> int | None:
    """Resident bytes of ``pid`` (Linux /proc); None elsewhere."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def grow(more: int) -> None:
    """Add ``more`` resident bytes: a bytearray with one byte written in each page."""
    if more >= PAGE:
        block = bytearray(more)
        block[::PAGE] = b"\x01" * len(range(0, more, PAGE))
        _ballast.append(block)


def trial(hold: int, clock: bool) -> tuple[int, int, int | None]:
    """(kill -> exit ns, kill -> reaped ns, the child's RSS) for one child."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say it runs, then wait for the kill
        os.write(ready_w, b"x")
        os.read(hold, 1)
        os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    size = rss(pid)
    pidfd = os.pidfd_open(pid) if clock else -1
    try:
        began = time.monotonic_ns()
        os.kill(pid, signal.SIGKILL)
        if pidfd >= 0:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll()
        exited = time.monotonic_ns()
        os.waitpid(pid, 0)
        reaped = time.monotonic_ns()
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return (exited if pidfd >= 0 else reaped) - began, reaped - began, size


def _have_pidfd() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):  # not Linux, or a kernel older than 5.3
        return False
    return True


def main(argv: list[str]) -> int:
    target, trials, warmup = int(argv[0]), int(argv[1]), int(argv[2])
    clock = _have_pidfd()
    hold, keep = os.pipe()  # never written: children block on it until killed
    for _ in range(3):  # a fork maps less than its parent: grow by what the child lacks
        child = trial(hold, clock)[2]
        if child is None or target - child < PAGE * 256:
            break
        grow(target - child)
    samples = [trial(hold, clock) for _ in range(warmup + trials)][warmup:]
    os.close(keep)
    json.dump(
        {
            "clock": "pidfd" if clock else "waitpid",
            "exit_ns": [s[0] for s in samples],
            "reaped_ns": [s[1] for s in samples],
            "child_rss": [s[2] for s in samples if s[2] is not None],
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
