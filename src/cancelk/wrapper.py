"""killable_wrapper: a hard stop for jobs in pools cancelk does not own.

    host worker (any pool)                       job process (own process group)
    killable_wrapper(fn, *args, ...)
      fork  ------------------------------------>  fn(*args, **kwargs)
      wait in C, GIL released, for the first of:   encode outcome
        result frame    <------ result pipe -----  write frame, _exit
        job exit (pidfd / waitid)
        cancel pipe message
        deadline (CLOCK_MONOTONIC)
      kill(-pgid, SIGKILL), reap
      return value | raise job's exception | ProcessTimeoutError |
      ProcessCancelledError | ProcessDiedError

If the host runs other threads, forking it is unsafe; the job then runs in a
clean interpreter started for it (see ``_CleanJob``), which inherits the
environment, working directory and ``sys.path`` and re-imports ``__main__`` as
spawn does, but not the host's in-memory state (its initializer's effects).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

from cancelk import _child, _core, _kill, _wire
from cancelk.errors import ProcessCancelledError, ProcessTimeoutError, died_error
from cancelk.options import check_seconds, seconds_to_ns

__all__ = ["killable_wrapper"]

log = logging.getLogger("cancelk")

_RESULT, _CHILD, _CANCEL = 0, 1, 2


class _Job(Protocol):
    pid: int
    result_fd: int

    def finish(self, *, whole_tree: bool) -> int: ...


def killable_wrapper(
    fn: Callable[..., Any],
    /,
    *args: Any,
    killable_wrapper_timeout: float | None = None,
    killable_wrapper_cancel_pipe: Any = None,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` in a child process that can be killed.

    ``killable_wrapper_timeout``: seconds before the job's whole process group
    is killed and ProcessTimeoutError raised (None: no limit).
    ``killable_wrapper_cancel_pipe``: a multiprocessing Connection; any
    message received on it cancels the job (ProcessCancelledError); a dict
    with ``cancel_timeout`` lets the job finish within that many seconds
    first.
    """
    if not callable(fn):
        raise TypeError(f"killable_wrapper needs a callable, not {type(fn).__name__}")
    timeout = check_seconds(killable_wrapper_timeout, "killable_wrapper_timeout")
    cancel_pipe = killable_wrapper_cancel_pipe
    cancel_fd = _cancel_fd(cancel_pipe)
    # Everything that can fail is set up before the fork, so a failure never
    # leaves a job running.
    loop = _core.Loop()
    try:
        started = _core.monotonic_ns()
        job: _Job = (
            _ForkedJob(fn, args, kwargs) if _alone_in_process() else _CleanJob(fn, args, kwargs)
        )
    except BaseException:
        loop.close()
        raise
    deadline = None if timeout is None else started + seconds_to_ns(timeout)
    watcher = _Watcher(job, deadline, cancel_pipe, cancel_fd, loop)
    try:
        return watcher.run().unwrap()
    finally:
        watcher.close()


def _cancel_fd(pipe: Any) -> int | None:
    if pipe is None:
        return None
    fileno = getattr(pipe, "fileno", None)
    if not callable(fileno):
        raise TypeError("killable_wrapper_cancel_pipe must be a multiprocessing Connection")
    try:
        return int(fileno())
    except OSError as why:
        raise ValueError(f"killable_wrapper_cancel_pipe cannot be used: {why}") from why


def _alone_in_process() -> bool:
    return threading.active_count() == 1


