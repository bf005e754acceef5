"""The supervisor: one clean, single-threaded process per executor.

    user process                                supervisor process
    SupervisorLink.start(method) --fork/spawn-->  Supervisor.serve()
      send: deadline / cancel / kill / shutdown     C loop (_core.Loop) over
        ───────────── control socket ──────────►      control socket
        ◄────────────────────────────────────────      one pidfd per runner
      recv: runner(slot, id, pid) + channel fd        the earliest deadline
            exit(slot, id, pid, status, word)       forks runners, reaps them,
                                                    kills process groups,
                                                    sweeps orphans (subreaper)

It never runs user code except to unpickle the initializer.  When the user
process goes away the control socket reads EOF and the supervisor kills every
runner group and orphan before it exits (I6).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import spawn
from typing import Any

from cancelk import _core, _forked, _wire, runner
from cancelk._slots import KILL_CANCEL, KILL_TIMEOUT, SEQ_MASK, SlotWords

log = logging.getLogger("cancelk")

_CTRL, _WAKE, _CHILD_BASE = 0, 1, 2


@dataclass
class SupervisorConfig:
    slots: int
    initializer: Callable[..., Any] | None = None
    initargs: Sequence[Any] = ()
    max_tasks_per_child: int | None = None


@dataclass
class _Runner:
    slot: int
    runner_id: int
    pid: int


@dataclass(order=True)
class _Deadline:
    at_ns: int
    seq: int = field(compare=False)
    flag: int = field(compare=False)
    timeout_ns: int | None = field(compare=False, default=None)


class Supervisor:
    """Runs in the supervisor process; see the module docstring."""

    def __init__(self, ctrl_fd: int, words_fd: int, config: SupervisorConfig) -> None:
        self.ctrl = socket.socket(fileno=ctrl_fd)
        self.ctrl.setblocking(False)
        self.words = SlotWords(words_fd, config.slots)
        os.close(words_fd)
        self.config = config
        self.loop = _core.Loop()
        self.reader = _wire.FrameReader()
        self.runners: dict[int, _Runner] = {}
        self.deadlines: dict[int, list[_Deadline]] = {}
        self.next_runner_id = 1
        self.wake_fd = -1

    # -- life cycle -------------------------------------------------------
    def serve(self) -> None:
        _core.set_child_subreaper()
        self.loop.add_fd(self.ctrl.fileno(), _CTRL)
        if self.loop.backend == "posix":
            self._wake_on_sigchld()
        for slot in range(self.config.slots):
            self._fork_runner(slot)
        try:
            while self._step():
                pass
        finally:
            self._stop_all()

    def _wake_on_sigchld(self) -> None:
        # Without pidfds, SIGCHLD through the wakeup fd ends the loop's wait
        # at once instead of at its next polling slice.
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.wake_fd = read_fd
        self.loop.add_fd(read_fd, _WAKE)

    def _step(self) -> bool:
        tokens = self.loop.wait(self._next_deadline())
        for token in tokens:
            if token == _CTRL and not self._read_control():
                return False
            if token == _WAKE:
                _drain(self.wake_fd)
            if token >= _CHILD_BASE:
                self._runner_exited(token - _CHILD_BASE)
        self._fire_deadlines()
        return True

    # -- runners ----------------------------------------------------------
    def _fork_runner(self, slot: int) -> None:
        user_end, runner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        runner_id = self.next_runner_id
        self.next_runner_id += 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the runner
            os._exit(self._become_runner(slot, user_end, runner_end))
        runner_end.close()
        _join_own_group(pid)
        self.loop.add_child(pid, _CHILD_BASE + slot)
        self.runners[slot] = _Runner(slot, runner_id, pid)
        self._send(("runner", slot, runner_id, pid), fds=[user_end.fileno()])
        user_end.close()

    def _become_runner(
        self, slot: int, user_end: socket.socket, runner_end: socket.socket
    ) -> int:  # pragma: no cover - runs in the runner
        try:
            user_end.close()
            self.ctrl.close()  # the user must see EOF when the supervisor dies
            self.loop.close()
            if self.wake_fd >= 0:
                signal.set_wakeup_fd(-1)
                os.close(self.wake_fd)
            runner.run(
                slot,
                runner_end.detach(),
                self.words,
                self.config.initializer,
                self.config.initargs,
                self.config.max_tasks_per_child,
            )
        except BaseException:
            return 70
        return 0

    def _runner_exited(self, slot: int) -> None:
        dead = self.runners.pop(slot, None)
        if dead is None:
            return
        # The runner is unreaped, so its pid and group id are still ours:
        # killing the group cannot reach anyone else.
        _core.kill_group(dead.pid, signal.SIGKILL)
        status = _core.reap(dead.pid)
        self.loop.remove_child(dead.pid)
        word = self.words.state(slot)
        self.words.reset(slot)
        self.deadlines.pop(slot, None)
        self._send(("exit", slot, dead.runner_id, dead.pid, status, word))
        self._fork_runner(slot)
        self._sweep_orphans()

    def _kill(self, slot: int, runner_id: int, reason: str) -> None:
        current = self.runners.get(slot)
        if current is not None and current.runner_id == runner_id:
            _core.kill_group(current.pid, signal.SIGKILL)

    def _stop_all(self) -> None:
        for current in list(self.runners.values()):
            _core.kill_group(current.pid, signal.SIGKILL)
        for current in list(self.runners.values()):
            _core.reap(current.pid)
        self.runners.clear()
        self._sweep_orphans()

    def _sweep_orphans(self) -> None:
        """Kill and reap children that are not runners: what killed jobs left.

        As a child subreaper we inherit every orphan of a dead runner's tree,
        including processes that left its process group (setsid, double fork).
        """
        known = {r.pid for r in self.runners.values()}
        while True:
            strays = [pid for pid in _children_of(os.getpid()) if pid not in known]
            if not strays:
                return
            for pid in strays:
                _kill_tree_root(pid)
            for pid in strays:
                try:
                    _core.reap(pid)
                except ChildProcessError:
                    pass

    # -- control messages ---------------------------------------------------
    def _read_control(self) -> bool:
        while True:
            try:
                data = self.ctrl.recv(1 << 16)
            except BlockingIOError:
                return True
            except ConnectionResetError:
                return False
            if not data:
                return False  # the user process is gone
            for payload in self.reader.feed(data):
                if not self._handle(_load(payload)):
                    return False

    def _handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "deadline":
            _, slot, runner_id, seq, timeout_ns = message
            if self._is_current(slot, runner_id):
                at = _core.monotonic_ns() + timeout_ns
                self._add_deadline(slot, _Deadline(at, seq, KILL_TIMEOUT, timeout_ns))
        elif kind == "cancel":
            _, slot, runner_id, seq, grace_ns = message
            if self._is_current(slot, runner_id):
                at = _core.monotonic_ns() + grace_ns
                self._add_deadline(slot, _Deadline(at, seq, KILL_CANCEL, grace_ns))
        elif kind == "kill":
            _, slot, runner_id = message
            self._kill(slot, runner_id, "cancel")
        elif kind == "shutdown":
            return False
        return True

    def _is_current(self, slot: int, runner_id: int) -> bool:
        current = self.runners.get(slot)
        return current is not None and current.runner_id == runner_id

    def _send(self, message: tuple[Any, ...], fds: Sequence[int] = ()) -> None:
        data = _wire.frame(_wire.dumps(message))
        self.ctrl.setblocking(True)
        try:
            if fds:
                sent = socket.send_fds(self.ctrl, [data], list(fds))
                data = data[sent:]
            if data:
                self.ctrl.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the user process is gone; the next read sees EOF
        finally:
            self.ctrl.setblocking(False)

    # -- deadlines ------------------------------------------------------------
    def _add_deadline(self, slot: int, deadline: _Deadline) -> None:
        self.deadlines.setdefault(slot, []).append(deadline)

    def _next_deadline(self) -> int | None:
        earliest = [min(pending) for pending in self.deadlines.values() if pending]
        return min(earliest).at_ns if earliest else None

    def _fire_deadlines(self) -> None:
        now = _core.monotonic_ns()
        for slot, pending in list(self.deadlines.items()):
            keep = []
            for deadline in pending:
                if deadline.at_ns > now:
                    keep.append(deadline)
                elif self._rearm(slot, deadline, now):
                    keep.append(deadline)
                elif self.words.decide_kill(slot, deadline.seq, deadline.flag):
                    self._kill(slot, self.runners[slot].runner_id, "deadline")
            if keep:
                self.deadlines[slot] = keep
            else:
                del self.deadlines[slot]

    def _rearm(self, slot: int, deadline: _Deadline, now: int) -> bool:
        """Move a deadline whose job has not begun, or (time limits) began later."""
        if deadline.timeout_ns is None:
            return False
        state = self.words.state(slot)
        if state & SEQ_MASK < deadline.seq:
            deadline.at_ns = now + deadline.timeout_ns  # not begun yet
            return True
        if deadline.flag == KILL_TIMEOUT and state == deadline.seq:
            ends = self.words.started_ns(slot) + deadline.timeout_ns
            if ends > now:
                deadline.at_ns = ends
                return True
        return False


def _load(payload: bytes) -> Any:
    import pickle

    return pickle.loads(payload)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _join_own_group(pid: int) -> None:
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child did it first, or is already gone: both are fine


def _children_of(parent: int) -> list[int]:
    return _core.list_children(parent) or []


def _kill_tree_root(pid: int) -> None:
    try:
        leads_group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    if leads_group:
        _core.kill_group(pid, signal.SIGKILL)
    _core.kill_pid(pid, signal.SIGKILL)


# -- starting a supervisor ----------------------------------------------------
def _supervisor_process_setup() -> None:
    _forked.forget_parent_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _core.become_group_leader()


def _run_forked(ctrl_fd: int, words_fd: int, config: SupervisorConfig) -> None:  # pragma: no cover
    code = 0
    try:
        _supervisor_process_setup()
        Supervisor(ctrl_fd, words_fd, config).serve()
    except BaseException:
        log.exception("cancelk supervisor failed")
        code = 70
    finally:
        _forked.flush_std_streams()
        os._exit(code)


def spawned_main() -> None:  # pragma: no cover - runs in a fresh interpreter
    ctrl_fd, words_fd = int(sys.argv[1]), int(sys.argv[2])
    _supervisor_process_setup()
    frame = _wire.read_frame(ctrl_fd)
    if frame is None:
        os._exit(0)
    prep, config_bytes = _load(frame)
    spawn.prepare(prep)
    config = _load(config_bytes)
    Supervisor(ctrl_fd, words_fd, config).serve()
    _forked.flush_std_streams()
    os._exit(0)


_SPAWNED_MAIN = "from cancelk.supervisor import spawned_main; spawned_main()"


class SupervisorProcess:
    """The user process's handle on its supervisor: start, talk, reap."""

    def __init__(self, method: str, words_fd: int, config: SupervisorConfig) -> None:
        user_end, sup_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._popen: subprocess.Popen[bytes] | None = None
        try:
            if method == "fork":
                self.pid = self._fork(user_end, sup_end, words_fd, config)
            else:
                self.pid = self._spawn(user_end, sup_end, words_fd, config)
        finally:
            sup_end.close()
        self.ctrl = user_end
        self.status: int | None = None

    @staticmethod
    def _fork(
        user_end: socket.socket, sup_end: socket.socket, words_fd: int, config: SupervisorConfig
    ) -> int:
        # The at-fork hook closes the pool's own descriptors in every child,
        # so the supervisor gets copies the hook does not know about.
        words_copy = os.dup(words_fd)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the supervisor
                try:
                    user_end.close()
                    _run_forked(sup_end.detach(), words_copy, config)
                finally:
                    os._exit(70)
        finally:
            if pid != 0:
                os.close(words_copy)
        return pid

    def _spawn(
        self,
        user_end: socket.socket,
        sup_end: socket.socket,
        words_fd: int,
        config: SupervisorConfig,
    ) -> int:
        # Two layers: the initializer may live in __main__, which the
        # supervisor can unpickle only after spawn.prepare() imported it.
        payload = _wire.dumps((_forked.main_preparation("cancelk-supervisor"), _wire.dumps(config)))
        self._popen = subprocess.Popen(
            [spawn.get_executable(), "-c", _SPAWNED_MAIN, str(sup_end.fileno()), str(words_fd)],
            pass_fds=(sup_end.fileno(), words_fd),
        )
        user_end.sendall(_wire.frame(payload))
        return self._popen.pid

    def send(self, message: tuple[Any, ...]) -> None:
        """Small control messages; the supervisor reads them at once."""
        try:
            self.ctrl.sendall(_wire.frame(_wire.dumps(message)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died; the manager thread notices the EOF

    def reap(self) -> int:
        if self.status is None:
            status = _core.reap(self.pid)
            assert status is not None
            self.status = status
            if self._popen is not None:
                self._popen.returncode = os.waitstatus_to_exitcode(status)
        return self.status
