"""Runner processes: forked by the supervisor, they run jobs one at a time.

    supervisor --fork--> runner: own process group, dies with the supervisor
                         together with its tree, child subreaper for its jobs
                         initializer(*initargs) once
                         (a warm spare waits here until a slot needs it)
    user process ◄══channel══ ready frame (INIT_SEQ, value), or the
                              initializer's exception (INIT_SEQ, error)
    user process ══channel══► job frame (seq, slot, CLAIM word, pickled fn/args/kwargs);
                              the next ones may arrive while a job runs
                              words.claim(slot, word, seq)  (taken back: skip it)
                              words.begin(slot, seq)   (lost race: wait to be killed)
                              run, pickle the outcome (in parts: a large
                              result is never joined into one buffer)
                              words.finish(slot, seq)  (lost race: wait to be killed)
    user process ◄══channel══ result frame (seq, kind, outcome)

A runner never decides to be killed; it only makes sure that once a kill is
decided it neither starts nor reports the job the kill names.  The frames
are declared in ``_protocol``.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from cancelk import _child, _protocol, _wire
from cancelk._slots import DONE, FRESH, SlotWords


class RunnerSetup(NamedTuple):
    supervisor: int  # the pid that forked the runner: it dies with it
    runner_id: int
    channel_fd: int
    words: SlotWords
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    max_tasks: int | None
    preload: tuple[str, ...]


def run(setup: RunnerSetup) -> None:  # pragma: no cover - runs in the runner process
    """The runner's whole life; never returns."""
    code = 0
    try:
        _child.become_job_process(setup.supervisor)
        _child.become_multiprocessing_child()
        if setup.initializer is not None and not _initialize(setup):
            code = 3
            return
        _preload(setup.preload)
        _send(setup.channel_fd, _protocol.INIT_SEQ, _wire.OUTCOME_VALUE, [_READY])
        _serve(setup)
    except BaseException:
        code = 70
    finally:
        _child.multiprocessing_exit()  # a Queue the jobs used is flushed
        _child.flush_std_streams()
        os._exit(code)


def _preload(names: tuple[str, ...]) -> None:  # pragma: no cover - runs in the runner
    """Import the modules jobs came from, so a spare's first job need not."""
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:  # the job's own unpickling reports any real problem
            continue


def _initialize(setup: RunnerSetup) -> bool:  # pragma: no cover - runs in the runner
    assert setup.initializer is not None
    try:
        setup.initializer(*setup.initargs)
    except BaseException as exc:
        # Logged where it happened, as the stdlib's workers do, then sent.
        logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
        outcome = _wire.encode_exception(exc)
        _send(setup.channel_fd, _protocol.INIT_SEQ, _wire.OUTCOME_ERROR, [outcome])
        return False
    return True


_READY = _wire.dumps(("ok", None))


def _serve(setup: RunnerSetup) -> None:  # pragma: no cover - runs in the runner process
    words, done, me = setup.words, 0, os.getpid()
    before = FRESH | setup.runner_id
    frames = _incoming_frames(setup.channel_fd)
    while setup.max_tasks is None or done < setup.max_tasks:
        frame = next(frames, None)
        if frame is None:
            return  # the user process closed the channel: shut down
        seq, slot, word, job = _protocol.parse_job(frame)
        del frame
        if not words.claim(slot, word, seq):
            continue  # cancelled, or given to another runner, before it began
        if not words.begin(slot, before, seq):
            _await_kill()
        held = [job]
        del job
        kind, parts = _run_job(held)
        _child.leave_if_forked_by_job(me)
        _child.flush_std_streams()
        if not words.finish(slot, seq):
            _await_kill()
        before = seq | DONE
        _send(setup.channel_fd, seq, kind, parts)
        del parts  # a 100 MB result must not stay in memory while idle
        done += 1
        _reap_orphans()


def _incoming_frames(channel_fd: int) -> Iterator[_wire.Body]:  # pragma: no cover
    """Frames from the user process: one read per small job, a large job read
    straight into a buffer of its size."""
    reader = _wire.FrameReader()
    channel = socket.socket(fileno=channel_fd)  # blocking; lives as long as the runner
    while True:
        frames, ended = reader.receive(channel, wait=True)
        frames.reverse()
        while frames:
            yield frames.pop()  # held by the runner alone: it frees the frame early
        if ended:
            return


def _run_job(held: list[memoryview]) -> tuple[int, list[_wire.Part]]:  # pragma: no cover
    """Unpickle the job, let go of its frame (a 100 MB argument is not kept
    twice while the job runs), run it; the outcome's pickle in parts (a
    large result is sent from where it lies, not copied into one buffer)."""
    try:
        fn, args, kwargs = _wire.loads(held.pop())
    except BaseException as exc:
        return _wire.OUTCOME_ERROR, [_wire.encode_exception(exc)]
    return _wire.run_and_encode_in_parts(fn, args, kwargs)


def _send(  # pragma: no cover - runs in the runner process
    channel_fd: int, seq: int, kind: int, parts: list[_wire.Part]
) -> None:
    size = _wire.parts_size(parts)
    head = _protocol.result_frame_head(seq, kind, size)
    if size <= _wire.SMALL:
        _wire.write_all(channel_fd, head + b"".join(parts))  # one write: the user wakes once
    else:
        _wire.write_parts(channel_fd, [head, *parts])


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
