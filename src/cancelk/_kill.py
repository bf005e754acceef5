"""Every way cancelk stops processes, in one place.

    who stops what                         recipe here
    user process: cancelled job            kill_by_pidfd(runner pidfd)  (the group, at once)
    supervisor:   decided kill             kill_group(runner)
    supervisor:   at exit, every runner    kill_runner_trees(runners)
    supervisor:   after a runner's death   sweep_orphans(runners kept)
    user process: supervisor died          kill_orphaned_runner(runner, pidfd)
    user process: supervisor untrusted     kill_child(supervisor)
    killable_wrapper: stop the job         freeze_and_kill_tree(job)
    killable_wrapper: stop its own child   stop_child_tree(job, pidfd), reap_child
      in a host that may reap it too         (inside sigchld_blocked())
    killable_wrapper: stop a standby       kill_by_pidfd(standby pidfd)  (the group, at once)
    standby template: a standby ended      kill_group(standby), end_orphans(adopted), reaped after
    parent right after fork()              join_own_group(child)

A job process (runner or wrapped job) leads its own process group and is a
child subreaper (Linux), so everything it starts is in its group or, having
left the group, still in its tree.  A kill therefore takes the tree first
(``_core.kill_descendants`` scans /proc) and the group second.  Every recipe
acts on a pid only while that pid is provably still the same process: an
unreaped child of the caller, or one whose pidfd has not reported its exit.

killable_wrapper runs in hosts it does not own, where a SIGCHLD handler may
reap its job first (``os.waitpid(-1, WNOHANG)`` in a loop is common): there
"unreaped" is checked (waitid WNOWAIT, or the job's pidfd) right before each
signal, and ``sigchld_blocked`` keeps the host's handler from running between
the check, the kill and the reap.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
from collections.abc import Collection, Iterator
from contextlib import contextmanager

from cancelk import _core

log = logging.getLogger("cancelk")

_KILL = signal.SIGKILL


def join_own_group(pid: int) -> None:
    """Put a just-forked child in a group of its own, from the parent side.

    The child does the same: whichever runs first, the group exists before
    either goes on, so a kill right after fork() already reaches the whole
    job.  EACCES (the child exec'd), EPERM (it changed session) and ESRCH (it
    is gone) mean the child settled the matter itself.
    """
    try:
        os.setpgid(pid, pid)
    except OSError as why:
        if why.errno not in (errno.EACCES, errno.EPERM, errno.ESRCH):
            raise


def kill_child(pid: int) -> None:
    """SIGKILL one unreaped child of the caller (a supervisor)."""
    _core.kill_pid(pid, _KILL)


def kill_group(pid: int) -> bool:
    """SIGKILL the group a job process leads; False if nothing was left in it."""
    return _core.kill_group(pid, _KILL)


def kill_by_pidfd(pidfd: int, pid: int) -> bool:
    """SIGKILL the whole group a job process leads (a runner, a standby)
    from a process that is not its parent: True if it was done here.

    Where the kernel signals a group through a pidfd, that is exact and one
    syscall.  Elsewhere the pidfd proves the process has not exited, so it is
    not reaped and its group id is its own: the group is killed by that id.
    Only its parent could reap it between the check and the kill, and it does
    so only after seeing it exit.  The pidfd kill of the process itself
    follows either way (it may have left its group), and can never reach a
    recycled pid.
    """
    try:
        if _core.pidfd_signal_group(pidfd, _KILL) is None and not _pidfd_exited(pidfd):
            kill_group(pid)
        _core.pidfd_kill(pidfd, _KILL)
    except OSError as why:  # the parent's group kill still follows
        log.debug("killing process %d through its pidfd failed: %s", pid, why)
        return False
    return True


def kill_runner_trees(pids: list[int]) -> None:
    """SIGKILL live runners' groups, then what of their trees left the groups.

    The groups first: most of every job starts dying at once (I6 gives the
    whole teardown 100 ms).  What left a group (setsid) is found down the
    runner's tree while the runner is still there, or, once it is gone and its
    children passed to the supervisor (a subreaper), by the supervisor's
    sweep of its own children."""
    for pid in pids:
        kill_group(pid)  # first: most of each job dies at once, the scan meanwhile
    try:
        _core.kill_trees(pids)
    except OSError as why:
        log.debug("scanning the trees of runners %s failed: %s", pids, why)


def kill_orphaned_runner(pid: int, pidfd: int) -> None:
    """From the user process, after the supervisor died: kill the runner's
    tree too, for where the runner cannot do it itself (no parent-death
    signal, or a runner that cannot run its handler).

    Once its pidfd says the runner is gone, a scan from its pid would find
    nothing of it and the pid may be another's: only its group is killed.
    """
    if pidfd < 0 or not _pidfd_exited(pidfd):
        kill_runner_trees([pid])
    else:
        kill_group(pid)


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()  # not select(): a pidfd may be numbered above 1023
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def sweep_orphans(keep: Collection[int]) -> None:
    """Kill and reap the caller's children that are not in ``keep``.

    A child subreaper inherits every orphan of a dead runner's tree,
    including processes that left its group (setsid, double fork).
    """
    while True:
        strays = [pid for pid in _core.list_children(os.getpid()) or () if pid not in keep]
        if not strays:
            return
        for pid in strays:
            _kill_orphan(pid)
        for pid in strays:
            try:
                _core.reap(pid)
            except ChildProcessError:
                pass  # reaped by somebody else meanwhile


def end_orphans(pids: Collection[int]) -> None:
    """SIGKILL orphans adopted by the caller (a subreaper) and wait until
    each has exited, reaping none: a zombie runs nothing, and the reap, the
    slow part of a process's end, can follow later.  What a dying orphan
    leaves (its own children) is adopted by the caller too: look again."""
    for pid in pids:
        _kill_orphan(pid)
    for pid in pids:
        _wait_exited(pid)


def _wait_exited(pid: int) -> None:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass  # reaped by somebody else meanwhile


def _kill_orphan(pid: int) -> None:
    # An unreaped child of ours: its pid (and group id, if it leads one) is safe.
    try:
        leads_group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    if leads_group:
        kill_group(pid)
    _core.kill_pid(pid, _KILL)


def freeze_and_kill_tree(pid: int) -> None:
    """Stop an unreaped child job and everything it started, leaving none behind.

    SIGSTOP first: a stopped job cannot start another process (which might
    setsid) behind the tree scan; then the tree, then the group, then the
    job itself (it may not lead its group yet, or have left it: stopped and
    never killed, it could not be reaped).
    """
    _core.kill_pid(pid, signal.SIGSTOP)
    _wait_stopped(pid)
    _core.kill_descendants(pid)
    kill_group(pid)
    _core.kill_pid(pid, _KILL)


def oom_kills() -> int:
    """How many processes the kernel's OOM killer has killed since boot
    (/proc/vmstat, Linux >= 4.13); -1 where the OS does not tell."""
    try:
        with open("/proc/vmstat", "rb") as vmstat:
            for line in vmstat:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def oom_kills_since(before: int) -> int:
    """OOM kills since a reading of ``oom_kills()``; -1 if unknown."""
    now = oom_kills()
    return now - before if before >= 0 and now >= 0 else -1


def _wait_stopped(pid: int) -> None:
    # kill() returns before the signal takes effect: until the job has
    # stopped it may still fork.  WNOWAIT: it stays ours to reap.  Python
    # has no os.waitid on macOS; there is no tree scan there either, so
    # nothing needs the job stopped before its group is killed.
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return
    try:
        waitid(os.P_PID, pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass


@contextmanager
def sigchld_blocked() -> Iterator[set[int | signal.Signals]]:
    """SIGCHLD blocked in this thread for the block, handlers already pending
    run first; yields the mask to restore (a child forked inside must).  In a
    single-threaded host this keeps a SIGCHLD handler that reaps (the host's,
    not ours) from running in the middle of a sequence that must act on an
    unreaped child: pidfd_open after fork(), a check-then-kill, a kill then
    reap."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield previous
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_child_tree(pid: int, pidfd: int = -1) -> bool:
    """Stop a job that is the caller's child and everything it started, never
    signalling its pid once somebody else may have reaped it.

    As ``freeze_and_kill_tree``: SIGSTOP, wait until stopped, the tree, the
    group; then the job itself, in case it left its group.  False if the job
    was reaped by somebody else before it could be stopped (it had exited:
    its pid may be another's, so nothing is sent).
    """
    if not _core.signal_child(pid, signal.SIGSTOP, pidfd=pidfd):
        return False
    _core.wait_stopped(pid, pidfd)
    if _core.child_unreaped(pid, pidfd):
        _core.kill_descendants(pid)
    _core.signal_child(pid, _KILL, pidfd=pidfd, group=True)
    _core.signal_child(pid, _KILL, pidfd=pidfd)
    return True


def reap_child(pid: int) -> int | None:
    """Reap the caller's exited (or killed) child: its wait status, or None
    if somebody else reaped it first (the status is lost)."""
    try:
        return _core.reap(pid)
    except ChildProcessError:
        return None
