"""Standby job processes for killable_wrapper: the fork taken off the call's path.

    host worker H (any pool)         template T (H's child)        standby S (T's child)
    killable_wrapper(fn, ...)        forked from H once: H's       one-shot; two kept
                                     memory as of that fork,       forked ahead of time
                                     none of H's fds               warm-up, then "r" -->T
     take S  <------- control ------ "standby S" + H's end of
                      socket         S's channel and S's pidfd
                                     (SCM_RIGHTS)
     H's fd table (SCM_RIGHTS) and the job -- S's channel ---->  H's fds in place,
                                                                 fn(*args, **kwargs)
     result frame <----------------------- S's channel -------  result frame, "d" -->T
                                     forks the next standby      waits for EOF, then
     close S's channel, SIGKILL S by pidfd ---------------------->  kills its group
                                     S exits: T kills its group,
                                     reaps it, sweeps its orphans
     stop (time limit, cancel): SIGKILL S by pidfd, "kill S" -> T; wait for
     "S exited, status" <- T  (a death: that report, with no result before it)

A call costs H a pickle and one C call that lists its fds and sends them
with the job in one sendmsg, not a fork: T forks the next standby while H
is elsewhere (SCHED_BATCH: it preempts nobody), and H reads T's news when
it needs a standby (without pidfds, also while the job runs).  T keeps
none of H's file descriptors (a pipe H closes later must reach EOF; a pool
must see its worker's exit), so an idle standby holds none either; with
its job it gets H's fd table as it is at the call, same numbers, same
close-on-exec flags.

T and S are job processes (``_child.become_job_process``): own process
group, child subreaper, dead with their parent -- T with H, S with T -- tree
and all.  T also ends on EOF of its control socket (H gone, or
``stop_standby``), killing its standbys first; S on EOF of its channel.

T is H's child; S is T's child, so T alone reaps S: a pid or group id of S
is acted on only in T, while S is unreaped, or in H through S's pidfd.  A
SIGCHLD handler of H's that reaps never sees S.

What differs from forking the job at the call (``killable_wrapper_fresh=True``
or ``CANCELK_WRAPPER_STANDBY=0`` restore that):
- the job sees H's memory as of T's fork, not of the call (its file
  descriptors are the call's).  T is forked again when H's pid,
  ``len(sys.modules)``, ``os.environ``, the working directory or ``sys.path``
  changed since; other changes H made to its memory (a global set by another
  function the worker ran) are not seen.  A job that names something H
  defined since (it does not unpickle there) is forked from H instead;
- fn, args and kwargs reach the job by pickle (as they reach a pool worker);
  when they do not pickle, the call forks the job from H as before;
- the job's parent is T, not H;
- after a result the call returns without waiting for the job's process to
  be torn down: it has been sent SIGKILL (it kills its group), T reaps it.

By default standbys serve hosts that are multiprocessing children (pool
workers), where what runs between two calls is the pool's own loop; a main
program, whose own code runs between calls, forks at the call unless
``CANCELK_WRAPPER_STANDBY=1``.

Why one module of this size: it holds the three sides (H, T, S) of one
private protocol; each message is written and read within a screen of each
other, and nothing outside killable_wrapper imports it.
"""

from __future__ import annotations

import collections
import errno
import gc
import logging
import multiprocessing
import os
import select
import signal
import socket
import struct
import sys
from typing import Any

from cancelk import _child, _core, _kill, _wire

__all__ = ["NOT_LOADED", "StandbyJob", "acquire", "stop_standby", "wanted"]

log = logging.getLogger("cancelk")

# One record on the control socket: what, about which standby, a value.
_RECORD = struct.Struct("<Iiq")
_STANDBY = 1  # T -> H: a standby waits (fds: its channel, and its pidfd on Linux)
_EXITED = 2  # T -> H: a standby was reaped, its tree killed (value: wait status)
_FAILED = 3  # T -> H: no standby will come (value: errno); H ends T
_KILL = 4  # H -> T: stop this standby's job, tree and all

_CONTROL = 0  # T's loop token of the control socket; a standby's: pid*2 exit, pid*2+1 news
_WAIT_T = 10.0  # seconds H waits for T to answer before it gives T up

# The outcome frame of a job its standby could not unpickle (a name the host
# defined after the template's fork): empty, which no encoded outcome is.
NOT_LOADED = b""

_OFF = ("0", "no", "off", "false")
_ON = ("1", "yes", "on", "true")


