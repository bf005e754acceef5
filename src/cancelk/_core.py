"""Typed wrapper over the C process core; the only module that touches ``lib``.

    Python caller --(ints, fds)--> _core --cffi, GIL released--> csrc/*.c
                  <--OSError(errno, "what was attempted")--

Each loop picks a backend: ``pidfd`` when the kernel offers pidfd_open(2),
else ``posix``; ``CANCELK_BACKEND=pidfd|posix`` forces one.

Why one module of this size: it is one short typed function per C entry
point, and the one place that turns C's results and errnos into Python's;
split, each part would import ``lib`` and repeat that error policy.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable
from typing import Any

from cancelk._cancelk_core import ffi, lib

__all__ = [
    "DEADLINE",
    "WAKE_AHEAD_NS",
    "Loop",
    "SharedWords",
    "become_group_leader",
    "become_job_process",
    "child_unreaped",
    "die_with_parent",
    "environ_setting",
    "has_exited",
    "kill_descendants",
    "kill_group",
    "kill_pid",
    "kill_trees",
    "list_children",
    "monotonic_ns",
    "open_fds",
    "pidfd_kill",
    "pidfd_open",
    "pidfd_signal_group",
    "place_fds",
    "reap",
    "receive_table",
    "recv_pending",
    "selected_backend",
    "send_table",
    "set_child_subreaper",
    "signal_child",
    "signal_dispositions",
    "signals_in",
    "tree_rss",
    "wait_stopped",
    "word_cas",
    "word_load",
    "word_store",
]

DEADLINE = int(lib.CANCELK_TOKEN_DEADLINE)
# How long before a deadline that kills a waiting thread stops sleeping and
# polls: a thread asleep until its deadline ran again 0.16-0.26 ms after it
# here (a 2-vCPU VM), which a time limit would add to every kill.
WAKE_AHEAD_NS = 300_000


def _fail(what: str) -> OSError:
    code = ffi.errno
    return OSError(code, f"{what}: {os.strerror(code)}")


_PIDFD_SUPPORTED = bool(lib.cancelk_pidfd_supported())


def environ_setting(name: str) -> str:
    """An environment variable, "" when unset.  Read from the bytes behind
    os.environ with one lookup: killable_wrapper reads two at each call, and
    os.environ.get() is four Python calls (encode, lookup, decode)."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        return os.environ.get(name, "")
    raw = data.get(name.encode())
    return "" if raw is None else os.fsdecode(raw)


def selected_backend() -> str:
    """The backend for a new loop: read from the environment each time, so a
    test (or a host worker's initializer) can switch it for what follows."""
    wanted = environ_setting("CANCELK_BACKEND").strip().lower()
    supported = _PIDFD_SUPPORTED
    if wanted == "posix":
        return "posix"
    if wanted == "pidfd":
        if not supported:
            raise RuntimeError("CANCELK_BACKEND=pidfd but this kernel does not offer pidfd_open(2)")
        return "pidfd"
    if wanted:
        raise ValueError(f"CANCELK_BACKEND must be 'pidfd' or 'posix', not {wanted!r}")
    return "pidfd" if supported else "posix"


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: the clock all deadlines use, in every process."""
    return int(lib.cancelk_monotonic_ns())


def pidfd_open(pid: int) -> int:
    fd = int(lib.cancelk_pidfd_open(pid))
    if fd < 0:
        raise _fail(f"pidfd_open({pid})")
    return fd


def pidfd_signal_group(pidfd: int, sig: int) -> bool | None:
    """Signal the process group led by the process a pidfd names, exactly
    (Linux 6.9+); False if the group is empty, None where the kernel cannot."""
    rc = int(lib.cancelk_pidfd_signal_group(pidfd, sig))
    if rc == -2:
        return None
    if rc < 0:
        raise _fail(f"pidfd_send_signal({pidfd}, {sig}, PIDFD_SIGNAL_PROCESS_GROUP)")
    return rc == 1


def pidfd_kill(pidfd: int, sig: int) -> bool:
    """Signal the process a pidfd names; False if it has exited already."""
    return _signalled(
        lib.cancelk_pidfd_send_signal(pidfd, sig), f"pidfd_send_signal({pidfd}, {sig})"
    )


def kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if the group no longer exists."""
    return _signalled(lib.cancelk_kill_group(pgid, sig), f"kill(-{pgid}, {sig})")


