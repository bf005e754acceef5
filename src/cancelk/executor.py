"""cancelk.ProcessPoolExecutor: the stdlib pool's API, with jobs that really stop.

    submit(fn, *args, ProcessTimeout(t))
      │ options split off the arguments, (fn, args, kwargs) pickled here, in
      │ the caller's thread; a Future and its Job made
      ▼
    Manager (_manager): lock, intake, the manager thread, every descriptor
      └─ Pool (_pool): pending jobs, idle runners, dispatch, endings
           ├─ job frame ──────────► runner (runner), over its own channel
           └─ SetTimeLimit ───────► supervisor (supervisor), over the control socket
    Future.cancel() ─► Manager.cancel_running ─► Pool: CAS on the job's shared
      word (_slots), pidfd SIGKILL, KillRunner to the supervisor
    manager thread: result frames and supervisor events ─► futures settled

This module holds the public surface only: the executor, its ``options()``
views and ``map``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from cancelk import _compat, _wire
from cancelk._manager import Manager
from cancelk._pool import Job
from cancelk.futures import Future
from cancelk.options import (
    JobOptions,
    check_bytes,
    check_count,
    check_seconds,
    deadline_option,
    split_markers,
)
from cancelk.supervisor import SupervisorConfig

__all__ = ["ExecutorOptions", "ProcessPoolExecutor"]


def _default_workers() -> int:
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return count or 1


def _context(mp_context: Any, max_tasks_per_child: int | None) -> Any:
    """The multiprocessing context whose start method starts the supervisor,
    chosen as the stdlib pool chooses its own (spawn by default when
    ``max_tasks_per_child`` is given, which cancelk does not need but
    follows, so that a switched pool starts its processes the same way)."""
    if mp_context is None:
        if max_tasks_per_child is not None:
            mp_context = multiprocessing.get_context("spawn")
        else:
            mp_context = multiprocessing.get_context()
    if isinstance(mp_context, str):
        mp_context = multiprocessing.get_context(mp_context)
    method = mp_context.get_start_method()
    if method not in ("fork", "forkserver", "spawn"):
        raise ValueError(f"unsupported start method {method!r}")
    return mp_context


_MEMORY_LIMITS_WORK = os.path.isdir("/proc/self")


def _process_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _module_of(fn: Callable[..., Any]) -> str | None:
    """The module a spare runner may import ahead of the job, if any."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(target, "__module__", None)
    if type(name) is not str or name in _NOT_PRELOADED:
        return None  # __main__ is prepared by the supervisor itself
    return None if name.startswith("cancelk.") else name


_NOT_PRELOADED = frozenset(("__main__", "builtins", "cancelk"))


class _Submitter:
    """Turns a call into a job for a manager; shared by the executor and its views."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        # A loop submits one function over and over: its module is looked
        # up once.  By id, so that no function is kept alive; an id reused
        # by another function at worst skips a spare's import ahead of it.
        self._last_fn_id = 0

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        defaults: JobOptions,
    ) -> Future:
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        submitted = time.monotonic()
        args, kwargs, options = split_markers(args, kwargs, defaults)
        if options.memory_limit is not None and not _MEMORY_LIMITS_WORK:
            raise NotImplementedError(
                "memory limits need Linux's /proc to sample a job's resident memory"
            )
        future = Future(self.manager)
        try:
            payload = _wire.dumps_call(fn, args, kwargs)
        except Exception as why:
            self.manager.check_usable()
            self.manager.count_refused_submit()
            future.set_exception(why)
            return future
        job = Job(future, 0, payload, options, options.deadline_at(submitted))  # seq: at dispatch
        future._cancelk_job = job  # type: ignore[attr-defined]
        module = None
        if id(fn) != self._last_fn_id:
            self._last_fn_id = id(fn)
            module = _module_of(fn)
        self.manager.submit(job, module)
        return future


class _MapsBySubmit:
    """``map`` with the stdlib's semantics, built on the class's own
    ``submit``; ``options()`` views of the same pool."""

    _defaults: JobOptions

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        raise NotImplementedError

    def _pool_executor(self) -> ProcessPoolExecutor:
        raise NotImplementedError

    def options(
        self,
        *,
        timeout: Any = ...,
        cancel_timeout: Any = ...,
        deadline: Any = ...,
        memory_limit: Any = ...,
    ) -> ExecutorOptions:
        """A light view of the same pool whose jobs get other defaults (``...``:
        as here), usable wherever an executor is
        (``run_in_executor(pool.options(timeout=2), fn, x)``).  ``deadline`` is
        seconds from each submit, or a ProcessDeadline.  Leaving a view's
        ``with`` block shuts nothing down; its ``shutdown()`` shuts the pool down."""
        changes = _changes(timeout, cancel_timeout, deadline, memory_limit)
        defaults = dataclasses.replace(self._defaults, **changes)
        return ExecutorOptions(self._pool_executor(), defaults)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``fn(*args)`` for the items of ``iterables`` taken together, as jobs;
        an iterator over their results, in order, each let go once yielded.

        ``timeout``: seconds from this call within which every result must
        be there; past it, ``next()`` raises ``TimeoutError`` and every job
        not finished is cancelled, running ones killed.
        ``chunksize``: items sent to a runner per job.
        ``buffersize``: at most that many jobs submitted ahead of the results
        read (Python 3.14's argument; without it every job is submitted now).
        Markers (``ProcessTimeout``...) cannot be given per item: use
        ``executor.options(timeout=...).map(...)``.

        Dropping the iterator before its end (or an exception while it is
        read) cancels the jobs not yet read: queued ones never run, running
        ones are killed.
        """
        return _map(self.submit, fn, iterables, timeout, chunksize, buffersize)


