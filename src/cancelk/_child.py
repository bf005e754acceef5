"""How cancelk's own processes begin: forked children, and fresh interpreters.

    parent --os.fork()--> child: forget_parent_signals()  (I9)
                                 own process group         (one kill reaches the tree)
                                 parent-death signal       (no orphans, Linux)

    parent: start_interpreter("cancelk.X:main", fds)  ──►  python -c "...; main()"
            send_main_and_payload(fd, name, payload)  ──►  receive_main_and_payload(fd)
                                                           (imports __main__ as spawn
                                                            does, returns the payload)

Fresh interpreters serve the spawn and forkserver supervisors and the jobs of
``killable_wrapper`` in threaded hosts.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from multiprocessing import spawn
from typing import Any

from cancelk import _core, _wire


def forget_parent_signals() -> None:
    """Drop the parent's Python signal handlers and wakeup fd.

    A forked child shares the parent's asyncio self-pipe; if its wakeup fd
    stayed set, a signal in the child would wake the parent's event loop and
    run the parent's handlers there (I9).
    """
    _forget_wakeup_fd()
    _forget_handlers(*_core.signal_dispositions())


def become_job_process(parent: int) -> None:
    """Run in a job process freshly forked by ``parent``: the parent's
    signal handlers forgotten, own group, and when the parent dies, the job
    dies with everything it started.

    It also becomes a child subreaper (Linux), so whatever the job starts
    stays in its tree even if it daemonizes, and a kill can find it.  The
    process work is one C call: every Python call here costs a fork of a
    large process copy-on-write faults (killable_wrapper's overhead, P6).
    """
    _forget_wakeup_fd()
    _forget_handlers(*_core.become_job_process(parent))


_SIGINT_BIT = 1 << (signal.SIGINT - 1)
# signal.getsignal() maps values to enums through an exception per handler:
# in a forked child, each of its steps faults in pages.
_raw_getsignal: Callable[[int], Any] = getattr(
    importlib.import_module("_signal"), "getsignal", signal.getsignal
)


def _forget_wakeup_fd() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass


def _forget_handlers(handled: int, ignored: int) -> None:
    """Reset the Python handlers among ``handled`` (a mask of the signals
    with an OS-level handler: only those can have a Python one); SIGINT gets
    Python's default, KeyboardInterrupt, as in any fresh interpreter."""
    for signum in _core.signals_in(handled & ~_SIGINT_BIT):
        try:
            handler = _raw_getsignal(signum)
        except (ValueError, OSError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (ValueError, OSError):
                continue
    # Ignored dispositions survive exec(); a job's subprocesses must not
    # inherit a supervisor's "ignore SIGINT".
    if ignored & _SIGINT_BIT or _raw_getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stdin_from_devnull() -> None:
    """Read stdin from /dev/null, as the stdlib's workers do: ``input()`` in a
    job raises EOFError instead of taking the user's input.  Descriptor 0
    too, so that neither the job nor what it starts reads the terminal."""
    try:
        if sys.stdin is not None:
            sys.stdin.close()  # first: it may own descriptor 0
    except Exception:
        pass
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    if fd != 0:  # 0 itself when descriptor 0 was closed
        os.dup2(fd, 0)
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)


def become_multiprocessing_child() -> None:
    """What multiprocessing does first in a process it forks: the parent's
    children and exit finalizers are not this process's, and objects that
    must be reset after a fork (a Queue's feeder thread, locks) are reset."""
    from multiprocessing import process, util

    process._children = set()  # type: ignore[attr-defined]
    util._finalizer_registry.clear()  # type: ignore[attr-defined]
    util._run_after_forkers()  # type: ignore[attr-defined]


def multiprocessing_exit() -> None:
    """What multiprocessing does last in a process it started: run the exit
    finalizers, so that what a job put in a multiprocessing Queue is flushed
    to it, and join the processes it left."""
    from multiprocessing import util

    try:
        util._exit_function()  # type: ignore[attr-defined]
    except Exception:
        pass


class _DupFd:
    """A descriptor a fresh interpreter inherits under the same number."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


class _Spawning:
    """Stands for the process being started while its payload is pickled, as
    multiprocessing's spawning Popen does: objects that may only be shared by
    inheritance (Queue, Lock, Connection) pickle, their descriptors listed to
    be passed on."""

    DupFd = _DupFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return fd


def dumps_for_child(obj: object) -> tuple[bytes, list[int]]:
    """Pickle ``obj`` for a fresh interpreter started next; the descriptors it
    must inherit (``pass_fds``) for what was pickled to work there."""
    from multiprocessing import context, reduction

    spawning = _Spawning()
    context.set_spawning_popen(spawning)  # type: ignore[arg-type]
    try:
        # multiprocessing's pickler: it knows how to pickle a Connection
        data = reduction.ForkingPickler.dumps(obj, _wire.PROTOCOL)
        return bytes(data), spawning.fds
    finally:
        context.set_spawning_popen(None)


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def run_job_here(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Run the job in this (job) process; its encoded outcome, std streams
    flushed.  A child the job forks that returns here exits instead."""
    me = os.getpid()
    _kind, payload = _wire.run_and_encode(fn, args, kwargs)
    leave_if_forked_by_job(me)
    flush_std_streams()
    return payload


def leave_if_forked_by_job(job_process: int) -> None:
    """A child the job forked came back from the job's function: it is not
    the job process, and must neither report a result nor go on as one."""
    if os.getpid() != job_process:
        flush_std_streams()
        os._exit(0)


def start_interpreter(
    entry: str, pass_fds: Sequence[int], args: Sequence[str] = (), *, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``python -c`` running ``entry`` ("cancelk.module:function") with
    ``pass_fds`` inherited and ``args`` in its ``sys.argv[1:]``."""
    module, function = entry.split(":")
    code = f"from {module} import {function}; {function}()"
    # The interpreter's flags (-X dev, -W, -O...) go along, as to
    # multiprocessing's spawned children.
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return subprocess.Popen(
        [spawn.get_executable(), *flags, "-c", code, *args],
        pass_fds=tuple(pass_fds),
        start_new_session=new_session,
    )


def send_main_and_payload(fd: int, process_name: str, payload: bytes) -> None:
    """Send a fresh interpreter what it needs to import ``__main__``, then ``payload``.

    Two layers: the payload may name functions of ``__main__``, which can be
    unpickled only after the main module was imported there.
    """
    _wire.write_frame(fd, _wire.dumps((main_preparation(process_name), payload)))


def receive_main_and_payload(fd: int) -> bytes | None:
    """In a fresh interpreter: import ``__main__`` as spawn does and return
    the payload; None if the parent went away first.

    While the main module is imported the process counts as bootstrapping,
    as multiprocessing's own children do: a pool (cancelk's or the stdlib's)
    started by that import fails at once instead of starting processes that
    import it again (a script without ``if __name__ == "__main__":``).
    """
    frame = _wire.read_frame(fd)
    if frame is None:
        return None
    preparation, payload = pickle.loads(frame)
    process = multiprocessing.current_process()
    process._inheriting = True  # type: ignore[attr-defined]
    try:
        spawn.prepare(preparation)
    finally:
        process._inheriting = False  # type: ignore[attr-defined]
    return bytes(payload)


class MainGuardError(RuntimeError):
    """A pool was started while this process imported the main module."""


# Set when this process refused to start a pool during that import: the
# supervisor then reports the missing guard rather than a bare traceback.
refused_during_main_import = False


def check_not_importing_main() -> None:
    """Refuse to start a pool while this process is still importing the main
    module for a spawn or forkserver start, as multiprocessing does."""
    global refused_during_main_import
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    refused_during_main_import = True
    # During the import the module is __mp_main__; __main__ is still "-c".
    module = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    main = getattr(module, "__file__", None) or "the main module"
    raise MainGuardError(
        f"a process pool was started while this process (a cancelk supervisor or "
        f"a multiprocessing child, started with spawn or forkserver) was importing "
        f"{main}: that module starts a pool as it is imported.\n"
        f"Put the code that starts the pool under\n\n"
        f'    if __name__ == "__main__":\n\n'
        f"as the multiprocessing documentation asks ('Safe importing of main module')."
    )


def main_preparation(name: str) -> dict[str, object]:
    """What a fresh interpreter needs to import ``__main__`` as spawn does.

    The authkey goes along as plain bytes (an ``AuthenticationString``
    refuses to pickle outside multiprocessing's own spawning): a job must be
    able to use the ``multiprocessing.Manager`` proxies the user process
    passes it, which authenticate with it, as the stdlib's workers can.
    """
    data: dict[str, object] = spawn.get_preparation_data(name)
    authkey = data.get("authkey")
    if authkey is not None:
        data["authkey"] = bytes(authkey)  # type: ignore[call-overload]
    return data