def kill_pid(pid: int, sig: int) -> bool:
    """Signal one process; False if it no longer exists."""
    return _signalled(lib.cancelk_kill_pid(pid, sig), f"kill({pid}, {sig})")


def _signalled(rc: int, attempted: str) -> bool:
    if rc == 0:
        return True
    if ffi.errno == _errno.ESRCH:
        return False  # nobody left to signal: not an error for a kill
    raise _fail(attempted)


def become_group_leader() -> None:
    if lib.cancelk_become_group_leader() != 0:
        raise _fail("setpgid(0, 0)")


_JOB_STEPS = {
    int(lib.CANCELK_STEP_QUERY_SIGNALS): "sigaction(query)",
    int(lib.CANCELK_STEP_OWN_GROUP): "setpgid(0, 0)",
    int(lib.CANCELK_STEP_SUBREAPER): "prctl(PR_SET_CHILD_SUBREAPER)",
    int(lib.CANCELK_STEP_DIE_WITH_PARENT): "installing the parent-death handler",
}


def become_job_process(parent: int) -> tuple[int, int]:
    """In a child just forked by ``parent``: own process group, child
    subreaper, death with the parent (both Linux), in one C call.

    Returns the signal dispositions inherited from the parent, read before
    any of that: (handled, ignored) as masks, bit ``n - 1`` for signal ``n``.
    """
    dispositions = _CHILD_DISPOSITIONS
    step = int(lib.cancelk_become_job_process(parent, dispositions))
    if step != 0:
        raise _fail(_JOB_STEPS.get(step, f"job process set-up step {step}"))
    return int(dispositions[0]), int(dispositions[1])


# Allocated at import: a child's first ffi.new() faults in some 26 pages of
# its parent (~0.1 ms).  Only a freshly forked, single-threaded child uses it.
_CHILD_DISPOSITIONS = ffi.new("uint64_t[2]")


def signal_dispositions() -> tuple[int, int]:
    """(signals with a handler installed, signals ignored) from sigaction(2),
    as masks: bit ``n - 1`` for signal ``n`` (see ``signals_in``)."""
    masks = ffi.new("uint64_t[2]")
    if lib.cancelk_signal_dispositions(masks, masks + 1) != 0:
        raise _fail("sigaction(query)")
    return int(masks[0]), int(masks[1])


def signals_in(mask: int) -> list[int]:
    """The signal numbers in a disposition mask."""
    if not mask:
        return []  # the usual case, and in a forked child every step costs
    return [bit + 1 for bit in range(64) if mask >> bit & 1]


def die_with_parent(parent: int) -> bool:
    """When ``parent`` (the pid that forked us) dies, kill every descendant,
    then die (Linux); at once if it is gone already.

    False where the OS has no parent-death signal.  Call it in a child
    subreaper, so that orphans of the tree are its children to kill.
    """
    if lib.cancelk_die_with_parent(parent) == 0:
        return True
    if ffi.errno == _errno.ENOSYS:
        return False
    raise _fail("installing the parent-death handler")


def set_child_subreaper() -> bool:
    """Become a child subreaper; False where the OS has no such thing."""
    if lib.cancelk_set_child_subreaper() == 0:
        return True
    if ffi.errno == _errno.ENOSYS:
        return False
    raise _fail("prctl(PR_SET_CHILD_SUBREAPER)")


def reap(pid: int, *, block: bool = True) -> int | None:
    """waitpid(); the raw status, or None if ``block`` is False and it still runs."""
    status = ffi.new("int *")
    rc = int(lib.cancelk_reap(pid, 0 if block else 1, status))
    if rc < 0:
        raise _fail(f"waitpid({pid})")
    if rc == 0:
        return None
    return int(status[0])


