"""Shared fixtures: C backend selection, host pools, and a per-test leak check.

Tests import the *installed* cancelk (src/ layout: the source tree is not on
sys.path). Every test runs under pytest-timeout (``timeout = 120`` in
pyproject); slow tests carry a smaller explicit ``@pytest.mark.timeout``.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import resource_sharer

import pytest

from cancelk import _core

import procs
from jobs import BACKENDS, START_METHODS

_LEAK_WAIT = 3.0  # seconds a test's processes get to disappear after it ends
_FD_WAIT = 1.0


# --------------------------------------------------------------------------
# a terminal's signal dispositions


def pytest_configure(config: pytest.Config) -> None:
    """A shell without job control starts a background command (``cmd &``)
    with SIGINT and SIGQUIT ignored, and ignored signals survive exec: every
    program a test starts would then shrug off Ctrl-C, which no program in a
    terminal does, and the Ctrl-C tests would test nothing. Give the run a
    terminal's dispositions, which its children inherit."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


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


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The C backend for every cancelk loop created during the test.

    ``_core.Loop()`` reads CANCELK_BACKEND at each creation, and processes the
    test starts inherit the environment.
    """
    name = request.param
    if name == "pidfd" and not procs.pidfd_supported():
        pytest.skip("this kernel (or a seccomp filter) does not allow pidfd_open(2)")
    monkeypatch.setenv("CANCELK_BACKEND", name)
    assert _core.selected_backend() == name
    return name


# --------------------------------------------------------------------------
# process inspection


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory's own fd, closed by now
    return fds


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
def leak_check(long_lived, request):
    """Fail a test that leaves a process or a file descriptor behind."""
    before = set(procs.descendant_infos())
    fds_before = _open_fds() if os.path.isdir("/proc/self/fd") else None
    yield
    deadline = time.monotonic() + _LEAK_WAIT
    while True:
        new = [
            info
            for key, info in procs.descendant_infos().items()
            if key not in before and info.pid not in long_lived
        ]
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if new:
        procs.kill_records([(info.pid, info.created) for info in new], reap=True)
        pytest.fail(
            "the test left processes behind (zombies count):\n  "
            + "\n  ".join(info.describe() for info in new),
            pytrace=False,
        )
    if fds_before is None:
        return
    deadline = time.monotonic() + _FD_WAIT
    if not request.node.nodeid.startswith("tests/unit/"):
        # What the test dropped is finalized here, not inside the next test
        # (a hostile host's signal handler collecting garbage, say).  Unit
        # tests start no pool: they skip the 40 ms this takes.
        gc.collect()
    fds_after = _open_fds()
    while len(fds_after) > len(fds_before) and time.monotonic() <= deadline:
        # Objects the test dropped may hold the extra descriptors until the
        # cyclic GC frees them.
        gc.collect()
        fds_after = _open_fds()
        if len(fds_after) > len(fds_before):
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
    """Where a job writes the record of its processes (see jobs.record)."""
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
    factory = procs.PoolFactory()
    try:
        yield factory
    finally:
        factory.close_all()


# --------------------------------------------------------------------------
# host pools: plain stdlib ProcessPoolExecutors that run killable_wrapper


@pytest.fixture(scope="class")
def host_pools(long_lived):
    """One host pool per (start method, backend), all started before the
    class's first test (so their processes and fds predate every leak check;
    fork pools first, while this process has no pool threads yet) and shut
    down after its last test, so their threads do not outlive the class."""
    with procs.running_hosts(START_METHODS, long_lived) as hosts:
        yield hosts
