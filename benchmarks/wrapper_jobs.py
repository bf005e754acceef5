"""What runs inside the host worker of the killable_wrapper benchmark (P6 and P3).

The host is a stdlib ``ProcessPoolExecutor`` worker (wrapper_bench.py submits
these functions to it); everything here is timed there, not in the user process.

    jobs            noop, and four jobs a 50 ms time limit stops: (a) time.sleep,
                    (b) a pure-Python spin, (c) a C call holding the GIL (libc
                    ``sleep`` through ``ctypes.PyDLL``), (d) a ``sleep`` grandchild;
                    each reports its pids over a pipe
    time_calls_in_worker      N x noop(), N x killable_wrapper(noop) (the default:
                              a standby runs it), N x the same forked at the call
                              (killable_wrapper_fresh=True, the only way before),
                              N bare forks
    handoff_floor_in_worker   the floor under P6: a job handed to an idle copy of
                              this worker forked ahead of time (pickle, one
                              write, one read, both ways), nothing else
    timeout_trials_in_worker  killable_wrapper(job, timeout=50 ms): deadline ->
                              ProcessTimeoutError raised, -> every job process gone;
                              each trial followed by its floor: the same job,
                              through killable_wrapper with no limit, SIGKILLed
                              at the same age by a killer process of the
                              benchmark, SIGKILL -> every job process exited

A process counts as gone when it no longer exists *or is a zombie*: a zombie
runs nothing, and a reparented grandchild is reaped by init (or a subreaper) on
its own schedule, which is not the wrapper's doing.  killable_wrapper counts its
deadline from just before its fork, slightly after t0, so the figures are
pessimistic by that much.
"""

from __future__ import annotations

import ctypes
import math
import os
import pickle
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Union

from cancelk import ProcessDiedError, ProcessTimeoutError, killable_wrapper

try:
    from benchmarks import floor_host
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import floor_host  # type: ignore[no-redef]

__all__ = [
    "JOBS",
    "KINDS",
    "KIND_LABELS",
    "TIMEOUT_NS",
    "TIMEOUT_S",
    "handoff_floor_in_worker",
    "noop",
    "set_backend",
    "time_calls_in_worker",
    "timeout_trials_in_worker",
    "worker_facts",
]

TIMEOUT_S = 0.05
TIMEOUT_NS = 50_000_000
KILLED_JOB_S = 10.0  # long enough never to end on its own before the 50 ms deadline
GONE_LIMIT_NS = 5_000_000_000
KINDS = ("sleep", "spin", "gil_c_call", "grandchild")
KIND_LABELS = {
    "sleep": "(a) time.sleep",
    "spin": "(b) pure-Python spin",
    "gil_c_call": "(c) C call holding the GIL",
    "grandchild": "(d) sleep grandchild (Popen)",
}

Sample = Union[tuple[int, int], str]


# --------------------------------------------------------------------- jobs


def noop() -> None:
    """The job whose cost is nothing: what is measured is the machinery."""
    return None


def _report_pids(pid_fd: int, *pids: int) -> None:
    if pid_fd >= 0:
        os.write(pid_fd, (" ".join(map(str, pids)) + "\n").encode())


def sleep_job(pid_fd: int, seconds: float) -> None:
    _report_pids(pid_fd, os.getpid())
    time.sleep(seconds)


def spin_job(pid_fd: int, seconds: float) -> None:
    _report_pids(pid_fd, os.getpid())
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def gil_c_call_job(pid_fd: int, seconds: float) -> None:
    _report_pids(pid_fd, os.getpid())
    ctypes.PyDLL(None).sleep(math.ceil(seconds))  # PyDLL keeps the GIL during the call


def grandchild_job(pid_fd: int, seconds: float) -> None:
    child = subprocess.Popen(["sleep", str(seconds)])
    _report_pids(pid_fd, os.getpid(), child.pid)
    child.wait()


JOBS: dict[str, Callable[[int, float], None]] = {
    "sleep": sleep_job,
    "spin": spin_job,
    "gil_c_call": gil_c_call_job,
    "grandchild": grandchild_job,
}


# ------------------------------------------------------ in the host worker


def set_backend(backend: str) -> None:
    """Pool initializer: the backend every later killable_wrapper loop uses."""
    os.environ["CANCELK_BACKEND"] = backend


def worker_facts() -> dict[str, Any]:
    """What the host worker looks like; raises if the backend is unavailable."""
    from cancelk import _core, _standby

    if threading.active_count() > 1:
        start = "clean interpreter"
    elif _standby.wanted():
        start = "standby"
    else:
        start = "fork"
    return {
        "backend": _core.selected_backend(),
        "threads": threading.active_count(),
        "job_start": start,
        "rss_mb": (floor_host.rss() or 0) / 2**20 or None,
    }