class _ForkedJob:
    """The job forked from the host: it inherits the host's state."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        read_fd, write_fd = os.pipe()
        host = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            _job_child(host, read_fd, write_fd, fn, args, kwargs)
        os.close(write_fd)
        _kill.join_own_group(pid)
        os.set_blocking(read_fd, False)
        self.pid = pid
        self.result_fd = read_fd

    def finish(self, *, whole_tree: bool) -> int:
        return _reap_and_close(self.pid, self.result_fd, whole_tree=whole_tree)


def _job_child(
    host: int,
    read_fd: int,
    write_fd: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:  # pragma: no cover - runs in the child
    code = 0
    try:
        os.close(read_fd)
        _child.become_job_process(host)
        _kind, payload = _wire.run_and_encode(fn, args, kwargs)
        _child.flush_std_streams()
        _wire.write_frame(write_fd, payload)
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def _reap_and_close(pid: int, fd: int, *, whole_tree: bool) -> int:
    try:
        if whole_tree:
            _kill.freeze_and_kill_tree(pid)
        else:
            _kill.kill_group(pid)
        status = _core.reap(pid)
        assert status is not None
        return status
    finally:
        os.close(fd)


class _CleanJob:
    """The job in a fresh interpreter, for hosts where fork() is unsafe."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        job = _wire.dumps((fn, args, kwargs))
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        try:
            self._popen = _child.start_interpreter(
                "cancelk.wrapper:_clean_job_main",
                (job_read, result_write),
                (str(job_read), str(result_write), str(os.getpid())),
                new_session=True,
            )
        finally:
            os.close(job_read)
            os.close(result_write)
        self.pid = self._popen.pid
        self.result_fd = result_read
        os.set_blocking(result_read, False)
        try:
            _child.send_main_and_payload(job_write, "cancelk-job", job)
        except BrokenPipeError:
            pass  # the job died before reading; its exit is reported as a death
        finally:
            os.close(job_write)

    def finish(self, *, whole_tree: bool) -> int:
        status = _reap_and_close(self.pid, self.result_fd, whole_tree=whole_tree)
        self._popen.returncode = os.waitstatus_to_exitcode(status)
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
        _kind, payload = _wire.run_and_encode(fn, args, kwargs)
    _child.flush_std_streams()
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
        self.outcome: _wire.Outcome | None = None
        self.status: int | None = None
        self.loop = loop
        self.result_open = True
        self.cancel_fd = cancel_fd
        try:
            loop.add_fd(job.result_fd, _RESULT)
            loop.add_child(job.pid, _CHILD)
            if cancel_fd is not None:
                loop.add_fd(cancel_fd, _CANCEL)
        except BaseException:
            self.close()
            raise

    def run(self) -> _wire.Outcome:
        while True:
            tokens = self.loop.wait(self.deadline)
            if _RESULT in tokens and self._drain():
                return self._finished()
            if _CHILD in tokens:
                self._drain()
                return self._finished() if self.outcome else self._died()
            if _CANCEL in tokens:
                self._on_cancel_message()
            if self.deadline is not None and _core.monotonic_ns() >= self.deadline:
                return self._stop(self.deadline_error)

    def _drain(self) -> bool:
        """Read what the pipe holds; True once a whole frame is in."""
        while self.outcome is None and self.result_open:
            try:
                chunk = os.read(self.job.result_fd, 1 << 20)
            except BlockingIOError:
                return False
            if not chunk:
                self.result_open = False
                self.loop.remove_fd(self.job.result_fd)
                return False
            frames = self.reader.feed(chunk)
            if frames:
                self.outcome = _wire.decode_outcome(frames[0])
        return self.outcome is not None

    def _finished(self) -> _wire.Outcome:
        assert self.outcome is not None
        self.status = self.job.finish(whole_tree=False)
        return self.outcome

    def _died(self) -> _wire.Outcome:
        status = self.status = self.job.finish(whole_tree=False)
        return _wire.Outcome(exception=died_error(self.job.pid, status))

    def _stop(self, error: type[Exception]) -> _wire.Outcome:
        self.status = self.job.finish(whole_tree=True)
        if error is ProcessTimeoutError:
            message = f"job process {self.job.pid} ran past its time limit and was killed"
        else:
            message = f"job process {self.job.pid} was cancelled and killed"
        return _wire.Outcome(exception=error(message))

    def _on_cancel_message(self) -> None:
        assert self.cancel_fd is not None
        self.loop.remove_fd(self.cancel_fd)
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
        if self.status is None:  # an error or interrupt in the host: never leave the job
            self.status = self.job.finish(whole_tree=True)
        self.loop.close()


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
