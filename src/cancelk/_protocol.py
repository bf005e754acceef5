"""Every message that crosses a process boundary inside cancelk, in both directions.

    user process ──control socket──► supervisor     StartRunner, SetTimeLimit,
                                                     SetDeadline, SetMemoryLimit,
                                                     GraceCancel, KillRunner,
                                                     Preload, Shutdown
    user process ◄──control socket── supervisor     SupervisorReady, StartFailed,
                                                     RunnerStarted (+ channel fd,
                                                     pidfd), RunnerExited, JobKilled
    user process ──runner channel──► runner         job frame: JOB_HEAD + pickle
    user process ◄──runner channel── runner         result frame: RESULT_HEAD + outcome

Every frame on a stream is an 8-byte little-endian length and a body
(``_wire.FrameReader`` cuts them).  A control body is one kind byte and the
fixed fields of that kind (``Preload`` and ``StartFailed`` end with a UTF-8
text); a job or
result body is a fixed head and a pickle.  Decoding checks the kind and the
size, so an unknown or truncated message raises ``ProtocolError`` with what
was received rather than being misread or dropped.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Union

from cancelk._wire import HEADER, OUTCOME_ERROR, OUTCOME_VALUE

__all__ = [
    "INIT_SEQ",
    "OUTCOME_ERROR",
    "OUTCOME_VALUE",
    "ControlMessage",
    "GraceCancel",
    "JobKilled",
    "KillRunner",
    "Preload",
    "ProtocolError",
    "RunnerExited",
    "RunnerStarted",
    "SetDeadline",
    "SetMemoryLimit",
    "SetTimeLimit",
    "Shutdown",
    "StartFailed",
    "StartRunner",
    "SupervisorReady",
    "decode",
    "encode",
    "job_frame_head",
    "parse_job",
    "parse_result",
    "result_frame_head",
]


class ProtocolError(Exception):
    """A message that does not follow this module's layouts."""


# -- user process -> supervisor -------------------------------------------------
class SetTimeLimit(NamedTuple):
    """Kill job ``seq`` once it has run ``timeout_ns`` (counted from its start)."""

    slot: int
    runner_id: int
    seq: int
    timeout_ns: int


class SetDeadline(NamedTuple):
    """Kill job ``seq`` if it still runs at CLOCK_MONOTONIC ``at_ns``."""

    slot: int
    runner_id: int
    seq: int
    at_ns: int


class SetMemoryLimit(NamedTuple):
    """Kill job ``seq`` once its process tree holds more than ``nbytes`` resident."""

    slot: int
    runner_id: int
    seq: int
    nbytes: int


class GraceCancel(NamedTuple):
    """Job ``seq`` was cancelled with a grace: kill it if it still runs then."""

    slot: int
    runner_id: int
    seq: int
    grace_ns: int


class KillRunner(NamedTuple):
    """A kill of the runner's job was decided: kill the runner's group now."""

    slot: int
    runner_id: int


class StartRunner(NamedTuple):
    """Give ``slot`` a runner: jobs wait and no runner is idle (runners start
    on demand, as the stdlib's workers do)."""

    slot: int


class Preload(NamedTuple):
    """A module jobs come from: spares import it before their first job."""

    module: str


class Shutdown(NamedTuple):
    """Stop every runner and exit."""


# -- supervisor -> user process -------------------------------------------------
class SupervisorReady(NamedTuple):
    """The supervisor has started and serves: a death from now on is not a
    failure to start (and may be answered by starting another)."""


class StartFailed(NamedTuple):
    """The supervisor could not start; it exits.  ``main_guard``: because the
    main module started a pool while the supervisor imported it."""

    main_guard: bool
    text: str


class RunnerStarted(NamedTuple):
    """A runner took ``slot``; the channel fd (and a pidfd) travel with it."""

    slot: int
    runner_id: int
    pid: int
    with_pidfd: bool


class RunnerExited(NamedTuple):
    """A runner was reaped; ``state`` is its slot's shared word at that moment;
    ``oom_kills`` how many processes the kernel's OOM killer killed while the
    runner lived (-1: unknown)."""

    slot: int
    runner_id: int
    pid: int
    status: int
    state: int
    oom_kills: int


class JobKilled(NamedTuple):
    """The supervisor killed job ``seq`` (``flag``: its KILL_* bit), before the
    reap; ``peak``: the most resident memory seen of its tree (memory kills)."""

    slot: int
    runner_id: int
    seq: int
    flag: int
    peak: int


ControlMessage = Union[
    SetTimeLimit,
    SetDeadline,
    SetMemoryLimit,
    GraceCancel,
    KillRunner,
    StartRunner,
    Preload,
    Shutdown,
    SupervisorReady,
    StartFailed,
    RunnerStarted,
    RunnerExited,
    JobKilled,
]