def has_exited(pid: int, pidfd: int = -1) -> bool:
    """True once the child has exited; it stays unreaped.  ``pidfd`` (>= 0)
    names the child exactly (Linux)."""
    rc = int(lib.cancelk_has_exited(pid, pidfd))
    if rc < 0:
        raise _fail(f"waitid({pid}, WNOWAIT)")
    return rc == 1


def child_unreaped(pid: int, pidfd: int = -1) -> bool:
    """True while the caller's child is not reaped (running, stopped or a
    zombie): its pid, and its group id, still name it.  False once somebody
    else reaped it.  ``pidfd`` (>= 0) names the child exactly (Linux)."""
    rc = int(lib.cancelk_child_unreaped(pid, pidfd))
    if rc < 0:
        raise _fail(f"waitid({pid}, WNOWAIT)")
    return rc == 1


def signal_child(pid: int, sig: int, *, pidfd: int = -1, group: bool = False) -> bool:
    """Signal the caller's child (or, with ``group``, the group it leads)
    only while it is provably unreaped; through ``pidfd`` when given.
    False if there was nothing to signal: reaped by somebody else, or gone."""
    rc = int(lib.cancelk_signal_child(pid, pidfd, sig, 1 if group else 0))
    if rc < 0:
        target = f"-{pid}" if group else str(pid)
        raise _fail(f"kill({target}, {sig}) of a child")
    return rc == 1


def wait_stopped(pid: int, pidfd: int = -1) -> None:
    """Block until the caller's child has stopped or exited; it stays
    unreaped.  Returns at once if somebody else reaped it."""
    if lib.cancelk_wait_stopped(pid, pidfd) != 0:
        raise _fail(f"waitid({pid}, WSTOPPED | WNOWAIT)")


def open_fds(directory: int = -1) -> list[tuple[int, bool]]:
    """This process's open file descriptors: (fd, close-on-exec) each.
    ``directory``: an fd of /proc/self/fd the caller keeps open (Linux: no
    lookup and open per call), left out of the list; -1 to open one."""
    limit = 256
    while True:
        fds = ffi.new("int[]", limit)
        cloexec = ffi.new("int[]", limit)
        n = int(lib.cancelk_open_fds(directory, fds, cloexec, limit))
        if n >= 0:
            return [(int(fds[i]), bool(cloexec[i])) for i in range(n)]
        if ffi.errno != _errno.ENOBUFS or limit >= 1 << 24:  # ENOBUFS: the array was full
            raise _fail("listing the open file descriptors")
        limit *= 8


def place_fds(received: list[int], targets: list[tuple[int, bool]], keep: list[int]) -> list[int]:
    """Install a file descriptor table sent by another process: each received
    fd moves to its target number (with its close-on-exec flag), the received
    copies closed.  ``keep``, this process's own fds, are moved out of the way
    first; their new numbers are returned."""
    n = len(received)
    if len(targets) != n:
        raise ValueError(f"{n} fds received for {len(targets)} targets")
    c_received = ffi.new("int[]", received or [0])
    c_targets = ffi.new("int[]", [fd for fd, _ in targets] or [0])
    c_cloexec = ffi.new("int[]", [int(flag) for _, flag in targets] or [0])
    c_keep = ffi.new("int[]", keep or [0])
    if lib.cancelk_place_fds(c_received, c_targets, c_cloexec, n, c_keep, len(keep)) != 0:
        raise _fail("installing the file descriptors sent")
    return [int(c_keep[i]) for i in range(len(keep))]


FD_CHUNK = int(lib.CANCELK_FD_CHUNK)