def _fork_exit_reap() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)


# The pause before each P6 call: a pool worker waiting for its next task,
# long enough for the standby the last call used to be replaced (a fork, a
# teardown and a warm-up of a copy of the worker: 4.5 ms back to back for a
# 22 MB worker here, 6.7 ms for a 59 MB one).
GAP_S = 0.010


def time_calls_in_worker(calls: int, warmup: int) -> dict[str, list[int]]:
    """Per-call ns, each kind in a block of its own:

    direct / wrapped   noop() and killable_wrapper(noop), each pair after a
                       GAP_S pause (the worker waits for its next task, and the
                       standby used last is replaced meanwhile): P6 proper;
    back_to_back       killable_wrapper(noop) calls with nothing between them:
                       each waits for the standby the one before it used up to
                       be replaced (a fork and a warm-up, on the same cores);
    after_fork         killable_wrapper(noop) right after a fork and reap of
                       the worker: the worker's next write to each page it
                       shared with the child faults, whoever makes it;
    fresh              killable_wrapper(noop, killable_wrapper_fresh=True);
    fork_floor         a bare fork + _exit + waitpid of the worker.

    Timed apart because a fork between two calls makes the second pay for it
    (some 200 page faults here)."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        noop()
        killable_wrapper(noop)
        killable_wrapper(noop, killable_wrapper_fresh=True)
        _fork_exit_reap()
    direct: list[int] = []
    wrapped: list[int] = []
    for _ in range(calls):
        time.sleep(GAP_S)
        t = clock()
        noop()
        direct.append(clock() - t)
        t = clock()
        killable_wrapper(noop)
        wrapped.append(clock() - t)
    back_to_back = _timed(calls, lambda: killable_wrapper(noop))
    after_fork: list[int] = []
    for _ in range(calls // 2):
        _fork_exit_reap()
        time.sleep(GAP_S)
        t = clock()
        killable_wrapper(noop)
        after_fork.append(clock() - t)
    fresh = _timed(calls, lambda: killable_wrapper(noop, killable_wrapper_fresh=True))
    forked = _timed(calls, _fork_exit_reap)
    return {
        "direct": direct,
        "wrapped": wrapped,
        "back_to_back": back_to_back,
        "after_fork": after_fork,
        "fresh": fresh,
        "fork_floor": forked,
    }


def _timed(calls: int, call: Callable[[], object]) -> list[int]:
    clock = time.perf_counter_ns
    samples: list[int] = []
    for _ in range(calls):
        t = clock()
        call()
        samples.append(clock() - t)
    return samples


# Copies of the worker forked at once, each used for one floor trial: their
# forks are not timed, and the first trial after each batch is dropped (this
# worker's first write to each page it now shares with the batch faults).
_HANDOFF_BATCH = 20


def _warm_other() -> None:
    return None


def _serve_one_job(channel: int, others: Sequence[int]) -> None:  # pragma: no cover - the fork
    """A copy of the worker that takes one pickled job and answers its
    pickled outcome, warmed like a standby (a round trip of another
    function first); it never goes back into the pool's code.  ``others``:
    the worker's ends of the other copies' channels, closed here."""
    code = 0
    try:
        for fd in others:
            os.close(fd)
        warm = pickle.loads(pickle.dumps((_warm_other, (), {}), pickle.HIGHEST_PROTOCOL))
        pickle.dumps(("ok", warm[0]()), pickle.HIGHEST_PROTOCOL)
        os.write(channel, b"r")  # warmed up: the trials wait for every copy to be
        data = os.read(channel, 1 << 16)
        if data:
            fn, args, kwargs = pickle.loads(data)
            os.write(channel, pickle.dumps(("ok", fn(*args, **kwargs)), pickle.HIGHEST_PROTOCOL))
            os.read(channel, 1)  # until the worker closes its end, after its timed read
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _fork_servers(count: int) -> list[tuple[int, int]]:
    servers: list[tuple[int, int]] = []
    try:
        for _ in range(count):
            ours, theirs = socket.socketpair()
            try:
                pid = os.fork()
            except BaseException:
                ours.close()
                theirs.close()
                raise
            if pid == 0:  # pragma: no cover - the fork
                _serve_one_job(theirs.fileno(), [ours.fileno(), *(fd for _pid, fd in servers)])
            theirs.close()
            servers.append((pid, ours.detach()))
        for _pid, fd in servers:
            if os.read(fd, 1) != b"r":
                raise RuntimeError("a copy of the worker for the P6 floor did not start")
    except BaseException:
        _end_servers(servers)
        raise
    return servers


def _end_servers(servers: Sequence[tuple[int, int]]) -> None:
    for pid, fd in servers:
        os.close(fd)  # EOF: an unused server exits
        os.waitpid(pid, 0)


def handoff_floor_in_worker(trials: int) -> list[int]:
    """ns per job handed to an idle pre-forked copy of this worker, after the
    same GAP_S pause as P6's calls: pickle, write, the copy reads, unpickles,
    calls, pickles, writes, this worker reads and unpickles.  The least any
    standby design pays here; killable_wrapper adds what its guarantees need
    (the state check, the fd table, watching and killing the job)."""
    clock = time.perf_counter_ns
    wanted = max(trials, 1)
    samples: list[int] = []
    while len(samples) < wanted:
        servers = _fork_servers(_HANDOFF_BATCH)
        try:
            for index, (_pid, fd) in enumerate(servers):
                time.sleep(GAP_S)
                t = clock()
                os.write(fd, pickle.dumps((noop, (), {}), pickle.HIGHEST_PROTOCOL))
                outcome = pickle.loads(os.read(fd, 1 << 16))
                took = clock() - t
                if outcome != ("ok", None):
                    raise RuntimeError(f"the floor's server answered {outcome!r}")
                if index:
                    samples.append(took)
        finally:
            _end_servers(servers)
    return samples[:wanted]


def teardown_floor_in_worker(trials: int, warmup: int) -> dict[str, Any]:
    """The kernel's floor under P3: SIGKILL -> exited (pidfd readable) of a
    fork of this worker, the size a standby is; floor_host.py's trial."""
    if not floor_host._have_pidfd():
        return {"exit_ns": [], "child_rss": []}
    hold, keep = os.pipe()  # never written: each child blocks on it until killed
    try:
        samples = [floor_host.trial(hold, True) for _ in range(warmup + trials)][warmup:]
    finally:
        os.close(hold)
        os.close(keep)
    return {
        "exit_ns": [s[0] for s in samples],
        "child_rss": [s[2] for s in samples if s[2] is not None],
    }


