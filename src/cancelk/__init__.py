"""cancelk: a process pool whose jobs can really be stopped."""

from __future__ import annotations

from cancelk.errors import (
    ProcessCancelledError,
    ProcessDiedError,
    ProcessTimeoutError,
    ResultPicklingError,
)
from cancelk.executor import ExecutorOptions, ProcessPoolExecutor
from cancelk.futures import Future
from cancelk.options import ProcessCancelTimeout, ProcessTimeout
from cancelk.wrapper import killable_wrapper

__all__ = [
    "ExecutorOptions",
    "Future",
    "ProcessCancelTimeout",
    "ProcessCancelledError",
    "ProcessDiedError",
    "ProcessPoolExecutor",
    "ProcessTimeout",
    "ProcessTimeoutError",
    "ResultPicklingError",
    "killable_wrapper",
]

__version__ = "0.1.0"