_TABLE_STEPS = {
    int(lib.CANCELK_STEP_LIST_FDS): "listing the open file descriptors",
    int(lib.CANCELK_STEP_SENDMSG): "sendmsg of a file descriptor table",
    int(lib.CANCELK_STEP_RECVMSG): "recvmsg of a file descriptor table",
    int(lib.CANCELK_STEP_PLACE_FDS): "installing the file descriptors sent",
    int(lib.CANCELK_STEP_MALLOC): "malloc for a file descriptor table",
    int(lib.CANCELK_STEP_BAD_TABLE): "reading a file descriptor table",
}


def send_table(channel: int, directory: int, exclude: list[int], frame: bytes = b"") -> None:
    """Send this process's fd table but ``exclude`` (each fd's number and
    close-on-exec flag, the fds themselves attached), then ``frame``, over
    the unix stream socket ``channel`` (blocking).  ``directory`` as for
    open_fds.  OSError on failure (EPIPE: the reader is gone)."""
    c_exclude = ffi.new("int[]", exclude or [0])
    sent = lib.cancelk_send_table(channel, directory, c_exclude, len(exclude), frame, len(frame))
    step = int(sent)
    if step:
        raise _fail(_TABLE_STEPS.get(step, f"fd table step {step}"))


_TABLE_BUFFER = 1 << 16
_NO_TABLE = int(ffi.cast("size_t", -1))  # receive_table's "EOF first"


def receive_table(channel: int, keep: list[int]) -> bytes | None:
    """Receive what send_table sent and install it: each fd at its number.
    ``keep``, this process's own fds, is updated in place to the numbers
    they were moved to (also when this raises).  The first bytes of what
    followed the table, or None on EOF before a whole table arrived."""
    c_keep = ffi.new("int[]", keep or [0])
    buffer = ffi.new("char[]", _TABLE_BUFFER)
    got = ffi.new("size_t *")
    step = int(lib.cancelk_receive_table(channel, c_keep, len(keep), buffer, _TABLE_BUFFER, got))
    keep[:] = [int(c_keep[i]) for i in range(len(keep))]
    if step:
        raise _fail(_TABLE_STEPS.get(step, f"fd table step {step}"))
    if got[0] == _NO_TABLE:
        return None
    arrived: bytes = ffi.buffer(buffer, got[0])[:]
    return arrived


PENDING_DRAINED = int(lib.CANCELK_PENDING_DRAINED)
PENDING_EOF = int(lib.CANCELK_PENDING_EOF)
PENDING_FULL = int(lib.CANCELK_PENDING_FULL)
_PENDING_BYTES = 4096
_PENDING_FDS = 256


def recv_pending(fd: int) -> tuple[bytes, list[int], int]:
    """What the unix socket ``fd`` holds now, without waiting: its bytes,
    the fds that came with them (close-on-exec, in order), and whether it
    is drained, at EOF, or may hold more (PENDING_*)."""
    buffer = ffi.new("char[]", _PENDING_BYTES)
    fds = ffi.new("int[]", _PENDING_FDS)
    counts = ffi.new("int[2]")
    n = int(
        lib.cancelk_recv_pending(fd, buffer, _PENDING_BYTES, fds, _PENDING_FDS, counts, counts + 1)
    )
    if n < 0:
        raise _fail(f"recvmsg of what socket {fd} holds")
    data: bytes = ffi.buffer(buffer, n)[:]
    return data, [int(fds[i]) for i in range(counts[0])], int(counts[1])


def list_children(parent: int) -> list[int] | None:
    """Pids whose parent is ``parent``; None where the OS cannot tell (not Linux)."""
    out = ffi.new("int[]", 4096)
    n = int(lib.cancelk_list_children(parent, out, 4096))
    if n < 0:
        if ffi.errno == _errno.ENOSYS:
            return None
        raise _fail(f"listing the children of {parent} in /proc")
    return [int(out[i]) for i in range(n)]


def kill_descendants(root: int) -> int | None:
    """SIGKILL every descendant of ``root`` (not root itself); None where unsupported."""
    n = int(lib.cancelk_kill_descendants(root, 16))
    if n < 0:
        if ffi.errno == _errno.ENOSYS:
            return None
        raise _fail(f"killing the descendants of {root}")
    return n


