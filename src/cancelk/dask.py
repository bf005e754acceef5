"""cancelk.dask: hard time limits and real cancels for Dask distributed tasks.

    client.register_plugin(CancelkPlugin())      every worker gets a cancelk pool,
                                                 executors["cancelk"] (and "default")
    with annotate(timeout=30):                   dask.annotate(executor="cancelk",
        fut = client.submit(f, x)                              cancelk_timeout=30)

    worker event loop                                 cancelk pool of this worker
    Worker.execute(key)
      run_in_executor(CancelkExecutor,      submit: the task's key and limits
                      _run_task_simple, ──► (annotations), cloudpickle the call,
                      run_spec, data, delay)  pool.options(...).submit(_run_job, blob)
                                                  │                    ▲
    client.cancel(fut) ─► scheduler ─► worker     │ job: unpickle, run │
      transition(key, "executing", "released")    ▼ Dask's own runner  │
      ts.state == "cancelled" ─► call_soon ─► still cancelled? ─► job future.cancel()
                                                  (SIGKILL of the job's whole tree)

The executor future handed back to the worker always ends with a result or an
exception, never in the cancelled state: a cancelled executor future would
escape ``Worker.execute`` and leave the task hanging.  A killed job therefore
ends it with ``ProcessCancelledError`` or ``ProcessTimeoutError`` (exceptions),
which Dask records as a task error (and retries, with ``retries=``).

Only cancelk's public API is used: a ``cancelk.ProcessPoolExecutor``, its
``options()`` views, ``Future.cancel()`` and the exceptions.

Why one module of this size: everything Dask-specific is behind this one
optional import (``import cancelk`` never imports Dask); the plugin, the
executor it installs and the annotations only make sense together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import math
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import click
import cloudpickle
import dask
from dask.sizeof import sizeof
from distributed import Worker, WorkerPlugin

import cancelk

__all__ = [
    "EXECUTOR_NAME",
    "CancelkExecutor",
    "CancelkPlugin",
    "annotate",
    "dask_setup",
    "task_runner_recognised",
]

log = logging.getLogger("cancelk.dask")

#: The name of the worker executor the plugin installs and ``annotate`` selects.
EXECUTOR_NAME = "cancelk"
#: Annotation keys that carry the limits from the client to the worker.
TIMEOUT_ANNOTATION = "cancelk_timeout"
CANCEL_TIMEOUT_ANNOTATION = "cancelk_cancel_timeout"

# Dependency data above this size (dask.sizeof) is pickled by a helper thread,
# so that the worker's event loop, which calls submit(), never stalls on it.
_INLINE_LIMIT = 1 << 20


# -------------------------------------------------------------------------
# what the worker hands to its executor


def _recognised_task_runner() -> Callable[..., Any] | None:
    """``distributed.worker._run_task_simple`` if it still has the shape this
    module was written against: ``(task, data, time_delay)``, the task being a
    spec with a ``key``.  Private to Dask: when it changes, tasks still run
    under cancelk with the plugin's pool-wide limits, but without per-task
    limits or cancel (the worker's submit no longer names the task)."""
    try:
        from distributed import worker as worker_module

        runner: Callable[..., Any] = worker_module._run_task_simple
        params = list(inspect.signature(runner).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    if params != ["task", "data", "time_delay"]:
        return None
    return runner


_TASK_RUNNER = _recognised_task_runner()


def task_runner_recognised() -> bool:
    """True when this Dask's worker submits tasks in the form cancelk.dask
    knows, so per-task limits and ``client.cancel()`` reach the job."""
    return _TASK_RUNNER is not None


def _task_key(fn: Callable[..., Any], args: tuple[Any, ...]) -> Hashable | None:
    if _TASK_RUNNER is None or fn is not _TASK_RUNNER or len(args) != 3:
        return None
    key = getattr(args[0], "key", None)
    return key if isinstance(key, Hashable) else None


# -------------------------------------------------------------------------
# the job side


def _prepare_runner() -> None:
    """Initializer of every runner: have what unpickling a task needs ready.

    Unpickling this function by reference also imports this module, and with
    it Dask, where the pool's processes are started, so a runner that
    replaces a killed one has it at once.
    """
    import distributed.worker  # noqa: F401


def _run_job(blob: bytes) -> bytes:
    """Run a call the worker submitted; both ways through cloudpickle, as Dask
    ships functions (lambdas, ``__main__``, closures) by value."""
    fn, args, kwargs = cloudpickle.loads(blob)
    outcome = fn(*args, **kwargs)
    try:
        return cloudpickle.dumps(outcome)  # type: ignore[no-any-return]
    except Exception as why:
        raise TypeError(f"cancelk.dask cannot pickle what the task returned: {why!r}") from None


def _noop() -> None:
    return None


# -------------------------------------------------------------------------
# the executor


class _TaskJob:
    """One submit of the worker: its future, and the cancelk job once submitted."""

    __slots__ = ("cancel_requested", "inner", "key", "lock", "outer")

    def __init__(self, key: Hashable | None, outer: _ExecutorFuture) -> None:
        self.key = key
        self.outer = outer
        self.inner: concurrent.futures.Future[Any] | None = None
        self.cancel_requested = False
        self.lock = threading.Lock()

    def cancel(self) -> None:
        """Kill the job (after its grace, if it has one); never blocks."""
        with self.lock:
            self.cancel_requested = True
            inner = self.inner
        if inner is not None:
            inner.cancel()
        # Not submitted yet: whoever submits sees the flag and fails it instead.


class _ExecutorFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future the worker awaits.  ``cancel()`` (asyncio calls it when the
    worker cancels its ``execute``) kills the job; the future still ends with
    an exception, never cancelled, so ``cancel()`` returns False."""

    _task_job: _TaskJob | None = None

    def cancel(self) -> bool:
        job = self._task_job
        if job is not None and not self.done():
            job.cancel()
        return False


class _Submitter:
    """One thread that pickles and submits the calls with large data."""

    def __init__(self, submit: Callable[..., None]) -> None:
        self._submit = submit
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, item: tuple[Any, ...]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cancelk-dask-submit", daemon=True
                )
                self._thread.start()
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._submit(*item)
            del item  # do not hold the last task's data while idle

    def close(self, wait: bool) -> None:
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        if wait and thread is not threading.current_thread():
            thread.join()


def _limits(annotations: Any) -> dict[str, Any]:
    """``pool.options()`` keywords from a task's annotations."""
    if not isinstance(annotations, dict):
        return {}
    limits = {}
    if annotations.get(TIMEOUT_ANNOTATION) is not None:
        limits["timeout"] = annotations[TIMEOUT_ANNOTATION]
    if annotations.get(CANCEL_TIMEOUT_ANNOTATION) is not None:
        limits["cancel_timeout"] = annotations[CANCEL_TIMEOUT_ANNOTATION]
    return limits


class CancelkExecutor(concurrent.futures.Executor):
    """A Dask worker executor that runs every task as a cancelk job.

    Installed by :class:`CancelkPlugin`; give it to ``Worker(executor=...)``
    yourself only if you also route cancels to :meth:`task_released`.
    ``submit`` never blocks the worker's event loop: it pickles small calls
    inline and hands calls with large data to a helper thread.  The future it
    returns ends with the task's outcome or an exception -- a killed job with
    ``ProcessTimeoutError`` or ``ProcessCancelledError`` -- never cancelled.
    """

    def __init__(self, pool: cancelk.ProcessPoolExecutor, worker: Worker | None = None) -> None:
        self.pool = pool
        self._worker: Any = worker  # only its task states are read, duck-typed
        self._lock = threading.Lock()
        self._jobs: dict[Hashable, _TaskJob] = {}  # by task key, for cancels
        self._live: set[_TaskJob] = set()  # every job not settled yet
        self._submitter = _Submitter(self._submit_now)
        self._closed = False

    # -- submitting ---------------------------------------------------------
    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        key = _task_key(fn, args)
        outer = _ExecutorFuture()
        job = _TaskJob(key, outer)
        outer._task_job = job
        limits: dict[str, Any] = {}
        if key is not None:
            state, annotations = self._task_facts(key)
            if state == "cancelled":  # cancelled before it reached us: never start it
                outer.set_exception(_cancelled_error(key, started=False))
                return outer
            limits = _limits(annotations)
        with self._lock:
            self._live.add(job)
            if key is not None:
                self._jobs[key] = job
        item = (job, fn, args, kwargs, limits)
        if key is not None and _small(args[1]):
            self._submit_now(*item)
        else:
            self._submitter.put(item)
        return outer

    def _task_facts(self, key: Hashable) -> tuple[str | None, Any]:
        """The worker's state and annotations of a task, None if unknown."""
        try:
            ts = self._worker.state.tasks.get(key)
        except AttributeError:
            return None, None
        if ts is None:
            return None, None
        return getattr(ts, "state", None), getattr(ts, "annotations", None)

    def _submit_now(
        self,
        job: _TaskJob,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        limits: dict[str, Any],
    ) -> None:
        try:
            blob = cloudpickle.dumps((fn, args, kwargs))
        except Exception as why:
            self._forget(job)
            job.outer.set_exception(
                TypeError(f"cancelk.dask cannot pickle the task for its job: {why!r}")
            )
            return
        del args, kwargs
        executor: concurrent.futures.Executor = self.pool
        try:
            if limits:
                executor = self.pool.options(**limits)
            with job.lock:
                if job.cancel_requested:
                    inner = None
                else:
                    inner = executor.submit(_run_job, blob)
                    job.inner = inner
        except Exception as why:  # a bad annotation, or the pool shut down
            self._forget(job)
            job.outer.set_exception(why)
            return
        if inner is None:
            self._forget(job)
            job.outer.set_exception(_cancelled_error(job.key, started=False))
            return
        inner.add_done_callback(lambda done: self._finish(job, done))

    def _finish(self, job: _TaskJob, inner: concurrent.futures.Future[Any]) -> None:
        """Runs in cancelk's manager thread (or the canceller's): settle the
        worker's future, off the event loop."""
        self._forget(job)
        outer = job.outer
        if inner.cancelled():
            outer.set_exception(_cancelled_error(job.key, started=True))
            return
        error = inner.exception()
        if error is not None:
            outer.set_exception(error)
            return
        try:
            value = cloudpickle.loads(inner.result())
        except Exception as why:
            outer.set_exception(why)
            return
        outer.set_result(value)

    def _forget(self, job: _TaskJob) -> None:
        with self._lock:
            self._live.discard(job)
            if job.key is not None and self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    # -- cancelling ---------------------------------------------------------
    def task_released(self, key: Hashable) -> None:
        """The worker released a task it was running; kill its job unless the
        task is resumed first.  Call on the worker's event loop."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            return
        # Decide once the stimulus being handled is done: if the same key was
        # resubmitted in it, the worker resumes the running task instead.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._cancel_if_released(key, job)
        else:
            loop.call_soon(self._cancel_if_released, key, job)

    def _cancel_if_released(self, key: Hashable, job: _TaskJob) -> None:
        with self._lock:
            if self._jobs.get(key) is not job:
                return  # it ended, or a new run of the key took its place
        state, _ = self._task_facts(key)
        if state not in (None, "cancelled"):
            return  # resumed: the worker wants the running task after all
        log.info("Dask task %r was cancelled: killing its job", key)
        job.cancel()

    def cancel_all(self) -> None:
        """Kill every job this executor runs (the pool goes on)."""
        with self._lock:
            jobs = list(self._live)
        for job in jobs:
            job.cancel()

    # -- the rest of the Executor API ---------------------------------------
    def warm_up(self, timeout: float = 60.0) -> None:
        """Start the pool's processes now (blocks; run it off the event loop)."""
        self.pool.submit(_noop).result(timeout)

    def stats(self) -> dict[str, int]:
        """The cancelk pool's counts (jobs started, timed out, cancelled ...)."""
        return self.pool.stats()

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, kill: bool = False
    ) -> None:
        """Stop taking tasks; with ``kill``, running jobs are killed now."""
        self._closed = True
        if kill:
            self.cancel_all()
        self._submitter.close(wait)
        self.pool.shutdown(wait, cancel_futures=cancel_futures or kill, timeout=0 if kill else None)


def _small(data: Any) -> bool:
    try:
        return int(sizeof(data)) <= _INLINE_LIMIT
    except Exception:
        return False


def _cancelled_error(key: Hashable | None, started: bool) -> cancelk.ProcessCancelledError:
    if started:
        return cancelk.ProcessCancelledError(
            f"Dask task {key!r} was cancelled; its job was stopped"
        )
    return cancelk.ProcessCancelledError(f"Dask task {key!r} was cancelled before it started")


# -------------------------------------------------------------------------
# the plugin


class CancelkPlugin(WorkerPlugin):
    """Gives every worker a cancelk pool as the executor ``"cancelk"``.

    ``max_workers``: processes per worker (default: the worker's threads).
    ``timeout`` / ``cancel_timeout``: default time limit and cancel grace of
    every job (``annotate`` overrides them per task).  ``default=True`` also
    makes the pool the worker's default executor, so every task runs under
    cancelk without annotations.  ``mp_context``: how the pool starts its
    supervisor (default spawn: a Dask worker runs threads, which a fork would
    copy mid-flight); its runners are forked from the supervisor either way.
    ``teardown`` (the worker closes, or the plugin is unregistered) kills the
    pool's jobs and stops its processes.
    """

    name = "cancelk"
    idempotent = False

    def __init__(
        self,
        max_workers: int | None = None,
        timeout: float | None = None,
        cancel_timeout: float | None = 0.0,
        default: bool = False,
        *,
        mp_context: Any = None,
    ) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        # Validated here, on the client, rather than on every worker.
        cancelk.ProcessTimeout(timeout)
        cancelk.ProcessCancelTimeout(cancel_timeout)
        self.max_workers = max_workers
        self.timeout = timeout
        self.cancel_timeout = cancel_timeout
        self.default = bool(default)
        self.mp_context = mp_context
        self._executors: dict[int, tuple[Worker, CancelkExecutor, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_executors"] = {}  # what runs on one worker never travels
        return state

    def __repr__(self) -> str:
        return (
            f"CancelkPlugin(max_workers={self.max_workers!r}, timeout={self.timeout!r}, "
            f"cancel_timeout={self.cancel_timeout!r}, default={self.default!r})"
        )

    async def setup(self, worker: Worker) -> None:
        if not task_runner_recognised():
            log.warning(
                "cancelk.dask does not recognise how this version of distributed submits "
                "tasks: they run under cancelk with the plugin's time limit, but "
                "per-task limits (annotate) and client.cancel() do not reach them"
            )
        workers = self.max_workers or _worker_threads(worker)
        context = self.mp_context
        if context is None:
            context = multiprocessing.get_context("spawn")
        pool = cancelk.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_prepare_runner,
            timeout=self.timeout,
            cancel_timeout=self.cancel_timeout,
        )
        executor = CancelkExecutor(pool, worker)
        try:
            # Start the processes now, off the event loop, so that the
            # first task's submit has nothing to start.
            await asyncio.to_thread(executor.warm_up)
        except BaseException:
            await asyncio.to_thread(executor.shutdown, True, kill=True)
            raise
        replaced = worker.executors.get("default")
        worker.executors[EXECUTOR_NAME] = executor
        if self.default:
            worker.executors["default"] = executor
        self._executors[id(worker)] = (worker, executor, replaced)

    def transition(self, key: Hashable, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "released" or start not in ("executing", "long-running"):
            return
        for _, executor, _ in list(self._executors.values()):
            executor.task_released(key)

    async def teardown(self, worker: Worker) -> None:
        entry = self._executors.pop(id(worker), None)
        if entry is None:
            return
        _, executor, replaced = entry
        if worker.executors.get(EXECUTOR_NAME) is executor:
            del worker.executors[EXECUTOR_NAME]
        if worker.executors.get("default") is executor:
            if replaced is not None:
                worker.executors["default"] = replaced
            else:
                del worker.executors["default"]
        await asyncio.to_thread(executor.shutdown, True, kill=True)


def _worker_threads(worker: Worker) -> int:
    for source in (getattr(worker, "state", None), worker):
        count = getattr(source, "nthreads", None)
        if isinstance(count, int) and count > 0:
            return count
    return os.cpu_count() or 1


# -------------------------------------------------------------------------
# the client side


@contextlib.contextmanager
def annotate(
    timeout: float | None = None, cancel_timeout: float | None = None, **annotations: Any
) -> Iterator[None]:
    """``dask.annotate`` that runs the tasks built inside under cancelk.

    ``timeout``: time limit per task, from when its job starts (``math.inf``:
    none, even if the plugin sets one); ``cancel_timeout``: grace after
    ``client.cancel()``.  None keeps what an enclosing ``annotate`` or the
    plugin says.  Other keywords go to ``dask.annotate`` (``retries=2``).
    """
    # Bad values fail here, not on a worker.
    cancelk.ProcessTimeout(timeout)
    cancelk.ProcessCancelTimeout(cancel_timeout)
    fields: dict[str, Any] = {"executor": EXECUTOR_NAME, **annotations}
    if timeout is not None:
        fields[TIMEOUT_ANNOTATION] = float(timeout)
    if cancel_timeout is not None:
        fields[CANCEL_TIMEOUT_ANNOTATION] = float(cancel_timeout)
    with dask.annotate(**fields):
        yield


# -------------------------------------------------------------------------
# `dask worker --preload cancelk.dask`


async def _preload_setup(
    worker: Worker,
    cancelk_max_workers: int | None,
    cancelk_timeout: float | None,
    cancelk_cancel_timeout: float,
    cancelk_default: bool,
) -> None:
    timeout = None if cancelk_timeout is None or math.isinf(cancelk_timeout) else cancelk_timeout
    plugin = CancelkPlugin(
        max_workers=cancelk_max_workers,
        timeout=timeout,
        cancel_timeout=cancelk_cancel_timeout,
        default=cancelk_default,
    )
    await worker.plugin_add(plugin, name=CancelkPlugin.name, catch_errors=False)


#: Preload hook: ``dask worker ADDRESS --preload cancelk.dask [--cancelk-timeout 60]``
#: (a click command, so ``dask worker`` takes its options).
dask_setup = click.Command(
    "cancelk.dask",
    callback=_preload_setup,
    help="Install cancelk.dask.CancelkPlugin on this worker.",
    params=[
        click.Option(
            ["--cancelk-max-workers"], type=int, default=None, help="processes per worker"
        ),
        click.Option(
            ["--cancelk-timeout"], type=float, default=None, help="time limit per task (s)"
        ),
        click.Option(
            ["--cancelk-cancel-timeout"], type=float, default=0.0, help="cancel grace (s)"
        ),
        click.Option(
            ["--cancelk-default/--no-cancelk-default"],
            default=False,
            help="also make cancelk the worker's default executor",
        ),
    ],
)
