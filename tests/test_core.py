"""The C process core through its typed wrapper, cancelk._core, on both backends."""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import pathlib
import re
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from cancelk import _core

import procs

MS = 1_000_000
LINUX = sys.platform.startswith("linux")
linux_only = pytest.mark.skipif(not LINUX, reason="Linux-only facility (prctl, /proc)")
CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
needs_csrc = pytest.mark.skipif(
    not (CSRC / "cancelk.h").is_file(), reason="csrc/ is not beside tests/ (a wheel's test run)"
)


def spawn(*argv: str, group: bool = False) -> int:
    """Start a process without a Popen object: its pid is ours to reap."""
    kwargs = {"setpgroup": 0} if group else {}
    return os.posix_spawnp(argv[0], list(argv), os.environ, **kwargs)


@pytest.fixture
def children():
    """Pids the test starts; whatever is left is killed and reaped (a pid is
    only signalled while it is our unreaped child, so never a reused one)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                continue  # it had ended: reaped just now
        except ChildProcessError:
            continue  # the test reaped it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.fixture
def loop(backend):
    lp = _core.Loop()
    assert lp.backend == backend
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fds = {"r": r, "w": w}
    yield fds
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


def elapsed_since(start_ns: int) -> float:
    return (_core.monotonic_ns() - start_ns) / 1e9


def run_python(code: str, timeout: float = 30) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# --------------------------------------------------------------------------
# backend selection


class TestBackendSelection:
    def test_environment_chooses(self, monkeypatch):
        monkeypatch.setenv("CANCELK_BACKEND", "posix")
        assert _core.selected_backend() == "posix"
        assert _core.Loop().backend == "posix"
        monkeypatch.setenv("CANCELK_BACKEND", " POSIX ")
        assert _core.selected_backend() == "posix"

    def test_default_prefers_pidfd(self, monkeypatch):
        monkeypatch.delenv("CANCELK_BACKEND", raising=False)
        expected = "pidfd" if _core._PIDFD_SUPPORTED else "posix"
        assert _core.selected_backend() == expected

    def test_unknown_name_in_environment(self, monkeypatch):
        monkeypatch.setenv("CANCELK_BACKEND", "kqueue-please")
        with pytest.raises(ValueError, match="kqueue-please"):
            _core.selected_backend()

    def test_unknown_name_for_loop(self):
        # Loop("bogus") must not quietly build a posix loop that calls itself "bogus".
        with pytest.raises(ValueError, match="bogus"):
            _core.Loop("bogus")

    def test_monotonic_clock_is_pythons(self):
        assert abs(_core.monotonic_ns() - time.monotonic_ns()) < 50 * MS


# --------------------------------------------------------------------------
# the loop


class TestLoop:
    def test_deadline(self, loop):
        start = _core.monotonic_ns()
        assert loop.wait(start + 100 * MS) == [_core.DEADLINE]
        assert 0.099 <= elapsed_since(start) < 1.0

    def test_deadline_in_the_past_returns_at_once(self, loop):
        start = _core.monotonic_ns()
        assert loop.wait(0) == [_core.DEADLINE]
        assert loop.wait(start - 10**9) == [_core.DEADLINE]
        assert elapsed_since(start) < 0.5

    def test_deadline_can_be_waited_again_and_moved(self, loop, pipe):
        loop.add_fd(pipe["r"], 1)
        start = _core.monotonic_ns()
        deadline = start + 50 * MS
        assert loop.wait(deadline) == [_core.DEADLINE]
        assert loop.wait(deadline) == [_core.DEADLINE]  # passed: at once, again
        later = _core.monotonic_ns() + 80 * MS
        assert loop.wait(later) == [_core.DEADLINE]
        assert _core.monotonic_ns() >= later
        # An fd event before the deadline, then the same deadline again.
        far = _core.monotonic_ns() + 150 * MS
        os.write(pipe["w"], b"x")
        assert loop.wait(far) == [1]
        os.read(pipe["r"], 1)
        assert loop.wait(far) == [_core.DEADLINE]
        assert _core.monotonic_ns() >= far

    def test_precise_deadline_is_never_early_and_still_sees_events(self, loop, pipe, children):
        """precise=True sleeps until WAKE_AHEAD_NS before the deadline, then
        polls: the deadline token never comes before the deadline, an fd
        ready meanwhile (or already) is reported, a child's exit too."""
        loop.add_fd(pipe["r"], 1)
        for offset in (50 * MS, _core.WAKE_AHEAD_NS // 2, 0):
            deadline = _core.monotonic_ns() + offset
            assert loop.wait(deadline, precise=True) == [_core.DEADLINE]
            assert _core.monotonic_ns() >= deadline
        os.write(pipe["w"], b"x")  # ready from the start, in the polled stretch or not
        for offset in (50 * MS, _core.WAKE_AHEAD_NS // 2):
            assert loop.wait(_core.monotonic_ns() + offset, precise=True) == [1]
        os.read(pipe["r"], 1)
        pid = spawn("true")
        children.append(pid)
        loop.add_child(pid, 9)
        assert loop.wait(_core.monotonic_ns() + 10 * 1000 * MS, precise=True) == [9]

    def test_fd_readable(self, loop, pipe):
        loop.add_fd(pipe["r"], 7)
        start = _core.monotonic_ns()
        assert loop.wait(start + 30 * MS) == [_core.DEADLINE]
        os.write(pipe["w"], b"x")
        start = _core.monotonic_ns()
        assert loop.wait(start + 5 * 10**9) == [7]
        assert elapsed_since(start) < 0.5
        # Level-triggered: still readable until read.
        assert loop.wait(_core.monotonic_ns() + 5 * 10**9) == [7]
        os.read(pipe["r"], 1)
        assert loop.wait(_core.monotonic_ns() + 30 * MS) == [_core.DEADLINE]

    def test_fd_hangup_counts_as_ready(self, loop, pipe):
        loop.add_fd(pipe["r"], 2)
        os.close(pipe.pop("w"))
        assert loop.wait(_core.monotonic_ns() + 5 * 10**9) == [2]

    def test_removed_fd_is_not_reported(self, loop, pipe):
        loop.add_fd(pipe["r"], 3)
        loop.remove_fd(pipe["r"])
        os.write(pipe["w"], b"x")
        assert loop.wait(_core.monotonic_ns() + 30 * MS) == [_core.DEADLINE]

    def test_child_exit(self, loop, children):
        start = _core.monotonic_ns()
        pid = spawn("sleep", "0.1")
        children.append(pid)
        loop.add_child(pid, 5)
        assert loop.wait(start + 10 * 10**9) == [5]
        assert 0.1 <= elapsed_since(start) < 2.0
        # Reported, but left unreaped so the pid (and its group) stay ours.
        assert _core.has_exited(pid)
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        status = _core.reap(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert not psutil.pid_exists(pid)

    def test_killed_child(self, loop, children):
        pid = spawn("sleep", "30")
        children.append(pid)
        loop.add_child(pid, 9)
        assert loop.wait(_core.monotonic_ns() + 50 * MS) == [_core.DEADLINE]
        assert _core.reap(pid, block=False) is None
        assert not _core.has_exited(pid)
        assert _core.kill_pid(pid, signal.SIGKILL)
        start = _core.monotonic_ns()
        assert loop.wait(start + 10 * 10**9) == [9]
        assert elapsed_since(start) < 1.0
        status = _core.reap(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert not _core.kill_pid(pid, signal.SIGKILL)  # gone: False, no error

    def test_children_and_fds_together(self, loop, children, pipe):
        first, second = spawn("sleep", "30"), spawn("sleep", "30")
        children.extend([first, second])
        loop.add_child(first, 1)
        loop.add_child(second, 2)
        loop.add_fd(pipe["r"], 3)
        os.write(pipe["w"], b"x")
        assert loop.wait(_core.monotonic_ns() + 5 * 10**9) == [3]
        os.read(pipe["r"], 1)
        os.kill(second, signal.SIGKILL)
        assert loop.wait(_core.monotonic_ns() + 5 * 10**9) == [2]
        loop.remove_child(second)
        _core.reap(second)
        os.kill(first, signal.SIGKILL)
        assert loop.wait(_core.monotonic_ns() + 5 * 10**9) == [1]
        _core.reap(first)

    def test_removed_child_is_not_reported(self, loop, children):
        pid = spawn("sleep", "0")
        children.append(pid)
        loop.add_child(pid, 4)
        loop.remove_child(pid)
        assert loop.wait(_core.monotonic_ns() + 200 * MS) == [_core.DEADLINE]

    def test_signal_interrupts_wait(self, loop):
        received = []
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
        pid = spawn("sh", "-c", f"sleep 0.1; kill -USR1 {os.getpid()}")
        try:
            start = _core.monotonic_ns()
            assert loop.wait(start + 10 * 10**9) == []  # empty: interrupted
            assert elapsed_since(start) < 5
        finally:
            os.waitpid(pid, 0)
            signal.signal(signal.SIGUSR1, previous)
        assert received == [signal.SIGUSR1]

    def test_close_twice(self, backend):
        lp = _core.Loop()
        lp.close()
        lp.close()
        assert lp._handle is None

    @linux_only
    def test_loops_do_not_leak_fds(self, backend):
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            lp = _core.Loop()
            lp.wait(0)
            lp.close()
        assert len(os.listdir("/proc/self/fd")) == before


class TestLoopErrors:
    def test_bad_fd(self, loop):
        with pytest.raises(OSError) as info:
            loop.add_fd(-1, 0)
        assert info.value.errno == errno.EINVAL

    def test_negative_token(self, loop, pipe):
        with pytest.raises(OSError) as info:
            loop.add_fd(pipe["r"], -2)
        assert info.value.errno == errno.EINVAL

    def test_remove_unknown(self, loop, pipe):
        with pytest.raises(OSError) as info:
            loop.remove_fd(pipe["r"])
        assert info.value.errno == errno.ENOENT
        with pytest.raises(OSError) as info:
            loop.remove_child(os.getpid())
        assert info.value.errno == errno.ENOENT

    @pytest.mark.parametrize("pid", [0, -1])
    def test_bad_child_pid(self, loop, pid):
        with pytest.raises(OSError) as info:
            loop.add_child(pid, 0)
        assert info.value.errno == errno.EINVAL
        assert f"watching child {pid}" in str(info.value)

    def test_posix_watching_a_process_that_is_not_our_child(self):
        # Our parent runs on and is not ours to wait for: the posix loop must
        # say so (ECHILD), not report it as exited.
        lp = _core.Loop("posix")
        try:
            with pytest.raises(OSError) as info:
                lp.add_child(os.getppid(), 0)
                tokens = lp.wait(_core.monotonic_ns() + 100 * MS)
                pytest.fail(f"watching a live non-child gave {tokens}, no error")
            assert info.value.errno == errno.ECHILD
        finally:
            lp.close()

    def test_pidfd_watching_a_process_that_does_not_exist(self):
        if not _core._PIDFD_SUPPORTED:
            pytest.skip("this kernel does not offer pidfd_open(2)")
        pid = spawn("true")
        os.waitpid(pid, 0)
        lp = _core.Loop("pidfd")
        try:
            with pytest.raises(OSError) as info:
                lp.add_child(pid, 0)
            assert info.value.errno == errno.ESRCH
            assert f"pidfd_open(), watching child {pid} for token 0: " in str(info.value)
        finally:
            lp.close()

    def test_pidfd_open_bad_pid(self):
        if not _core._PIDFD_SUPPORTED:
            pytest.skip("this kernel does not offer pidfd_open(2)")
        with pytest.raises(OSError) as info:
            _core.pidfd_open(-1)
        assert info.value.errno == errno.EINVAL
        assert "pidfd_open(-1)" in str(info.value)
        fd = _core.pidfd_open(os.getpid())
        assert fd >= 0
        os.close(fd)


class TestPidfdGroupSignal:
    """pidfd_signal_group: the group a pidfd's process leads, matched by the
    pidfd's own pid (Linux 6.9+; None where the kernel cannot)."""

    @staticmethod
    def _group_with_member(tmp_path, children, *, leader_waits: bool):
        """A shell leading its own group, with a ``sleep`` in that group;
        (leader pid, member pid, pipe end that ends the leader when closed)."""
        member_file = tmp_path / "member"
        hold_r, hold_w = os.pipe()
        script = f"sleep 60 & echo $! > {member_file}; " + (
            "read x; wait" if leader_waits else "read x"
        )
        leader = os.posix_spawnp(
            "sh",
            ["sh", "-c", script],
            os.environ,
            setpgroup=0,
            file_actions=[(os.POSIX_SPAWN_DUP2, hold_r, 0)],
        )
        os.close(hold_r)
        children.append(leader)
        deadline = time.monotonic() + 10
        while not member_file.is_file() or not member_file.read_text().strip():
            assert time.monotonic() < deadline, "the group's member never started"
            time.sleep(0.01)
        member = int(member_file.read_text())
        return leader, member, hold_w

    @pytest.fixture
    def strays(self):
        """pidfds of processes the test started that are not its children:
        each is SIGKILLed at the end, failed test or not (a pidfd never
        reaches a recycled pid)."""
        fds: list[int] = []
        yield fds
        for fd in fds:
            try:
                _core.pidfd_kill(fd, signal.SIGKILL)
            finally:
                os.close(fd)

    @pytest.fixture
    def group_signal(self):
        if not _core._PIDFD_SUPPORTED:
            pytest.skip("this kernel does not offer pidfd_open(2)")
        fd = _core.pidfd_open(os.getpid())
        try:
            if _core.pidfd_signal_group(fd, 0) is None:
                pytest.skip("this kernel does not signal a group through a pidfd (< 6.9)")
        finally:
            os.close(fd)

    @pytest.mark.timeout(30)
    def test_kills_the_leader_and_its_group(self, group_signal, tmp_path, children, strays):
        leader, member, hold = self._group_with_member(tmp_path, children, leader_waits=True)
        strays.append(_core.pidfd_open(member))
        fd = _core.pidfd_open(leader)
        try:
            assert _core.pidfd_signal_group(fd, signal.SIGKILL) is True
            _, status = os.waitpid(leader, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            psutil.wait_procs([psutil.Process(member)] if psutil.pid_exists(member) else [], 5)
            assert not psutil.pid_exists(member) or psutil.Process(member).status() == "zombie"
        finally:
            os.close(fd)
            os.close(hold)

    @pytest.mark.timeout(30)
    def test_reaches_the_group_after_its_leader_was_reaped(
        self, group_signal, tmp_path, children, strays
    ):
        leader, member, hold = self._group_with_member(tmp_path, children, leader_waits=False)
        strays.append(_core.pidfd_open(member))
        fd = _core.pidfd_open(leader)
        try:
            os.close(hold)  # the leader reads EOF and exits; its member stays in the group
            os.waitpid(leader, 0)
            assert psutil.Process(member).status() != "zombie"
            assert os.getpgid(member) == leader
            assert _core.pidfd_signal_group(fd, signal.SIGKILL) is True
            _gone, alive = psutil.wait_procs([psutil.Process(member)], 5)
            assert not alive
            assert _core.pidfd_signal_group(fd, signal.SIGKILL) is False  # nobody left
        finally:
            os.close(fd)


class TestLoopFailuresNameTheCall:
    """A failed step of the C loop raises OSError naming its system call and
    what the loop was doing, with the call's errno."""

    def test_each_step_has_a_message(self):
        from cancelk._cancelk_core import lib

        steps = [getattr(lib, name) for name in dir(lib) if name.startswith("CANCELK_STEP_")]
        assert len(steps) == len(set(steps))  # one number, one step
        tables = (_core._LOOP_STEPS, _core._JOB_STEPS, _core._TABLE_STEPS)
        assert sum(map(len, tables)) == len(set().union(*tables))  # disjoint
        assert set().union(*tables) == set(steps)

    def test_the_backends_own_call(self, loop, pipe, children):
        if loop.backend == "pidfd":
            closed = pipe.pop("w")
            os.close(closed)
            with pytest.raises(OSError) as info:
                loop.add_fd(closed, 3)
            assert info.value.errno == errno.EBADF
            assert f"epoll_ctl(EPOLL_CTL_ADD) of fd {closed} for token 3: " in str(info.value)
        else:
            parent = os.getppid()  # not our child: waitid says ECHILD
            with pytest.raises(OSError) as info:
                loop.add_child(parent, 3)
            assert info.value.errno == errno.ECHILD
            expected = f"waitid(WEXITED | WNOHANG | WNOWAIT), watching child {parent} for token 3: "
            assert expected in str(info.value)
        # The failed call left the loop as it was.
        pid = spawn("true")
        children.append(pid)
        loop.add_child(pid, 4)
        assert loop.wait(_core.monotonic_ns() + 5 * 10**9) == [4]

    def test_unknown_fd_or_child(self, loop, pipe):
        with pytest.raises(OSError) as info:
            loop.remove_fd(pipe["r"])
        assert f"unwatching fd {pipe['r']}: not watched by this loop" in str(info.value)
        with pytest.raises(OSError) as info:
            loop.remove_child(os.getpid())
        assert f"unwatching child {os.getpid()}: not watched by this loop" in str(info.value)

    def test_bad_argument(self, loop):
        with pytest.raises(OSError) as info:
            loop.add_fd(-1, 5)
        assert info.value.errno == errno.EINVAL
        assert "watching fd -1 for token 5: argument out of range" in str(info.value)

    @linux_only
    def test_creating_a_pidfd_loop_names_the_call_out_of_descriptors(self):
        if not _core._PIDFD_SUPPORTED:
            pytest.skip("this kernel does not offer pidfd_open(2)")
        # No fd left: epoll_create1 fails.  One left: the epoll fd takes it,
        # then timerfd_create fails, and the loop closes its epoll fd again.
        out = run_python(
            """
            import errno, os, resource
            from cancelk import _core
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
            held = []
            try:
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE

            def create(backend):
                try:
                    _core.Loop(backend).close()
                except OSError as exc:
                    return f"{errno.errorcode[exc.errno]} {exc.strerror}"
                return "created"

            print(create("pidfd"))
            os.close(held.pop())
            print(create("pidfd"))
            print(create("pidfd"))  # the first attempt's epoll fd was closed
            print(create("posix"))  # needs no fd
            os.close(held.pop())
            print(create("pidfd"))
            """
        )
        assert out.splitlines() == [
            "EMFILE epoll_create1(EPOLL_CLOEXEC), creating a pidfd loop: Too many open files",
            "EMFILE timerfd_create(CLOCK_MONOTONIC) for the deadline, creating a pidfd loop:"
            " Too many open files",
            "EMFILE timerfd_create(CLOCK_MONOTONIC) for the deadline, creating a pidfd loop:"
            " Too many open files",
            "created",
            "created",
        ]

    @linux_only
    def test_posix_wait_names_ppoll(self):
        # ppoll(2) refuses more fds than RLIMIT_NOFILE allows (EINVAL).
        out = run_python(
            """
            import errno, os, resource
            from cancelk import _core
            r, w = os.pipe()
            loop = _core.Loop("posix")
            for token in range(40):
                loop.add_fd(r, token)
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))
            try:
                print(loop.wait(None))
            except OSError as exc:
                print(errno.errorcode[exc.errno], exc.strerror)
            """
        )
        assert out == (
            "EINVAL ppoll() of the watched fds, waiting with no deadline: Invalid argument"
        )

    def test_a_child_reaped_by_someone_else_counts_as_exited(self, loop, children):
        pid = spawn("sleep", "30")
        children.append(pid)
        loop.add_child(pid, 6)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # gone for good: no pid left to ask about
        assert loop.wait(_core.monotonic_ns() + 5 * 10**9) == [6]


# --------------------------------------------------------------------------
# process operations


class TestProcessOperations:
    def test_kill_group_reaches_the_whole_group(self, children):
        pid = spawn("sh", "-c", "sleep 30 & sleep 30 & wait", group=True)
        children.append(pid)
        leader = psutil.Process(pid)
        deadline = time.monotonic() + 10
        while len(leader.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        members = [(p.pid, p.create_time()) for p in leader.children()]
        assert len(members) == 2
        assert all(os.getpgid(member) == pid for member, _ in members)
        assert _core.kill_group(pid, signal.SIGKILL)
        status = _core.reap(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert not procs.wait_gone(members, orphaned_zombies_ok=True)

    def test_kill_group_of_nobody(self, children):
        pid = spawn("true", group=True)
        os.waitpid(pid, 0)
        assert _core.kill_group(pid, signal.SIGKILL) is False

    @pytest.mark.parametrize("pgid", [1, 0, -5])
    def test_kill_group_refuses_everybody(self, pgid):
        with pytest.raises(OSError) as info:
            _core.kill_group(pgid, signal.SIGKILL)
        assert info.value.errno == errno.EINVAL

    @pytest.mark.parametrize("pid", [0, -1])
    def test_kill_pid_refuses_groups(self, pid):
        with pytest.raises(OSError) as info:
            _core.kill_pid(pid, 0)
        assert info.value.errno == errno.EINVAL

    def test_reap_and_has_exited_need_our_child(self):
        with pytest.raises(OSError) as info:
            _core.reap(os.getppid())
        assert info.value.errno == errno.ECHILD
        with pytest.raises(OSError) as info:
            _core.has_exited(os.getppid())
        assert info.value.errno == errno.ECHILD

    @linux_only
    def test_parent_death_signal(self):
        # middle forks a grandchild that asks for SIGKILL when middle dies.
        out = run_python(
            """
            import os, signal, sys, time
            from cancelk import _core
            r, w = os.pipe()
            middle = os.getpid()
            pid = os.fork()
            if pid == 0:
                assert _core.die_with_parent(middle) is True
                os.write(w, b"x")
                time.sleep(30)
                os._exit(0)
            os.read(r, 1)
            import psutil
            print(pid, psutil.Process(pid).create_time())
            """
        )
        pid, created = out.split()
        assert not procs.wait_gone(
            [(int(pid), float(created))], timeout=3, orphaned_zombies_ok=True
        )

    @linux_only
    def test_child_subreaper(self):
        out = run_python(
            """
            import os, subprocess, psutil
            from cancelk import _core
            assert _core.set_child_subreaper()
            sh = subprocess.run(
                ["sh", "-c", "sleep 30 </dev/null >/dev/null 2>&1 & echo $!"],
                capture_output=True, text=True,
            )
            orphan = int(sh.stdout)
            print(psutil.Process(orphan).ppid() == os.getpid())
            os.kill(orphan, 9)
            os.waitpid(orphan, 0)
            """
        )
        assert out == "True"

    def test_become_group_leader(self):
        out = run_python(
            """
            import os
            from cancelk import _core
            _core.become_group_leader()
            print(os.getpgid(0) == os.getpid())
            """
        )
        assert out == "True"

    def test_become_job_process_sets_up_a_forked_child(self):
        """One C call: group leader, subreaper and parent-death signal (Linux);
        the Python side forgets the parent's handlers and wakeup fd."""
        out = run_python(
            """
            import ctypes, os, signal, sys
            from cancelk import _child, _core
            signal.signal(signal.SIGUSR1, lambda signum, frame: None)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            r, w = os.pipe()
            os.set_blocking(w, False)
            signal.set_wakeup_fd(w)
            parent = os.getpid()
            report_r, report_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                handled, ignored = _core.become_job_process(parent)
                _child.become_job_process(parent)  # twice: it is idempotent
                facts = [
                    handled >> (signal.SIGUSR1 - 1) & 1,
                    ignored >> (signal.SIGUSR2 - 1) & 1,
                    ignored >> (signal.SIGINT - 1) & 1,
                    os.getpgid(0) == os.getpid(),
                    signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
                    signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN,
                    signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                    signal.set_wakeup_fd(-1) == -1,
                ]
                if sys.platform.startswith("linux"):
                    libc = ctypes.CDLL(None, use_errno=True)
                    value = ctypes.c_int()
                    libc.prctl(2, ctypes.byref(value))  # PR_GET_PDEATHSIG
                    facts.append(value.value == signal.SIGRTMAX - 2)
                    libc.prctl(37, ctypes.byref(value))  # PR_GET_CHILD_SUBREAPER
                    facts.append(value.value == 1)
                os.write(report_w, repr([int(fact) for fact in facts]).encode())
                os._exit(0)
            os.close(report_w)
            print(os.read(report_r, 1000).decode())
            os.waitpid(pid, 0)
            """
        )
        facts = eval(out)
        assert len(facts) >= 8 and all(facts), facts


# --------------------------------------------------------------------------
# shared words


@pytest.fixture
def shared():
    # MAP_SHARED | MAP_ANONYMOUS; not closed explicitly: SharedWords keeps a
    # buffer export (cffi from_buffer) for its lifetime, and mmap.close()
    # refuses to run while one exists.
    buf = mmap.mmap(-1, mmap.PAGESIZE)
    return buf, _core.SharedWords(buf, 4)


def _cas_increments(buf, index, count):
    words = _core.SharedWords(buf, 4)
    done = 0
    while done < count:
        seen = words.load(index)
        if words.cas(index, seen, seen + 1):
            done += 1


class TestSharedWords:
    def test_load_store_cas(self, shared):
        _, words = shared
        assert [words.load(i) for i in range(4)] == [0, 0, 0, 0]
        words.store(1, -5)
        assert words.load(1) == -5
        assert words.cas(1, -5, 7) is True
        assert words.cas(1, -5, 9) is False
        assert words.load(1) == 7
        for value in (2**63 - 1, -(2**63)):
            words.store(3, value)
            assert words.load(3) == value

    @pytest.mark.parametrize("index", [4, -1])
    def test_index_checked(self, shared, index):
        _, words = shared
        with pytest.raises(IndexError):
            words.load(index)

    def test_buffer_too_small(self):
        buf = bytearray(16)
        with pytest.raises(ValueError, match="need 3"):
            _core.SharedWords(buf, 3)

    def test_read_only_buffer_refused(self):
        with pytest.raises((TypeError, BufferError)):
            _core.SharedWords(bytes(64), 2)

    @pytest.mark.timeout(60)
    def test_cas_is_atomic_across_processes(self, shared):
        buf, words = shared
        count = 20_000
        ctx = multiprocessing.get_context("fork")
        workers = [ctx.Process(target=_cas_increments, args=(buf, 2, count)) for _ in range(2)]
        for proc in workers:
            proc.start()
        try:
            _cas_increments(buf, 2, count)
        finally:
            for proc in workers:
                proc.join(30)
        assert [proc.exitcode for proc in workers] == [0, 0]
        assert words.load(2) == 3 * count


def test_signal_dispositions_report_handlers_and_ignored_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        handled, ignored = map(_core.signals_in, _core.signal_dispositions())
        assert signal.SIGUSR1 in handled and signal.SIGUSR1 not in ignored
        assert signal.SIGUSR2 in ignored and signal.SIGUSR2 not in handled
        assert signal.SIGINT in handled  # Python's KeyboardInterrupt handler
        assert signal.SIGKILL not in handled + ignored
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        handled, ignored = map(_core.signals_in, _core.signal_dispositions())
        assert signal.SIGUSR1 not in handled + ignored
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------
# the cffi declarations come from cancelk.h


def _header_declarations() -> tuple[set[str], dict[str, int]]:
    """(function names, integer constants) that cancelk.h declares, read
    from the header itself with no help from the build script."""
    text = re.sub(r"/\*.*?\*/", " ", (CSRC / "cancelk.h").read_text(), flags=re.DOTALL)
    functions = set(re.findall(r"\b(cancelk_\w+)\s*\(", text))
    constants = {
        name: int(value)
        for name, value in re.findall(r"^#define\s+(CANCELK_\w+)\s+\(?(-?\d+)\)?", text, re.M)
    }
    return functions, constants


def _cdef_declarations(cdef: str) -> tuple[set[str], dict[str, int]]:
    """(function names, integer constants) in a cdef, the functions found by
    a C parser (pycparser, which cffi itself uses)."""
    c_parser = pytest.importorskip("pycparser.c_parser")
    c_ast = pytest.importorskip("pycparser.c_ast")
    constants = {
        name: int(value) for name, value in re.findall(r"^#define (\w+) (-?\d+)$", cdef, re.M)
    }
    code = "\n".join(line for line in cdef.splitlines() if not line.startswith("#"))
    prelude = (
        "typedef long long int64_t; typedef unsigned long long uint64_t;"
        " typedef unsigned long size_t;\n"
    )
    unit = c_parser.CParser().parse(prelude + code)
    functions = {
        node.name
        for node in unit.ext
        if isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.FuncDecl)
    }
    return functions, constants


@pytest.fixture(scope="module")
def build_script():
    return runpy.run_path(str(CSRC / "build_cancelk.py"))


@needs_csrc
class TestDeclarationsFromTheHeader:
    def test_cdef_declares_what_the_header_declares(self, build_script):
        cdef = build_script["cdef_from_header"]((CSRC / "cancelk.h").read_text())
        header_functions, header_constants = _header_declarations()
        cdef_functions, cdef_constants = _cdef_declarations(cdef)
        assert "cancelk_loop_wait" in header_functions  # the header parse found something
        assert cdef_functions == header_functions
        assert cdef_constants == header_constants
        assert cdef_constants["CANCELK_TOKEN_DEADLINE"] == -1  # "(-1)" in the header

    def test_the_built_module_has_every_header_declaration(self):
        from cancelk._cancelk_core import lib

        functions, constants = _header_declarations()
        assert sorted(name for name in functions if not hasattr(lib, name)) == []
        assert {name: getattr(lib, name) for name in constants} == constants

    def test_private_loop_header_stays_out(self, build_script):
        cdef = build_script["cdef_from_header"]((CSRC / "cancelk.h").read_text())
        assert "loop_backend.h" not in (CSRC / "cancelk.h").read_text()
        for private in ("loop_ops", "watched_fd", "watched_child", "loop_reserve"):
            assert private not in cdef

    @pytest.mark.parametrize(
        "line",
        ["#define CANCELK_FLAGS (1 << 2)", "#ifdef __linux__", "#define CANCELK_MAX(a, b) a"],
    )
    def test_what_cffi_cannot_take_stops_the_build(self, build_script, line):
        with pytest.raises(ValueError, match=re.escape(line.split()[1])):
            build_script["cdef_from_header"](f"int cancelk_x(void);\n{line}\n")