def kill_trees(roots: list[int]) -> int | None:
    """SIGKILL every descendant of every root (not the roots themselves), one
    scan of /proc per round for all of them; None where unsupported."""
    if not roots:
        return 0
    pids = ffi.new("int[]", roots)
    n = int(lib.cancelk_kill_trees(pids, len(roots), 16))
    if n < 0:
        if ffi.errno == _errno.ENOSYS:
            return None
        raise _fail(f"killing the descendants of {roots}")
    return n


def tree_rss(roots: list[int]) -> list[int] | None:
    """Resident bytes of each root's whole process tree, from one scan of
    /proc; None where the OS has no /proc to scan."""
    if not roots:
        return []
    pids = ffi.new("int[]", roots)
    out = ffi.new("int64_t[]", len(roots))
    if lib.cancelk_tree_rss(pids, len(roots), out) != 0:
        if ffi.errno == _errno.ENOSYS:
            return None
        raise _fail(f"reading the resident memory of the trees of {roots}")
    return [int(out[i]) for i in range(len(roots))]


# What each step of the C loop attempted, for the OSError when it fails.
# ``{doing}`` is the loop call it served ("watching fd 12 for token 3");
# ``{subject}`` what an epoll_ctl acted on ("fd 12 for token 3").
_LOOP_STEPS = {
    int(getattr(lib, f"CANCELK_STEP_{name}")): template
    for name, template in {
        "BAD_ARGUMENT": "{doing}: argument out of range",
        "NOT_WATCHED": "{doing}: not watched by this loop",
        "NO_BACKEND": "{doing}: this OS has no such backend",
        "CALLOC": "calloc() of the loop, {doing}",
        "REALLOC": "realloc() of the loop's watch lists, {doing}",
        "EPOLL_CREATE": "epoll_create1(EPOLL_CLOEXEC), {doing}",
        "TIMERFD_CREATE": "timerfd_create(CLOCK_MONOTONIC) for the deadline, {doing}",
        "EPOLL_ADD_TIMER": "epoll_ctl(EPOLL_CTL_ADD) of the deadline timerfd, {doing}",
        "EPOLL_ADD": "epoll_ctl(EPOLL_CTL_ADD) of {subject}",
        "EPOLL_DEL": "epoll_ctl(EPOLL_CTL_DEL) of {subject}",
        "PIDFD_OPEN": "pidfd_open(), {doing}",
        "WAITID": "waitid(WEXITED | WNOHANG | WNOWAIT), {doing}",
        "TIMERFD_SETTIME": "timerfd_settime(TFD_TIMER_ABSTIME), {doing}",
        "EPOLL_WAIT": "epoll_wait(), {doing}",
        "TIMERFD_READ": "read() of the expired deadline timerfd, {doing}",
        "PPOLL": "ppoll() of the watched fds, {doing}",
        "POLL": "poll() of the watched fds, {doing}",
    }.items()
}


def _loop_failed(step: int, doing: str, subject: str = "") -> OSError:
    template = _LOOP_STEPS.get(step, "event loop step {step}, {doing}")
    return _fail(template.format(step=step, doing=doing, subject=subject or doing))


def _waiting(deadline_ns: int) -> str:
    if deadline_ns < 0:
        return "waiting with no deadline"
    return f"waiting with the deadline {(deadline_ns - monotonic_ns()) / 1e9:.3f} s away"


