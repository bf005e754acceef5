"""The manager thread: every descriptor of a pool, and the loop that reads them.

    selector.select() over:
      Waker          ─► run the commands callers left in the intake
      control socket ─► SupervisorReady ─► deaths from now on may be restarted
                        StartFailed ─► its reason kept for the EOF that follows
                        RunnerStarted ─► a RunnerLink, Pool.runner_started
                        RunnerExited  ─► its last frames read, link closed,
                                         Pool.runner_exited
                        JobKilled     ─► Pool.job_killed
                        EOF           ─► runners' trees killed, Pool.supervisor_lost,
                                         another supervisor started (_restarts), or,
                                         if it never got ready, the pool broken
      runner channel ─► result frames ─► Pool.result_arrived
      writable       ─► the bytes that did not fit when they were queued
    then, still under the lock: queued jobs to runners with room, the intake;
    the small job frames of this wake-up go out one write per runner;
    once the pool is shut down and idle, the supervisor is stopped and every
    descriptor closed.  Futures are settled after the lock is released.

It is also the pool logic's ``PoolIO``: ``send_job``, ``send_control`` and
``kill_now`` queue bytes or signal without blocking, from any thread.

Why one module of this size: it is one thread's whole work; the selector,
the links it owns and the supervisor's life cycle share that thread's state,
which would otherwise be passed between modules.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from cancelk import _kill, _protocol, _slots
from cancelk._channels import RunnerLink, SupervisorLink, Waker, close_quietly
from cancelk._compat import RunnerHandles
from cancelk._pool import Completion, Placement, Pool, fail
from cancelk._restarts import RestartPolicy, start_failed_error, status_text
from cancelk._wire import SMALL, Payload
from cancelk.errors import oom_detail
from cancelk.supervisor import PRELOAD_LIMIT, SupervisorConfig, SupervisorProcess, SupervisorStart

log = logging.getLogger("cancelk")

Command = Callable[[list[Completion]], None]
# Received descriptors must not leak into programs the user process execs.
_RECV_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_WAKER = "waker"
_READ = selectors.EVENT_READ


class PoolLock:
    """The lock over a pool's logic, and how deep its holder is in it.

    Reentrant, with a depth count: a signal handler or finalizer that enters
    while its own thread holds the lock sees ``depth`` > 0 and leaves its
    command in the intake instead of waiting for itself.
    """

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0


class ManagerThread(threading.Thread):
    """Runs a pool's I/O; see the module docstring."""

    def __init__(
        self,
        lock: PoolLock,
        intake: deque[Command],
        method: str,
        config: SupervisorConfig,
        max_pending: int | None = None,
    ) -> None:
        super().__init__(name="cancelk-manager", daemon=True)
        self.pool = Pool(config.slots, config.max_tasks_per_child, self, max_pending)
        self.lock = lock
        self.intake = intake
        self.method = method
        self.config = config
        self.selector: selectors.BaseSelector | None = None
        self.waker: Waker | None = None
        self.words_fd = -1
        self.supervisor: SupervisorLink | None = None
        self.runners: list[RunnerLink | None] = [None] * config.slots
        self.want_write: set[int] = set()
        # While this thread handles a wake-up: small job frames per runner, sent
        # together at its end (one write, one wake-up of the runner, for all
        # the jobs the results it read made room for).  None otherwise.
        self.outgoing: dict[RunnerLink, list[bytes]] | None = None
        self.preload: list[str] = []
        self.timers: list[tuple[float, int, Command]] = []  # (monotonic time, tie, command)
        self._timer_order = itertools.count()
        self.stopped = False  # every process and descriptor is gone
        self.restarts = RestartPolicy()
        self.supervisor_ready = False  # the current supervisor sent SupervisorReady
        self.start_failure: _protocol.StartFailed | None = None
        self.handles = RunnerHandles()  # what executor._processes gave out
        self.soon: deque[Callable[[], object]] = deque()  # calls from any context
        self.ending = False  # the loop has ended: nothing more runs ``soon``

    # -- PoolIO: never blocks, any thread -----------------------------------------
    def send_job(self, slot: int, head: bytes, payload: Payload) -> None:
        link = self.runners[slot]
        if link is None:
            return  # the runner died; its exit settles the job
        if isinstance(payload, bytes) and len(payload) <= SMALL:
            outgoing = self.outgoing
            if outgoing is not None:  # this thread, in a wake-up: sent at its end
                outgoing.setdefault(link, []).append(head + payload)
                return
            sent = link.outbox.push(head + payload)  # one send: the runner wakes once
        else:
            if self.outgoing:
                self._send_outgoing(link, self.outgoing)  # first: in the order of dispatch
            sent = link.outbox.push(head)
            for part in [payload] if isinstance(payload, bytes) else payload:
                sent = link.outbox.push(part) and sent
        if not sent:
            self.want_write.add(slot)
            self.wake()

    def send_control(self, message: _protocol.ControlMessage) -> None:
        link = self.supervisor
        if link is not None and not link.outbox.push(_protocol.encode(message)):
            self.wake()  # this thread sends the rest

    def kill_now(self, placement: Placement) -> bool:
        link = self.runners[placement.slot]
        return link is not None and link.runner_id == placement.runner_id and link.kill_now()

    def wake(self) -> None:
        waker = self.waker
        if waker is not None:
            waker.wake()

    def call_soon(self, call: Callable[[], object]) -> None:
        """Run ``call`` on this thread, outside the lock, from any context
        (a signal handler, a finalizer): only appends and wakes.  Once the
        loop has ended the caller runs it, since nobody else will."""
        self.soon.append(call)
        if self.ending or not self.is_alive():
            self._run_soon()
        else:
            self.wake()

    def _run_soon(self) -> None:
        while True:
            try:
                call = self.soon.popleft()
            except IndexError:
                return
            try:
                call()
            except Exception:
                log.exception("cancelk: a call on the manager thread failed")

    def add_timer(self, at: float, command: Command) -> None:
        """Run ``command`` under the lock at ``time.monotonic()`` ``at``; with
        the lock held."""
        heapq.heappush(self.timers, (at, next(self._timer_order), command))
        self.wake()  # the loop's wait must end sooner

    def note_module(self, name: str) -> None:
        """Tell the supervisor a job's module once, for its spares to import."""
        if name in self.preload or len(self.preload) >= PRELOAD_LIMIT:
            return
        self.preload.append(name)  # a later supervisor gets it at its start
        self.send_control(_protocol.Preload(name))

    # -- starting -------------------------------------------------------------------
    def open(self) -> None:
        """Everything but the thread itself; nothing is left open if it fails."""
        try:
            self.words_fd = _slots.create_fd(self.config.slots)
            self.pool.words = _slots.SlotWords(self.words_fd, self.config.slots)
            self.waker = Waker()
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.waker.read_fd, selectors.EVENT_READ, _WAKER)
            self._start_supervisor()
        except BaseException:
            # e.g. an initializer spawn cannot pickle: fail this submit, keep nothing
            self._close_descriptors()
            raise

    def _start_supervisor(self) -> None:
        started = self.pool.counts["supervisors_started"]
        start = SupervisorStart(self.config, started * (1 << 32) + 1, tuple(self.preload))
        link = SupervisorLink(SupervisorProcess(self.method, self.words_fd, start))
        assert self.selector is not None
        self.selector.register(link.sock, selectors.EVENT_READ, link)
        self.supervisor = link
        self.supervisor_ready, self.start_failure = False, None
        self.restarts.started(self.pool.counts["finished"])
        self.pool.counts["supervisors_started"] += 1
        self.pool.supervisor_started()  # it has no runners: ask for those the queue needs

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as why:
            # A bug here must not leave futures waiting forever (I3).
            log.exception("cancelk manager thread failed; stopping the pool")
            self._crash(why)
        finally:
            # Set before the last run: a call appended after it sees the flag
            # and runs itself; one appended before it is run here.
            self.ending = True
            self._run_soon()

    def _loop(self) -> None:
        assert self.selector is not None
        select, lock = self.selector.select, self.lock
        while not self.stopped:
            events = select(self._until_next_timer() if self.timers else None)
            out: list[Completion] = []
            with lock.rlock:  # as _locked(), unrolled: this runs once per wake-up
                lock.depth += 1
                try:
                    self._handle_events(events, out)
                finally:
                    lock.depth -= 1
            run_completions(out, on_manager_thread=True)
            if self.soon:
                self._run_soon()
        self._locked(self._run_intake)  # submits that raced the end: refused

    def _locked(self, work: Command) -> None:
        out: list[Completion] = []
        with self.lock.rlock:
            self.lock.depth += 1
            try:
                work(out)
            finally:
                self.lock.depth -= 1
        run_completions(out, on_manager_thread=True)

    def _run_intake(self, out: list[Completion]) -> None:
        while self.intake:
            self.intake.popleft()(out)

    def _until_next_timer(self) -> float | None:
        if not self.timers:
            return None
        return max(0.0, self.timers[0][0] - time.monotonic())

    def _run_due_timers(self, out: list[Completion]) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2](out)

    def _handle_events(
        self, events: list[tuple[selectors.SelectorKey, int]], out: list[Completion]
    ) -> None:
        outgoing: dict[RunnerLink, list[bytes]] = {}
        self.outgoing = outgoing
        try:
            self._handle_batch(events, out)
        finally:
            self.outgoing = None
            for link in list(outgoing):
                self._send_outgoing(link, outgoing)
        self._register_writes()  # last: dispatching may have queued bytes
        pool = self.pool
        if pool.shutting_down and pool.finished():
            self._stop_processes()
            self.stopped = True

    def _send_outgoing(self, link: RunnerLink, outgoing: dict[RunnerLink, list[bytes]]) -> None:
        """Send the frames held for ``link``'s runner in one write."""
        frames = outgoing.pop(link, None)
        if not frames or self.runners[link.slot] is not link:
            return  # its runner is gone: its exit hands its jobs back
        if not link.outbox.push(frames[0] if len(frames) == 1 else b"".join(frames)):
            self.want_write.add(link.slot)

    def _handle_batch(
        self, events: list[tuple[selectors.SelectorKey, int]], out: list[Completion]
    ) -> None:
        for key, mask in events:
            if mask == _READ and type(key.data) is RunnerLink:
                self._read_channel(key.data, out)  # nearly every wake-up: a result
            else:
                self._on_event(key, mask, out)
        if self.timers:
            self._run_due_timers(out)
        pool = self.pool
        if pool.pending:
            pool.fill_idle()  # first: queued jobs go before those in the intake
        elif pool.idle and pool.ahead:
            pool.take_over_sent_ahead()
        if self.intake:
            self._run_intake(out)

    def _on_event(self, key: selectors.SelectorKey, mask: int, out: list[Completion]) -> None:
        link = key.data
        if isinstance(link, RunnerLink):  # first: the event of nearly every wake-up
            if self.runners[link.slot] is not link:
                return  # closed or replaced earlier in this batch
            if mask & selectors.EVENT_WRITE:
                link.outbox.flush()
                self.want_write.add(link.slot)
            if mask & selectors.EVENT_READ:
                self._read_channel(link, out)
        elif isinstance(link, SupervisorLink):
            if link is not self.supervisor:
                return  # replaced earlier in this batch
            if mask & selectors.EVENT_WRITE:
                link.outbox.flush()
            if mask & selectors.EVENT_READ:
                self._read_control(link, out)
        elif link is _WAKER:
            assert self.waker is not None
            self.waker.drain()

    def _register_writes(self) -> None:
        if self.want_write:
            for slot in self.want_write:
                runner = self.runners[slot]
                if runner is not None:
                    self._want_write(runner, runner.outbox.pending())
            self.want_write.clear()
        # Cancels push to the control queue without the lock: look each time.
        supervisor = self.supervisor
        if supervisor is not None and supervisor.write_wanted != supervisor.outbox.pending():
            self._want_write(supervisor, not supervisor.write_wanted)

    def _want_write(self, link: RunnerLink | SupervisorLink, wanted: bool) -> None:
        if link.write_wanted == wanted:
            return
        assert self.selector is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
        self.selector.modify(link.sock, events, link)
        link.write_wanted = wanted

    # -- the supervisor ---------------------------------------------------------------
    def _read_control(self, link: SupervisorLink, out: list[Completion]) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(link.sock, 1 << 16, 16, _RECV_CLOEXEC)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                os.set_inheritable(fd, False)  # where MSG_CMSG_CLOEXEC does not exist
            link.received_fds.extend(fds)
            if not data:
                self._supervisor_died(link, out)
                return
            for body in link.reader.feed(data):
                try:
                    self._on_supervisor_event(link, _protocol.decode(body), out)
                except _protocol.ProtocolError as why:
                    # Killed, it takes every runner with it; its EOF then
                    # settles each job and starts another.  Safer than guessing.
                    pid = link.process.pid
                    log.error("cancelk supervisor %d sent a bad message, killing it: %s", pid, why)
                    _kill.kill_child(pid)
                    return

    def _on_supervisor_event(
        self, link: SupervisorLink, message: _protocol.ControlMessage, out: list[Completion]
    ) -> None:
        if isinstance(message, _protocol.SupervisorReady):
            self.supervisor_ready = True
            self.restarts.ready()
        elif isinstance(message, _protocol.StartFailed):
            self.start_failure = message
        elif isinstance(message, _protocol.RunnerStarted):
            channel = link.received_fds.popleft()
            pidfd = link.received_fds.popleft() if message.with_pidfd else -1
            self._runner_started(message, channel, pidfd, out)
        elif isinstance(message, _protocol.RunnerExited):
            runner = self.runners[message.slot]
            if runner is not None and runner.runner_id == message.runner_id:
                self._read_channel(runner, out)  # a result written just before death counts
                self._close_runner(runner)
            detail = self.handles.exited(message.runner_id, message.status)
            detail = detail or oom_detail(message.oom_kills)
            self.pool.runner_exited(
                message.slot, message.runner_id, message.status, message.state, detail, out
            )
        elif isinstance(message, _protocol.JobKilled):
            self.pool.job_killed(*message, out)
        else:
            raise _protocol.ProtocolError(f"unexpected message from the supervisor: {message!r}")

    def _supervisor_died(self, link: SupervisorLink, out: list[Completion]) -> None:
        assert self.selector is not None
        self.supervisor = None
        self.selector.unregister(link.sock)
        link.close()
        status = link.process.reap()
        for runner in self.runners:
            if runner is None:
                continue
            if not self.pool.shutting_down:
                runner.kill_orphaned()
            self._read_channel(runner, out)
            self._close_runner(runner)
        self.handles.all_exited()
        self.pool.supervisor_lost(link.process.pid, status, out)
        if self.pool.shutting_down and not self.pool.pending:
            return
        pid = link.process.pid
        if not self.supervisor_ready:
            # It failed as it started: another would fail the same way.
            self.pool.break_pool(start_failed_error(pid, status, self.start_failure), out)
            return
        delay = self.restarts.died(self.pool.counts["finished"])
        if delay is None:
            self.pool.break_pool(self.restarts.gave_up_error(pid, status), out)
            return
        if status != 0 and not self.pool.shutting_down:
            log.warning(
                "cancelk supervisor %d died (%s); starting a new one%s",
                pid,
                status_text(status),
                f" in {delay:.1f} s" if delay else "",
            )
        if delay:
            self.add_timer(time.monotonic() + delay, self._restart_supervisor)
        else:
            self._restart_supervisor(out)

    def _restart_supervisor(self, out: list[Completion]) -> None:
        if self.pool.broken is not None or self.stopped:
            return
        try:
            self._start_supervisor()
        except (OSError, RuntimeError) as why:
            self.pool.break_pool(why, out)

    # -- runners ----------------------------------------------------------------------
    def _runner_started(
        self, message: _protocol.RunnerStarted, channel: int, pidfd: int, out: list[Completion]
    ) -> None:
        assert self.selector is not None
        link = RunnerLink(message.slot, message.runner_id, message.pid, channel, pidfd)
        self.selector.register(link.sock, selectors.EVENT_READ, link)
        self.runners[message.slot] = link
        self.pool.runner_started(message.slot, message.runner_id, message.pid)
        self._read_channel(link, out)  # a spare said it is ready before it got the slot

    def _read_channel(self, link: RunnerLink, out: list[Completion]) -> None:
        if self.runners[link.slot] is not link:
            return
        try:
            frames, ended = link.reader.receive(link.sock)
        except OSError:
            frames, ended = [], True
        for body in frames:
            try:
                seq, kind, outcome = _protocol.parse_result(body)
            except _protocol.ProtocolError as why:
                log.error("cancelk runner %d sent a bad frame, killing it: %s", link.pid, why)
                self._close_runner(link)
                self.send_control(_protocol.KillRunner(link.slot, link.runner_id))
                return
            self.pool.result_arrived(link.slot, seq, kind, outcome, out)
        if ended:
            self._close_runner(link)

    def _close_runner(self, link: RunnerLink) -> None:
        if self.runners[link.slot] is not link:
            return
        self.runners[link.slot] = None
        self.want_write.discard(link.slot)
        assert self.selector is not None
        self.selector.unregister(link.sock)
        link.close()
        self.pool.channel_closed(link.slot)

    # -- the end --------------------------------------------------------------------------
    def _stop_processes(self) -> None:
        link, self.supervisor = self.supervisor, None
        if link is not None:
            assert self.selector is not None
            self.selector.unregister(link.sock)
            link.stop()  # it kills and reaps its runners before it exits
        self.handles.all_exited()
        for runner in self.runners:
            if runner is not None:
                self._close_runner(runner)
        self._close_descriptors()
        # No supervisor will start again: let go of the initializer's
        # arguments (a multiprocessing Queue, say) now, not at the next GC.
        self.config = dataclasses.replace(self.config, initializer=None, initargs=())

    def _close_descriptors(self) -> None:
        if self.selector is not None:
            self.selector.close()
        if self.waker is not None:
            self.waker.close()
        if self.words_fd >= 0:
            os.close(self.words_fd)
            self.words_fd = -1
        if self.pool.words is not None:
            self.pool.words.close()
            self.pool.words = None

    def _crash(self, why: BaseException) -> None:
        error = BrokenProcessPool(f"the cancelk manager thread failed: {why!r}")
        error.__cause__ = why
        out: list[Completion] = []
        with self.lock.rlock:
            self.pool.break_pool(error, out)
            for slot in self.pool.slots:
                for job in slot.jobs:
                    out.append(functools.partial(fail, job.future, error))
            link, self.supervisor = self.supervisor, None
            if link is not None:
                # Its runners follow it (parent-death signal); their trees
                # are killed too so nothing a job started survives.
                _kill.kill_child(link.process.pid)
                link.process.reap()
            for runner in self.runners:
                if runner is not None:
                    runner.kill_orphaned()
            self.handles.all_exited()
        run_completions(out)

    def abandon(self) -> None:
        """In a forked child: drop the parent's descriptors without touching
        its processes, and without a lock (its holder may be a lost thread)."""
        for link in (self.supervisor, *self.runners):
            if link is not None:
                link.abandon()
        if self.waker is not None:
            self.waker.abandon()
            self.waker = None
        close_quietly(self.words_fd)
        self.words_fd = -1
        if self.pool.words is not None:
            self.pool.words.close()  # unmaps the child's view only
            self.pool.words = None


def run_completions(out: list[Completion], on_manager_thread: bool | None = None) -> None:
    """Run them, then let go: the manager must not hold the last result (a
    100 MB one, say) while it waits for the next event.

    A done-callback of the user's may raise anything (the stdlib passes only
    an Exception's to the log): on the manager thread that is logged, since
    no signal can raise there; on a caller's thread a KeyboardInterrupt
    still reaches the caller, once every future has been settled."""
    if not out:
        return
    if on_manager_thread is None:
        on_manager_thread = isinstance(threading.current_thread(), ManagerThread)
    try:
        for index, complete in enumerate(out):
            try:
                complete()
            except Exception:
                log.exception("cancelk: settling a future failed")
            except BaseException:
                if on_manager_thread:
                    log.exception("cancelk: settling a future raised")
                    continue
                run_completions(out[index + 1 :])  # every future still ends
                raise
    finally:
        out.clear()
