"""The user process's ends of its streams: non-blocking, usable from any thread.

    SendQueue       bytes for one socket, sent in order without ever blocking;
                    whatever does not fit waits for the manager thread
    RunnerLink      one runner: its channel (SendQueue + FrameReader) and pidfd
    SupervisorLink  the supervisor: its process handle and control socket
    Waker           the pipe that ends the manager thread's select()

Each of them may be used from a thread or a signal handler while the manager
thread closes it, so each guards its descriptor with a lock that users only
*try* to take: a descriptor is closed exactly once, never used after that,
and a signal handler that interrupts its own thread inside one of these never
waits for itself.  Whoever cannot take the lock leaves the work to the
manager thread.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque

from cancelk import _kill, _protocol, _wire
from cancelk.supervisor import SupervisorProcess


class SendQueue:
    """Bytes queued for one socket; ``push`` and ``flush`` never block."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._chunks: deque[memoryview] = deque()
        self._sending = threading.Lock()
        self._closed = False

    def push(self, chunk: bytes) -> bool:
        """Queue the chunk and send what fits; True when nothing is left."""
        rest: bytes | memoryview = chunk
        if not self._chunks and self._sending.acquire(blocking=False):
            # Nothing queued ahead of it (the usual job): send it straight away.
            try:
                if self._closed:
                    return True
                if not self._chunks:
                    sent = self.sock.send(chunk)
                    if sent == len(chunk):
                        return True
                    rest = memoryview(chunk)[sent:]  # queued below
            except BlockingIOError:
                pass
            except OSError:
                return True  # the peer is gone; its death is reported elsewhere
            finally:
                self._sending.release()
        self._chunks.append(memoryview(rest))
        return self.flush()

    def flush(self) -> bool:
        """Send what fits; True when nothing is left.  False also when another
        thread is sending: it may have finished before our bytes arrived, so
        the caller must then wake the manager thread."""
        if not self._sending.acquire(blocking=False):
            return False
        try:
            return self._send_queued()
        finally:
            self._sending.release()

    def _send_queued(self) -> bool:
        while self._chunks and not self._closed:
            view = self._chunks[0]
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                return False
            except OSError:
                self._chunks.clear()  # the peer is gone; its death is reported elsewhere
                return True
            if sent < len(view):
                self._chunks[0] = view[sent:]
            else:
                self._chunks.popleft()
        return True

    def pending(self) -> bool:
        return bool(self._chunks) and not self._closed

    def send_all_blocking(self) -> None:
        """At shutdown: everything queued, however long the peer takes."""
        with self._sending:
            if self._closed:
                return
            self.sock.setblocking(True)
            try:
                while self._chunks:
                    self.sock.sendall(self._chunks.popleft())
            except OSError:
                self._chunks.clear()
            finally:
                self.sock.setblocking(False)

    def close(self) -> None:
        with self._sending:
            if not self._closed:
                self._closed = True
                self._chunks.clear()
                self.sock.close()

    def abandon(self) -> None:
        """In a forked child: close without the lock a lost thread may hold."""
        self._closed = True
        self._chunks.clear()
        close_quietly(self.sock.detach())


class RunnerLink:
    """The user process's end of one runner: its channel and its pidfd."""

    def __init__(self, slot: int, runner_id: int, pid: int, channel_fd: int, pidfd: int) -> None:
        self.slot = slot
        self.runner_id = runner_id
        self.pid = pid
        sock = socket.socket(fileno=channel_fd)
        sock.setblocking(False)
        self.sock = sock
        self.outbox = SendQueue(sock)
        self.reader = _wire.FrameReader()
        self.write_wanted = False  # registered for EVENT_WRITE in the selector
        self._pidfd = pidfd  # -1 where the OS has no pidfds
        self._pidfd_lock = threading.Lock()

    def kill_now(self) -> bool:
        """SIGKILL the runner's group from here (its pidfd proves it is
        still unreaped); False if the supervisor must do it."""
        if not self._pidfd_lock.acquire(blocking=False):
            return False  # being closed, or in use
        try:
            return self._pidfd >= 0 and _kill.kill_by_pidfd(self._pidfd, self.pid)
        finally:
            self._pidfd_lock.release()

    def kill_orphaned(self) -> None:
        """The supervisor died: make sure the runner's tree goes too."""
        with self._pidfd_lock:
            _kill.kill_orphaned_runner(self.pid, self._pidfd)

    def close(self) -> None:
        self.outbox.close()
        with self._pidfd_lock:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

    def abandon(self) -> None:
        """In a forked child: close without the locks a lost thread may hold."""
        self.outbox.abandon()
        close_quietly(self._pidfd)
        self._pidfd = -1


class SupervisorLink:
    """The user process's end of its supervisor: process handle and control socket."""

    def __init__(self, process: SupervisorProcess) -> None:
        self.process = process
        process.ctrl.setblocking(False)
        self.sock = process.ctrl
        self.outbox = SendQueue(process.ctrl)
        self.reader = _wire.FrameReader()
        self.received_fds: deque[int] = deque()  # until their RunnerStarted is read
        self.write_wanted = False

    def close(self) -> None:
        self.outbox.close()
        while self.received_fds:
            os.close(self.received_fds.popleft())

    def abandon(self) -> None:
        """In a forked child: close without the lock a lost thread may hold."""
        self.outbox.abandon()
        while self.received_fds:
            close_quietly(self.received_fds.popleft())

    def stop(self) -> None:
        """Ask it to stop every runner and exit, and wait until it has."""
        self.outbox.push(_protocol.encode(_protocol.Shutdown()))
        self.outbox.send_all_blocking()
        self.process.reap()
        self.close()


class Waker:
    """A self-pipe: any thread or signal handler ends the manager's select()."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        # Held while writing and while closing, so that no wake writes to a
        # descriptor number that is closed and maybe reused.  Never waited
        # for by a wake: a signal handler may interrupt a wake in its own
        # thread, and the manager thread wakes itself while holding the pool's
        # lock, which such a handler may be waiting for.
        self._lock = threading.Lock()
        self._again = False  # a wake found the lock held: its holder writes once more

    def wake(self) -> None:
        self._again = True
        while self._again and self._lock.acquire(blocking=False):
            self._again = False
            try:
                if self._write_fd >= 0:
                    os.write(self._write_fd, b"\0")
            except OSError:
                pass  # full: the manager is awake already
            finally:
                self._lock.release()
            # A wake that found the lock held set _again before this check,
            # so its news is written by this loop, after the manager may have
            # read the byte just written.

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self.abandon()

    def abandon(self) -> None:
        """Close; without the lock only in a forked child, where nobody else runs."""
        fds = self._write_fd, self.read_fd
        self.read_fd = self._write_fd = -1  # first: a reentrant wake then writes nothing
        for fd in fds:
            close_quietly(fd)


def close_quietly(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass
