"""The supervisor: one clean, single-threaded process per executor.

    user process                                supervisor process
    SupervisorProcess(method) ---fork/spawn--->   Supervisor.serve()
      send: deadline / cancel / kill / shutdown     C loop (_core.Loop) over
        ───────────── control socket ──────────►      control socket
        ◄────────────────────────────────────────      one pidfd per runner
      recv: runner(slot, id, pid) + channel fd        the earliest deadline
            killed(slot, id, seq, reason)           forks runners, reaps them,
            exit(slot, id, pid, status, word)       kills process groups,
                                                    sweeps orphans (subreaper),
                                                    keeps one warm spare runner

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
from cancelk._slots import KILL_CANCEL, KILL_TIMEOUT, SlotWords, job_of

log = logging.getLogger("cancelk")

_CTRL, _WAKE, _SPARE, _CHILD_BASE = 0, 1, 2, 3


@dataclass
class SupervisorConfig:
    slots: int
    initializer: Callable[..., Any] | None = None
    initargs: Sequence[Any] = ()
    max_tasks_per_child: int | None = None
    first_runner_id: int = 1  # ids stay unique across supervisors of one pool
    # Modules of the submitted functions, imported by spares ahead of their
    # first job (a spawned supervisor has not imported them; a job's module
    # may take tens of milliseconds to import).
    preload: list[str] = field(default_factory=list)


PRELOAD_LIMIT = 64


@dataclass
class _Runner:
    runner_id: int
    pid: int
    user_end: socket.socket | None  # held until the runner is handed to the user


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
        self.next_runner_id = config.first_runner_id
        self.wake_fd = -1
        # A warm spare (already initialized) replaces a dead runner at once.
        # With an initializer it is kept from the start, since the first
        # replacement would otherwise wait for the initializer (importing
        # numpy: ~100 ms); without one, from the first replacement on.  It is
        # given up for good if one dies before use (a failing initializer
        # must not fork-loop).
        self.spare: _Runner | None = None
        self.keep_spare = config.initializer is not None

    # -- life cycle -------------------------------------------------------
    def serve(self) -> None:
        _core.set_child_subreaper()
        self.loop.add_fd(self.ctrl.fileno(), _CTRL)
        if self.loop.backend == "posix":
            self._wake_on_sigchld()
        for slot in range(self.config.slots):
            self._assign(slot, self._start_runner())
        if self.keep_spare:
            self._start_spare()
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
            if token == _SPARE:
                self._spare_died()
            if token >= _CHILD_BASE:
                self._runner_exited(token - _CHILD_BASE)
        self._fire_deadlines()
        return True

    # -- runners ----------------------------------------------------------
    def _start_runner(self, preload: Sequence[str] = ()) -> _Runner:
        user_end, runner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        runner_id = self.next_runner_id
        self.next_runner_id += 1
        me = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the runner
            os._exit(self._become_runner(me, runner_id, user_end, runner_end, preload))
        runner_end.close()
        _join_own_group(pid)
        return _Runner(runner_id, pid, user_end)

    def _assign(self, slot: int, fresh: _Runner) -> None:
        """Give a runner a slot and its channel to the user process."""
        assert fresh.user_end is not None
        self.words.give(slot, fresh.runner_id)
        self.loop.add_child(fresh.pid, _CHILD_BASE + slot)
        self.runners[slot] = fresh
        # With a pidfd the user process can kill a cancelled job itself, a
        # hop sooner; the pidfd names this runner even after it is reaped.
        pidfd = _core.pidfd_open(fresh.pid) if self.loop.backend == "pidfd" else -1
        try:
            fds = [fresh.user_end.fileno()] + ([pidfd] if pidfd >= 0 else [])
            self._send(("runner", slot, fresh.runner_id, fresh.pid, pidfd >= 0), fds=fds)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        fresh.user_end.close()
        fresh.user_end = None

    def _replace(self, slot: int) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            self.loop.remove_child(spare.pid)
            self._assign(slot, spare)
        else:
            self._assign(slot, self._start_runner())
        if self.keep_spare or spare is None:
            self.keep_spare = True
            self._start_spare()

    def _start_spare(self) -> None:
        # Only spares preload: a spare that dies of it is given up, while a
        # slot's runner dying of it would be replaced again and again.
        self.spare = self._start_runner(tuple(self.config.preload))
        self.loop.add_child(self.spare.pid, _SPARE)

    def _spare_died(self) -> None:
        dead = self.spare
        if dead is None or not _core.has_exited(dead.pid):
            return
        self.spare = None
        self.loop.remove_child(dead.pid)
        _core.kill_group(dead.pid, signal.SIGKILL)
        _core.reap(dead.pid)
        if dead.user_end is not None:
            dead.user_end.close()
        self.keep_spare = False

    def _become_runner(
        self,
        supervisor: int,
        runner_id: int,
        user_end: socket.socket,
        runner_end: socket.socket,
        preload: Sequence[str],
    ) -> int:  # pragma: no cover - runs in the runner
        try:
            user_end.close()
            self.ctrl.close()  # the user must see EOF when the supervisor dies
            self.loop.close()
            for held in (*self.runners.values(), self.spare):
                if held is not None and held.user_end is not None:
                    held.user_end.close()
            if self.wake_fd >= 0:
                signal.set_wakeup_fd(-1)
                os.close(self.wake_fd)
            runner.run(
                supervisor,
                runner_id,
                runner_end.detach(),
                self.words,
                self.config.initializer,
                self.config.initargs,
                self.config.max_tasks_per_child,
                preload,
            )
        except BaseException:
            return 70
        return 0

    def _runner_exited(self, slot: int) -> None:
        dead = self.runners.get(slot)
        # Never act on a token alone: killing a live runner would kill its job.
        if dead is None or not _core.has_exited(dead.pid):
            return
        del self.runners[slot]
        # The runner is unreaped, so its pid and group id are still ours:
        # killing the group cannot reach anyone else.
        _core.kill_group(dead.pid, signal.SIGKILL)
        status = _core.reap(dead.pid)
        self.loop.remove_child(dead.pid)
        word = self.words.state(slot)
        self.deadlines.pop(slot, None)
        self._send(("exit", slot, dead.runner_id, dead.pid, status, word))
        self._replace(slot)
        self._sweep_orphans()

    def _kill(self, slot: int, runner_id: int, reason: str) -> None:
        current = self.runners.get(slot)
        if current is not None and current.runner_id == runner_id:
            _core.kill_group(current.pid, signal.SIGKILL)

    def _stop_all(self) -> None:
        everyone = list(self.runners.values())
        if self.spare is not None:
            everyone.append(self.spare)
        for current in everyone:
            kill_runner_tree(current.pid)
        for current in everyone:
            _core.reap(current.pid)
        self.runners.clear()
        self.spare = None
        self._sweep_orphans()

    def _sweep_orphans(self) -> None:
        """Kill and reap children that are not runners: what killed jobs left.

        As a child subreaper we inherit every orphan of a dead runner's tree,
        including processes that left its process group (setsid, double fork).
        """
        known = {r.pid for r in self.runners.values()}
        if self.spare is not None:
            known.add(self.spare.pid)
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
                at = self._time_limit_end(slot, seq, timeout_ns)
                self._add_deadline(slot, _Deadline(at, seq, KILL_TIMEOUT, timeout_ns))
        elif kind == "cancel":
            _, slot, runner_id, seq, grace_ns = message
            if self._is_current(slot, runner_id):
                at = _core.monotonic_ns() + grace_ns
                self._add_deadline(slot, _Deadline(at, seq, KILL_CANCEL, grace_ns))
        elif kind == "preload":
            name = message[1]
            if name not in self.config.preload and len(self.config.preload) < PRELOAD_LIMIT:
                self.config.preload.append(name)
        elif kind == "kill":
            _, slot, runner_id = message
            self._kill(slot, runner_id, "cancel")
        elif kind == "shutdown":
            return False
        return True

    def _time_limit_end(self, slot: int, seq: int, timeout_ns: int) -> int:
        """When job ``seq``'s time limit runs out.

        The limit message is sent once the job is on its way to the runner,
        so the job has often begun by now: count from its start, not from
        this message, or every kill would be late by the message's trip.
        """
        now = _core.monotonic_ns()
        if self.words.state(slot) == seq:
            return min(now, self.words.started_ns(slot)) + timeout_ns
        return now + timeout_ns  # moved to its start when it fires (_rearm)

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
        # A job reaches a slot only after the previous one ended, so the
        # deadlines of older jobs are moot: dropping them keeps this bounded
        # however long the time limits are.
        pending = [d for d in self.deadlines.get(slot, ()) if d.seq >= deadline.seq]
        pending.append(deadline)
        self.deadlines[slot] = pending

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
                    runner_id = self.runners[slot].runner_id
                    self._kill(slot, runner_id, "deadline")
                    # The outcome is final now: report it before the kernel has
                    # torn the runner down (its exit follows as usual).
                    self._send(("killed", slot, runner_id, deadline.seq, deadline.flag))
            if keep:
                self.deadlines[slot] = keep
            else:
                del self.deadlines[slot]

    def _rearm(self, slot: int, deadline: _Deadline, now: int) -> bool:
        """Move a deadline whose job has not begun, or (time limits) began later."""
        if deadline.timeout_ns is None:
            return False
        state = self.words.state(slot)
        if job_of(state) < deadline.seq:
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


def kill_runner_tree(pid: int) -> None:
    """SIGKILL a live runner's group and its whole tree.

    While the runner lives (a subreaper) whatever its job started is in its
    tree, even what left its group: killed in one pass now, rather than
    found among the orphans once the runner is gone.
    """
    try:
        _core.kill_descendants(pid)
    except OSError as why:
        log.debug("scanning the tree of runner %d failed: %s", pid, why)
    _core.kill_group(pid, signal.SIGKILL)


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
        except BaseException:
            user_end.close()
            raise
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