def wanted() -> bool:
    """Should this call use a standby?  ``CANCELK_WRAPPER_STANDBY`` decides
    (read at each call); unset, yes in multiprocessing children only."""
    setting = _core.environ_setting("CANCELK_WRAPPER_STANDBY").strip().lower()
    if setting in _OFF:
        return False
    if setting in _ON:
        return True
    if setting:
        raise ValueError(f"CANCELK_WRAPPER_STANDBY must be 0 or 1, not {setting!r}")
    return multiprocessing.parent_process() is not None


# ---------------------------------------------------------------- host side

_template: _Template | None = None
_busy = False  # a standby call is in progress (a nested call, from a signal handler, forks)


def acquire(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StandbyJob | None:
    """A standby for this job (not started yet), or None when the call must
    fork the job itself: arguments that do not pickle, a nested call, a
    template that cannot be started."""
    global _busy
    if _busy:
        return None
    try:
        payload = _wire.dumps((fn, args, kwargs))
    except Exception as why:
        log.debug("killable_wrapper forks the job: its call does not pickle (%s)", why)
        return None
    _busy = True
    try:
        standby = _take()
    except BaseException:
        _busy = False
        raise
    if standby is None:
        _busy = False
        return None
    template, pid, channel, pidfd = standby
    return StandbyJob(template, pid, channel, pidfd, payload)


def _take() -> tuple[_Template, int, int, int] | None:
    global _template
    for _attempt in range(2):  # a template found dead is replaced once
        template = _template
        if template is not None and not template.usable():
            _template = None
            template.close()
            template = None
        if template is None:
            try:
                template = _template = _Template()
            except OSError as why:
                log.debug("killable_wrapper forks the job: no template process (%s)", why)
                return None
        try:
            pid, channel, pidfd = template.take()
        except _TemplateGone:
            continue
        return template, pid, channel, pidfd
    return None


def stop_standby() -> None:
    """Stop this process's standby processes (the template and its idle
    standbys) and wait until they are gone; the next call forks new ones.
    Call it after changing state that later jobs must see.  No process or
    descriptor of cancelk's is left in this process afterwards."""
    global _template, _loop, _fd_directory
    template, _template = _template, None
    try:
        if template is not None:
            template.close()
    finally:
        loop, _loop = _loop, None
        if loop is not None:
            loop.close()
        if _fd_directory >= 0:
            os.close(_fd_directory)
        _fd_directory = -2


_fd_directory = -2  # this process's /proc/self/fd, kept open (-1: none to keep)
_loop: _core.Loop | None = None  # the loop standby calls wait in, kept from call to call


def _call_loop(backend: str) -> _core.Loop:
    global _loop
    if _loop is None or _loop.backend != backend:
        if _loop is not None:
            _loop.close()
        _loop = None
        _loop = _core.Loop(backend)
    return _loop


def _fd_dir() -> int:
    global _fd_directory
    if _fd_directory == -2:
        try:
            _fd_directory = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            _fd_directory = -1
    return _fd_directory


def _forget_in_child() -> None:
    """After any fork of this process: the child is not the template's host
    (and /proc/self/fd, opened here, lists the parent's fds)."""
    global _template, _busy, _fd_directory, _loop
    template, _template = _template, None
    _busy = False
    if _fd_directory >= 0:
        os.close(_fd_directory)
    _fd_directory = -2
    loop, _loop = _loop, None
    if loop is not None:
        loop.close()  # our copies of its epoll and timer fds, closed now
    if template is not None:
        template.forget()


os.register_at_fork(after_in_child=_forget_in_child)


def _environ() -> dict[Any, Any]:
    data = getattr(os.environ, "_data", None)  # the bytes behind os.environ: no decoding
    return data if isinstance(data, dict) else dict(os.environ)


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


class _Fingerprint:
    """What the host's state is checked by at each call: if any of it changed
    since the template's fork, the template is forked again.  A few
    microseconds; what it cannot see (a global the host set) is documented."""

    def __init__(self) -> None:
        self.modules = len(sys.modules)
        self.environ = dict(_environ())
        self.cwd = _cwd()
        self.path = list(sys.path)

    def matches(self) -> bool:
        return (
            len(sys.modules) == self.modules
            and sys.path == self.path
            and _environ() == self.environ
            and _cwd() == self.cwd
        )


class _TemplateGone(Exception):
    """The template ended, or stopped answering."""


class _Template:
    """The host's handle on its template process T."""

    def __init__(self) -> None:
        self.backend = _core.selected_backend()
        self.host = os.getpid()
        self.fingerprint = _Fingerprint()
        self.ready: collections.deque[tuple[int, int, int]] = collections.deque()
        self.exits: dict[int, int] = {}  # wait statuses of standbys in `watching`
        self.watching: set[int] = set()  # standbys handed a job, not finished with
        self.gone = False  # T ended (EOF), failed or fell silent
        self.failed = False  # T cannot fork standbys: no more will come
        self.stale = False  # a job could not be loaded from T's state
        self._buffer = bytearray()
        self._fds: list[int] = []
        self.pidfd = -1
        ours, theirs = socket.socketpair()
        _child.flush_std_streams()  # else each job would print what H had buffered
        try:
            with _kill.sigchld_blocked() as mask:  # a reaping handler must not race the pidfd
                pid = os.fork()
                if pid == 0:  # pragma: no cover - runs in the template
                    _template_main(self.host, theirs, ours, mask)
                try:
                    if self.backend == "pidfd":
                        self.pidfd = _core.pidfd_open(pid)
                except BaseException:
                    _core.signal_child(pid, signal.SIGKILL)
                    _kill.reap_child(pid)
                    raise
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = pid
        ours.setblocking(False)
        self.control = ours

    def usable(self) -> bool:
        return (
            not (self.gone or self.failed or self.stale)
            and self.host == os.getpid()
            and self.fingerprint.matches()
            and self.backend == _core.selected_backend()
        )

    def take(self) -> tuple[int, int, int]:
        """The next standby: (pid, channel fd, pidfd or -1), now the caller's."""
        # T's news is read here only when no standby is known (and, without
        # pidfds, while jobs run): one syscall asks whether T lives (its
        # standbys die with it).  A standby that died
        # idle refuses its job (EPIPE); one whose T died just now leaves it
        # unrun: both jobs are forked from H then, nothing lost.
        if not self.alive():
            self.gone = True
        while True:
            if self.gone:  # its standbys die with it: none may get a job now
                raise _TemplateGone
            if self.ready:
                pid, channel, pidfd = self.ready.popleft()
                self.watching.add(pid)
                return pid, channel, pidfd
            if self.failed:
                raise _TemplateGone
            self.read_records(block=True)

    def alive(self) -> bool:
        try:
            return not _core.has_exited(self.pid, self.pidfd)
        except OSError:
            return False  # reaped by somebody else: exited

    def read_records(self, block: bool) -> None:
        """Take in what T sent; with ``block``, wait for one record at least."""
        while not self.gone:
            try:
                data, fds, state = _core.recv_pending(self.control.fileno())
            except OSError:
                self._lost()
                return
            self._fds.extend(fds)
            self._buffer += data
            whole = len(self._buffer) - len(self._buffer) % _RECORD.size
            if whole:
                for kind, pid, value in _RECORD.iter_unpack(self._buffer[:whole]):
                    self._record(kind, pid, value)
                del self._buffer[:whole]
                block = False
            if state == _core.PENDING_EOF:
                self._lost()
            elif state == _core.PENDING_DRAINED:
                if not block:
                    return
                if not _readable(self.control.fileno(), _WAIT_T):
                    log.warning("killable_wrapper: template process %d stopped answering", self.pid)
                    self._lost()

    def _record(self, kind: int, pid: int, value: int) -> None:
        if kind == _STANDBY and value in (1, 2) and len(self._fds) >= value:
            # value: how many fds T sent with it (its channel, its pidfd)
            fds = self._fds[:value]
            del self._fds[:value]
            self.ready.append((pid, fds[0], fds[1] if value == 2 else -1))
            return
        if kind == _EXITED:
            if pid in self.watching:
                self.exits[pid] = value
            else:  # an idle standby ended (killed from outside): not to be handed a job
                for entry in [e for e in self.ready if e[0] == pid]:
                    self.ready.remove(entry)
                    _close_fds(entry[1], entry[2])
        elif kind == _FAILED:
            log.debug("killable_wrapper: template %d cannot fork: %s", self.pid, os.strerror(value))
            self.failed = True
        else:
            log.warning("killable_wrapper: template %d sent a stray record %d", self.pid, kind)
            self._lost()

    def _lost(self) -> None:
        self.gone = True

    def send_kill(self, pid: int) -> None:
        try:
            self.control.send(_RECORD.pack(_KILL, pid, 0))
        except OSError:
            self._lost()

    def wait_exit(self, pid: int) -> int | None:
        """Block until T reports the standby reaped: its wait status, or None
        if T ended first."""
        while pid not in self.exits and not self.gone:
            self.read_records(block=True)
        return self.exits.get(pid)

    def done_with(self, pid: int) -> None:
        self.watching.discard(pid)
        self.exits.pop(pid, None)

    def close(self) -> None:
        """End T (EOF on its control socket: it stops its standbys and exits),
        wait until it is gone and reap it."""
        while self.ready:
            _, channel, pidfd = self.ready.popleft()
            _close_fds(channel, pidfd)
        _close_fds(*self._fds)
        self._fds = []
        self.control.close()
        self.gone = True
        try:
            if not _wait_child_exit(self.pid, self.pidfd, self.backend, _WAIT_T):
                log.warning("killable_wrapper: template process %d did not exit; killed", self.pid)
                _core.signal_child(self.pid, signal.SIGKILL, pidfd=self.pidfd)
            with _kill.sigchld_blocked():
                _kill.reap_child(self.pid)
        finally:
            _close_fds(self.pidfd)
            self.pidfd = -1

    def forget(self) -> None:
        """In a forked child of the host: drop the host's descriptors, leave T alone."""
        while self.ready:
            _, channel, pidfd = self.ready.popleft()
            _close_fds(channel, pidfd)
        _close_fds(*self._fds, self.pidfd)
        self._fds = []
        self.pidfd = -1
        self.control.close()
        self.gone = True


def _own_fds(template: _Template, channel: int, pidfd: int) -> list[int]:
    """cancelk's fds in H, left out of the table a job gets: the template's
    control socket, this standby's channel and pidfd, what other standbys'
    announcements brought."""
    ours = [template.control.fileno(), channel, pidfd, *template._fds]
    for _pid, other_channel, other_pidfd in template.ready:
        ours += (other_channel, other_pidfd)
    return [fd for fd in ours if fd >= 0]


def _send_job(channel: int, directory: int, exclude: list[int], payload: bytes) -> None:
    """H's fd table and the job: one sendmsg for a small job (a C call lists
    the fds and sends them with it); a large payload follows by write."""
    head = _wire.HEADER.pack(len(payload))
    if len(payload) <= _wire.SMALL:
        _core.send_table(channel, directory, exclude, head + payload)
        return
    _core.send_table(channel, directory, exclude, head)
    _wire.write_all(channel, payload)


def _read_frame(channel: int, start: bytes) -> bytes | None:
    """The frame whose first bytes are ``start``, the rest read from ``channel``."""
    head = _wire.HEADER.size
    if len(start) < head:
        more = _wire.read_exact(channel, head - len(start))
        if more is None:
            return None
        start += more
    (size,) = _wire.HEADER.unpack_from(start)
    body = start[head:]
    if len(body) < size:
        more = _wire.read_exact(channel, size - len(body))
        if more is None:
            return None
        body += more
    return bytes(body)


def _readable(fd: int, timeout: float = 0.0) -> bool:
    poller = select.poll()  # not select(): fds past 1024 are fine here
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _close_fds(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _wait_child_exit(pid: int, pidfd: int, backend: str, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the caller's child to exit (it stays
    unreaped); True if it did, or was reaped by somebody else already."""
    loop = _core.Loop(backend)
    try:
        if pidfd >= 0:
            loop.add_fd(pidfd, 0)
        else:
            try:
                loop.add_child(pid, 0)
            except OSError as why:
                if why.errno == errno.ECHILD:
                    return True
                raise
        deadline = _core.monotonic_ns() + int(timeout * 1e9)
        while True:
            tokens = loop.wait(deadline)
            if 0 in tokens:
                return True
            if _core.monotonic_ns() >= deadline:
                return False
    finally:
        loop.close()


class StandbyJob:
    """A job run by a standby, seen from the host (killable_wrapper's ``_Job``)."""

    def __init__(
        self,
        template: _Template,
        pid: int,
        channel: int,
        pidfd: int,
        payload: bytes,
    ) -> None:
        self.template = template
        self.pid = pid
        self.result_fd = channel
        self.pidfd = pidfd
        self._payload = payload
        self._finished = False
        self.status: int | None = None
        self._loop: _core.Loop | None = None  # the call's loop, while it watches this job
        self._watched = -1  # the fd watched there for this job's end
        self._loop_clean = True  # False once taking an fd out of it failed

    def start(self) -> bool:
        """Hand over H's fd table and the job; False if the standby is gone
        before it got them (then nothing ran: the caller forks the job)."""
        exclude = _own_fds(self.template, self.result_fd, self.pidfd)
        try:
            _send_job(self.result_fd, _fd_dir(), exclude, self._payload)
        except OSError as why:
            # It died idle (EPIPE), or H's table cannot be passed (an fd the
            # kernel will not send, too many fds in flight): the standby
            # gets EOF when its channel is closed and runs nothing; the job
            # is forked from H.
            if not isinstance(why, (BrokenPipeError, ConnectionResetError)):
                log.debug("killable_wrapper forks the job: %s", why)
            self._finished = True
            self.template.done_with(self.pid)
            return False
        finally:
            self._payload = b""
        os.set_blocking(self.result_fd, False)
        return True

    def open_loop(self) -> _core.Loop:
        return _call_loop(self.template.backend)

    def close_loop(self, loop: _core.Loop, *, clean: bool) -> None:
        global _loop
        self._unwatch()
        if not (clean and self._loop_clean) and _loop is loop:
            _loop = None
            loop.close()

    def watch(self, loop: _core.Loop, token: int) -> bool:
        """Watch for the standby's end: on its pidfd where there is one (T's
        news of the next standby, ready meanwhile, then waits in the control
        socket until a call needs it, instead of waking this one), else by
        T's report of it on the control socket."""
        self._watched = self.pidfd if self.pidfd >= 0 else self.template.control.fileno()
        loop.add_fd(self._watched, token)
        self._loop = loop
        return True

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.remove_fd(self._watched)
            except OSError:
                self._loop_clean = False

    def exited(self) -> bool:
        if self._watched == self.pidfd:  # it exited; T reports its status
            self.template.wait_exit(self.pid)
            return True
        self.template.read_records(block=False)
        return self.pid in self.template.exits or self.template.gone

    def finish(self, *, stop: bool) -> int | None:
        """Kill what is left of the job; with ``stop`` wait until T reports it
        gone with its tree.  The wait status, or None when unknown."""
        if self._finished:
            return self.status
        self._finished = True
        template = self.template
        try:
            asked = stop and self.pid not in template.exits
            if not stop:
                # Its result is in: EOF, and S kills its group itself; the
                # SIGKILL spares us waiting for that (T kills the group at
                # S's end all the same).  One syscall on every call's path.
                _close_fds(self.result_fd)
                self.result_fd = -1
                if self.pidfd >= 0:
                    _core.pidfd_kill(self.pidfd, signal.SIGKILL)
            elif self.pidfd >= 0:  # S and its group at once; never a recycled pid
                # Before T hears of it: T, woken on this CPU, would run first
                # (~0.2 ms of cold Python in traces) and delay the kill.
                _kill.kill_by_pidfd(self.pidfd, self.pid)
            if asked:
                template.send_kill(self.pid)  # without a pidfd, T kills S
                self.status = template.wait_exit(self.pid)
                if self.status is None and self.pidfd >= 0:
                    _readable(self.pidfd, _WAIT_T)  # T ended: S dies with it
            else:
                self.status = template.exits.get(self.pid)
        finally:
            template.done_with(self.pid)
        return self.status

    def lost_status(self) -> str:
        return "its exit status is unknown: the standby's template process ended"

    def close(self) -> None:
        global _busy, _template
        try:
            if not self._finished:
                self.finish(stop=True)
        finally:
            self._unwatch()  # before its pidfd is closed
            fds, self.result_fd, self.pidfd = (self.result_fd, self.pidfd), -1, -1
            _close_fds(*fds)
            _busy = False
        if self.template.gone and _template is self.template:
            _template = None  # it ended: reaped now, not left a zombie until the next call
            self.template.close()


# ------------------------------------------------------------ template side


def _template_main(
    host: int, control: socket.socket, hosts_end: socket.socket, mask: Any
) -> None:  # pragma: no cover - runs in the template
    code = 70
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the host's, as it was
        hosts_end.close()
        # None of H's objects is ever collected here (a finalizer could close
        # a descriptor number T reuses); the heap stays shared with H, too.
        gc.freeze()
        _drop_host_fds(keep=control.fileno())
        _child.become_job_process(host)
        _Server(control).serve()
        code = 0
    except BaseException:
        pass
    finally:
        os._exit(code)


def _drop_host_fds(keep: int) -> None:  # pragma: no cover - runs in the template
    """Close every descriptor inherited from H but ``keep``; 0, 1 and 2 read
    and write /dev/null.  A standby gets H's fds with its job."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    for fd, _cloexec in _core.open_fds():
        if fd > 2 and fd != keep:
            os.close(fd)


_STARTING, _READY, _DONE = 0, 1, 2  # a standby, as T sees it
_SPARES = 2  # standbys kept starting or ready: a call finds one warmed up
_IDLE_DEATHS = 3  # standbys in a row that end before they are ready: T gives up
_WARM_FDS = 16  # fds a standby's warm-up passes itself, as many as a pool worker has
_UNREPORTED_KEPT = 8  # exits T keeps for a stop request that comes after them


class _Standby:  # pragma: no cover - lives in the template
    __slots__ = ("channel", "news", "pidfd", "report", "state")

    def __init__(self, news: int, channel: socket.socket, pidfd: int) -> None:
        self.news = news  # read end of its news pipe ("r" ready, "d" done); -1 closed
        self.channel: socket.socket | None = channel  # H's end, sent when it is ready
        self.pidfd = pidfd
        self.state = _STARTING
        self.report = False  # H asked to be told of its end (it stopped its job)

    def forget_h_end(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        _close_fds(self.pidfd)
        self.pidfd = -1


class _Server:  # pragma: no cover - runs in the template
    """T: keeps ``_SPARES`` standbys started, cleans up after each one's end.

    A standby is announced to H when it is warmed up and blocked in read()
    ("r" on its news pipe).  When one is done with a job ("d": its result is
    written) the next one is forked, SCHED_BATCH: the fork, and the standby's
    start, preempt nobody (the standby leaves BATCH when ready).  H hears of
    a standby's end only when that end is news: it asked (it stopped the job),
    or the standby ended without being done (a death, or killed idle).
    """

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.loop = _core.Loop()
        self.pidfds = self.loop.backend == "pidfd"
        self.loop.add_fd(control.fileno(), _CONTROL)
        self.kids: dict[int, _Standby] = {}  # every unreaped standby
        self.idle_deaths = 0  # standbys in a row that ended before they were ready
        self.buffer = bytearray()
        self.children_file = f"/proc/self/task/{os.getpid()}/children"
        self.children_fd = -1
        self.unreported: dict[int, int] = {}  # standbys done with a job, reaped untold

    def serve(self) -> None:
        self.ensure_spares()
        while True:
            for token in self.loop.wait(None):
                if token == _CONTROL:
                    if not self.read_control():
                        self.shutdown()
                        return
                elif token & 1:
                    self.on_news(token >> 1)
                else:
                    self.on_exit(token >> 1)

    def ensure_spares(self) -> None:
        spares = sum(kid.state != _DONE for kid in self.kids.values())
        while spares < _SPARES and self.idle_deaths < _IDLE_DEATHS:
            if not self.fork_standby():
                return
            spares += 1

    def fork_standby(self) -> bool:
        """Fork a standby; on failure tell H (which then forks its jobs
        itself and ends us), and keep serving the standbys running jobs."""
        try:
            channel, channel_s = socket.socketpair()
            news_r, news_w = os.pipe()
        except OSError as why:
            self.send(_FAILED, 0, why.errno or errno.EIO)
            return False
        keep_out = [self.control.fileno(), channel.fileno(), news_r]
        if self.children_fd >= 0:
            keep_out.append(self.children_fd)
        for kid in self.kids.values():
            keep_out += [fd for fd in (kid.news, kid.pidfd) if fd >= 0]
            if kid.channel is not None:
                keep_out.append(kid.channel.fileno())
        _policy(batch=True)  # the fork, and the standby's start, preempt nobody
        try:
            pid = os.fork()
        except OSError as why:
            _policy(batch=False)
            for sock in (channel, channel_s):
                sock.close()
            _close_fds(news_r, news_w)
            self.send(_FAILED, 0, why.errno or errno.EIO)
            return False
        if pid == 0:
            _standby_main(os.getppid(), channel_s.fileno(), news_w, keep_out, self.loop)
        _policy(batch=False)
        _kill.join_own_group(pid)
        channel_s.close()
        os.close(news_w)
        pidfd = _core.pidfd_open(pid) if self.pidfds else -1  # our unreaped child: exact
        self.loop.add_child(pid, pid << 1)
        self.loop.add_fd(news_r, pid << 1 | 1)
        self.kids[pid] = _Standby(news_r, channel, pidfd)
        self.unreported.pop(pid, None)  # an earlier standby's pid, reused
        return True

    def on_news(self, pid: int) -> None:
        """ "r": the standby is ready (H is told); "d": it is done with its
        job (the next one is forked); EOF: it ended (its exit follows)."""
        kid = self.kids.get(pid)
        if kid is None or kid.news < 0:
            return
        news = os.read(kid.news, 16)
        if news == b"r" and kid.channel is not None:
            kid.state = _READY
            self.idle_deaths = 0
            fds = [kid.channel.fileno()] + ([kid.pidfd] if kid.pidfd >= 0 else [])
            try:
                socket.send_fds(self.control, [_RECORD.pack(_STANDBY, pid, len(fds))], fds)
            except OSError:
                pass  # H is gone: the loop sees EOF next
            kid.forget_h_end()
            return
        self.drop_news(kid)
        if news:
            kid.state = _DONE
            self.ensure_spares()

    def on_exit(self, pid: int) -> None:
        """A standby ended: its group killed while it is unreaped (its id is
        still its own), the orphans of its tree killed and waited for, H told
        if it is news to H, then all of them reaped."""
        kid = self.kids.pop(pid, None)
        if kid is None:
            return
        _kill.kill_group(pid)
        strays = self.end_strays(exited=pid)
        reported = kid.report or kid.state != _DONE
        if reported:  # H may be waiting: told first
            # A zombie runs nothing: H hears of it before the reap, which
            # costs more than the rest of this together (~90 us on a VM).
            self.send(_EXITED, pid, _exit_status(pid))
            # H's wake-up may have been queued on this CPU, behind the fork
            # of the next standby that follows: let it run first.
            os.sched_yield()
        status = _core.reap(pid)
        for stray in strays:
            try:
                _core.reap(stray)
            except ChildProcessError:
                pass  # reaped by somebody else meanwhile
        if not reported:  # H's request to stop it may be on its way
            self.unreported[pid] = status if status is not None else 0
            while len(self.unreported) > _UNREPORTED_KEPT:
                del self.unreported[next(iter(self.unreported))]
        self.loop.remove_child(pid)
        self.drop_news(kid)
        kid.forget_h_end()
        if kid.state == _STARTING:  # it cannot start here, or was killed from outside
            self.idle_deaths += 1
            if self.idle_deaths == _IDLE_DEATHS:
                self.send(_FAILED, 0, errno.ECHILD)
        self.ensure_spares()

    def end_strays(self, exited: int) -> list[int]:
        """Kill T's children other than its standbys and the one that
        ``exited`` (orphans of a standby's tree, adopted by T as a
        subreaper), and wait until each has exited: their pids, to reap."""
        ended: list[int] = []
        while True:
            found = [
                pid
                for pid in self.children()
                if pid not in self.kids and pid != exited and pid not in ended
            ]
            if not found:
                return ended
            _kill.end_orphans(found)
            ended += found

    def children(self) -> list[int]:
        """T's children: one read where the kernel lists a task's children
        (the file kept open: a path lookup in /proc costs more than the
        read), else a scan of /proc (not Linux: none known)."""
        try:
            if self.children_fd < 0:
                self.children_fd = os.open(self.children_file, os.O_RDONLY | os.O_CLOEXEC)
            return [int(pid) for pid in os.pread(self.children_fd, 1 << 16, 0).split()]
        except OSError:
            return _core.list_children(os.getpid()) or []

    def drop_news(self, kid: _Standby) -> None:
        if kid.news >= 0:
            self.loop.remove_fd(kid.news)
            os.close(kid.news)
            kid.news = -1

    def read_control(self) -> bool:
        """One read of H's requests (the socket blocks: one read per wake-up
        never waits); False on EOF (H gone or done with us)."""
        try:
            data = self.control.recv(_RECORD.size - len(self.buffer))
        except OSError:
            return False
        if not data:
            return False
        self.buffer += data
        if len(self.buffer) == _RECORD.size:
            kind, pid, _value = _RECORD.unpack(self.buffer)
            self.buffer.clear()
            if kind == _KILL and pid in self.unreported and pid not in self.kids:
                # Done with its job, it ended before H's request arrived:
                # H waits for the report all the same.
                self.send(_EXITED, pid, self.unreported.pop(pid))
            elif kind == _KILL and pid in self.kids:
                kid = self.kids[pid]
                kid.report = True
                self.kill(pid)
                # Its news is of no use now, and the end of its pipe, closed
                # as it exits, would wake us on its CPU in the middle of its
                # teardown: H waits for that teardown.
                self.drop_news(kid)
        return True

    def send(self, kind: int, pid: int, value: int) -> None:
        try:
            self.control.sendall(_RECORD.pack(kind, pid, value))
        except OSError:
            pass  # H is gone: the loop sees EOF next

    def kill(self, pid: int) -> None:
        """SIGKILL a standby and its group (our unreaped child: its pid and
        group id are its own).  What its job started outside the group is
        ours once it is dead (we are a subreaper): on_exit sweeps it.  No
        SIGSTOP first, as killable_wrapper's own child gets: a process in a
        subreaper's tree cannot get away from the sweep."""
        _core.kill_pid(pid, signal.SIGKILL)
        _kill.kill_group(pid)

    def shutdown(self) -> None:
        """H is gone or done with us: no standby may outlive T."""
        for pid in self.kids:
            self.kill(pid)
        for pid in self.kids:
            _core.reap(pid)
        self.kids.clear()
        _kill.sweep_orphans(())


def _exit_status(pid: int) -> int:  # pragma: no cover - runs in the template
    """The wait status of an exited, unreaped child, which stays unreaped
    (0 if it cannot be read)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except OSError:
        return 0
    if info is None:
        return 0
    if info.si_code == os.CLD_EXITED:
        return (info.si_status & 0xFF) << 8
    core = 0x80 if info.si_code == os.CLD_DUMPED else 0
    return (info.si_status & 0x7F) | core


def _policy(*, batch: bool) -> None:  # pragma: no cover - runs in the template and standbys
    """SCHED_BATCH (Linux) for work that must preempt nobody when it wakes
    up, yet gets its fair share (SCHED_IDLE could starve it, and could not be
    left again unprivileged): a fork in T, a standby's start and teardown.
    ``batch=False``: back to SCHED_OTHER, which SCHED_BATCH may always do."""
    policy = getattr(os, "SCHED_BATCH" if batch else "SCHED_OTHER", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        pass


def _noop() -> None:
    return None


def _warm_up(channel: int, news: int) -> None:  # pragma: no cover - runs in the standby
    """Go through a job's whole path once, with nothing in it, while idle:
    each page of the template this process writes costs it a copy-on-write
    fault (some 5 us on a VM), better taken now than between the job's
    arrival and its result.  The fd table sent is of the size a pool
    worker's is.  Every fd it opens is closed again."""
    ours, theirs = socket.socketpair()
    spares = [os.open(os.devnull, os.O_RDONLY) for _ in range(_WARM_FDS)]
    try:
        not_sent = [ours.fileno(), theirs.fileno(), channel, news]
        _send_job(ours.fileno(), -1, not_sent, _wire.dumps((_noop, (), {})))
        keep = [theirs.fileno()]
        start = _core.receive_table(theirs.fileno(), keep) or b""
        (job_end,) = keep
        fn, args, kwargs = _wire.loads(_read_frame(job_end, start) or b"")
        _wire.write_frame(job_end, _wire.run_and_encode(fn, args, kwargs)[1])
        _child.flush_std_streams()
        _wire.decode_outcome(_read_frame(ours.fileno(), b"") or b"")
        if job_end != theirs.fileno():
            os.close(job_end)
    finally:
        ours.close()
        theirs.close()
        for fd in spares:
            os.close(fd)


def _take_job(keep: list[int], template: int) -> Any:  # pragma: no cover - runs in the standby
    """H's fd table put in place and its job read: (fn, args, kwargs), or
    None if it cannot run here (H's table did not arrive whole, T is dying,
    the job names what T's state lacks).  EOFError when H gave the standby
    back or is gone.  ``keep`` ([channel, news]) gets their new numbers."""
    try:
        start = _core.receive_table(keep[0], keep)
    except OSError:
        return None
    if start is None:
        raise EOFError
    try:
        frame = _read_frame(keep[0], start)
        if os.getppid() != template:
            return None  # dying with T: better not started at all
        return _wire.loads(frame or b"")
    except Exception:
        return None


def _standby_main(
    template: int, channel: int, news: int, keep_out: list[int], loop: _core.Loop
) -> None:  # pragma: no cover - runs in the standby
    code = 70
    try:
        loop.close()  # T's: its epoll, timer and pidfds
        for fd in keep_out:
            os.close(fd)
        _child.become_job_process(template)
        try:
            _warm_up(channel, news)
        except Exception:
            pass  # only an optimization
        _policy(batch=False)  # the job runs, and wakes up, as H would
        os.write(news, b"r")  # T tells H now
        keep = [channel, news]
        try:
            job = _take_job(keep, template)
        except EOFError:
            code = 0
            return  # H gave it back, or is gone
        finally:
            channel, news = keep
        # Not run: H forks the job itself, from its own state.
        payload = NOT_LOADED if job is None else _child.run_job_here(*job)
        _wire.write_frame(channel, payload)
        os.write(news, b"d")  # T forks the next standby
        code = 0
        # Die when H is done reading (it closes the channel, or kills us),
        # without preempting anyone when woken: tearing down this copy of H
        # costs about what forking it did, better not spent in front of H on
        # its way back.
        _policy(batch=True)
        while os.read(channel, 4096):
            pass
        _core.kill_group(os.getpid(), signal.SIGKILL)  # what the job left running, and us
    except BaseException:
        pass
    finally:
        os._exit(code)
