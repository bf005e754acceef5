"""Runner processes: forked by the supervisor, they run jobs one at a time.

    supervisor --fork--> runner: own process group, SIGKILL when the
                         supervisor dies, child subreaper for its jobs' orphans
                         initializer(*initargs) once
                         (a warm spare waits here until a slot needs it)
    user process ==channel==> frame(seq, slot, pickled (fn, args, kwargs))
                              words.begin(slot, seq)   (lost race: wait to be killed)
                              run, encode the outcome
                              words.finish(slot, seq)  (lost race: wait to be killed)
    user process <==channel== frame(seq, outcome)

A runner never decides to be killed; it only makes sure that once a kill is
decided it neither starts nor reports the job the kill names.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cancelk import _forked, _wire
from cancelk._slots import DONE, FRESH, SlotWords

SEQ = struct.Struct("<Q")
JOB_HEAD = struct.Struct("<QQ")  # seq, slot: a spare learns its slot from its first job
INIT_FAILED_SEQ = 0


def run(
    supervisor: int,
    runner_id: int,
    channel_fd: int,
    words: SlotWords,
    initializer: Callable[..., Any] | None,
    initargs: Sequence[Any],
    max_tasks: int | None,
    preload: Sequence[str] = (),
) -> None:  # pragma: no cover - runs in the runner process
    """The runner's whole life; never returns."""
    code = 0
    try:
        _forked.become_job_process(supervisor)
        if initializer is not None and not _initialize(channel_fd, initializer, initargs):
            code = 3
            return
        _preload(preload)
        _serve(runner_id, channel_fd, words, max_tasks)
    except BaseException:
        code = 70
    finally:
        _forked.flush_std_streams()
        os._exit(code)


def _preload(names: Sequence[str]) -> None:  # pragma: no cover - runs in the runner
    """Import the modules jobs came from, so a spare's first job need not."""
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:  # the job's own unpickling reports any real problem
            continue


def _initialize(
    channel_fd: int, initializer: Callable[..., Any], initargs: Sequence[Any]
) -> bool:  # pragma: no cover - runs in the runner process
    try:
        initializer(*initargs)
    except BaseException as exc:
        _send(channel_fd, INIT_FAILED_SEQ, _wire.encode_exception(exc))
        return False
    return True


def _serve(
    runner_id: int, channel_fd: int, words: SlotWords, max_tasks: int | None
) -> None:  # pragma: no cover - runs in the runner process
    done = 0
    before = FRESH | runner_id
    frames = _incoming_frames(channel_fd)
    while max_tasks is None or done < max_tasks:
        frame = next(frames, None)
        if frame is None:
            return  # the user process closed the channel: shut down
        seq, slot = JOB_HEAD.unpack_from(frame)
        if not words.begin(slot, before, seq):
            _await_kill()
        outcome = _run_job(memoryview(frame)[JOB_HEAD.size :])
        _forked.flush_std_streams()
        if not words.finish(slot, seq):
            _await_kill()
        before = seq | DONE
        _send(channel_fd, seq, outcome)
        del frame, outcome  # a 100 MB job must not stay in memory while idle
        done += 1
        _reap_orphans()


def _incoming_frames(channel_fd: int) -> Iterator[bytes]:  # pragma: no cover
    """Frames from the user process, read in large chunks: one read per small job."""
    reader = _wire.FrameReader()
    while True:
        chunk = os.read(channel_fd, 1 << 16)
        if not chunk:
            return
        yield from reader.feed(chunk)


def _run_job(job: memoryview) -> bytes:  # pragma: no cover - runs in the runner process
    try:
        fn, args, kwargs = pickle.loads(job)
    except BaseException as exc:
        return _wire.encode_exception(exc)
    return _wire.run_and_encode(fn, args, kwargs)


def _send(channel_fd: int, seq: int, outcome: bytes) -> None:  # pragma: no cover
    head = _wire.HEADER.pack(SEQ.size + len(outcome)) + SEQ.pack(seq)
    if len(outcome) <= _wire.SMALL:
        _wire.write_all(channel_fd, head + outcome)  # one write: the user wakes once
    else:
        _wire.write_all(channel_fd, head)
        _wire.write_all(channel_fd, outcome)


def _await_kill() -> None:  # pragma: no cover - runs in the runner process
    while True:
        signal.pause()


def _reap_orphans() -> None:  # pragma: no cover - runs in the runner process
    """Reap zombies a finished job left behind (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
