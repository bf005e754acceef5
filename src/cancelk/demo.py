"""``python -m cancelk demo``: the headline behaviour, measured, in a few seconds.

stuck job + ProcessTimeout ─┐
cancel() from a thread      ├─ one cancelk pool ── time from the stop to the
asyncio.wait_for            │                      job's processes being gone
a job that segfaults        ┘
killable_wrapper inside a stdlib ProcessPoolExecutor
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from cancelk import (
    ProcessCancelledError,
    ProcessDiedError,
    ProcessPoolExecutor,
    ProcessTimeout,
    ProcessTimeoutError,
    killable_wrapper,
)


def stuck_in_c(seconds: int) -> None:
    """Holds the GIL inside a C call: no Python-level timeout can interrupt it."""
    ctypes.PyDLL(None).sleep(seconds)


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def square(x: int) -> int:
    return x * x


def _gone(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _wait_gone(pid: int | None, limit: float = 2.0) -> None:
    end = time.monotonic() + limit
    while not _gone(pid) and time.monotonic() < end:
        time.sleep(0.0005)


def _line(what: str, outcome: str, ms: float) -> None:
    print(f"  {what:<46} {outcome:<26} {ms:8.1f} ms")


def _timeout_demo(pool: ProcessPoolExecutor) -> None:
    future = pool.submit(stuck_in_c, 60, ProcessTimeout(0.5))
    start = time.perf_counter()
    try:
        future.result()
    except ProcessTimeoutError:
        elapsed = (time.perf_counter() - start) * 1000
        _line("C call holding the GIL, ProcessTimeout(0.5)", "ProcessTimeoutError", elapsed)


def _cancel_demo(pool: ProcessPoolExecutor) -> None:
    future = pool.submit(time.sleep, 60)
    while future.pid is None:
        time.sleep(0.001)
    pid = future.pid
    times: dict[str, float] = {}

    def cancel_later() -> None:
        time.sleep(0.3)
        times["start"] = time.perf_counter()
        times["returned"] = float(future.cancel())

    thread = threading.Thread(target=cancel_later)
    thread.start()
    try:
        future.result()
    except ProcessCancelledError:
        _wait_gone(pid)
        elapsed = (time.perf_counter() - times["start"]) * 1000
        _line("cancel() from another thread (sleep 60)", "cancelled, pid gone", elapsed)
    thread.join()


def _asyncio_demo(pool: ProcessPoolExecutor) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            await asyncio.wait_for(loop.run_in_executor(pool, time.sleep, 60), 0.5)
        except asyncio.TimeoutError:
            elapsed = (time.perf_counter() - start) * 1000
            _line(
                "asyncio.wait_for(run_in_executor(...), 0.5)", "TimeoutError, job killed", elapsed
            )

    asyncio.run(main())


def _segfault_demo(pool: ProcessPoolExecutor) -> None:
    neighbour = pool.submit(square, 12)
    start = time.perf_counter()
    try:
        pool.submit(segfault).result()
    except ProcessDiedError as why:
        elapsed = (time.perf_counter() - start) * 1000
        _line(
            "a job that segfaults",
            f"ProcessDiedError ({signal.Signals(why.signal or 0).name})",
            elapsed,
        )
    start = time.perf_counter()
    result = pool.submit(square, 7).result()
    elapsed = (time.perf_counter() - start) * 1000
    _line("the pool goes on: square(7)", f"{result} (neighbour: {neighbour.result()})", elapsed)


def _wrapper_demo() -> None:
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as stdlib_pool:
        stdlib_pool.submit(square, 1).result()  # start the worker first
        start = time.perf_counter()
        future = stdlib_pool.submit(killable_wrapper, stuck_in_c, 60, killable_wrapper_timeout=0.5)
        try:
            future.result()
        except ProcessTimeoutError:
            elapsed = (time.perf_counter() - start) * 1000
            _line("stdlib pool + killable_wrapper, timeout 0.5", "ProcessTimeoutError", elapsed)
        start = time.perf_counter()
        result = stdlib_pool.submit(square, 9).result()
        elapsed = (time.perf_counter() - start) * 1000
        _line("the stdlib pool goes on: square(9)", str(result), elapsed)


def run_demo() -> int:
    print("cancelk demo: every stop is a SIGKILL of the job's whole process tree\n")
    steps: list[Callable[..., Any]] = [_timeout_demo, _cancel_demo, _asyncio_demo, _segfault_demo]
    with ProcessPoolExecutor(max_workers=2) as pool:
        pool.submit(square, 1).result()  # start the supervisor and runners first
        for step in steps:
            step(pool)
        stats = pool.stats()
    _wrapper_demo()
    print(
        f"\npool stats: {stats['finished']} finished, {stats['timed_out']} timed out, "
        f"{stats['cancelled']} cancelled, {stats['died']} died, "
        f"{stats['processes_started']} runner processes started"
    )
    return 0
