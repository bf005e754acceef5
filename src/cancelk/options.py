"""Per-job option markers and their validation.

    submit(fn, 1, ProcessTimeout(2), key=ProcessCancelTimeout(0.5))
        -> split_markers -> args (1,), kwargs {}, JobOptions(timeout=2, cancel_timeout=0.5)

``run_in_executor`` passes positional arguments only, so options travel as
marker objects and are stripped before the function is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "JobOptions",
    "ProcessCancelTimeout",
    "ProcessTimeout",
    "check_seconds",
    "seconds_to_ns",
]


def check_seconds(value: object, what: str) -> float | None:
    """Validate a duration: None or a finite-or-infinite number >= 0.

    Infinity means "no limit" and is returned as None.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds):
        raise ValueError(f"{what} must not be NaN")
    if seconds < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    if math.isinf(seconds):
        return None
    return seconds


def seconds_to_ns(seconds: float) -> int:
    """A checked duration in the nanoseconds of CLOCK_MONOTONIC, the clock
    every cancelk deadline is kept in."""
    return int(seconds * 1_000_000_000)


class _Marker:
    __slots__ = ("seconds",)
    _what = "marker"

    def __init__(self, seconds: float | None) -> None:
        self.seconds = check_seconds(seconds, self._what)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.seconds!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Marker)
        return other.seconds == self.seconds

    def __hash__(self) -> int:
        return hash((type(self), self.seconds))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.seconds,))


class ProcessTimeout(_Marker):
    """Time limit for one job, counted from when it starts running."""

    __slots__ = ()
    _what = "ProcessTimeout"


class ProcessCancelTimeout(_Marker):
    """Grace period a running job gets after ``cancel()`` before it is killed."""

    __slots__ = ()
    _what = "ProcessCancelTimeout"


@dataclass(frozen=True)
class JobOptions:
    timeout: float | None = None
    cancel_timeout: float | None = 0.0


def split_markers(
    args: tuple[Any, ...], kwargs: dict[str, Any], defaults: JobOptions
) -> tuple[tuple[Any, ...], dict[str, Any], JobOptions]:
    """Remove every marker from args and keyword values; the last one of a kind wins."""
    timeout = defaults.timeout
    cancel_timeout = defaults.cancel_timeout
    found = False
    clean_args = []
    for value in args:
        if isinstance(value, ProcessTimeout):
            timeout, found = value.seconds, True
        elif isinstance(value, ProcessCancelTimeout):
            cancel_timeout, found = value.seconds, True
        else:
            clean_args.append(value)
    clean_kwargs = {}
    for key, value in kwargs.items():
        if isinstance(value, ProcessTimeout):
            timeout, found = value.seconds, True
        elif isinstance(value, ProcessCancelTimeout):
            cancel_timeout, found = value.seconds, True
        else:
            clean_kwargs[key] = value
    if not found:
        return args, kwargs, defaults
    return tuple(clean_args), clean_kwargs, JobOptions(timeout, cancel_timeout)
