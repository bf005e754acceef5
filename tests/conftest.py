"""Shared fixtures: C backend selection, host pools, and a per-test leak check.

Tests import the *installed* cancelk (src/ layout: the source tree is not on
sys.path). Every test runs under pytest-timeout (``timeout = 120`` in
pyproject); slow tests carry a smaller explicit ``@pytest.mark.timeout``.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import resource_sharer

import psutil
import pytest

from cancelk import _core

import executor_jobs
import helpers
from helpers import BACKENDS, HOST_WORKERS, START_METHODS

# Session-long multiprocessing helpers; started once (below) and never leaks.
_SINGLETON_MARKS = ("multiprocessing.forkserver", "resource_tracker")

_LEAK_WAIT = 3.0  # seconds a test's processes get to disappear after it ends
_FD_WAIT = 1.0


# --------------------------------------------------------------------------
# stress mode: `pytest -m stress` runs only the tests marked stress, each
# with its loops scaled up (see the `scale` fixture) and a longer timeout

_STRESS_TIMEOUT = 1800  # seconds per stress test when scaled up


def stress_mode(config: pytest.Config) -> bool:
    return "stress" in (config.getoption("markexpr", "") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not stress_mode(config):
        return
    for item in items:
        if item.get_closest_marker("stress") is not None:
            # Prepended, so it wins over the test's own CI-sized timeout.
            item.add_marker(pytest.mark.timeout(_STRESS_TIMEOUT), append=False)


@pytest.fixture
def scale(request):
    """``scale(ci, stress)``: a loop size, ``ci`` in a normal run and
    ``stress`` under ``pytest -m stress``."""
    stressed = stress_mode(request.config)

    def pick(ci: int, stress: int) -> int:
        return stress if stressed else ci

    return pick


# --------------------------------------------------------------------------
# backend


def _pidfd_supported() -> bool:
    try:
        os.close(_core.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The C backend for every cancelk loop created during the test.

    ``_core.Loop()`` reads CANCELK_BACKEND at each creation, and processes the
    test starts inherit the environment.
    """
    name = request.param
    if name == "pidfd" and not _pidfd_supported():
        pytest.skip("this kernel (or a seccomp filter) does not allow pidfd_open(2)")
    monkeypatch.setenv("CANCELK_BACKEND", name)
    assert _core.selected_backend() == name
    return name


# --------------------------------------------------------------------------
# process inspection


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    created: float
    ppid: int
    status: str
    cmdline: str

    def describe(self) -> str:
        return f"pid {self.pid} ppid {self.ppid} [{self.status}] {self.cmdline[:160]!r}"


def _info(proc: psutil.Process) -> ProcInfo | None:
    try:
        created = proc.create_time()
        ppid = proc.ppid()
        status = proc.status()
    except psutil.NoSuchProcess:  # includes ZombieProcess on some platforms
        return None
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.ZombieProcess, psutil.AccessDenied):
        cmdline = ""
    except psutil.NoSuchProcess:
        return None
    return ProcInfo(proc.pid, created, ppid, status, cmdline)


def _is_singleton(info: ProcInfo) -> bool:
    # Only the server itself: processes forked *from* the forkserver share
    # its command line but have the server, not us, as parent.
    return info.ppid == os.getpid() and any(m in info.cmdline for m in _SINGLETON_MARKS)


def descendants() -> dict[tuple[int, float], ProcInfo]:
    found = {}
    for proc in psutil.Process().children(recursive=True):
        info = _info(proc)
        if info is not None and not _is_singleton(info):
            found[(info.pid, info.created)] = info
    return found


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory's own fd, closed by now
    return fds


def _kill_leftovers(infos: list[ProcInfo]) -> None:
    me = os.getpid()
    for info in infos:
        proc = helpers.same_process(info.pid, info.created)
        if proc is None:
            continue
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    for info in infos:
        if info.ppid == me:
            try:
                os.waitpid(info.pid, 0)
            except ChildProcessError:
                pass