class Loop:
    """Wait for the first of: watched children exiting, fds readable, a deadline.

    Tokens are caller-chosen integers >= 0; ``DEADLINE`` (-1) reports the deadline.
    A failure raises OSError naming the system call that failed.
    """

    def __init__(self, backend: str | None = None) -> None:
        backend = backend or selected_backend()
        if backend not in ("pidfd", "posix"):
            raise ValueError(f"backend must be 'pidfd' or 'posix', not {backend!r}")
        code = lib.CANCELK_BACKEND_PIDFD if backend == "pidfd" else lib.CANCELK_BACKEND_POSIX
        out = ffi.new("struct cancelk_loop **")
        step = int(lib.cancelk_loop_new(code, out))
        if step != 0:
            raise _loop_failed(step, f"creating a {backend} loop")
        self._handle: Any = ffi.gc(out[0], lib.cancelk_loop_free)
        self._tokens: Any = ffi.new("int64_t[]", 64)
        self.backend = backend

    def close(self) -> None:
        if self._handle is not None:
            ffi.release(self._handle)
            self._handle = None

    def add_fd(self, fd: int, token: int) -> None:
        step = int(lib.cancelk_loop_add_fd(self._handle, fd, token))
        if step != 0:
            watched = f"fd {fd} for token {token}"
            raise _loop_failed(step, f"watching {watched}", watched)

    def remove_fd(self, fd: int) -> None:
        step = int(lib.cancelk_loop_remove_fd(self._handle, fd))
        if step != 0:
            raise _loop_failed(step, f"unwatching fd {fd}", f"fd {fd}")

    def add_child(self, pid: int, token: int) -> None:
        step = int(lib.cancelk_loop_add_child(self._handle, pid, token))
        if step != 0:
            doing = f"watching child {pid} for token {token}"
            raise _loop_failed(step, doing, f"the pidfd of child {pid} for token {token}")

    def remove_child(self, pid: int) -> None:
        step = int(lib.cancelk_loop_remove_child(self._handle, pid))
        if step != 0:
            raise _loop_failed(step, f"unwatching child {pid}", f"the pidfd of child {pid}")

    def wait(self, deadline_ns: int | None, *, precise: bool = False) -> list[int]:
        """Ready tokens; an empty list means a signal interrupted the wait.
        ``precise``: the deadline stops something; its last WAKE_AHEAD_NS
        are watched without sleeping (a sleeper wakes late on a VM)."""
        deadline = -1 if deadline_ns is None else max(deadline_ns, 0)
        ahead = WAKE_AHEAD_NS if precise else 0
        n = int(lib.cancelk_loop_wait(self._handle, deadline, ahead, self._tokens, 64))
        if n < 0:
            doing = _waiting(deadline)
            if -n == lib.CANCELK_STEP_WAITID:
                doing = f"checking the child for token {self._tokens[0]}, {doing}"
            raise _loop_failed(-n, doing)
        return [int(self._tokens[i]) for i in range(n)]


class SharedWords:
    """Atomic 64-bit words in a buffer shared between processes (a MAP_SHARED mmap)."""

    def __init__(self, buffer: Any, count: int) -> None:
        self._cdata: Any = ffi.from_buffer("int64_t[]", buffer, require_writable=True)
        if len(self._cdata) < count:
            raise ValueError(f"shared buffer holds {len(self._cdata)} words, need {count}")
        self.count = count

    def address(self, index: int) -> Any:
        """Word ``index``'s address, bounds-checked, for the ``word_*``
        functions; a caller may keep it (a job's begin and finish are then
        one C call each) until ``close()``, and must drop it before."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self._cdata + index

    def close(self) -> None:
        """Release the buffer so its owner (an mmap) can be closed."""
        ffi.release(self._cdata)

    def load(self, index: int) -> int:
        return word_load(self.address(index))

    def store(self, index: int, value: int) -> None:
        word_store(self.address(index), value)

    def cas(self, index: int, expected: int, desired: int) -> bool:
        return bool(word_cas(self.address(index), expected, desired))


# The atomic operations on an address from SharedWords.address(): no bounds
# check here (address() made it), and no Python frame of their own.
word_load: Callable[[Any], int] = lib.cancelk_word_load
word_store: Callable[[Any, int], None] = lib.cancelk_word_store
word_cas: Callable[[Any, int, int], int] = lib.cancelk_word_cas  # 1 if it swapped
