"""The pools the executor benchmark compares, each driven through its own API.

    Library.make(workers, method, initializer, initargs) -> pool
    Library.submit(pool, fn, *args)                -> future   (plain job)
    Library.submit_timeout(pool, fn, args, s)      -> future   (its per-job time limit)
    Library.stop(pool, future)                     -> bool     (its way to stop a running job)
    Library.asyncio_submit(pool)                   -> (executor, leading args) for
                                                      loop.run_in_executor
    Library.shutdown(pool)                         (bounded by the caller, see ``opened``)

    library      time limit per job                   stop a running job
    stdlib       none                                 Future.cancel() (returns False)
    cancelk      submit(fn, *args, ProcessTimeout(s)) Future.cancel()
    pebble       schedule(fn, args, timeout=s)        Future.cancel()
    loky         none                                 Future.cancel() (returns False)
    deadpool     submit(fn, *args, deadpool_timeout=s) Future.cancel_and_kill_if_running()

A library that is not installed stays in the list with ``available`` False, so
the tables can say "not installed".  ``opened`` runs a pool inside a
``ProcessScope``: whatever process the pool leaves behind after a bounded
shutdown is killed and counted.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import multiprocessing
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable

__all__ = [
    "LIBRARIES",
    "Library",
    "Opened",
    "ProcessScope",
    "by_name",
    "close",
    "kill_tree",
    "open_pool",
    "opened",
]

SHUTDOWN_LIMIT_S = 10.0
# Long-lived helpers that a start method shares between pools: not leftovers.
_SHARED_HELPERS = ("resource_tracker", "forkserver", "semaphore_tracker")


class Library:
    """Base adapter; subclasses fill in the library's own calls."""

    name = ""
    module = ""
    timeout_api: str | None = None  # None: the library has no per-job time limit
    stop_api = "future.cancel()"

    def __init__(self) -> None:
        try:
            self.lib: Any = importlib.import_module(self.module)
            self.available = True
            self.version = str(getattr(self.lib, "__version__", "")) or _dist_version(self.name)
            self.why_unavailable = ""
        except ImportError as why:
            self.lib = None
            self.available = False
            self.version = ""
            self.why_unavailable = f"not installed ({why.name or why})"

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}".strip()

    def make(
        self,
        workers: int,
        method: str,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> Any:
        raise NotImplementedError

    def submit(self, pool: Any, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        return pool.submit(fn, *args)  # type: ignore[no-any-return]

    def submit_timeout(
        self, pool: Any, fn: Callable[..., Any], args: Sequence[Any], seconds: float
    ) -> cf.Future[Any]:
        raise NotImplementedError(f"{self.name} has no per-job time limit")

    def stop(self, pool: Any, future: cf.Future[Any]) -> bool:
        return future.cancel()

    def asyncio_submit(self, pool: Any) -> tuple[Any, tuple[Any, ...]]:
        """What to hand ``loop.run_in_executor``: the executor and leading arguments."""
        return pool, ()

    def shutdown(self, pool: Any) -> None:
        pool.shutdown(wait=True, cancel_futures=True)

    def method_note(self, method: str) -> str:
        """Why this library's pool does not use ``method``; "" when it does."""
        return ""


class Stdlib(Library):
    name = "stdlib"
    module = "concurrent.futures"

    def __init__(self) -> None:
        super().__init__()
        import platform

        self.version = f"(Python {platform.python_version()})"

    def make(self, workers, method, initializer=None, initargs=()):  # type: ignore[no-untyped-def]
        return cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(method),
            initializer=initializer,
            initargs=initargs,
        )


class Cancelk(Library):
    name = "cancelk"
    module = "cancelk"
    timeout_api = "submit(fn, *args, ProcessTimeout(s))"

    def make(self, workers, method, initializer=None, initargs=()):  # type: ignore[no-untyped-def]
        return self.lib.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(method),
            initializer=initializer,
            initargs=initargs,
        )

    def submit_timeout(self, pool, fn, args, seconds):  # type: ignore[no-untyped-def]
        return pool.submit(fn, *args, self.lib.ProcessTimeout(seconds))


class Pebble(Library):
    name = "pebble"
    module = "pebble"
    timeout_api = "schedule(fn, args, timeout=s)"

    def make(self, workers, method, initializer=None, initargs=()):  # type: ignore[no-untyped-def]
        return self.lib.ProcessPool(
            max_workers=workers,
            initializer=initializer,
            initargs=initargs,
            context=multiprocessing.get_context(method),
        )

    def submit(self, pool, fn, *args):  # type: ignore[no-untyped-def]
        return pool.schedule(fn, args=args)

    def submit_timeout(self, pool, fn, args, seconds):  # type: ignore[no-untyped-def]
        return pool.schedule(fn, args=tuple(args), timeout=seconds)

    def asyncio_submit(self, pool):  # type: ignore[no-untyped-def]
        # ProcessPool.submit(fn, timeout, *args) exists for run_in_executor.
        return pool, (None,)

    def shutdown(self, pool):  # type: ignore[no-untyped-def]
        pool.stop()
        pool.join(SHUTDOWN_LIMIT_S)