@pytest.fixture(scope="session", autouse=True)
def _multiprocessing_singletons():
    """Start the forkserver and resource tracker before any test, so the
    processes and fds they keep for the whole session predate every leak
    check."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    if "forkserver" in multiprocessing.get_all_start_methods():
        forkserver.ensure_running()
    return None


@pytest.fixture(scope="session")
def long_lived() -> set[int]:
    """Pids of processes that fixtures keep across tests (host pool workers)."""
    return set()


@pytest.fixture(autouse=True)
def leak_check(long_lived):
    """Fail a test that leaves a process or a file descriptor behind."""
    before = set(descendants())
    fds_before = _open_fds() if os.path.isdir("/proc/self/fd") else None
    yield
    deadline = time.monotonic() + _LEAK_WAIT
    while True:
        new = [
            info
            for key, info in descendants().items()
            if key not in before and info.pid not in long_lived
        ]
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if new:
        _kill_leftovers(new)
        pytest.fail(
            "the test left processes behind (zombies count):\n  "
            + "\n  ".join(info.describe() for info in new),
            pytrace=False,
        )
    if fds_before is None:
        return
    deadline = time.monotonic() + _FD_WAIT
    while True:
        gc.collect()
        fds_after = _open_fds()
        if len(fds_after) <= len(fds_before) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if len(fds_after) > len(fds_before):
        grown = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
        pytest.fail(
            f"the test leaked file descriptors: {len(fds_before)} open before, "
            f"{len(fds_after)} after; new: {grown}",
            pytrace=False,
        )


# --------------------------------------------------------------------------
# small resources


@pytest.fixture
def record_path(tmp_path):
    """Where a job writes the record of its processes (see helpers.record)."""
    return str(tmp_path / "record.json")


@pytest.fixture
def cancel_pipe():
    """A multiprocessing Pipe: (sender kept by the test, receiver for the job).

    Pickling a Connection for a pool worker goes through multiprocessing's
    resource sharer (a listener thread and socket in this process); it is
    stopped afterwards so neither outlives the test.
    """
    sender, receiver = multiprocessing.Pipe()
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()
        resource_sharer.stop(timeout=5)


@pytest.fixture
def single_threaded():
    """The test process runs only its main thread, so killable_wrapper forks
    the job (instead of starting a clean interpreter)."""
    deadline = time.monotonic() + 3.0
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    assert not others, f"threads left running by earlier tests: {others}"


@pytest.fixture
def extra_thread():
    """Another thread in the test process, blocked on an Event for the whole test."""
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="blocked-on-event", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        release.set()
        thread.join(timeout=10)
        assert not thread.is_alive()


# --------------------------------------------------------------------------
# cancelk pools


@pytest.fixture
def make_pool():
    """``make_pool(*args, **kwargs)``: a cancelk.ProcessPoolExecutor that is
    shut down (and, if that hangs, killed) after the test."""
    factory = executor_jobs.PoolFactory()
    try:
        yield factory
    finally:
        factory.close_all()


# --------------------------------------------------------------------------
# host pools: plain stdlib ProcessPoolExecutors that run killable_wrapper


@dataclass
class Host:
    """A stdlib pool whose workers use one start method and one cancelk backend."""

    method: str
    backend: str
    pool: concurrent.futures.ProcessPoolExecutor
    token: str
    workers: list[ProcInfo] = field(default_factory=list)

    def worker_problems(self) -> list[str]:
        problems = []
        for info in self.workers:
            try:
                proc = psutil.Process(info.pid)
                status = proc.status()
            except psutil.NoSuchProcess:
                problems.append(f"host worker {info.pid} is gone")
                continue
            if status == psutil.STATUS_ZOMBIE:
                problems.append(f"host worker {info.pid} died")
        return problems


def _start_host(method: str, backend: str, long_lived: set[int]) -> Host:
    before = set(descendants())
    token = f"initialized-{method}-{backend}"
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=HOST_WORKERS,
        mp_context=multiprocessing.get_context(method),
        initializer=helpers.init_host,
        initargs=(backend, token),
    )
    host = Host(method, backend, pool, token)
    # Start every worker now (spawn and forkserver pools start them on
    # demand), so no test sees a host worker appear as "its" process.
    infos = [f.result(timeout=60) for f in [pool.submit(helpers.host_info) for _ in range(4)]]
    deadline = time.monotonic() + 30
    while True:
        host.workers = [info for key, info in descendants().items() if key not in before]
        if len(host.workers) >= HOST_WORKERS or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    long_lived.update(info.pid for info in host.workers)
    assert len(host.workers) == HOST_WORKERS, [w.describe() for w in host.workers]
    for info in infos:
        assert info["backend_env"] == backend, info
        assert info["state"] == token, info
    return host


@pytest.fixture(scope="class")
def host_pools(long_lived):
    """One host pool per (start method, backend), all started before the
    class's first test (so their processes and fds predate every leak check;
    fork pools first, while this process has no pool threads yet) and shut
    down after its last test, so their threads do not outlive the class."""
    hosts: dict[tuple[str, str], Host] = {}
    try:
        for method in START_METHODS:
            for name in BACKENDS:
                if name == "pidfd" and not _pidfd_supported():
                    continue
                hosts[method, name] = _start_host(method, name, long_lived)
        yield hosts
    finally:
        for host in hosts.values():
            host.pool.shutdown(wait=True, cancel_futures=True)
        for host in hosts.values():
            for info in host.workers:
                long_lived.discard(info.pid)
