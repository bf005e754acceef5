"""Keep the measured libraries' own output off the terminal.

Peers talk while they run: Deadpool logs ``BrokenPipeError on 7896, retrying.``
as a warning (through the ``logging`` last-resort handler, i.e. to stderr), its
threads' tracebacks go to stderr, and every worker process inherits fd 1 and 2.
While a ``Capture`` is active, fd 1 and fd 2 of this process point at an
unlinked temporary file, so whatever any thread, or any process started
meanwhile, writes lands there instead of between the progress lines; log
records go there too, with their level (``[WARNING deadpool] ...``).  Progress
reaches the terminal through a duplicate of the original stderr (``say``).

``heard()`` brackets the measurement of one library: what was written meanwhile
is read back and only the errors are kept, to go into that library's notes:

    [ERROR name] message / [CRITICAL name] message     -> "name: message"
    Traceback (most recent call last): ... Exc: why    -> "Exc: why"
    Fatal Python error: ...                            -> as it is

Everything else (warnings, retries, progress of the library itself) is dropped.
Output that comes late (a worker still dying) counts for whoever is measured
next; what no library claims is ``loose``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from types import TracebackType
from typing import IO

__all__ = ["UNCAPTURED", "Capture", "Uncaptured", "errors_in"]

_LOG_FORMAT = "[%(levelname)s %(name)s] %(message)s"
_ERROR_LEVELS = ("[ERROR ", "[CRITICAL ")
_MOST_NOTES = 3  # distinct errors named per library; the rest are counted


def errors_in(text: str) -> list[str]:
    """The errors in captured output, one short line each (see the module's table)."""
    errors: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(_ERROR_LEVELS):
            level_and_name, _, message = line[1:].partition("] ")
            errors.append(f"{level_and_name.split(' ', 1)[-1]}: {message}")
        elif line.startswith("Traceback (most recent call last):"):
            tail = (later for later in lines[index + 1 :] if later and not later[0].isspace())
            errors.append(next(tail, "a traceback, cut short"))
        elif line.startswith("Fatal Python error"):
            errors.append(line)
    return errors


def _as_notes(errors: list[str]) -> list[str]:
    counted = collections.Counter(errors)
    notes = [
        f"error output: {what}" + (f" ({n}x)" if n > 1 else "")
        for what, n in counted.most_common(_MOST_NOTES)
    ]
    if len(counted) > _MOST_NOTES:
        notes.append(f"{len(counted) - _MOST_NOTES} other error(s) in the output")
    return notes


class Uncaptured:
    """Nothing is captured: ``heard()`` has nothing to tell (``figures.run`` used as an API)."""

    def __init__(self) -> None:
        self.loose: list[str] = []  # notes on errors that no ``heard()`` took

    @contextlib.contextmanager
    def heard(self) -> Iterator[list[str]]:
        yield []


UNCAPTURED = Uncaptured()


class Capture(Uncaptured):
    """fd 1 and 2 (and the root logger) into a temporary file while active."""

    def __init__(self) -> None:
        super().__init__()
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="cancelk-bench-output-")
        fd = self._file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self._saved: list[int] = []
        self._console: IO[str] | None = None
        self._handler = logging.StreamHandler(sys.stderr)
        self._handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        self._read_up_to = 0

    def __enter__(self) -> Capture:
        _flush()
        self._saved = [os.dup(1), os.dup(2)]
        self._console = os.fdopen(os.dup(2), "w", buffering=1)
        for fd in (1, 2):
            os.dup2(self._file.fileno(), fd)
        self._handler.setStream(sys.stderr)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.loose += self._take()
        logging.getLogger().removeHandler(self._handler)
        _flush()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        if self._console is not None:
            self._console.close()
        self._file.close()

    def say(self, message: str) -> None:
        """A progress line, to the terminal's stderr."""
        print(message, file=self._console or sys.stderr, flush=True)

    @contextlib.contextmanager
    def heard(self) -> Iterator[list[str]]:
        """A list that holds, once the block is over, the notes on its error output."""
        self.loose += self._take()
        notes: list[str] = []
        try:
            yield notes
        finally:
            notes += self._take()

    def _take(self) -> list[str]:
        """Notes on the errors in the whole lines written since the last call."""
        _flush()
        fd = self._file.fileno()
        data = os.pread(fd, max(0, os.fstat(fd).st_size - self._read_up_to), self._read_up_to)
        whole = data[: data.rfind(b"\n") + 1]
        self._read_up_to += len(whole)
        return _as_notes(errors_in(whole.decode(errors="replace")))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
