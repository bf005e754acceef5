"""cancelk: a process pool whose jobs can really be stopped."""

from __future__ import annotations

from cancelk.errors import (
    PoolFullError,
    ProcessCancelledError,
    ProcessDiedError,
    ProcessMemoryError,
    ProcessTimeoutError,
    ResultPicklingError,
)
from cancelk.executor import ExecutorOptions, ProcessPoolExecutor
from cancelk.futures import Future
from cancelk.options import (
    ProcessCancelTimeout,
    ProcessDeadline,
    ProcessMemoryLimit,
    ProcessTimeout,
)
from cancelk.wrapper import killable_wrapper

__all__ = [
    "ExecutorOptions",
    "Future",
    "PoolFullError",
    "ProcessCancelTimeout",
    "ProcessCancelledError",
    "ProcessDeadline",
    "ProcessDiedError",
    "ProcessMemoryError",
    "ProcessMemoryLimit",
    "ProcessPoolExecutor",
    "ProcessTimeout",
    "ProcessTimeoutError",
    "ResultPicklingError",
    "killable_wrapper",
]

__version__ = "0.1.0"
