"""killable_wrapper: a hard stop for jobs in pools cancelk does not own.

The default path, in a pool worker (a multiprocessing child; see _standby):

    host worker H (one thread)              template T           standby S
    killable_wrapper(fn, *args, ...)        H's child, forked    T's child, forked
      pickle (fn, args, kwargs)             once: H's memory     ahead of time, own
      list H's open fds                     then, none of H's    group, warmed up,
                                            fds; keeps 2 ready   blocked in read()
      H's fds (SCM_RIGHTS), job frame ----- S's channel ------>  H's fds in place,
      wait in C, GIL released, for the first of:                 fn(*args, **kwargs)
        result frame  <------------------- S's channel -------   write result frame
        S's exit (its pidfd; without pidfds    T reaps S,    (then, when H has
          "S exited" from T), then T's report  kills its     read it: SIGKILL of
        cancel pipe message                    group, sweeps its own group)
        deadline (CLOCK_MONOTONIC)                 its orphans
      result: close S's channel, SIGKILL S by pidfd, return (T reaps S)
      stop: SIGKILL S by pidfd, "kill S" to T, wait for "S exited"
      return value | raise job's exception | ProcessTimeoutError |
      ProcessCancelledError | ProcessDiedError

No fork on the call's path: T forks the next standby while H is elsewhere.
The job is forked from H at the call instead (``_ForkedJob``, the only way
before) when asked (``killable_wrapper_fresh=True``,
``CANCELK_WRAPPER_STANDBY=0``), outside multiprocessing children unless
``CANCELK_WRAPPER_STANDBY=1``, when the call does not pickle, and when a
standby could not load it (a name H defined after T's fork):

    H: fork (SIGCHLD blocked until the job's pidfd is open) ---> job: own group,
       wait as above on {result pipe, job's pidfd          fn(*args, **kwargs),
       (posix: waitid WNOWAIT), cancel pipe, deadline}     write result frame, _exit
       result or death: SIGKILL the group; stop: SIGSTOP, tree, group; reap

If H runs other threads, forking it is unsafe; the job then runs in a clean
interpreter started for it (see ``_CleanJob``), which inherits the
environment, working directory and ``sys.path`` and re-imports ``__main__`` as
spawn does, but not the host's in-memory state (its initializer's effects).

H may reap its children behind our back (a SIGCHLD handler that calls
``waitpid(-1)``): the job's exit is seen through its pidfd, a pid is
signalled only while provably unreaped, a reaped job's status is reported
unknown (a result that arrived still counts), and each fd is closed once.
A standby is T's child, never H's: such a handler does not see it at all.

Why one module of this size: killable_wrapper's call, its two ways of
starting the job (forked at the call, or a clean interpreter) and the
watcher that stops it share one job interface; the standby processes, the
third way, are in _standby.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

from cancelk import _child, _core, _kill, _standby, _wire
from cancelk.errors import ProcessCancelledError, ProcessDiedError, ProcessTimeoutError, died_error
from cancelk.options import check_seconds, seconds_to_ns

__all__ = ["killable_wrapper", "stop_standby"]

stop_standby = _standby.stop_standby

log = logging.getLogger("cancelk")

_RESULT, _CHILD, _CANCEL = 0, 1, 2


class _Job(Protocol):
    pid: int
    result_fd: int

    def open_loop(self) -> _core.Loop:
        """The loop to wait in (made for the call, or kept from call to call)."""

    def close_loop(self, loop: _core.Loop, *, clean: bool) -> None:
        """Done with the loop; ``clean``: nothing of this call is left in it."""

    def start(self) -> bool:
        """Set the job going (it is prepared, not running, before); False if
        it could not be handed over and nothing ran."""

    def watch(self, loop: _core.Loop, token: int) -> bool:
        """Have ``loop`` report the job's end under ``token``; False if it
        has ended already."""

    def exited(self) -> bool:
        """After ``token`` fired: has the job's process ended?"""

    def finish(self, *, stop: bool) -> int | None:
        """Kill what is left of the job (with ``stop``: its whole tree, and
        wait until it is gone); its wait status, or None if unknown."""

    def lost_status(self) -> str:
        """Why the status is unknown, when ``finish`` returned None."""

    def close(self) -> None:
        """Stop the job if ``finish`` was not called; release every fd, once."""


