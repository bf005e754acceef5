"""cancelk.ProcessPoolExecutor: the stdlib pool's API, with jobs that really stop.

    submit(fn, *args, ProcessTimeout(t))                      supervisor process
      │ split markers, pickle                                   forks runners,
      ▼                                                         enforces deadlines,
    _Pool (one lock) ── idle runner? ── job frame ──► runner    kills groups
      │                 no: pending deque           (channel)      ▲  │
      │ cancel(): CAS on the job's shared word,                    │  │ exit(slot,
      │           then "kill" ───────────── control socket ────────┘  │  status,
      ▼                                                                │  word)
    manager thread (selector): result frames from channels ◄──────────┘
      complete futures outside the lock, refill idle runners, replace a dead
      supervisor, stop everything at shutdown

Nothing here blocks the caller on a child: job frames are written without
blocking (what does not fit is finished by the manager thread) and kills are
a few bytes to the supervisor (I7).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import os
import select
import selectors
import signal
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cancelk import _core, _slots, _wire
from cancelk.errors import ProcessDiedError, ProcessTimeoutError
from cancelk.futures import Future
from cancelk.options import JobOptions, check_seconds, split_markers
from cancelk.supervisor import (
    PRELOAD_LIMIT,
    SupervisorConfig,
    SupervisorProcess,
    kill_runner_tree,
)

__all__ = ["ProcessPoolExecutor"]

log = logging.getLogger("cancelk")

_SEQ = struct.Struct("<Q")
_JOB_HEAD = struct.Struct("<QQ")  # seq, slot
_INIT_FAILED_SEQ = 0
_INIT_FAILURES_TO_BREAK = 3
_CTRL_WRITE = -1  # in want_write: the control socket has queued bytes
# Received descriptors must not leak into programs the user process execs.
_RECV_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def _default_workers() -> int:
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return count or 1


def _start_method(mp_context: Any) -> str:
    if mp_context is None:
        mp_context = multiprocessing.get_context()
    if isinstance(mp_context, str):
        mp_context = multiprocessing.get_context(mp_context)
    method = mp_context.get_start_method()
    if method not in ("fork", "forkserver", "spawn"):
        raise ValueError(f"unsupported start method {method!r}")
    return str(method)


def _process_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


class _Job:
    __slots__ = (
        "before",
        "cancel_sent",
        "cancelled_by_kill",
        "future",
        "options",
        "payload",
        "seq",
        "settled",
        "slot",
    )

    def __init__(self, future: Future, seq: int, payload: bytes, options: JobOptions) -> None:
        self.future = future
        self.seq = seq
        self.payload = payload
        self.options = options
        self.slot: _Slot | None = None
        self.before = 0
        self.cancel_sent = False
        self.cancelled_by_kill = False  # a cancel won its word: it ends cancelled
        self.settled = False  # its outcome is decided; the runner may still be dying


class _Slot:
    """One runner place: the current runner's channel and job."""

    __slots__ = (
        "index",
        "job",
        "marker",
        "outbuf",
        "pid",
        "pidfd",
        "reader",
        "retiring",
        "runner_id",
        "sock",
        "tasks",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.runner_id = 0
        self.pid = 0
        self.pidfd = -1  # names the runner process, where the OS has pidfds
        self.sock: socket.socket | None = None
        self.reader = _wire.FrameReader()
        self.outbuf: deque[memoryview] = deque()
        self.job: _Job | None = None
        self.marker = 0  # the shared STATE word before the current job began
        self.tasks = 0
        self.retiring = False

    def close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _module_of(fn: Callable[..., Any]) -> str | None:
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(target, "__module__", None)
    if not isinstance(name, str) or name in ("__main__", "builtins"):
        return None  # __main__ is prepared by the supervisor itself
    return None if name.split(".")[0] == "cancelk" else name


def _kill_orphaned_runner(slot: _Slot) -> None:
    """The supervisor died: kill the runner's tree from here too, for where
    the runner cannot do it itself (no parent-death signal, or a runner that
    cannot run its handler).  Once the runner is gone (its pidfd says so) a
    scan from its pid would find nothing of it and the pid may be another's:
    then only its group is killed.
    """
    if slot.pidfd < 0 or not _exited(slot.pidfd):
        kill_runner_tree(slot.pid)
    else:
        _core.kill_group(slot.pid, signal.SIGKILL)


def _exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def _complete_all(completions: list[_Completion]) -> None:
    """Run them, then let go: the manager must not hold the last result (a
    100 MB one, say) while it waits for the next event."""
    for complete in completions:
        complete()
    completions.clear()


def _kill_runner_now(slot: _Slot) -> None:
    """SIGKILL the job's process from here, a hop before the supervisor can;
    the supervisor, told next, kills the rest of its group and tree."""
    if slot.pidfd < 0:
        return
    try:
        _core.pidfd_kill(slot.pidfd, signal.SIGKILL)
    except OSError as why:  # the supervisor's kill still follows
        log.debug("pidfd kill of runner %d failed: %s", slot.pid, why)


_Completion = Callable[[], object]
_live_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


class _Pool:
    """Everything an executor owns; its views and the manager thread share it."""

    def __init__(
        self,
        max_workers: int,
        method: str,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_child: int | None,
    ) -> None:
        self.method = method
        self.config = SupervisorConfig(max_workers, initializer, initargs, max_tasks_per_child)
        self.max_tasks = max_tasks_per_child
        self.lock = threading.Lock()
        self.slots = [_Slot(i) for i in range(max_workers)]
        self.idle: list[_Slot] = []
        self.pending: deque[_Job] = deque()
        self.seqs = itertools.count(1)
        self.words_fd = -1
        self.words: _slots.SlotWords | None = None
        self.supervisor: SupervisorProcess | None = None
        self.ctrl_reader = _wire.FrameReader()
        self.ctrl_fds: deque[int] = deque()
        self.wake_r, self.wake_w = -1, -1
        self.selector: selectors.BaseSelector | None = None
        self.thread: threading.Thread | None = None
        self.want_write: set[int] = set()
        self.ctrl_out: deque[memoryview] = deque()
        self.shutting_down = False
        self.broken: BaseException | None = None
        self.forked_away = False
        self.init_failures = 0
        self.counts = dict.fromkeys(
            ("submitted", "started", "finished", "timed_out", "cancelled", "died"), 0
        )
        self.counts["processes_started"] = 0
        self.counts["supervisors_started"] = 0
        _live_pools.add(self)

    # -- starting ---------------------------------------------------------
    def _ensure_started(self) -> None:
        if self.thread is not None:
            return
        try:
            self.words_fd = _slots.create_fd(len(self.slots))
            self.words = _slots.SlotWords(self.words_fd, len(self.slots))
            self.wake_r, self.wake_w = os.pipe()
            os.set_blocking(self.wake_r, False)
            os.set_blocking(self.wake_w, False)
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
            self._start_supervisor()
        except BaseException:
            # e.g. an initializer spawn cannot pickle: fail this submit, keep nothing
            self._close_quietly()
            self.selector = None
            self.words = None
            raise
        self.thread = threading.Thread(target=self._manage, name="cancelk-manager", daemon=True)
        self.thread.start()

    def _start_supervisor(self) -> None:
        # Runner ids never repeat within a pool, so no shared word written for
        # a runner of a dead supervisor can match one of the next supervisor's.
        self.config.first_runner_id = self.counts["supervisors_started"] * (1 << 32) + 1
        supervisor = SupervisorProcess(self.method, self.words_fd, self.config)
        supervisor.ctrl.setblocking(False)
        self.supervisor = supervisor
        self.ctrl_reader = _wire.FrameReader()
        assert self.selector is not None
        self.selector.register(supervisor.ctrl, selectors.EVENT_READ, "ctrl")
        self.counts["supervisors_started"] += 1

    def _send_control(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the supervisor and send what fits without blocking.

        Blocking here, under the lock, could deadlock: the supervisor may be
        blocked sending us events that only the lock holder's thread reads.
        """
        if self.supervisor is None:
            return
        self.ctrl_out.append(memoryview(_wire.frame(_wire.dumps(message))))
        self._flush_control()
        if self.ctrl_out:
            self.want_write.add(_CTRL_WRITE)
            if threading.current_thread() is not self.thread:
                self.wake()

    def _flush_control(self) -> None:
        assert self.supervisor is not None
        while self.ctrl_out:
            try:
                sent = self.supervisor.ctrl.send(self.ctrl_out[0])
            except BlockingIOError:
                return
            except OSError:
                self.ctrl_out.clear()  # it died; the manager sees the EOF
                return
            if sent < len(self.ctrl_out[0]):
                self.ctrl_out[0] = self.ctrl_out[0][sent:]
            else:
                self.ctrl_out.popleft()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed at shutdown

    # -- submitting -------------------------------------------------------
    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        defaults: JobOptions,
    ) -> Future:
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        args, kwargs, options = split_markers(args, kwargs, defaults)
        future = Future(self)
        try:
            payload = _wire.dumps((fn, args, kwargs))
        except Exception as why:
            payload = b""
            pickling_error: Exception | None = why
        else:
            pickling_error = None
        with self.lock:
            self._check_usable()
            self.counts["submitted"] += 1
            if pickling_error is not None:
                future.set_exception(pickling_error)
                return future
            self._ensure_started()
            self._note_module(fn)
            job = _Job(future, next(self.seqs), payload, options)
            future._cancelk_job = job  # type: ignore[attr-defined]
            if self.idle:
                self._dispatch(self.idle.pop(), job)
            else:
                self.pending.append(job)
        return future

    def _note_module(self, fn: Callable[..., Any]) -> None:
        """Tell the supervisor a job's module once, for its spares to import."""
        name = _module_of(fn)
        preload = self.config.preload
        if name is None or name in preload or len(preload) >= PRELOAD_LIMIT:
            return
        preload.append(name)  # a later supervisor gets it with the config
        self._send_control(("preload", name))

    def _check_not_forked(self) -> None:
        # A forked child holds a copy of the pool: its jobs, words and
        # processes are the parent's, and only the parent may stop them.
        if self.forked_away:
            raise RuntimeError("this cancelk executor belongs to the parent process")

    def _check_usable(self) -> None:
        self._check_not_forked()
        if self.broken is not None:
            raise BrokenProcessPool(f"the pool is broken: {self.broken}") from self.broken
        if self.shutting_down:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _dispatch(self, slot: _Slot, job: _Job) -> bool:
        if not job.future.start_running():
            self.idle.append(slot)
            return False
        job.slot = slot
        job.before = slot.marker
        slot.job = job
        job.future._job_pid = slot.pid
        head = _wire.HEADER.pack(_JOB_HEAD.size + len(job.payload)) + _JOB_HEAD.pack(
            job.seq, slot.index
        )
        if len(job.payload) <= _wire.SMALL:
            self._write(slot, head + job.payload)
        else:
            self._write(slot, head, job.payload)
        job.payload = b""
        if job.options.timeout is not None:
            self._send_control(
                ("deadline", slot.index, slot.runner_id, job.seq, int(job.options.timeout * 1e9))
            )
        self.counts["started"] += 1
        return True

    def _write(self, slot: _Slot, *chunks: bytes) -> None:
        """Send without blocking; the manager thread finishes what does not fit."""
        assert slot.sock is not None
        for chunk in chunks:
            view = memoryview(chunk)
            if not slot.outbuf:
                try:
                    view = view[slot.sock.send(view) :]
                except BlockingIOError:
                    pass
                except OSError:
                    return  # the runner died; its exit event settles the job
            if view:
                slot.outbuf.append(view)
        if slot.outbuf:
            self.want_write.add(slot.index)
            if threading.current_thread() is not self.thread:
                self.wake()

    def _flush(self, slot: _Slot) -> None:
        assert slot.sock is not None
        while slot.outbuf:
            view = slot.outbuf[0]
            try:
                sent = slot.sock.send(view)
            except BlockingIOError:
                return
            except OSError:
                slot.outbuf.clear()
                return
            if sent < len(view):
                slot.outbuf[0] = view[sent:]
            else:
                slot.outbuf.popleft()

    def _fill_idle(self) -> None:
        while self.idle and self.pending:
            job = self.pending.popleft()
            if not job.future.done():
                self._dispatch(self.idle.pop(), job)

    # -- cancelling ---------------------------------------------------------
    def cancel_running(self, future: Future) -> bool:
        job: _Job | None = getattr(future, "_cancelk_job", None)
        with self.lock:
            self._check_not_forked()
            if job is None or not self._decide_cancel(job):
                return future.cancelled()
        # Another cancel, or the job's exit seen by the manager thread, may
        # have marked it already: every caller gets the same True.
        reason = "the job was cancelled; its processes were killed"
        return future.mark_cancelled(reason) or future.cancelled()

    def _decide_cancel(self, job: _Job) -> bool:
        """True once the job's kill by a cancel is decided (now or earlier)."""
        if job.cancelled_by_kill:
            return True
        slot = job.slot
        if slot is None or slot.job is not job or job.future.done():
            return False
        grace = job.options.cancel_timeout
        if grace is None:
            return False  # unlimited grace: the job is left to finish
        if grace > 0:
            if not job.cancel_sent:
                job.cancel_sent = True
                self._send_control(
                    ("cancel", slot.index, slot.runner_id, job.seq, int(grace * 1e9))
                )
            return False  # undecided: it may still finish within its grace
        # False: it finished first, its result is on the way.
        return self._kill_job(job, _slots.KILL_CANCEL, "cancel")

    def _kill_job(self, job: _Job, flag: int, reason: str) -> bool:
        slot = job.slot
        assert slot is not None and self.words is not None
        if not self.words.decide_kill(slot.index, job.seq, flag, job.before):
            return False
        job.cancelled_by_kill = flag == _slots.KILL_CANCEL
        _kill_runner_now(slot)
        self._send_control(("kill", slot.index, slot.runner_id))
        log.info("killing job %d (pid %d): %s", job.seq, slot.pid, reason)
        return True

    # -- the manager thread -------------------------------------------------
    def _manage(self) -> None:
        try:
            self._manage_until_done()
        except BaseException as why:
            # A bug here must not leave futures waiting forever (I3).
            log.exception("cancelk manager thread failed; stopping the pool")
            self._crash(why)

    def _crash(self, why: BaseException) -> None:
        error = BrokenProcessPool(f"the cancelk manager thread failed: {why!r}")
        error.__cause__ = why
        futures = []
        with self.lock:
            self.broken = error
            self.shutting_down = True
            futures = [job.future for job in self.pending]
            futures += [slot.job.future for slot in self.slots if slot.job is not None]
            self.pending.clear()
            supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            # Its runners follow it (parent-death signal); their groups are
            # killed so nothing a job started survives.
            _core.kill_pid(supervisor.pid, signal.SIGKILL)
            supervisor.reap()
            for slot in self.slots:
                if slot.pid:
                    _core.kill_group(slot.pid, signal.SIGKILL)
        for future in futures:
            _fail(future, error)

    def _manage_until_done(self) -> None:
        assert self.selector is not None
        while True:
            events = self.selector.select()
            completions: list[_Completion] = []
            with self.lock:
                for key, mask in events:
                    self._on_event(key, mask, completions)
                self._fill_idle()
                self._register_writes()  # last: dispatching may have queued bytes
                finished = self._finish_if_done(completions)
            _complete_all(completions)
            if finished:
                return

    def _on_event(self, key: selectors.SelectorKey, mask: int, out: list[_Completion]) -> None:
        if key.data == "wake":
            _drain(self.wake_r)
        elif key.data == "ctrl":
            if mask & selectors.EVENT_WRITE and self.supervisor is not None:
                self._flush_control()
                self.want_write.add(_CTRL_WRITE)
            if mask & selectors.EVENT_READ:
                self._read_control(out)
        elif isinstance(key.data, _Slot):
            slot = key.data
            if key.fileobj is not slot.sock:
                return  # an earlier event in this batch closed or replaced it
            if mask & selectors.EVENT_WRITE:
                self._flush(slot)
                if not slot.outbuf:
                    self.want_write.add(slot.index)
            if mask & selectors.EVENT_READ:
                self._read_channel(slot, out)

    def _register_writes(self) -> None:
        assert self.selector is not None
        for index in self.want_write:
            if index == _CTRL_WRITE:
                if self.supervisor is not None:
                    flags = selectors.EVENT_WRITE if self.ctrl_out else 0
                    self.selector.modify(self.supervisor.ctrl, selectors.EVENT_READ | flags, "ctrl")
                continue
            slot = self.slots[index]
            if slot.sock is None:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if slot.outbuf else 0)
            self.selector.modify(slot.sock, events, slot)
        self.want_write.clear()

    def _read_control(self, out: list[_Completion]) -> None:
        assert self.supervisor is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.supervisor.ctrl, 1 << 16, 16, _RECV_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                os.set_inheritable(fd, False)  # where MSG_CMSG_CLOEXEC does not exist
            self.ctrl_fds.extend(fds)
            if not data:
                self._supervisor_died(out)
                return
            for payload in self.ctrl_reader.feed(data):
                self._on_supervisor_message(_loads(payload), out)

    def _on_supervisor_message(self, message: tuple[Any, ...], out: list[_Completion]) -> None:
        if message[0] == "runner":
            _, index, runner_id, pid, with_pidfd = message
            channel = self.ctrl_fds.popleft()
            pidfd = self.ctrl_fds.popleft() if with_pidfd else -1
            self._runner_started(self.slots[index], runner_id, pid, channel, pidfd)
        elif message[0] == "exit":
            _, index, runner_id, pid, status, word = message
            slot = self.slots[index]
            if slot.runner_id == runner_id:
                self._runner_exited(slot, status, word, out)
        elif message[0] == "killed":
            _, index, runner_id, seq, flag = message
            slot = self.slots[index]
            job = slot.job
            if slot.runner_id == runner_id and job is not None and job.seq == seq:
                self._settle_killed(slot, job, seq | flag, out)

    def _runner_started(self, slot: _Slot, runner_id: int, pid: int, fd: int, pidfd: int) -> None:
        assert self.selector is not None
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        slot.sock, slot.runner_id, slot.pid, slot.pidfd = sock, runner_id, pid, pidfd
        slot.reader = _wire.FrameReader()
        slot.outbuf.clear()
        slot.marker, slot.tasks, slot.retiring = _slots.FRESH | runner_id, 0, False
        self.selector.register(sock, selectors.EVENT_READ, slot)
        self.counts["processes_started"] += 1
        if self.broken is None:
            self.idle.append(slot)

    def _read_channel(self, slot: _Slot, out: list[_Completion]) -> bool:
        """Read what the runner sent; False once its channel reached EOF."""
        assert slot.sock is not None
        while True:
            try:
                data = slot.sock.recv(1 << 20)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                self._close_channel(slot)
                return False
            for payload in slot.reader.feed(data):
                self._on_runner_frame(slot, payload, out)

    def _on_runner_frame(self, slot: _Slot, payload: bytes, out: list[_Completion]) -> None:
        (seq,) = _SEQ.unpack_from(payload)
        outcome = _wire.decode_outcome(payload[_SEQ.size :])
        if seq == _INIT_FAILED_SEQ:
            self._initializer_failed(slot, outcome.exception, out)
            return
        job = slot.job
        if job is None or job.seq != seq:
            return
        slot.job = None
        slot.marker = seq | _slots.DONE
        slot.tasks += 1
        self.init_failures = 0
        self.counts["finished"] += 1
        out.append(lambda: _settle(job.future, outcome))
        if self.max_tasks is not None and slot.tasks >= self.max_tasks:
            slot.retiring = True  # it exits by itself; a fresh runner replaces it
        elif slot.sock is not None and slot not in self.idle:
            self.idle.append(slot)

    def _initializer_failed(
        self, slot: _Slot, error: BaseException | None, out: list[_Completion]
    ) -> None:
        slot.retiring = True
        if slot in self.idle:
            # A spare's failure can be read before any job reached it: the
            # runner is exiting, so no job may be sent to it now.
            self.idle.remove(slot)
        self.init_failures += 1
        broken = BrokenProcessPool(f"the pool's initializer failed: {error!r}")
        broken.__cause__ = error
        if slot.job is not None:
            job, slot.job = slot.job, None
            out.append(lambda: _fail(job.future, broken))
        if self.init_failures >= _INIT_FAILURES_TO_BREAK and self.broken is None:
            self._break(broken, out)

    def _break(self, error: BaseException, out: list[_Completion]) -> None:
        self.broken = error
        self.idle.clear()
        while self.pending:
            job = self.pending.popleft()
            out.append(functools.partial(_fail, job.future, error))
        self.shutting_down = True

    def _runner_exited(self, slot: _Slot, status: int, word: int, out: list[_Completion]) -> None:
        if slot.sock is not None:
            self._read_channel(slot, out)  # a result written just before death still counts
            self._close_channel(slot)
        if slot in self.idle:
            self.idle.remove(slot)
        job, slot.job = slot.job, None
        if job is not None:
            self._settle_killed(slot, job, word, out, status)

    def _settle_killed(
        self, slot: _Slot, job: _Job, word: int, out: list[_Completion], status: int = 0
    ) -> None:
        """End the future of a job that was killed or died, once."""
        if job.settled:
            return
        job.settled = True
        reason = _exit_reason(job, status, word, slot.pid)
        self.counts[reason[0]] += 1
        out.append(lambda: reason[1](job.future))

    def _close_channel(self, slot: _Slot) -> None:
        if slot.sock is None:
            return
        assert self.selector is not None
        self.selector.unregister(slot.sock)
        slot.sock.close()
        slot.sock = None
        slot.close_pidfd()
        slot.outbuf.clear()
        if slot in self.idle:
            self.idle.remove(slot)

    def _supervisor_died(self, out: list[_Completion]) -> None:
        supervisor = self.supervisor
        assert supervisor is not None and self.selector is not None and self.words is not None
        self.selector.unregister(supervisor.ctrl)
        supervisor.ctrl.close()
        self.ctrl_out.clear()
        status = supervisor.reap()
        self.supervisor = None
        for slot in self.slots:
            self._abandon_slot(slot, supervisor.pid, status, out)
        for fd in self.ctrl_fds:
            os.close(fd)
        self.ctrl_fds.clear()
        if self.shutting_down and not self.pending:
            return
        if status and not self.shutting_down:
            log.warning(
                "cancelk supervisor %d died (status %d); starting a new one", supervisor.pid, status
            )
        try:
            self._start_supervisor()
        except OSError as why:
            self._break(why, out)

    def _abandon_slot(
        self, slot: _Slot, supervisor_pid: int, status: int, out: list[_Completion]
    ) -> None:
        assert self.words is not None
        if slot.pid and self.shutting_down is False:
            _kill_orphaned_runner(slot)
        if slot.sock is not None:
            self._read_channel(slot, out)
            self._close_channel(slot)
        job, slot.job = slot.job, None
        if job is not None:
            self.counts["died"] += 1
            detail = f"the cancelk supervisor (pid {supervisor_pid}) died, status {status}"
            error = ProcessDiedError(slot.pid, signal=signal.SIGKILL, detail=detail)
            out.append(lambda: _fail(job.future, error))
        slot.pid = slot.runner_id = 0
        slot.marker = 0

    def _finish_if_done(self, out: list[_Completion]) -> bool:
        if not self.shutting_down or self.pending:
            return False
        if any(slot.job is not None for slot in self.slots):
            return False
        self._stop_processes(out)
        return True

    def _stop_processes(self, out: list[_Completion]) -> None:
        supervisor = self.supervisor
        if supervisor is not None:
            supervisor.ctrl.setblocking(True)
            for pending in self.ctrl_out:
                supervisor.ctrl.sendall(pending)  # the supervisor reads until it stops
            self.ctrl_out.clear()
            supervisor.send(("shutdown",))
            assert self.selector is not None
            self.selector.unregister(supervisor.ctrl)
            # The supervisor kills and reaps its runners before it exits.
            supervisor.reap()
            supervisor.ctrl.close()
            self.supervisor = None
        for slot in self.slots:
            if slot.sock is not None:
                self._close_channel(slot)
        for fd in self.ctrl_fds:
            os.close(fd)
        self.ctrl_fds.clear()
        self._close_quietly()

    def _close_quietly(self) -> None:
        if self.selector is not None:
            self.selector.close()
        for fd in (self.wake_r, self.wake_w, self.words_fd):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = self.words_fd = -1
        self.thread = None
        if self.words is not None:
            self.words.close()

    # -- shutting down --------------------------------------------------------
    def shutdown(self, wait: bool, cancel_futures: bool, timeout: float | None) -> None:
        completions: list[_Completion] = []
        with self.lock:
            if self.forked_away:
                return
            self.shutting_down = True
            if cancel_futures:
                self._cancel_pending(completions)
            thread = self.thread
            if thread is None:
                return
            self.wake()
        for complete in completions:
            complete()
        if not wait or thread is threading.current_thread():
            return
        if timeout is not None:
            thread.join(timeout)
            if thread.is_alive():
                self.kill_everything("shutdown timeout")
        thread.join()

    def _cancel_pending(self, out: list[_Completion]) -> None:
        while self.pending:
            job = self.pending.popleft()
            out.append(job.future.cancel)

    def kill_everything(self, reason: str) -> None:
        """Cancel what is queued and kill what runs; the pool then stops."""
        completions: list[_Completion] = []
        with self.lock:
            self._check_not_forked()
            self.shutting_down = True
            self._cancel_pending(completions)
            for slot in self.slots:
                job = slot.job
                if job is not None and self._kill_job(job, _slots.KILL_CANCEL, reason):
                    completions.append(
                        functools.partial(job.future.mark_cancelled, f"killed: {reason}")
                    )
            self.wake()
        for complete in completions:
            complete()

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's descriptors without touching its processes."""
        self.forked_away = True
        if self.supervisor is not None:
            self.supervisor.ctrl.close()
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close()
            slot.close_pidfd()
        for fd in (self.wake_r, self.wake_w, self.words_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.wake_r = self.wake_w = self.words_fd = -1
        if self.words is not None:
            self.words.close()  # unmaps the child's view only
            self.words = None
        self.lock = threading.Lock()  # the parent's may have been held at fork

    def stats(self) -> dict[str, int]:
        with self.lock:
            counts = dict(self.counts)
            counts["running"] = sum(1 for slot in self.slots if slot.job is not None)
            counts["pending"] = len(self.pending)
        return counts


def _exit_reason(
    job: _Job, status: int, word: int, pid: int
) -> tuple[str, Callable[[Future], Any]]:
    if word == job.seq | _slots.KILL_TIMEOUT:
        timeout = job.options.timeout
        error = ProcessTimeoutError(
            f"job process {pid} ran past its time limit of {timeout} s and was killed"
        )
        log.info("killed job %d (pid %d): timeout after %s s", job.seq, pid, timeout)
        return "timed_out", lambda future: _fail(future, error)
    if word == job.seq | _slots.KILL_CANCEL:
        message = "the job was cancelled; its processes were killed"
        return "cancelled", lambda future: future.mark_cancelled(message)
    if os.WIFSIGNALED(status):
        died = ProcessDiedError(pid, signal=os.WTERMSIG(status))
    else:
        died = ProcessDiedError(pid, exitcode=os.WEXITSTATUS(status))
    log.info("job %d died: %s", job.seq, died)
    return "died", lambda future: _fail(future, died)


def _settle(future: Future, outcome: _wire.Outcome) -> None:
    if outcome.exception is not None:
        _fail(future, outcome.exception)
        return
    try:
        future.set_result(outcome.value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled while the result was on its way


def _fail(future: Future, error: BaseException) -> None:
    try:
        future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _loads(payload: bytes) -> Any:
    import pickle

    return pickle.loads(payload)


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool.forget_after_fork()


def _shutdown_at_exit() -> None:
    for pool in list(_live_pools):
        pool.shutdown(wait=True, cancel_futures=False, timeout=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)


class _MapsBySubmit:
    """``map`` with the stdlib's semantics, built on the class's own ``submit``."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        raise NotImplementedError

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        return _map(self.submit, fn, iterables, timeout, chunksize, buffersize)


class ProcessPoolExecutor(_MapsBySubmit, concurrent.futures.ProcessPoolExecutor):
    """A drop-in ``concurrent.futures.ProcessPoolExecutor`` whose jobs can be stopped.

    ``timeout``: default time limit per job (seconds, None for none).
    ``cancel_timeout``: default grace a running job gets after ``cancel()``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        timeout: float | None = None,
        cancel_timeout: float | None = 0.0,
    ) -> None:
        if max_workers is None:
            max_workers = _default_workers()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._defaults = JobOptions(
            check_seconds(timeout, "timeout"), check_seconds(cancel_timeout, "cancel_timeout")
        )
        self._max_workers = max_workers
        self._pool = _Pool(
            max_workers,
            _start_method(mp_context),
            initializer,
            tuple(initargs),
            max_tasks_per_child,
        )
        weakref.finalize(self, self._pool.shutdown, False, False, None)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._pool.submit(fn, args, kwargs, self._defaults)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        self._pool.shutdown(wait, cancel_futures, check_seconds(timeout, "timeout"))

    def terminate_workers(self) -> None:
        """Stop every job now (SIGKILL of each job's tree) and shut the pool down."""
        self._pool.kill_everything("terminate_workers()")
        self._pool.shutdown(False, True, None)

    def kill_workers(self) -> None:
        """The same as ``terminate_workers()``: cancelk's only stop is SIGKILL."""
        self.terminate_workers()

    def options(self, *, timeout: Any = ..., cancel_timeout: Any = ...) -> ExecutorOptions:
        """A light view of this pool whose jobs get other default options."""
        return ExecutorOptions(self, _merge(self._defaults, timeout, cancel_timeout))

    def stats(self) -> dict[str, int]:
        """Counts of jobs submitted, started, finished, timed out, cancelled, died."""
        return self._pool.stats()


def _merge(defaults: JobOptions, timeout: Any, cancel_timeout: Any) -> JobOptions:
    return JobOptions(
        defaults.timeout if timeout is ... else check_seconds(timeout, "timeout"),
        defaults.cancel_timeout
        if cancel_timeout is ...
        else check_seconds(cancel_timeout, "cancel_timeout"),
    )


class ExecutorOptions(_MapsBySubmit, concurrent.futures.Executor):
    """``executor.options(...)``: the same pool, other per-job defaults."""

    def __init__(self, executor: ProcessPoolExecutor, defaults: JobOptions) -> None:
        self._executor = executor
        self._defaults = defaults

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._executor._pool.submit(fn, args, kwargs, self._defaults)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        self._executor.shutdown(wait, cancel_futures=cancel_futures, timeout=timeout)

    def options(self, *, timeout: Any = ..., cancel_timeout: Any = ...) -> ExecutorOptions:
        return ExecutorOptions(self._executor, _merge(self._defaults, timeout, cancel_timeout))


def _map(
    submit: Callable[..., Future],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int,
    buffersize: int | None,
) -> Iterator[Any]:
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None:
        if not isinstance(buffersize, int) or isinstance(buffersize, bool):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
    end_time = None if timeout is None else timeout + time.monotonic()
    work: Iterator[Any] = zip(*iterables)
    source: Iterator[Any] = work
    if chunksize > 1:
        source = iter(lambda: list(itertools.islice(work, chunksize)), [])

    def submit_one(item: Any) -> Future:
        if chunksize > 1:
            return submit(_process_chunk, fn, item)
        return submit(fn, *item)

    if buffersize is None:
        futures = deque(submit_one(item) for item in source)
    else:
        futures = deque(submit_one(item) for item in itertools.islice(source, buffersize))
    return _results(futures, source if buffersize else None, submit_one, end_time, chunksize > 1)


def _results(
    futures: deque[Future],
    source: Iterator[Any] | None,
    submit_one: Callable[[Any], Future],
    end_time: float | None,
    chunked: bool,
) -> Iterator[Any]:
    try:
        while futures:
            future = futures.popleft()
            if source is not None:
                following = next(source, _END)
                if following is not _END:
                    futures.append(submit_one(following))
            try:
                if end_time is None:
                    value = future.result()
                else:
                    value = future.result(end_time - time.monotonic())
            finally:
                future.cancel()  # a no-op once done; stops the job if result() gave up
            if chunked:
                yield from value
            else:
                yield value
    finally:
        for future in futures:
            future.cancel()


_END = object()