def _is_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return _is_gone_portable(pid)
    fields = data.rpartition(b")")[2].split()
    return not fields or fields[0] in (b"Z", b"X")


def _is_gone_portable(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_HAVE_PROC = os.path.isdir("/proc/self")


def _wait_gone(pids: Sequence[int]) -> int | None:
    """Tight poll until every pid is gone; monotonic ns then, None past the limit."""
    check = _is_gone if _HAVE_PROC else _is_gone_portable
    limit = time.monotonic_ns() + GONE_LIMIT_NS
    pending = list(pids)
    while True:
        pending = [pid for pid in pending if not check(pid)]
        now = time.monotonic_ns()
        if not pending:
            return now
        if now > limit:
            return None


def _read_pids(read_fd: int) -> list[int]:
    os.set_blocking(read_fd, False)
    try:
        text = os.read(read_fd, 4096).decode()
    except BlockingIOError:
        return []
    return [int(word) for word in text.split()]


def _one_timeout_trial(job: Callable[[int, float], None]) -> Sample:
    """(raised, all gone) in ns past the deadline, or why the trial failed."""
    read_fd, write_fd = os.pipe()
    try:
        t0 = time.monotonic_ns()
        try:
            killable_wrapper(job, write_fd, KILLED_JOB_S, killable_wrapper_timeout=TIMEOUT_S)
        except ProcessTimeoutError:
            raised = time.monotonic_ns()
        except Exception as why:
            return f"{type(why).__name__}: {why}"
        else:
            return "the job ended on its own"
        pids = _read_pids(read_fd)
        if not pids:
            return "the job was killed before it reported its pids"
        gone = _wait_gone(pids)
        if gone is None:
            return "a job process was still alive 5 s after the timeout"
    finally:
        os.close(read_fd)
        os.close(write_fd)
    deadline = t0 + TIMEOUT_NS
    return raised - deadline, gone - deadline


def timeout_trials_in_worker(kind: str, trials: int, warmup: int) -> dict[str, Any]:
    """Run the timeout trial ``warmup + trials`` times, each followed by its
    floor trial (with pidfds); keep the last ``trials``.  ``floor[i]`` pairs
    with ``gone[i]`` (None: no floor for that trial)."""
    job = JOBS[kind]
    raised: list[int] = []
    gone: list[int] = []
    floor: list[int | None] = []
    failures: list[str] = []
    killer = _Killer.start() if floor_host._have_pidfd() else None
    try:
        for index in range(warmup + trials):
            sample = _one_timeout_trial(job)
            floor_sample = _one_floor_trial(job, killer) if killer is not None else None
            if isinstance(sample, str):
                failures.append(sample)
                continue
            if isinstance(floor_sample, str):
                failures.append(f"floor: {floor_sample}")
                floor_sample = None
            if index >= warmup:
                raised.append(sample[0])
                gone.append(sample[1])
                floor.append(floor_sample)
    finally:
        if killer is not None:
            killer.close()
    return {"raised": raised, "gone": gone, "floor": floor, "failures": failures}


# ------------------------------------------------ the floor of a P3 trial
#
# The floor under a trial's "all gone" is the kernel's teardown of that same
# job's processes: the same job, started the same way (a standby of this
# worker runs it), SIGKILLed at the same age (the 50 ms time limit) by a
# process of the benchmark, nothing of cancelk's on the way.  A fresh fork of
# the worker killed at once is cheaper to tear down than a process that has
# lived 50 ms (on a 2-vCPU VM, 0.76 ms 5 ms after its fork, 1.67 ms 50 ms
# after: the same page-table walk, slower, as when it has left the CPU's
# caches), so only this floor is the trial's own.


class _Killer:
    """A fork of this worker that SIGKILLs each floor trial's job.

    The worker writes the kill time (monotonic ns) to ``requests``; the job
    writes its pids there too (its fd table is the worker's).  The killer
    opens a pidfd for each, sleeps until the kill time, SIGKILLs them all and
    answers on ``answers`` the ns from its first SIGKILL until every pidfd is
    readable (exited), or -1 when a pid was gone before the kill."""

    def __init__(self, pid: int, requests: int, answers: int) -> None:
        self.pid = pid
        self.requests = requests
        self.answers = answers

    @classmethod
    def start(cls) -> _Killer:
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the killer
            code = 0
            try:
                _close_all_but((0, 1, 2, request_r, answer_w))
                _killer_main(request_r, answer_w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(request_r)
        os.close(answer_w)
        return cls(pid, request_w, answer_r)

    def kill_at(self, at_ns: int) -> None:
        os.write(self.requests, f"{at_ns}\n".encode())

    def answer(self) -> int | None:
        """ns SIGKILL -> exited, or None (no answer in time, or a pid gone early)."""
        poller = select.poll()  # not select(): an fd may be numbered above 1023
        poller.register(self.answers, select.POLLIN)
        if not poller.poll(GONE_LIMIT_NS // 1_000_000):
            return None
        data = os.read(self.answers, 64)
        value = int(data) if data.strip() else -1
        return value if value >= 0 else None

    def close(self) -> None:
        os.close(self.requests)  # EOF: the killer exits
        os.close(self.answers)
        os.waitpid(self.pid, 0)


def _close_all_but(keep: Sequence[int]) -> None:  # pragma: no cover - the killer
    """The killer holds none of the worker's descriptors (a template's
    control socket, say, must still reach EOF when the worker closes it)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _killer_main(requests: int, answers: int) -> None:  # pragma: no cover - the killer
    pending = b""
    while True:
        while pending.count(b"\n") < 2:  # the kill time, then the job's pids
            data = os.read(requests, 4096)
            if not data:
                return
            pending += data
        at_line, pids_line, pending = pending.split(b"\n", 2)
        try:
            pidfds = [os.pidfd_open(int(pid)) for pid in pids_line.split()]
        except ProcessLookupError:
            os.write(answers, b"-1")
            continue
        try:
            time.sleep(max(0.0, (int(at_line) - time.monotonic_ns()) / 1e9))
            began = time.monotonic_ns()
            for pidfd in pidfds:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            poller = select.poll()
            for pidfd in pidfds:
                poller.register(pidfd, select.POLLIN)
            left = len(pidfds)
            while left:
                for pidfd, _event in poller.poll():
                    poller.unregister(pidfd)
                    left -= 1
            os.write(answers, str(time.monotonic_ns() - began).encode())
        finally:
            for pidfd in pidfds:
                os.close(pidfd)


def _one_floor_trial(job: Callable[[int, float], None], killer: _Killer) -> int | str:
    """ns SIGKILL -> every job process exited, for ``job`` run as a trial's
    is and killed at its age by ``killer``; or why the trial failed."""
    killer.kill_at(time.monotonic_ns() + TIMEOUT_NS)
    try:
        killable_wrapper(job, killer.requests, KILLED_JOB_S)
    except ProcessDiedError:
        pass
    except Exception as why:
        return f"{type(why).__name__}: {why}"
    else:
        return "the job ended on its own"
    took = killer.answer()
    return "the killer did not time the job's end" if took is None else took
