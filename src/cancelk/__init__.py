"""cancelk: a process pool whose jobs can really be stopped.

The public names load on first use: the supervisor and runner processes,
which import ``cancelk.supervisor`` and ``cancelk.runner``, never pay for the
user-side pool (the executor, its manager thread) or ``killable_wrapper``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cancelk.errors import (
    PoolFullError,
    ProcessCancelledError,
    ProcessDiedError,
    ProcessMemoryError,
    ProcessTimeoutError,
    ResultPicklingError,
)
from cancelk.options import (
    ProcessCancelTimeout,
    ProcessDeadline,
    ProcessMemoryLimit,
    ProcessTimeout,
)

if TYPE_CHECKING:
    from cancelk.executor import ExecutorOptions, ProcessPoolExecutor
    from cancelk.futures import Future
    from cancelk.wrapper import killable_wrapper

_LOADED_ON_USE = {
    "ExecutorOptions": "cancelk.executor",
    "ProcessPoolExecutor": "cancelk.executor",
    "Future": "cancelk.futures",
    "killable_wrapper": "cancelk.wrapper",
}

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


def __getattr__(name: str) -> Any:
    module = _LOADED_ON_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'cancelk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