class ProcessPoolExecutor(_MapsBySubmit, concurrent.futures.ProcessPoolExecutor):
    """A drop-in ``concurrent.futures.ProcessPoolExecutor`` whose jobs can be stopped.

    The stdlib's arguments (``max_workers``, ``mp_context``, ``initializer``,
    ``initargs``, ``max_tasks_per_child``, with every start method), and:
    ``timeout``: default time limit per job (seconds, None for none);
    ``cancel_timeout``: default grace a running job gets after ``cancel()``.

    ``cancel()`` of a running job, a time limit, a cancelled asyncio task
    around ``run_in_executor`` and ``shutdown(timeout=)`` SIGKILL the job's
    whole process tree; a job that dies fails alone with
    ``ProcessDiedError`` and the pool goes on.  Jobs must be idempotent.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        timeout: float | None = None,
        cancel_timeout: float | None = 0.0,
        memory_limit: int | None = None,
        max_pending: int | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = _default_workers()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._defaults = JobOptions(
            check_seconds(timeout, "timeout"),
            check_seconds(cancel_timeout, "cancel_timeout"),
            memory_limit=check_bytes(memory_limit, "memory_limit"),
        )
        self._max_workers = max_workers
        self._mp_context = _context(mp_context, max_tasks_per_child)
        config = SupervisorConfig(max_workers, initializer, tuple(initargs), max_tasks_per_child)
        pending = check_count(max_pending, "max_pending")
        self._manager = Manager(str(self._mp_context.get_start_method()), config, pending)
        self._submitter = _Submitter(self._manager)
        weakref.finalize(self, self._manager.shutdown, False, False, None)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` as a job; return its ``Future``.

        Markers among the positional arguments or keyword values are taken
        out before the call and set this job's options:
        ``ProcessTimeout(s)`` (time limit from the job's start; past it the
        job is killed and raises ``ProcessTimeoutError``) and
        ``ProcessCancelTimeout(s)`` (grace after ``cancel()``).  Markers
        inside a ``functools.partial`` are not seen.  Never blocks on a child.
        """
        return self._submitter.submit(fn, args, kwargs, self._defaults)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Take no more jobs; with ``wait``, return once every job has ended
        and every process of the pool is gone.

        ``cancel_futures``: cancel the jobs still queued (running ones go on).
        ``timeout``: with ``wait``, jobs still running after that many
        seconds are killed (``ProcessCancelledError``) and queued ones
        cancelled.
        """
        timeout = check_seconds(timeout, "timeout")
        if cancel_futures:
            # The stdlib's submit starts workers before it returns; cancelk's
            # runners start a moment later.  Let a starting pool take the
            # first jobs, as the stdlib's would have, before the rest is cancelled.
            _compat.wait_until_started(self._manager)
        self._manager.shutdown(wait, cancel_futures, timeout)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Literal[False]:
        # Ctrl-C out of the with block stops the jobs instead of waiting for them.
        if isinstance(exc_value, KeyboardInterrupt):
            self._manager.kill_everything("KeyboardInterrupt")
        self.shutdown(wait=True)
        return False

    def terminate_workers(self) -> None:
        """Python 3.14's API: cancel every queued job, kill every running one
        (SIGKILL of its tree, ``ProcessCancelledError``) and shut the pool down."""
        self._manager.kill_everything("terminate_workers()")
        self._manager.shutdown(False, True, None)

    def kill_workers(self) -> None:
        """The same as ``terminate_workers()``: cancelk's only stop is SIGKILL."""
        self.terminate_workers()

    def _pool_executor(self) -> ProcessPoolExecutor:
        return self

    def stats(self) -> dict[str, int]:
        """Counts of jobs submitted, started, finished, timed out, cancelled, died."""
        return self._manager.stats()

    # -- compatibility shims: the stdlib pool's private attributes (see _compat) ------
    @property
    def _processes(self) -> dict[int, _compat.RunnerHandle]:  # type: ignore[override]
        """Compatibility shim: {pid: handle} of the runners, a snapshot; a
        handle's ``kill()`` stops only that runner and its job."""
        return _compat.processes(self._manager)

    @property
    def _broken(self) -> str | bool:  # type: ignore[override]
        """Compatibility shim: False, or what broke the pool."""
        broken = self._manager.pool.broken
        return False if broken is None else str(broken) or type(broken).__name__

    @property
    def _executor_manager_thread(self) -> threading.Thread | None:  # type: ignore[override]
        """Compatibility shim: the pool's manager thread, once started."""
        return self._manager.io if self._manager.started else None

    @property
    def _call_queue(self) -> _compat.CallQueueView:
        """Compatibility shim: ``join_thread()`` waits for the manager thread's end."""
        return _compat.CallQueueView(self._manager)


