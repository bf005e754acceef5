"""The supervisor: one clean, single-threaded process per executor.

    user process                                  supervisor process
    SupervisorProcess(method, words, start) ─fork / fresh interpreter─► serve()
      control socket ─ SetTimeLimit, GraceCancel ──►  C loop (_core.Loop) over
                       KillRunner, Preload,           the control socket, one
                       Shutdown                       pidfd per runner and the
      control socket ◄─ RunnerStarted (+ channel     book's next deadline:
                        fd, pidfd), RunnerExited,     forks runners and reaps them,
                        JobKilled ───────────────────  kills decided jobs' groups,
                                                      sweeps orphans (subreaper),
                                                      keeps one warm spare runner

It never runs user code except to unpickle the initializer.  When the user
process goes away the control socket reads EOF and the supervisor kills every
runner's tree and every orphan before it exits (I6).  The messages are
declared in ``_protocol``; the deadlines are kept by ``_deadlines``.

Why one module of this size: the supervisor's own loop and the user
process's handle on it are the two ends of one start handshake and one
control socket; read together, each message is next to its reader.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cancelk import _child, _core, _kill, _protocol, _wire, runner
from cancelk._deadlines import DeadlineBook
from cancelk._memwatch import MemoryWatch
from cancelk._slots import KILL_MEMORY, SlotWords

log = logging.getLogger("cancelk")

_CONTROL, _WAKE, _SPARE, _RUNNER_BASE = 0, 1, 2, 3
_LIMITS = (
    _protocol.SetTimeLimit,
    _protocol.SetDeadline,
    _protocol.SetMemoryLimit,
    _protocol.GraceCancel,
)
PRELOAD_LIMIT = 64
_REPORT_LIMIT = 32 * 1024  # characters of a failed start's traceback sent back


@dataclass(frozen=True)
class SupervisorConfig:
    """What every supervisor of one executor is given."""

    slots: int
    initializer: Any = None
    initargs: tuple[Any, ...] = ()
    max_tasks_per_child: int | None = None


@dataclass(frozen=True)
class SupervisorStart:
    """One supervisor's start: the pool's config and what this one inherits."""

    config: SupervisorConfig
    # Runner ids never repeat within a pool, so no shared word written for a
    # runner of a dead supervisor can match one of the next supervisor's.
    first_runner_id: int = 1
    # Modules of the submitted functions, imported by spares ahead of their
    # first job (a spawned supervisor has not imported them; a job's module
    # may take tens of milliseconds to import).
    preload: tuple[str, ...] = ()


@dataclass
class _Runner:
    runner_id: int
    pid: int
    user_end: socket.socket | None  # held until the runner is handed to the user
    oom_kills_at_start: int  # evidence, should the runner die of SIGKILL


class Supervisor:
    """Runs in the supervisor process; see the module docstring."""

    def __init__(self, ctrl_fd: int, words_fd: int, start: SupervisorStart) -> None:
        self.ctrl = socket.socket(fileno=ctrl_fd)
        self.ctrl.setblocking(False)
        self.config = start.config
        self.words = SlotWords(words_fd, self.config.slots)
        os.close(words_fd)
        self.preload = list(start.preload)
        self.loop = _core.Loop()
        self.reader = _wire.FrameReader()
        self.runners: dict[int, _Runner] = {}
        self.deadlines = DeadlineBook(self.words)
        self.memory = MemoryWatch(self.words)
        self.next_runner_id = start.first_runner_id
        self.wake_fd = -1
        # A warm spare (already initialized) replaces a dead runner at once.
        # With an initializer it is kept from the start, since the first
        # replacement would otherwise wait for the initializer (importing
        # numpy: ~100 ms); without one, from the first replacement on.  It is
        # given up for good if one dies before use (a failing initializer
        # must not fork-loop).
        self.spare: _Runner | None = None
        self.keep_spare = self.config.initializer is not None
        self.ready = False  # SupervisorReady was sent

    # -- life cycle -------------------------------------------------------------
    def serve(self) -> None:
        _core.set_child_subreaper()
        self.loop.add_fd(self.ctrl.fileno(), _CONTROL)
        if self.loop.backend == "posix":
            self._wake_on_sigchld()
        # Started: whatever fails from here on is a death, not a failed start.
        self._send(_protocol.SupervisorReady())
        self.ready = True
        # Runners start as the user process asks for them (StartRunner).
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
        kill_at, check_at = self.deadlines.next_ns(), self.memory.next_ns()
        wake_at = [t for t in (kill_at, check_at) if t is not None]
        deadline = min(wake_at) if wake_at else None
        # A kill is due at its deadline to the microsecond; a memory check is not.
        for token in self.loop.wait(deadline, precise=deadline == kill_at):
            if token == _CONTROL and not self._read_control():
                return False
            if token == _WAKE:
                _drain(self.wake_fd)
            if token == _SPARE:
                self._spare_died()
            if token >= _RUNNER_BASE:
                self._reap_runner(token - _RUNNER_BASE)
        self._kill_overdue()
        return True

    # -- runners ----------------------------------------------------------------
    def _fork_runner(self, preload: Sequence[str] = ()) -> _Runner:
        user_end, runner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (user_end, runner_end):
            _widen(end)
        runner_id = self.next_runner_id
        self.next_runner_id += 1
        me = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the runner
            os._exit(self._become_runner(me, runner_id, user_end, runner_end, preload))
        runner_end.close()
        _kill.join_own_group(pid)
        return _Runner(runner_id, pid, user_end, _kill.oom_kills())

    def _assign(self, slot: int, fresh: _Runner) -> None:
        """Give a runner a slot and its channel to the user process."""
        assert fresh.user_end is not None
        self.words.give(slot, fresh.runner_id)
        self.loop.add_child(fresh.pid, _RUNNER_BASE + slot)
        self.runners[slot] = fresh
        # With a pidfd the user process can kill a cancelled job itself, a
        # hop sooner; the pidfd names this runner even after it is reaped.
        pidfd = _core.pidfd_open(fresh.pid) if self.loop.backend == "pidfd" else -1
        try:
            fds = [fresh.user_end.fileno()] + ([pidfd] if pidfd >= 0 else [])
            message = _protocol.RunnerStarted(slot, fresh.runner_id, fresh.pid, pidfd >= 0)
            self._send(message, fds)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        fresh.user_end.close()
        fresh.user_end = None

    def _start_runner(self, slot: int) -> None:
        """A first runner for ``slot``: the warm spare if there is one."""
        if slot in self.runners or not 0 <= slot < self.config.slots:
            return  # asked twice, or for a slot that is no slot: nothing to do
        spare, self.spare = self.spare, None
        if spare is None:
            self._assign(slot, self._fork_runner())
            return
        self.loop.remove_child(spare.pid)
        self._assign(slot, spare)
        self._start_spare()  # kept from the start: there is an initializer

    def _replace(self, slot: int) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            self.loop.remove_child(spare.pid)
            self._assign(slot, spare)
        else:
            self._assign(slot, self._fork_runner())
        if self.keep_spare or spare is None:
            self.keep_spare = True
            self._start_spare()

    def _start_spare(self) -> None:
        # Only spares preload: a spare that dies of it is given up, while a
        # slot's runner dying of it would be replaced again and again.
        self.spare = self._fork_runner(tuple(self.preload))
        self.loop.add_child(self.spare.pid, _SPARE)

    def _spare_died(self) -> None:
        dead = self.spare
        if dead is None or not _core.has_exited(dead.pid):
            return
        self.spare = None
        self.loop.remove_child(dead.pid)
        _kill.kill_group(dead.pid)
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
                runner.RunnerSetup(
                    supervisor,
                    runner_id,
                    runner_end.detach(),
                    self.words,
                    self.config.initializer,
                    self.config.initargs,
                    self.config.max_tasks_per_child,
                    tuple(preload),
                )
            )
        except BaseException:
            return 70
        return 0

    def _reap_runner(self, slot: int) -> None:
        dead = self.runners.get(slot)
        # Never act on a token alone: killing a live runner would kill its job.
        if dead is None or not _core.has_exited(dead.pid):
            return
        del self.runners[slot]
        # The runner is unreaped, so its pid and group id are still ours:
        # killing the group cannot reach anyone else.
        _kill.kill_group(dead.pid)
        status = _core.reap(dead.pid)
        assert status is not None
        self.loop.remove_child(dead.pid)
        state = self.words.state(slot)
        self.deadlines.drop_slot(slot)
        self.memory.drop_slot(slot)
        oom = _kill.oom_kills_since(dead.oom_kills_at_start) if os.WIFSIGNALED(status) else -1
        self._send(_protocol.RunnerExited(slot, dead.runner_id, dead.pid, status, state, oom))
        self._replace(slot)
        _kill.sweep_orphans(self._known_pids())

    def _known_pids(self) -> set[int]:
        known = {r.pid for r in self.runners.values()}
        if self.spare is not None:
            known.add(self.spare.pid)
        return known

    def _kill(self, slot: int, runner_id: int) -> None:
        current = self.runners.get(slot)
        if current is not None and current.runner_id == runner_id:
            _kill.kill_group(current.pid)

    def _stop_all(self) -> None:
        everyone = list(self.runners.values())
        if self.spare is not None:
            everyone.append(self.spare)
        _kill.kill_runner_trees([current.pid for current in everyone])
        for current in everyone:
            _core.reap(current.pid)
            if current.user_end is not None:  # a spare's, never handed over
                current.user_end.close()
        self.runners.clear()
        self.spare = None
        _kill.sweep_orphans(())

    # -- control messages ---------------------------------------------------------
    def _read_control(self) -> bool:
        """Act on what the user process sent; False when the supervisor must stop."""
        while True:
            try:
                data = self.ctrl.recv(1 << 16)
            except BlockingIOError:
                return True
            except ConnectionResetError:
                return False
            if not data:
                return False  # the user process is gone
            for body in self.reader.feed(data):
                try:
                    message = _protocol.decode(body)
                except _protocol.ProtocolError as why:
                    # Stopping is the safe side: every runner dies with us and
                    # the user process sees each job end, then starts anew.
                    log.error("cancelk supervisor %d stops: %s", os.getpid(), why)
                    return False
                if not self._handle(message):
                    return False

    def _handle(self, message: _protocol.ControlMessage) -> bool:
        if isinstance(message, _LIMITS):
            # A limit for a runner that is gone (replaced meanwhile) is moot.
            if self._is_current(message.slot, message.runner_id):
                self._set_limit(message, _core.monotonic_ns())
        elif isinstance(message, _protocol.StartRunner):
            self._start_runner(message.slot)
        elif isinstance(message, _protocol.KillRunner):
            self._kill(message.slot, message.runner_id)
        elif isinstance(message, _protocol.Preload):
            if message.module not in self.preload and len(self.preload) < PRELOAD_LIMIT:
                self.preload.append(message.module)
        elif isinstance(message, _protocol.Shutdown):
            return False
        else:
            log.error("cancelk supervisor %d stops: unexpected %r", os.getpid(), message)
            return False
        return True

    def _set_limit(self, message: _protocol.ControlMessage, now: int) -> None:
        if isinstance(message, _protocol.SetTimeLimit):
            self.deadlines.add_time_limit(message.slot, message.seq, message.timeout_ns, now)
        elif isinstance(message, _protocol.SetDeadline):
            self.deadlines.add_deadline(message.slot, message.seq, message.at_ns)
        elif isinstance(message, _protocol.SetMemoryLimit):
            self.memory.add(message.slot, message.seq, message.nbytes, now)
        elif isinstance(message, _protocol.GraceCancel):
            self.deadlines.add_grace(message.slot, message.seq, message.grace_ns, now)

    def _is_current(self, slot: int, runner_id: int) -> bool:
        current = self.runners.get(slot)
        return current is not None and current.runner_id == runner_id

    def _send(self, message: _protocol.ControlMessage, fds: Sequence[int] = ()) -> None:
        data = _protocol.encode(message)
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

    def _kill_overdue(self) -> None:
        now = _core.monotonic_ns()
        for slot, seq, flag in self.deadlines.decided_kills(now):
            self._kill_decided(slot, seq, flag, 0)
        pids = {slot: runner.pid for slot, runner in self.runners.items()}
        for slot, seq, peak in self.memory.decided_kills(now, pids):
            self._kill_decided(slot, seq, KILL_MEMORY, peak)

    def _kill_decided(self, slot: int, seq: int, flag: int, peak: int) -> None:
        runner_id = self.runners[slot].runner_id
        self._kill(slot, runner_id)
        # The outcome is final now: report it before the kernel has torn the
        # runner down (its exit follows as usual).
        self._send(_protocol.JobKilled(slot, runner_id, seq, flag, peak))


_CHANNEL_BUFFER = 4 << 20


def _widen(end: socket.socket) -> None:
    """Let a channel hold megabytes in flight (as far as the host's
    net.core.wmem_max allows): a large argument or result then crosses in a
    few wake-ups of each side instead of one per 200 KB."""
    try:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CHANNEL_BUFFER)
    except OSError:
        pass  # the default then: slower for large payloads, nothing else


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


# -- the supervisor process's entry points -------------------------------------------
def _supervisor_process_setup() -> None:
    _child.forget_parent_signals()
    _child.stdin_from_devnull()  # runners inherit it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _core.become_group_leader()


def run_forked(ctrl_fd: int, words_fd: int, start: SupervisorStart) -> None:  # pragma: no cover
    _serve_and_exit(ctrl_fd, words_fd, lambda: start)


def spawned_main() -> None:  # pragma: no cover - runs in a fresh interpreter
    ctrl_fd, words_fd = int(sys.argv[1]), int(sys.argv[2])

    def receive_start() -> SupervisorStart | None:
        payload = _child.receive_main_and_payload(ctrl_fd)
        return None if payload is None else _wire.loads(payload)

    _serve_and_exit(ctrl_fd, words_fd, receive_start)


def _serve_and_exit(
    ctrl_fd: int, words_fd: int, get_start: Callable[[], SupervisorStart | None]
) -> None:  # pragma: no cover - runs in the supervisor
    """Serve until told to stop; a failure before READY is reported to the
    user process as StartFailed (never restarted in a loop), a later one logged."""
    code = 0
    supervisor = None
    try:
        _supervisor_process_setup()
        start = get_start()
        if start is not None:  # None: the user process went away before sending it
            supervisor = Supervisor(ctrl_fd, words_fd, start)
            supervisor.serve()
    except BaseException as why:
        if supervisor is None or not supervisor.ready:
            _report_start_failure(ctrl_fd, why)
        else:
            log.exception("cancelk supervisor failed")
        code = 70
    finally:
        _child.flush_std_streams()
        os._exit(code)


def _report_start_failure(ctrl_fd: int, why: BaseException) -> None:  # pragma: no cover
    """Tell the user process why this supervisor could not start (it breaks
    the pool rather than start another); print it only if that fails."""
    text = "".join(traceback.format_exception(type(why), why, why.__traceback__))
    message = _protocol.StartFailed(_child.refused_during_main_import, text[-_REPORT_LIMIT:])
    try:
        os.set_blocking(ctrl_fd, True)
        _wire.write_all(ctrl_fd, _protocol.encode(message))
    except OSError:
        sys.stderr.write(f"cancelk supervisor {os.getpid()} could not start:\n{text}")


# -- the user process's handle on its supervisor ---------------------------------------
class SupervisorProcess:
    """Starts a supervisor (fork, or a fresh interpreter), and reaps it."""

    def __init__(self, method: str, words_fd: int, start: SupervisorStart) -> None:
        _child.check_not_importing_main()
        user_end, sup_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._popen: subprocess.Popen[bytes] | None = None
        try:
            if method == "fork":
                self.pid = _fork(user_end, sup_end, words_fd, start)
            else:
                # First: an unpicklable initializer starts nothing.  As for a
                # multiprocessing child, a Queue or Lock among the initargs pickles.
                payload, inherited = _child.dumps_for_child(start)
                self._popen = _child.start_interpreter(
                    "cancelk.supervisor:spawned_main",
                    (sup_end.fileno(), words_fd, *inherited),
                    (str(sup_end.fileno()), str(words_fd)),
                )
                self.pid = self._popen.pid
                _child.send_main_and_payload(user_end.fileno(), "cancelk-supervisor", payload)
        except BaseException:
            user_end.close()
            raise
        finally:
            sup_end.close()
        self.ctrl = user_end
        self.reaped = False
        self.status: int | None = None  # None once reaped: somebody else reaped it

    def reap(self) -> int | None:
        """Wait for it to exit; its wait status, or None if a handler of the
        user's (a SIGCHLD handler calling waitpid(-1)) reaped it first."""
        if not self.reaped:
            try:
                self.status = _core.reap(self.pid)
            except ChildProcessError:
                self.status = None
            self.reaped = True
            if self._popen is not None:
                # Known to the Popen, so it neither polls a recycled pid nor warns.
                code = -1 if self.status is None else os.waitstatus_to_exitcode(self.status)
                self._popen.returncode = code
        return self.status


def _fork(
    user_end: socket.socket, sup_end: socket.socket, words_fd: int, start: SupervisorStart
) -> int:
    # The at-fork hook closes the pool's own descriptors in every child, so
    # the supervisor gets copies the hook does not know about.
    words_copy = os.dup(words_fd)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the supervisor
            try:
                user_end.close()
                run_forked(sup_end.detach(), words_copy, start)
            finally:
                os._exit(70)
    finally:
        if pid != 0:
            os.close(words_copy)
    return pid
