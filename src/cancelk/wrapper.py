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

import errno
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing import spawn
from typing import Any, Protocol

from cancelk import _core, _forked, _wire
from cancelk.errors import ProcessCancelledError, ProcessDiedError, ProcessTimeoutError
from cancelk.options import check_seconds

__all__ = ["killable_wrapper"]

_RESULT, _CHILD, _CANCEL = 0, 1, 2


class _Job(Protocol):
    pid: int
    result_fd: int

    def finish(self, *, whole_tree: bool) -> int: ...


def killable_wrapper(
    fn: Callable[..., Any],
    *args: Any,
    killable_wrapper_timeout: float | None = None,
    killable_wrapper_cancel_pipe: Any = None,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` in a child process that can be killed.

    ``killable_wrapper_timeout``: seconds before the job's whole process group
    is killed and ProcessTimeoutError raised (None: no limit).
    ``killable_wrapper_cancel_pipe``: a multiprocessing Connection; anything
    received on it cancels the job (ProcessCancelledError); a dict with
    ``cancel_timeout`` lets the job finish within that many seconds first.
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
    deadline = None if timeout is None else started + int(timeout * 1e9)
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
        _join_own_group(pid)
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
        _forked.become_job_process(host)
        payload = _wire.run_and_encode(fn, args, kwargs)
        _forked.flush_std_streams()
        _wire.write_frame(write_fd, payload)
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def _join_own_group(pid: int) -> None:
    # Both sides call setpgid so the group exists before either goes on:
    # a kill right after fork() must already reach the whole job.
    try:
        os.setpgid(pid, pid)
    except OSError as why:
        if why.errno not in (errno.EACCES, errno.ESRCH, errno.EPERM):
            raise


def _reap_and_close(pid: int, fd: int, *, whole_tree: bool) -> int:
    try:
        if whole_tree:
            # While the job lives (a subreaper) every process it started is in
            # its tree, even one that left its group; killed first, they
            # cannot be orphaned to init by the job's death.  Stopped, the job
            # cannot start another one (which could setsid) behind the scan.
            _core.kill_pid(pid, signal.SIGSTOP)
            _wait_stopped(pid)
            _core.kill_descendants(pid)
        _core.kill_group(pid, signal.SIGKILL)
        status = _core.reap(pid)
        assert status is not None
        return status
    finally:
        os.close(fd)


def _wait_stopped(pid: int) -> None:
    # kill() returns before the signal takes effect: until the job has
    # stopped it may still fork.  WNOWAIT: it stays ours to reap.
    try:
        os.waitid(os.P_PID, pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass


_CLEAN_MAIN = "from cancelk.wrapper import _clean_job_main; _clean_job_main()"


class _CleanJob:
    """The job in a fresh interpreter, for hosts where fork() is unsafe."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        # Two layers: the job may name functions of __main__, which can only
        # be unpickled after spawn.prepare() has imported the main module.
        job = _wire.dumps((fn, args, kwargs))
        payload = _wire.dumps((_forked.main_preparation("cancelk-job"), job))
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        try:
            self._popen = subprocess.Popen(
                [
                    spawn.get_executable(),
                    "-c",
                    _CLEAN_MAIN,
                    str(job_read),
                    str(result_write),
                    str(os.getpid()),
                ],
                pass_fds=(job_read, result_write),
                start_new_session=True,
            )
        finally:
            os.close(job_read)
            os.close(result_write)
        self.pid = self._popen.pid
        self.result_fd = result_read
        os.set_blocking(result_read, False)
        try:
            _wire.write_frame(job_write, payload)
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
    frame = _wire.read_frame(job_fd)
    os.close(job_fd)
    if frame is None:
        os._exit(70)
    prep, job = pickle.loads(frame)
    spawn.prepare(prep)
    try:
        fn, args, kwargs = pickle.loads(job)
    except BaseException as why:
        payload = _wire.encode_exception(why)
    else:
        payload = _wire.run_and_encode(fn, args, kwargs)
    _forked.flush_std_streams()
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
        if os.WIFSIGNALED(status):
            error = ProcessDiedError(self.job.pid, signal=os.WTERMSIG(status))
        else:
            error = ProcessDiedError(self.job.pid, exitcode=os.WEXITSTATUS(status))
        return _wire.Outcome(exception=error)

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
            message = self.cancel_pipe.recv()
        except (EOFError, OSError):
            return  # the sender went away without asking for anything
        grace: float | None = 0.0
        if isinstance(message, dict) and "cancel_timeout" in message:
            grace = check_seconds(message["cancel_timeout"], "cancel_timeout")
        if grace is None:
            return  # unlimited grace: the job is left to finish
        self.deadline_error = ProcessCancelledError
        now = _core.monotonic_ns()
        cancel_at = now + int(grace * 1e9)
        if self.deadline is None or cancel_at < self.deadline:
            self.deadline = cancel_at
        else:
            self.deadline_error = ProcessTimeoutError

    def close(self) -> None:
        if self.status is None:  # an error or interrupt in the host: never leave the job
            self.status = self.job.finish(whole_tree=True)
        self.loop.close()