def killable_wrapper(
    fn: Callable[..., Any],
    /,
    *args: Any,
    killable_wrapper_timeout: float | None = None,
    killable_wrapper_cancel_pipe: Any = None,
    killable_wrapper_fresh: bool = False,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` in a child process that can be killed.

    ``killable_wrapper_timeout``: seconds before the job's whole process tree
    is killed and ProcessTimeoutError raised (None: no limit).
    ``killable_wrapper_cancel_pipe``: a multiprocessing Connection; any
    message received on it cancels the job (ProcessCancelledError); a dict
    with ``cancel_timeout`` lets the job finish within that many seconds
    first.  ``killable_wrapper_fresh``: fork the job from this process now,
    so it sees this process's state as it is at the call, rather than
    handing it to a standby process forked earlier (see the README).
    """
    if not callable(fn):
        raise TypeError(f"killable_wrapper needs a callable, not {type(fn).__name__}")
    # This runs at every call: no clock read and no check for an option
    # that was not given.
    deadline = None
    if killable_wrapper_timeout is not None:
        timeout = check_seconds(killable_wrapper_timeout, "killable_wrapper_timeout")
        if timeout is not None:
            deadline = _core.monotonic_ns() + seconds_to_ns(timeout)
    if killable_wrapper_fresh is not False and killable_wrapper_fresh is not True:
        raise TypeError("killable_wrapper_fresh must be True or False")
    cancel_pipe = killable_wrapper_cancel_pipe
    cancel_fd = None if cancel_pipe is None else _cancel_fd(cancel_pipe)
    fresh = killable_wrapper_fresh or not _alone_in_process() or not _standby.wanted()
    if not fresh:
        job = _standby.acquire(fn, args, kwargs)
        if job is not None:
            outcome = _run(job, deadline, cancel_pipe, cancel_fd)
            if outcome is not None:
                return outcome.unwrap()
            # The standby could not load the job from its older state: fork it now.
    job_here: _Job = (
        _ForkedJob(fn, args, kwargs) if _alone_in_process() else _CleanJob(fn, args, kwargs)
    )
    outcome = _run(job_here, deadline, cancel_pipe, cancel_fd)
    assert outcome is not None
    return outcome.unwrap()


def _run(
    job: _Job, deadline: int | None, cancel_pipe: Any, cancel_fd: int | None
) -> _wire.Outcome | None:
    """Start the job and wait for its outcome; None if it did not run (a
    standby could not take it or load it)."""
    # Everything that can fail is set up before the job starts, so a failure
    # never leaves a job running.
    try:
        loop = job.open_loop()
    except BaseException:
        job.close()
        raise
    watcher = None
    clean = False
    try:
        if not job.start():
            clean = True
            return None
        watcher = _Watcher(job, deadline, cancel_pipe, cancel_fd, loop)
        return watcher.run()
    finally:
        try:
            if watcher is not None:
                try:
                    watcher.close()
                finally:
                    clean = watcher.unwatch()
            job.close()
        finally:
            job.close_loop(loop, clean=clean)


def _cancel_fd(pipe: Any) -> int:
    fileno = getattr(pipe, "fileno", None)
    if not callable(fileno):
        raise TypeError("killable_wrapper_cancel_pipe must be a multiprocessing Connection")
    try:
        return int(fileno())
    except OSError as why:
        raise ValueError(f"killable_wrapper_cancel_pipe cannot be used: {why}") from why


def _alone_in_process() -> bool:
    return threading.active_count() == 1


class _ChildJob:
    """A job process that is the host's own child: killed and reaped here,
    never relying on being the only one who reaps it (issue 12.2)."""

    pid: int
    result_fd: int

    def __init__(self) -> None:
        self.pid = 0
        self.pidfd = -1
        self.result_fd = -1
        self._finished = False
        self._status: int | None = None
        self._backend = _core.selected_backend()

    def _adopt(self, pid: int, result_fd: int) -> None:
        """Right after the fork, SIGCHLD blocked: the pid is still ours."""
        self.pid = pid
        self.result_fd = result_fd
        if self._backend == "pidfd":
            self.pidfd = _core.pidfd_open(pid)

    def open_loop(self) -> _core.Loop:
        return _core.Loop()

    def close_loop(self, loop: _core.Loop, *, clean: bool) -> None:
        loop.close()

    def watch(self, loop: _core.Loop, token: int) -> bool:
        if self.pidfd >= 0:
            loop.add_fd(self.pidfd, token)  # readable once it exited, reaped or not
            return True
        try:
            loop.add_child(self.pid, token)
        except OSError as why:
            if why.errno != errno.ECHILD:
                raise
            return False  # somebody reaped it already: it has ended
        return True

    def exited(self) -> bool:
        return True

    def finish(self, *, stop: bool) -> int | None:
        if self._finished:
            return self._status
        self._finished = True
        try:
            with _kill.sigchld_blocked():  # the host's handler waits until we reaped
                try:
                    if stop:
                        _kill.stop_child_tree(self.pid, self.pidfd)
                    else:
                        _core.signal_child(self.pid, signal.SIGKILL, pidfd=self.pidfd, group=True)
                finally:
                    # Whatever failed above, the job itself does not outlive the call.
                    _core.signal_child(self.pid, signal.SIGKILL, pidfd=self.pidfd)
                    self._status = _kill.reap_child(self.pid)
        finally:
            self._close_fds()
        return self._status

    def lost_status(self) -> str:
        return (
            "its exit status is unknown: another part of this process reaped it "
            "(a SIGCHLD handler?)"
        )

    def close(self) -> None:
        if not self._finished and self.pid:
            self.finish(stop=True)
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self.result_fd, self.pidfd = (self.result_fd, self.pidfd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class _ForkedJob(_ChildJob):
    """The job forked from the host at the call: the host's state as it is now."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__()
        self._call = (fn, args, kwargs)

    def start(self) -> bool:
        fn, args, kwargs = self._call
        self._call = None  # type: ignore[assignment]
        read_fd, write_fd = os.pipe()
        host = os.getpid()
        try:
            with _kill.sigchld_blocked() as mask:
                pid = os.fork()
                if pid == 0:  # pragma: no cover - runs in the child
                    _job_child(host, mask, read_fd, write_fd, fn, args, kwargs)
                os.close(write_fd)
                write_fd = -1
                _kill.join_own_group(pid)
                try:
                    self._adopt(pid, read_fd)
                except BaseException:
                    _core.signal_child(pid, signal.SIGKILL, group=True)
                    _core.signal_child(pid, signal.SIGKILL)
                    _kill.reap_child(pid)
                    raise
        except BaseException:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        os.set_blocking(read_fd, False)
        return True


def _job_child(
    host: int,
    mask: Any,
    read_fd: int,
    write_fd: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:  # pragma: no cover - runs in the child
    code = 0
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the host's, as it was
        os.close(read_fd)
        _child.become_job_process(host)
        _wire.write_frame(write_fd, _child.run_job_here(fn, args, kwargs))
    except BaseException:
        code = 70
    finally:
        os._exit(code)


class _CleanJob(_ChildJob):
    """The job in a fresh interpreter, for hosts where fork() is unsafe."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__()
        self._job = _wire.dumps((fn, args, kwargs))  # an unpicklable call fails here, at once
        self._popen: Any = None

    def start(self) -> bool:
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        try:
            with _kill.sigchld_blocked():
                self._popen = _child.start_interpreter(
                    "cancelk.wrapper:_clean_job_main",
                    (job_read, result_write),
                    (str(job_read), str(result_write), str(os.getpid())),
                    new_session=True,
                )
                # It waits for its job on job_read: it cannot have ended yet.
                self._adopt(self._popen.pid, result_read)
        except BaseException:
            if self._popen is not None:
                self._popen.kill()
                self._popen.wait()
            os.close(result_read)
            raise
        finally:
            os.close(job_read)
            os.close(result_write)
            job, self._job = self._job, b""
        os.set_blocking(result_read, False)
        try:
            _child.send_main_and_payload(job_write, "cancelk-job", job)
        except BrokenPipeError:
            pass  # the job died before reading; its exit is reported as a death
        finally:
            os.close(job_write)
        return True

    def finish(self, *, stop: bool) -> int | None:
        status = super().finish(stop=stop)
        if self._popen is not None and self._popen.returncode is None:
            # Popen must not wait for it again (it is reaped, by us or another).
            self._popen.returncode = 0 if status is None else os.waitstatus_to_exitcode(status)
        return status


def _clean_job_main() -> None:  # pragma: no cover - runs in the clean interpreter
    job_fd, result_fd, host = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _core.set_child_subreaper()
    _core.die_with_parent(host)
    job = _child.receive_main_and_payload(job_fd)
    os.close(job_fd)
    if job is None:
        os._exit(70)
    try:
        fn, args, kwargs = _wire.loads(job)
    except BaseException as why:
        payload = _wire.encode_exception(why)
    else:
        payload = _child.run_job_here(fn, args, kwargs)
    _wire.write_frame(result_fd, payload)
    os._exit(0)


class _Watcher:
    """Waits for the job's outcome and stops it when it must."""

    def __init__(
        self,
        job: _Job,
        deadline: int | None,
        cancel_pipe: Any,
        cancel_fd: int | None,
        loop: _core.Loop,
    ) -> None:
        self.job = job
        self.deadline = deadline
        self.deadline_error: type[Exception] = ProcessTimeoutError
        self.cancel_pipe = cancel_pipe
        self.reader = _wire.FrameReader()
        self.frame: _wire.Body | None = None
        self.finished = False
        self.loop = loop
        self.result_open = True
        self.cancel_fd = cancel_fd
        self.watched = [job.result_fd]  # fds added to the loop (a kept loop must lose them)
        loop.add_fd(job.result_fd, _RESULT)
        try:
            self.pending = [] if job.watch(loop, _CHILD) else [_CHILD]
            if cancel_fd is not None:
                loop.add_fd(cancel_fd, _CANCEL)
                self.watched.append(cancel_fd)
        except BaseException:
            self.unwatch()
            raise

    def run(self) -> _wire.Outcome | None:
        while True:
            tokens = self.pending or self.loop.wait(self.deadline, precise=True)
            self.pending = []
            if _RESULT in tokens and self._drain():
                return self._finished()
            if _CHILD in tokens and self.job.exited():
                self._drain()
                return self._finished() if self.frame is not None else self._died()
            if _CANCEL in tokens:
                self._on_cancel_message()
            if self.deadline is not None and _core.monotonic_ns() >= self.deadline:
                return self._stop(self.deadline_error)

    def _drain(self) -> bool:
        """Read what the pipe holds; True once a whole frame is in."""
        while self.frame is None and self.result_open:
            try:
                frames, eof = self.reader.read_fd(self.job.result_fd)
            except BlockingIOError:
                return False
            if frames:
                self.frame = frames[0]
            elif eof:
                self.result_open = False
                self.loop.remove_fd(self.job.result_fd)
                self.watched.remove(self.job.result_fd)
                return False
        return self.frame is not None

    def _finished(self) -> _wire.Outcome | None:
        assert self.frame is not None
        self._end(stop=False)
        if self.frame == _standby.NOT_LOADED:
            if isinstance(self.job, _standby.StandbyJob):
                self.job.template.stale = True
            return None
        return _wire.decode_outcome(self.frame)

    def _died(self) -> _wire.Outcome:
        status = self._end(stop=False)
        if status is None:
            error = ProcessDiedError(self.job.pid, detail=self.job.lost_status())
        else:
            error = died_error(self.job.pid, status)
        return _wire.Outcome(exception=error)

    def _stop(self, error: type[Exception]) -> _wire.Outcome:
        self._end(stop=True)
        if error is ProcessTimeoutError:
            message = f"job process {self.job.pid} ran past its time limit and was killed"
        else:
            message = f"job process {self.job.pid} was cancelled and killed"
        return _wire.Outcome(exception=error(message))

    def _end(self, *, stop: bool) -> int | None:
        self.finished = True
        return self.job.finish(stop=stop)

    def _on_cancel_message(self) -> None:
        assert self.cancel_fd is not None
        self.loop.remove_fd(self.cancel_fd)
        self.watched.remove(self.cancel_fd)
        try:
            message = _receive(self.cancel_pipe)
        except (EOFError, OSError):
            return  # the sender went away without asking for anything: the job runs on
        grace = _grace(message)
        if grace is None:
            return  # unlimited grace: the job is left to finish
        self.deadline_error = ProcessCancelledError
        now = _core.monotonic_ns()
        cancel_at = now + seconds_to_ns(grace)
        if self.deadline is None or cancel_at < self.deadline:
            self.deadline = cancel_at
        else:
            self.deadline_error = ProcessTimeoutError

    def close(self) -> None:
        if not self.finished:  # an error or interrupt in the host: never leave the job
            self._end(stop=True)

    def unwatch(self) -> bool:
        """Take this call's fds out of the loop (the job's own watch, a kept
        loop's business, is the job's); False if the loop may be unusable."""
        ok = True
        for fd in self.watched:
            try:
                self.loop.remove_fd(fd)
            except OSError as why:
                ok = ok and why.errno == errno.ENOENT  # taken out already (EOF)
        self.watched = []
        return ok


def _receive(pipe: Any) -> object:
    """One message from the cancel pipe, whatever it holds: bytes that do not
    unpickle are a message too.  EOFError/OSError: the sender went away."""
    recv_bytes = getattr(pipe, "recv_bytes", None)
    if not callable(recv_bytes):
        try:
            return pipe.recv()
        except (EOFError, OSError):
            raise
        except Exception as why:  # it arrived, it did not decode
            return why
    data = recv_bytes()
    try:
        return ForkingPickler.loads(data)
    except Exception as why:
        log.debug("killable_wrapper: a cancel message that does not unpickle (%s): cancel", why)
        return data


def _grace(message: object) -> float | None:
    """The grace a cancel message grants: 0 (kill now) unless it is a dict
    with a valid ``cancel_timeout``; None for no limit."""
    if not (isinstance(message, dict) and "cancel_timeout" in message):
        return 0.0
    value = message["cancel_timeout"]
    try:
        return check_seconds(value, "cancel_timeout")
    except (TypeError, ValueError) as why:
        log.warning(
            "killable_wrapper: cancel message with cancel_timeout=%r, not a grace period (%s): "
            "the job is killed now",
            value,
            why,
        )
        return 0.0
