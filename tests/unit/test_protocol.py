"""Frames, control messages and job outcomes (cancelk._wire, cancelk._protocol)."""

from __future__ import annotations

import pickle
import struct

import pytest

from cancelk import _protocol, _wire
from cancelk._slots import KILL_MEMORY, KILL_TIMEOUT
from cancelk.errors import RemoteTraceback, ResultPicklingError

pytestmark = pytest.mark.timeout(10)

MESSAGES = [
    _protocol.SetTimeLimit(3, 1 << 33, 12, 50_000_000),
    _protocol.GraceCancel(0, 7, 1, 0),
    _protocol.KillRunner(31, (1 << 40) + 5),
    _protocol.Preload("package.módulo"),
    _protocol.Shutdown(),
    _protocol.RunnerStarted(2, 9, 4242, True),
    _protocol.RunnerExited(2, 9, 4242, 9, 17 | KILL_TIMEOUT, -1),
    _protocol.JobKilled(1, 2, 3, KILL_TIMEOUT, 0),
    _protocol.JobKilled(1, 2, 3, KILL_MEMORY, 300 << 20),
    _protocol.SetDeadline(4, 5, 6, 123_456_789_000),
    _protocol.SetMemoryLimit(4, 5, 6, 300 << 20),
    _protocol.SupervisorReady(),
    _protocol.StartFailed(True, "RuntimeError: importing 'm\u00f6d.py' started a pool\n"),
    _protocol.StartFailed(False, ""),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    framed = _protocol.encode(message)
    (frames,) = [_wire.FrameReader().feed(framed)]
    assert len(frames) == 1
    decoded = _protocol.decode(frames[0])
    assert decoded == message and type(decoded) is type(message)


def test_unknown_kind_is_an_error_naming_it():
    with pytest.raises(_protocol.ProtocolError, match="unknown control message kind 200"):
        _protocol.decode(bytes([200, 1, 2, 3]))


def test_truncated_message_is_an_error_naming_it():
    body = _wire.FrameReader().feed(_protocol.encode(_protocol.KillRunner(1, 2)))[0]
    with pytest.raises(_protocol.ProtocolError, match="KillRunner of 15 bytes, expected 16"):
        _protocol.decode(body[:-1])


def test_empty_message_is_an_error():
    with pytest.raises(_protocol.ProtocolError, match="empty"):
        _protocol.decode(b"")


def test_malformed_module_name_is_an_error():
    with pytest.raises(_protocol.ProtocolError, match="Preload"):
        _protocol.decode(bytes([4]) + b"\xff\xfe")


def test_job_frame_head_and_parse():
    payload = pickle.dumps((len, ("ab",), {}))
    framed = _protocol.job_frame_head(41, 3, 1, len(payload)) + payload
    (body,) = _wire.FrameReader().feed(framed)
    seq, slot, word, job = _protocol.parse_job(body)
    assert (seq, slot, word) == (41, 3, 1)
    fn, args, kwargs = pickle.loads(job)
    assert fn(*args, **kwargs) == 2


def test_result_frame_head_and_parse():
    kind, outcome = _wire.encode_result([1, 2])
    framed = _protocol.result_frame_head(8, kind, len(outcome)) + outcome
    (body,) = _wire.FrameReader().feed(framed)
    seq, got_kind, got = _protocol.parse_result(body)
    assert (seq, got_kind) == (8, _wire.OUTCOME_VALUE)
    assert _wire.decode_outcome(bytes(got)).unwrap() == [1, 2]


@pytest.mark.parametrize("parse", [_protocol.parse_job, _protocol.parse_result])
def test_short_channel_frames_are_errors(parse):
    with pytest.raises(_protocol.ProtocolError, match="shorter than its head"):
        parse(b"\x01\x02")


def test_result_with_an_unknown_outcome_kind_is_an_error():
    body = struct.pack("<QB", 5, 9) + b"x"
    with pytest.raises(_protocol.ProtocolError, match="unknown outcome kind 9"):
        _protocol.parse_result(body)


def test_frame_reader_cuts_frames_fed_byte_by_byte():
    stream = b"".join(_wire.frame(bytes([n % 256]) * n) for n in (0, 1, 5, 300))
    reader = _wire.FrameReader()
    frames = []
    for byte in stream:
        frames += reader.feed(bytes([byte]))
    assert frames == [b"", b"\x01", b"\x05" * 5, bytes([300 % 256]) * 300]


def test_frame_reader_cuts_several_frames_in_one_chunk():
    stream = _wire.frame(b"one") + _wire.frame(b"two") + _wire.frame(b"thr")[:5]
    reader = _wire.FrameReader()
    assert reader.feed(stream) == [b"one", b"two"]
    assert reader.feed(_wire.frame(b"thr")[5:]) == [b"thr"]


def test_an_exception_outcome_carries_its_remote_traceback():
    kind, outcome = _wire.run_and_encode(int, ("x",), {})
    assert kind == _wire.OUTCOME_ERROR
    decoded = _wire.decode_outcome(outcome)
    assert isinstance(decoded.exception, ValueError)
    assert isinstance(decoded.exception.__cause__, RemoteTraceback)
    assert "invalid literal" in str(decoded.exception.__cause__)
    with pytest.raises(ValueError):
        decoded.unwrap()


def test_an_unpicklable_result_becomes_an_error_outcome():
    kind, outcome = _wire.run_and_encode(lambda: lambda: 1, (), {})
    assert kind == _wire.OUTCOME_ERROR
    error = _wire.decode_outcome(outcome).exception
    assert isinstance(error, ResultPicklingError)
    assert "could not be pickled" in str(error)


class _Unloadable:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise LookupError("cannot be built here")


def test_an_outcome_that_cannot_be_unpickled_names_what_failed():
    outcome = pickle.dumps(("ok", _Unloadable()))
    error = _wire.decode_outcome(outcome).exception
    assert isinstance(error, ResultPicklingError)
    assert "LookupError" in str(error) and "_refuse" in str(error)


def test_a_large_body_gets_a_buffer_of_its_own_fed_in_pieces():
    large = bytes(range(256)) * ((_wire.LARGE // 256) + 3)
    stream = _wire.frame(b"small") + _wire.frame(large) + _wire.frame(b"after")
    reader = _wire.FrameReader()
    frames = []
    for start in range(0, len(stream), 100_003):
        frames += reader.feed(stream[start : start + 100_003])
    assert frames == [b"small", large, b"after"]
    assert isinstance(frames[1], bytearray) and len(frames[1]) == len(large)


def test_receive_reads_a_large_body_in_place_and_sees_eof():
    import socket
    import threading

    large = b"\x07" * (3 * _wire.LARGE + 5)
    stream = _wire.frame(b"one") + _wire.frame(large) + _wire.frame(b"two")
    left, right = socket.socketpair()
    try:
        writer = threading.Thread(target=lambda: (left.sendall(stream), left.close()))
        writer.start()
        reader, frames, ended = _wire.FrameReader(), [], False
        while not ended:
            got, ended = reader.receive(right, wait=True)
            frames += got
        writer.join()
        assert frames == [b"one", large, b"two"]
    finally:
        right.close()
        if left.fileno() >= 0:
            left.close()


def test_receive_on_a_non_blocking_socket_returns_what_is_there():
    import socket

    left, right = socket.socketpair()
    right.setblocking(False)
    try:
        left.sendall(_wire.frame(b"a") + _wire.frame(b"b")[:5])
        frames, ended = _wire.FrameReader().receive(right)
        assert frames == [b"a"] and not ended
    finally:
        left.close()
        right.close()


# What each read brings, and the frames it completes (reads in this order,
# into one reader): every way of cutting must agree on them.
_CUT_CASES = [
    (_wire.frame(b"first"), [b"first"]),  # exactly one frame: the usual read
    (_wire.frame(b""), [b""]),
    (_wire.frame(b"x") + _wire.frame(b"yz"), [b"x", b"yz"]),
    (_wire.frame(b"part")[:6], []),  # a frame's head only: kept
    (_wire.frame(b"part")[6:], [b"part"]),
    (_wire.frame(b"\x00" * 1000), [b"\x00" * 1000]),
]


def test_receive_cuts_one_whole_frame_per_read_and_whatever_else_comes():
    import socket

    left, right = socket.socketpair()
    right.setblocking(False)
    reader = _wire.FrameReader()
    try:
        for data, expected in _CUT_CASES:
            left.sendall(data)
            frames, ended = reader.receive(right)
            assert [bytes(f) for f in frames] == expected and not ended
        left.close()
        assert reader.receive(right) == ([], True)
    finally:
        right.close()
        if left.fileno() >= 0:
            left.close()


def test_feed_and_read_fd_cut_the_same_frames_as_receive():
    import os

    fed = _wire.FrameReader()
    for data, expected in _CUT_CASES:
        assert [bytes(f) for f in fed.feed(data)] == expected
    read_end, write_end = os.pipe()
    reader = _wire.FrameReader()
    try:
        for data, expected in _CUT_CASES:
            os.write(write_end, data)
            frames, ended = reader.read_fd(read_end)
            assert [bytes(f) for f in frames] == expected and not ended
        os.close(write_end)
        write_end = -1
        assert reader.read_fd(read_end) == ([], True)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


class _Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Point) and other.x == self.x


_LARGE_BYTES = b"\x05" * (3 * _wire.LARGE)

_PARTS_VALUES = [
    None,
    7,
    2.5,
    [1, "two", 3.0],
    {"point": _Point(4)},
    b"short",
    _LARGE_BYTES,
    bytearray(b"\x09" * _wire.LARGE),
    "é" * _wire.LARGE,
    list(range(300_000)),  # framed: many 64 KB writes
    (_LARGE_BYTES, [_LARGE_BYTES], b"tail"),  # one object twice: the memo
]


@pytest.mark.parametrize("value", _PARTS_VALUES, ids=lambda v: type(v).__name__)
def test_a_result_in_parts_is_the_same_pickle_as_in_one_piece(value):
    kind, parts = _wire.encode_result_in_parts(value)
    assert kind == _wire.OUTCOME_VALUE
    joined = b"".join(parts)
    assert joined == _wire.encode_result(value)[1]
    assert _wire.parts_size(parts) == len(joined)
    assert _wire.decode_outcome(joined).value == value


def test_a_large_bytes_result_is_a_part_by_itself_not_a_copy():
    _kind, parts = _wire.encode_result_in_parts(("x", _LARGE_BYTES))
    assert any(part is _LARGE_BYTES for part in parts)
    assert max(len(part) for part in parts if part is not _LARGE_BYTES) < 1024


def test_an_unpicklable_result_in_parts_becomes_an_error_outcome():
    kind, parts = _wire.run_and_encode_in_parts(lambda: [1, lambda: 1], (), {})
    assert kind == _wire.OUTCOME_ERROR and len(parts) == 1
    error = _wire.decode_outcome(parts[0]).exception
    assert isinstance(error, ResultPicklingError)
    assert "of type builtins.list could not be pickled" in str(error)


def test_a_job_that_raises_gives_its_error_in_one_part():
    kind, parts = _wire.run_and_encode_in_parts(int, ("x",), {})
    assert kind == _wire.OUTCOME_ERROR and len(parts) == 1
    assert isinstance(_wire.decode_outcome(parts[0]).exception, ValueError)


@pytest.mark.parametrize("most", [None, 777], ids=["whole-writes", "short-writes"])
def test_write_parts_writes_every_part_in_order_past_short_writes_and_iov_max(monkeypatch, most):
    import os
    import socket
    import threading

    parts: list[_wire.Part] = [bytes([i % 251]) * (i % 7) for i in range(3000)]  # empty ones too
    parts += [_LARGE_BYTES, bytearray(b"\x02" * 70_000), pickle.PickleBuffer(b"buffer")]
    parts.append(memoryview(b"abcdef")[::2])  # not contiguous: its bytes in order
    parts.append(memoryview(bytearray(b"0123456789ab")).cast("B", shape=[3, 4]))
    expected = b"".join(bytes(memoryview(part).tobytes()) for part in parts)
    widest, real_writev = [], os.writev

    def writev(fd, buffers):
        # as a write interrupted by a signal: at most ``most`` bytes taken
        widest.append(len(buffers))
        if most is None:
            return real_writev(fd, buffers)
        taken, room = [], most
        for buffer in buffers:
            if room <= 0:
                break
            taken.append(buffer[:room])
            room -= len(taken[-1])
        return real_writev(fd, taken)

    monkeypatch.setattr(_wire.os, "writev", writev)
    left, right = socket.socketpair()
    received = bytearray()

    def read_all() -> None:
        while chunk := right.recv(1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        _wire.write_parts(left.fileno(), parts)
    finally:
        left.close()
        reader.join(10)
        right.close()
    assert not reader.is_alive()
    assert bytes(received) == expected
    assert max(widest) <= 1024
    assert _wire.parts_size(parts[:3003]) == len(expected) - 3 - 12


def _noop() -> None:
    return None


class _SizeRefused:
    def __sizeof__(self) -> int:
        raise RuntimeError("no size")


def test_a_call_with_small_arguments_is_pickled_in_one_piece():
    call = (_noop, (1, "two", [3]), {"four": b"4" * 1000})
    assert _wire.dumps_call(*call) == _wire.dumps(call)
    assert isinstance(_wire.dumps_call(_noop, (_SizeRefused(),), {}), bytes)


def test_a_large_bytes_argument_is_sent_by_reference_and_a_mutable_one_copied_now():
    data = b"\x03" * (2 * _wire.LARGE)
    buffer = bytearray(b"\x04" * _wire.LARGE)
    call = (_noop, (data,), {"buffer": buffer})
    payload = _wire.dumps_call(*call)
    assert isinstance(payload, list)
    assert any(part is data for part in payload)
    assert all(type(part) is bytes for part in payload)
    joined = b"".join(payload)
    assert joined == _wire.dumps(call)
    assert _wire.parts_size(payload) == len(joined)
    buffer[:] = b"\x00" * len(buffer)  # changed after submit: the job sees it as it was
    assert b"".join(payload) == joined
    assert pickle.loads(joined)[2]["buffer"] == b"\x04" * _wire.LARGE