def _changes(timeout: Any, cancel_timeout: Any, deadline: Any, memory_limit: Any) -> dict[str, Any]:
    """The options given (``...``: not given), checked."""
    checks: dict[str, tuple[Any, Callable[[Any], Any]]] = {
        "timeout": (timeout, lambda value: check_seconds(value, "timeout")),
        "cancel_timeout": (cancel_timeout, lambda value: check_seconds(value, "cancel_timeout")),
        "deadline": (deadline, deadline_option),
        "memory_limit": (memory_limit, lambda value: check_bytes(value, "memory_limit")),
    }
    return {name: check(value) for name, (value, check) in checks.items() if value is not ...}


class ExecutorOptions(_MapsBySubmit, concurrent.futures.Executor):
    """``executor.options(...)``: the same pool, other per-job defaults."""

    def __init__(self, executor: ProcessPoolExecutor, defaults: JobOptions) -> None:
        self._executor = executor
        self._defaults = defaults

    def __repr__(self) -> str:
        return (
            f"<cancelk.ExecutorOptions timeout={self._defaults.timeout!r} "
            f"cancel_timeout={self._defaults.cancel_timeout!r} "
            f"deadline={self._defaults.deadline!r} "
            f"memory_limit={self._defaults.memory_limit!r} of {self._executor!r}>"
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """As ``ProcessPoolExecutor.submit``, with this view's default options."""
        return self._executor._submitter.submit(fn, args, kwargs, self._defaults)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Shut the pool this view belongs to down (``ProcessPoolExecutor.shutdown``)."""
        self._executor.shutdown(wait, cancel_futures=cancel_futures, timeout=timeout)

    def _pool_executor(self) -> ProcessPoolExecutor:
        return self._executor

    def __enter__(self) -> ExecutorOptions:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Literal[False]:
        return False  # a view does not own the pool: leaving it shuts nothing down


def _map(
    submit: Callable[..., Future],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int,
    buffersize: int | None,
) -> Iterator[Any]:
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None:
        if not isinstance(buffersize, int) or isinstance(buffersize, bool):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
    end_time = None if timeout is None else timeout + time.monotonic()
    work: Iterator[Any] = zip(*iterables)
    source: Iterator[Any] = work
    if chunksize > 1:
        source = iter(lambda: list(itertools.islice(work, chunksize)), [])

    def submit_one(item: Any) -> Future:
        if chunksize > 1:
            return submit(_process_chunk, fn, item)
        return submit(fn, *item)

    if buffersize is None:
        futures = deque(submit_one(item) for item in source)
        # Holds no reference to the executor: a pool dropped while its map
        # is read is shut down (wait=False) and finishes the map's jobs.
        return _results(futures, None, None, end_time, chunksize > 1)
    futures = deque(submit_one(item) for item in itertools.islice(source, buffersize))
    return _results(futures, source, submit_one, end_time, chunksize > 1)


def _results(
    futures: deque[Future],
    source: Iterator[Any] | None,
    submit_one: Callable[[Any], Future] | None,
    end_time: float | None,
    chunked: bool,
) -> Iterator[Any]:
    # No local may hold a future or a result across a yield: a long map must
    # let go of each result once the caller has it (bpo-14406).
    try:
        while futures:
            if source is not None and submit_one is not None:
                following = next(source, _END)
                if following is not _END:
                    futures.append(submit_one(following))
            if chunked:
                yield from _drain(_result_or_cancel(futures, end_time))
            else:
                yield _result_or_cancel(futures, end_time)
    finally:
        for future in futures:
            future.cancel()


def _result_or_cancel(futures: deque[Future], end_time: float | None) -> Any:
    """The first future's result; it is cancelled (its job stopped) if that
    raises, e.g. when the time is up."""
    future = futures.popleft()
    try:
        if end_time is None:
            return future.result()
        return future.result(end_time - time.monotonic())
    finally:
        future.cancel()  # a no-op once done
        del future


def _drain(chunk: list[Any]) -> Iterator[Any]:
    """A chunk's results in order, each dropped as it is yielded."""
    chunk.reverse()
    while chunk:
        yield chunk.pop()


_END = object()