# kind byte -> (class, layout of its fixed fields); the text field, where the
# class has one (its last), follows the fixed ones.
_LAYOUTS: dict[int, tuple[type, struct.Struct]] = {
    1: (SetTimeLimit, struct.Struct("<QQQq")),
    2: (GraceCancel, struct.Struct("<QQQq")),
    3: (KillRunner, struct.Struct("<QQ")),
    4: (Preload, struct.Struct("")),
    5: (Shutdown, struct.Struct("")),
    6: (RunnerStarted, struct.Struct("<QQq?")),
    7: (RunnerExited, struct.Struct("<QQqiQq")),
    8: (JobKilled, struct.Struct("<QQQQq")),
    9: (SetDeadline, struct.Struct("<QQQq")),
    10: (SetMemoryLimit, struct.Struct("<QQQq")),
    11: (StartRunner, struct.Struct("<Q")),
    16: (SupervisorReady, struct.Struct("")),
    17: (StartFailed, struct.Struct("<?")),
}
_KINDS = {cls: kind for kind, (cls, _) in _LAYOUTS.items()}
_TEXT = {Preload, StartFailed}


def encode(message: ControlMessage) -> bytes:
    """The framed bytes of a control message."""
    kind = _KINDS[type(message)]
    layout = _LAYOUTS[kind][1]
    if type(message) in _TEXT:
        fields = tuple(message)
        body = bytes((kind,)) + layout.pack(*fields[:-1]) + str(fields[-1]).encode()
    else:
        body = bytes((kind,)) + layout.pack(*message)
    return HEADER.pack(len(body)) + body


def decode(body: bytes | bytearray) -> ControlMessage:
    """The message in one frame's body; ProtocolError if it is not one."""
    if not body:
        raise ProtocolError("empty control message")
    entry = _LAYOUTS.get(body[0])
    if entry is None:
        raise ProtocolError(f"unknown control message kind {body[0]} ({len(body)} bytes)")
    cls, layout = entry
    if cls in _TEXT:
        if len(body) - 1 < layout.size:
            raise ProtocolError(f"{cls.__name__} of {len(body) - 1} bytes is too short")
        fixed = layout.unpack_from(body, 1)
        try:
            text = bytes(body[1 + layout.size :]).decode()
        except UnicodeDecodeError as why:
            raise ProtocolError(f"{cls.__name__} with a malformed text: {why}") from why
        return cls(*fixed, text)  # type: ignore[no-any-return]
    if len(body) - 1 != layout.size:
        raise ProtocolError(
            f"{cls.__name__} of {len(body) - 1} bytes, expected {layout.size}: {bytes(body)!r}"
        )
    return cls(*layout.unpack_from(body, 1))  # type: ignore[no-any-return]


# -- runner channels ------------------------------------------------------------
# seq, slot, CLAIM word: a spare learns its slot from its first job
JOB_HEAD = struct.Struct("<QII")
RESULT_HEAD = struct.Struct("<QB")  # seq, outcome kind
INIT_SEQ = 0  # a result frame for no job: the initializer ran (value) or raised (error)


_JOB_FRAME_HEAD = struct.Struct(HEADER.format + JOB_HEAD.format.lstrip("<"))


def job_frame_head(seq: int, slot: int, word: int, payload_size: int) -> bytes:
    """Frame header and job head to send before a job's pickled payload."""
    return _JOB_FRAME_HEAD.pack(JOB_HEAD.size + payload_size, seq, slot, word)


def parse_job(body: bytes | bytearray) -> tuple[int, int, int, memoryview]:
    """(seq, slot, CLAIM word, pickled job) of a job frame's body."""
    if len(body) < JOB_HEAD.size:
        raise ProtocolError(f"job frame of {len(body)} bytes is shorter than its head")
    seq, slot, word = JOB_HEAD.unpack_from(body)
    return seq, slot, word, memoryview(body)[JOB_HEAD.size :]


def result_frame_head(seq: int, kind: int, outcome_size: int) -> bytes:
    """Frame header and result head to send before an encoded outcome."""
    return HEADER.pack(RESULT_HEAD.size + outcome_size) + RESULT_HEAD.pack(seq, kind)


def parse_result(body: bytes | bytearray) -> tuple[int, int, memoryview]:
    """(seq, outcome kind, encoded outcome) of a result frame's body."""
    if len(body) < RESULT_HEAD.size:
        raise ProtocolError(f"result frame of {len(body)} bytes is shorter than its head")
    seq, kind = RESULT_HEAD.unpack_from(body)
    if kind not in (OUTCOME_VALUE, OUTCOME_ERROR):
        raise ProtocolError(f"result frame for job {seq} with unknown outcome kind {kind}")
    return seq, kind, memoryview(body)[RESULT_HEAD.size :]
