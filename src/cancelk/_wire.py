"""Framing and outcome encoding shared by every stream cancelk writes.

    job side:    run_and_encode(fn, args, kwargs) -> (kind, outcome) -> write_frame(fd)
    a runner:    run_and_encode_in_parts(...) -> (kind, parts) -> write_parts(fd)
                 (a large result is written from where it lies, never joined)
    parent side: read(fd) -> FrameReader.feed -> body -> decode_outcome -> Outcome

A frame is an 8-byte little-endian length followed by its body.  Readers are
incremental so a parent never blocks on a half-written frame.  What the
bodies hold between the user process, the supervisor and the runners is
declared in ``_protocol``.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

from cancelk.errors import RemoteTraceback, ResultPicklingError, format_remote, pickling_error

# What a pickler writes: bytes, or a large bytes-like object of the value itself.
Part = Union[bytes, bytearray, memoryview, pickle.PickleBuffer]
Payload = Union[bytes, list[bytes]]  # a job's pickled call: one piece, or parts (dumps_call)
HEADER = struct.Struct("<Q")
OUTCOME_VALUE, OUTCOME_ERROR = 0, 1  # what an encoded outcome holds
SMALL = 1 << 16  # below this, copying to join a header and a payload beats a second syscall
PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=PROTOCOL)


def dumps_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Payload:
    """A job's pickled ``(fn, args, kwargs)``.  With a large argument (its
    own size LARGE or more), the parts the pickler wrote, never joined: a
    large ``bytes`` (or a ``str``'s UTF-8) by reference, anything mutable (a
    ``bytearray``, an array's buffer) copied now, so that the job sees its
    arguments as they were at submit, however long it waits to start."""
    call = (fn, args, kwargs)
    if not (args and _any_large(args)) and not (kwargs and _any_large(kwargs.values())):
        return pickle.dumps(call, protocol=PROTOCOL)
    parts = dumps_in_parts(call)
    return [part if type(part) is bytes else _flat_view(part).tobytes() for part in parts]


def dumps_in_parts(obj: object) -> list[Part]:
    """``obj``'s pickle as the pieces the pickler wrote it in: a large
    bytes-like object inside ``obj`` is a piece by itself, by reference."""
    parts: list[Part] = []
    pickle.Pickler(_PartsFile(parts), protocol=PROTOCOL).dump(obj)
    return parts


def _any_large(values: Iterable[object]) -> bool:
    for value in values:
        try:
            if sys.getsizeof(value) >= LARGE:
                return True
        except Exception:  # a __sizeof__ of the user's that fails: taken as small
            continue
    return False


def loads(data: bytes | memoryview) -> Any:
    return pickle.loads(data)


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Blocking write of the whole buffer (the fd must be blocking)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_parts(fd: int, parts: list[Part]) -> None:
    """Blocking write of the parts, in order, as one stream: ``writev``, at
    most IOV_MAX parts a call, resumed where a short write stopped."""
    views = [view for view in map(_flat_view, parts) if view.nbytes]
    index = 0
    while index < len(views):
        written = os.writev(fd, views[index : index + _IOV_MAX])
        while written:
            first = views[index]
            if written < first.nbytes:
                views[index] = first[written:]
                break
            written -= first.nbytes
            index += 1


def _flat_view(part: Part) -> memoryview:
    view = memoryview(part)
    if not view.c_contiguous:
        # A Fortran-ordered array's buffer, as pickle wrote it: its memory in order.
        return memoryview(view.tobytes(order="A"))
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def parts_size(parts: Sequence[Part]) -> int:
    if len(parts) == 1 and type(parts[0]) is bytes:
        return len(parts[0])  # nearly every outcome: one small pickle
    return sum(len(part) if type(part) is bytes else memoryview(part).nbytes for part in parts)


_IOV_MAX = 1024  # Linux's and macOS's limit on the buffers of one writev


def write_frame(fd: int, payload: bytes) -> None:
    if len(payload) <= SMALL:
        write_all(fd, HEADER.pack(len(payload)) + payload)  # one write, one wake-up
        return
    write_all(fd, HEADER.pack(len(payload)))
    write_all(fd, payload)


def read_exact(fd: int, size: int) -> bytes | None:
    """Blocking read of exactly ``size`` bytes; None on EOF before any byte."""
    chunks = []
    remaining = size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            if remaining == size:
                return None
            raise EOFError(f"pipe closed after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes | None:
    """Blocking read of one frame; None on a clean EOF."""
    header = read_exact(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    body = read_exact(fd, size) if size else b""
    if body is None:
        raise EOFError("pipe closed between a frame's header and its body")
    return body


LARGE = 1 << 20  # a body this big is read into a buffer of its own, not copied out
_CHUNK = 1 << 16
Body = Union[bytes, bytearray]


class FrameReader:
    """Cuts a byte stream into frame bodies.

    Small frames are cut out of one shared buffer.  A large body gets a
    buffer of exactly its size as soon as its header is in; ``receive`` reads
    the rest straight into it (``recv_into``) and hands that buffer over as
    the body: one copy of a 100 MB result instead of four.
    """

    __slots__ = ("_body", "_buffer", "_filled")

    def __init__(self) -> None:
        self._buffer = bytearray()  # headers and small frames not cut yet
        self._body: bytearray | None = None  # a large body being filled
        self._filled = 0

    def feed(self, data: bytes | memoryview) -> list[Body]:
        """The frames that ``data`` completes."""
        frames: list[Body] = []
        self._take(data, frames)
        return frames

    def receive(self, sock: socket.socket, *, wait: bool = False) -> tuple[list[Body], bool]:
        """Read what ``sock`` holds: the frames completed, and whether it
        reached EOF.  Non-blocking sockets: until it would block.  With
        ``wait`` (a blocking socket): until at least one frame is in."""
        frames: list[Body] = []
        while not (wait and frames):
            try:
                if self._body is not None:
                    count = sock.recv_into(memoryview(self._body)[self._filled :])
                    self._filled += count
                    self._take_body(frames)
                else:
                    chunk = sock.recv(_CHUNK)
                    count = len(chunk)
                    if (
                        count > _HEADER_SIZE
                        and not self._buffer
                        and _unpack_header(chunk, 0)[0] == count - _HEADER_SIZE
                    ):
                        # The usual read, one result: exactly one whole frame,
                        # small (under _CHUNK), cut out without _take's loop.
                        frames.append(chunk[_HEADER_SIZE:])
                    else:
                        self._take(chunk, frames)
                    if 0 < count < _CHUNK and not wait:
                        # Short read: the socket was drained.  A further recv
                        # would only fail (one syscall and one exception per
                        # result); the selector reports what comes next, EOF too.
                        return frames, False
            except BlockingIOError:
                return frames, False
            except (ConnectionResetError, BrokenPipeError):
                count = 0
            if not count:
                return frames, True
        return frames, False

    def read_fd(self, fd: int) -> tuple[list[Body], bool]:
        """One read of ``fd`` (a pipe or socket): the frames completed, and
        whether it reached EOF.  A large body is read into its own buffer in
        place; otherwise a read takes what a small frame needs.
        BlockingIOError when a non-blocking ``fd`` holds nothing."""
        frames: list[Body] = []
        try:
            if self._body is not None:
                count = os.readv(fd, [memoryview(self._body)[self._filled :]])
                self._filled += count
                self._take_body(frames)
            else:
                chunk = os.read(fd, _CHUNK)
                count = len(chunk)
                self._take(chunk, frames)
        except ConnectionResetError:
            count = 0
        return frames, not count

    def _take(self, data: bytes | memoryview, frames: list[Body]) -> None:
        """Append the frames ``data`` completes to ``frames``; keep the rest."""
        if self._body is None and not self._buffer and type(data) is bytes:
            # The usual read holds whole small frames (one result, one job):
            # they are cut straight out of it, not through the buffer.
            start = _cut_small(data, 0, frames)
            if start == len(data):
                return
            data = memoryview(data)[start:]
        view = memoryview(data)
        while view:
            if self._body is not None:
                taken = min(len(view), len(self._body) - self._filled)
                self._body[self._filled : self._filled + taken] = view[:taken]
                self._filled += taken
                view = view[taken:]
                self._take_body(frames)
            else:
                self._buffer += view
                view = view[len(view) :]
                self._cut(frames)

    def _take_body(self, frames: list[Body]) -> None:
        body = self._body
        if body is not None and self._filled == len(body):
            frames.append(body)  # handed over whole: this reader keeps no reference
            self._body = None

    def _cut(self, frames: list[Body]) -> None:
        buffer, start = self._buffer, 0
        while True:
            start = _cut_small(buffer, start, frames)
            if len(buffer) - start < HEADER.size:
                break
            (size,) = HEADER.unpack_from(buffer, start)
            if size < LARGE:
                break  # a small frame not complete yet
            begin = start + HEADER.size
            taken = min(size, len(buffer) - begin)
            self._body = bytearray(size)
            self._body[:taken] = buffer[begin : begin + taken]
            self._filled = taken
            start = begin + taken
            self._take_body(frames)
        del buffer[:start]


def _cut_small(data: bytes | bytearray, start: int, frames: list[Body]) -> int:
    """Append the small frames complete in ``data`` from ``start`` on, each
    copied once (a slice of ``data``'s own type); where the first frame that
    is large or not complete begins."""
    end = len(data)
    while end - start >= _HEADER_SIZE:
        (size,) = _unpack_header(data, start)
        begin = start + _HEADER_SIZE
        stop = begin + size
        if size >= LARGE or stop > end:
            break
        frames.append(data[begin:stop])
        start = stop
    return start


_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from


def _type_name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def encode_exception(exc: BaseException) -> bytes:
    tb = format_remote(exc)
    try:
        return dumps(("err", exc, tb))
    except Exception as why:
        message = (
            f"the job raised {_type_name(exc)}: {exc}, which could not be pickled: "
            f"{type(why).__name__}: {why}"
        )
        return _dumps_error(pickling_error(message, why), message, tb)


def encode_result(value: object) -> tuple[int, bytes]:
    """(OUTCOME_VALUE, pickle), or an error outcome when the value does not pickle."""
    try:
        return OUTCOME_VALUE, dumps(("ok", value))
    except Exception as why:
        return OUTCOME_ERROR, _unpicklable_result(value, why)


def encode_result_in_parts(value: object) -> tuple[int, list[Part]]:
    """As ``encode_result``, the pickle kept in the parts the pickler wrote it
    in: a large bytes-like object in the value (a 100 MB ``bytes``, an array's
    buffer) is a part by itself, by reference, not copied into one buffer
    with the rest (its copy and its pages' faults saved).  A scalar is
    pickled at once, the cheaper way for it."""
    if type(value) in _SCALARS:
        kind, outcome = encode_result(value)
        return kind, [outcome]
    try:
        return OUTCOME_VALUE, dumps_in_parts(("ok", value))
    except Exception as why:
        return OUTCOME_ERROR, [_unpicklable_result(value, why)]


# Their pickles are small but for the rare huge int, which is then copied once more.
_SCALARS = frozenset((type(None), bool, int, float, complex))


class _PartsFile:
    """The file a Pickler writes to: every write kept as it came."""

    __slots__ = ("write",)

    def __init__(self, parts: list[Part]) -> None:
        self.write = parts.append


def _unpicklable_result(value: object, why: Exception) -> bytes:
    message = (
        f"the job's result of type {_type_name(value)} could not be pickled: "
        f"{type(why).__name__}: {why}"
    )
    return _dumps_error(pickling_error(message, why), message, format_remote(why))


def _dumps_error(error: ResultPicklingError, message: str, tb: str) -> bytes:
    try:
        return dumps(("err", error, tb))
    except Exception:  # it took the type of an exception the user process cannot load
        return dumps(("err", ResultPicklingError(message), tb))


def run_and_encode(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, bytes]:
    """Call the job and encode what happened as (kind, outcome); never raises
    (but a BaseException raised while pickling)."""
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        return OUTCOME_ERROR, encode_exception(exc)
    return encode_result(value)


def run_and_encode_in_parts(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, list[Part]]:
    """As ``run_and_encode``, a value's pickle in parts (``encode_result_in_parts``)."""
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        return OUTCOME_ERROR, [encode_exception(exc)]
    return encode_result_in_parts(value)


class Outcome:
    """A decoded job outcome: a value or an exception with its remote traceback."""

    __slots__ = ("exception", "value")

    def __init__(self, value: Any = None, exception: BaseException | None = None) -> None:
        self.value = value
        self.exception = exception

    def unwrap(self) -> Any:
        if self.exception is not None:
            raise self.exception
        return self.value


def decode_outcome(payload: bytes | bytearray | memoryview) -> Outcome:
    """What a job's encoded outcome holds.  Unpickling runs code of the job's
    classes; whatever that raises, SystemExit included, is this outcome's
    error and nobody else's."""
    try:
        kind, *rest = pickle.loads(payload)
    except BaseException as why:
        classes = ", ".join(_classes_named(bytes(payload))) or "no class"
        error = pickling_error(
            f"the job's result or exception could not be unpickled: {type(why).__name__}: "
            f"{why} (it holds {classes})",
            why,
        )
        error.__cause__ = why
        return Outcome(exception=error)
    if kind == "ok":
        return Outcome(value=rest[0])
    exc, tb = rest
    exc.__cause__ = RemoteTraceback(tb)
    return Outcome(exception=exc)


def _classes_named(payload: bytes) -> list[str]:
    """The classes and functions a pickle refers to, so that an error can
    name the one that failed to load (Python's own message may not)."""
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(payload):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.append(arg)
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif opcode.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
    except Exception:
        pass  # a damaged pickle: name what was found before the damage
    return [name for name in dict.fromkeys(names) if not name.startswith("builtins.")]