class Loky(Library):
    name = "loky"
    module = "loky"

    def method_note(self, method: str) -> str:
        if method == "fork":
            return "loky's own 'loky' start method: its reusable executor refuses fork"
        return ""

    def make(self, workers, method, initializer=None, initargs=()):  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.lib.get_reusable_executor(
                max_workers=workers,
                context="loky" if method == "fork" else method,
                timeout=600,
                initializer=initializer,
                initargs=initargs,
            )

    def shutdown(self, pool):  # type: ignore[no-untyped-def]
        pool.shutdown(wait=True, kill_workers=True)


class Deadpool(Library):
    name = "deadpool"
    module = "deadpool"
    timeout_api = "submit(fn, *args, deadpool_timeout=s)"
    stop_api = "future.cancel_and_kill_if_running()"

    def make(self, workers, method, initializer=None, initargs=()):  # type: ignore[no-untyped-def]
        return self.lib.Deadpool(
            max_workers=workers,
            mp_context=method,
            initializer=initializer,
            initargs=initargs,
        )

    def submit_timeout(self, pool, fn, args, seconds):  # type: ignore[no-untyped-def]
        return pool.submit(fn, *args, deadpool_timeout=seconds)

    def stop(self, pool, future):  # type: ignore[no-untyped-def]
        future.cancel_and_kill_if_running()
        return future.cancelled()  # type: ignore[no-any-return]

    def shutdown(self, pool):  # type: ignore[no-untyped-def]
        pool.shutdown(wait=True, cancel_futures=True)
        pool.runner_thread.join(SHUTDOWN_LIMIT_S)


class DeadpoolCancel(Deadpool):
    """Deadpool through the plain ``Future.cancel()`` a concurrent.futures user calls."""

    stop_api = "future.cancel()"

    def stop(self, pool, future):  # type: ignore[no-untyped-def]
        return future.cancel()  # type: ignore[no-any-return]


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        dist = {"deadpool": "deadpool-executor", "pebble": "Pebble"}.get(name, name)
        return version(dist)
    except Exception:
        return ""


LIBRARIES: tuple[Library, ...] = (Stdlib(), Cancelk(), Pebble(), Loky(), Deadpool())


def by_name(name: str) -> Library:
    for library in LIBRARIES:
        if library.name == name:
            return library
    raise KeyError(name)


# --------------------------------------------------------------- processes


def _descendants() -> dict[int, Any]:
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return {}
    return {child.pid: child for child in children}


def _is_shared_helper(process: Any) -> bool:
    try:
        command = " ".join(process.cmdline())
    except Exception:
        return False
    return any(helper in command for helper in _SHARED_HELPERS)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (best effort)."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.Error:
        family = []
    for process in family:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    if not family:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class ProcessScope:
    """The processes that appear below us while a pool lives."""

    def __init__(self) -> None:
        self.before = set(_descendants())

    def processes(self) -> list[Any]:
        """The pool's processes now (shared start-method helpers left out)."""
        return [
            process
            for pid, process in _descendants().items()
            if pid not in self.before and not _is_shared_helper(process)
        ]

    def kill_leftovers(self) -> int:
        """SIGKILL what is still running of the pool's processes; how many there were."""
        import psutil

        left = [p for p in self.processes() if _alive(p)]
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs(left, timeout=5)
        return len(left)


def _alive(process: Any) -> bool:
    import psutil

    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class Opened:
    """A live pool and what its shutdown left behind."""

    def __init__(self, library: Library, pool: Any, scope: ProcessScope) -> None:
        self.library = library
        self.pool = pool
        self.scope = scope
        self.leftovers = 0
        self.shutdown_error = ""


def open_pool(
    library: Library,
    workers: int,
    method: str,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Opened:
    """A pool of ``library`` and the scope of the processes it will start."""
    scope = ProcessScope()
    return Opened(library, library.make(workers, method, initializer, initargs), scope)


def close(handle: Opened) -> None:
    """Shut the pool down within SHUTDOWN_LIMIT_S, then kill what is left of it."""
    errors: list[str] = []

    def stop() -> None:
        try:
            handle.library.shutdown(handle.pool)
        except Exception as why:
            errors.append(f"{type(why).__name__}: {why}")

    thread = threading.Thread(target=stop, name="bench-shutdown", daemon=True)
    thread.start()
    thread.join(SHUTDOWN_LIMIT_S)
    if thread.is_alive():
        errors.append(f"shutdown still blocked after {SHUTDOWN_LIMIT_S:.0f} s")
    handle.leftovers = handle.scope.kill_leftovers()
    thread.join(SHUTDOWN_LIMIT_S)
    handle.shutdown_error = "; ".join(errors)


@contextlib.contextmanager
def opened(
    library: Library,
    workers: int,
    method: str,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Opened]:
    """A pool of ``library``; shut down (bounded) and cleaned up on exit."""
    handle = open_pool(library, workers, method, initializer, initargs)
    try:
        yield handle
    finally:
        close(handle)
