"""Per-job option markers and their validation.

    submit(fn, 1, ProcessTimeout(2), key=ProcessCancelTimeout(0.5))
        -> split_markers -> args (1,), kwargs {}, JobOptions(timeout=2, cancel_timeout=0.5)

``run_in_executor`` passes positional arguments only, so options travel as
marker objects and are stripped before the function is called.  Every value
is checked when the marker (or the pool, or its ``options()`` view) is made,
so a bad one raises in the caller, never later in the pool.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "JobOptions",
    "ProcessCancelTimeout",
    "ProcessDeadline",
    "ProcessMemoryLimit",
    "ProcessTimeout",
    "check_bytes",
    "check_count",
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


def check_bytes(value: object, what: str) -> int | None:
    """Validate a size in bytes: None, or an int > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what} must be a number of bytes (int) or None, not {type(value).__name__}"
        )
    if value <= 0:
        raise ValueError(f"{what} must be > 0 bytes, got {value!r}")
    return value


def check_count(value: object, what: str) -> int | None:
    """Validate a count: None, or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int or None, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value!r}")
    return value


def seconds_to_ns(seconds: float) -> int:
    """A checked duration in the nanoseconds of CLOCK_MONOTONIC, the clock
    every cancelk deadline is kept in."""
    return int(seconds * 1_000_000_000)


class _Marker:
    """A per-job option passed among a job's arguments; ``field`` names the
    JobOptions field it sets."""

    __slots__ = ("value",)
    field: ClassVar[str]

    def __init__(self, value: Any) -> None:
        self.value = self._check(value)

    def _check(self, value: Any) -> Any:
        return check_seconds(value, type(self).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Marker)
        return bool(other.value == self.value)

    def __hash__(self) -> int:
        return hash((type(self), self.value))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.value,))

    @property
    def seconds(self) -> Any:
        return self.value


class ProcessTimeout(_Marker):
    """Time limit for one job, counted from when it starts running."""

    __slots__ = ()
    field = "timeout"


class ProcessCancelTimeout(_Marker):
    """Grace period a running job gets after ``cancel()`` before it is killed."""

    __slots__ = ()
    field = "cancel_timeout"


class ProcessMemoryLimit(_Marker):
    """Resident memory the job's whole process tree may use while it runs, in bytes."""

    __slots__ = ()
    field = "memory_limit"

    def _check(self, value: Any) -> Any:
        return check_bytes(value, "ProcessMemoryLimit")

    @property
    def nbytes(self) -> int | None:
        return self.value  # type: ignore[no-any-return]


class ProcessDeadline(_Marker):
    """A limit counted from ``submit``, time in the queue included:
    ``ProcessDeadline(seconds)``, or ``ProcessDeadline.at(t)`` for a deadline
    at ``time.monotonic()`` ``t`` (one carried in with a request)."""

    __slots__ = ("absolute",)
    field = "deadline"

    def __init__(self, value: Any, *, absolute: bool = False) -> None:
        self.absolute = absolute
        super().__init__(value)

    def _check(self, value: Any) -> Any:
        if not self.absolute:
            return check_seconds(value, "ProcessDeadline")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise TypeError(f"ProcessDeadline.at() needs a time.monotonic() time, not {value!r}")
        return float(value)

    @classmethod
    def at(cls, monotonic_time: float) -> ProcessDeadline:
        return cls(monotonic_time, absolute=True)

    def resolve(self, submitted: float) -> float | None:
        """The deadline as a ``time.monotonic()`` time, for a job submitted then."""
        if self.absolute:
            return float(self.value)
        return None if self.value is None else submitted + self.value

    def __repr__(self) -> str:
        if self.absolute:
            return f"ProcessDeadline.at({self.value!r})"
        return f"ProcessDeadline({self.value!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, ProcessDeadline)
        return (other.value, other.absolute) == (self.value, self.absolute)

    def __hash__(self) -> int:
        return hash((type(self), self.value, self.absolute))

    def __reduce__(self) -> tuple[Any, ...]:
        if self.absolute:
            return (ProcessDeadline.at, (self.value,))
        return (ProcessDeadline, (self.value,))


@dataclass(frozen=True)
class JobOptions:
    timeout: float | None = None
    cancel_timeout: float | None = 0.0
    deadline: ProcessDeadline | None = None
    memory_limit: int | None = None

    def deadline_at(self, submitted: float) -> float | None:
        return None if self.deadline is None else self.deadline.resolve(submitted)


def deadline_option(value: object) -> ProcessDeadline | None:
    """``options(deadline=...)``: seconds from each submit, or a ProcessDeadline."""
    if value is None or isinstance(value, ProcessDeadline):
        return value
    return ProcessDeadline(value)


def split_markers(
    args: tuple[Any, ...], kwargs: dict[str, Any], defaults: JobOptions
) -> tuple[tuple[Any, ...], dict[str, Any], JobOptions]:
    """Remove every marker from args and keyword values; the last one of a kind wins."""
    if not _any_marker(args, kwargs):
        return args, kwargs, defaults  # the usual case, checked without building anything
    found: dict[str, Any] = {}
    clean_args = tuple(value for value in args if not _took(value, found))
    clean_kwargs = {key: value for key, value in kwargs.items() if not _took(value, found)}
    return clean_args, clean_kwargs, dataclasses.replace(defaults, **found)


def _any_marker(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for value in args:
        if isinstance(value, _Marker):
            return True
    return any(isinstance(value, _Marker) for value in kwargs.values()) if kwargs else False


def _took(value: object, found: dict[str, Any]) -> bool:
    if not isinstance(value, _Marker):
        return False
    found[value.field] = value if isinstance(value, ProcessDeadline) else value.value
    return True
