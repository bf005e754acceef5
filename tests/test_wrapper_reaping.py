"""killable_wrapper in a host whose SIGCHLD handler reaps every child (issue 12.2).

Daemons often install ``while True: os.waitpid(-1, os.WNOHANG)`` as their
SIGCHLD handler. Such a handler may reap the job before killable_wrapper does,
so killable_wrapper must never depend on being the one who reaps: the exit is
seen through a pidfd (or, on the posix backend, waitid(WNOWAIT) treating
ECHILD as "reaped already"), a result that arrived is returned even if the
exit status is lost, every fd is closed exactly once, and no signal goes to a
pid that may have been reused.

Each case runs a fresh interpreter (the host, with a hard timeout) that
installs such a handler and makes many calls of every kind -- result,
exception, time limit, cancel, job death -- interleaved; it reports each
outcome, and the test checks that every one is right, that no EBADF (or other
OSError) surfaced, and that no process is left, in the host or anywhere under
the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import procs
from jobs import BACKENDS

CALLS = 50  # of each kind, per case

HOST = r"""
import json, multiprocessing, os, signal, sys, time
sys.path.insert(0, sys.argv[2])
import psutil
import cancelk
import cancelk.wrapper
from cancelk import (ProcessCancelledError, ProcessDiedError, ProcessTimeoutError,
                     killable_wrapper)
import jobs

reaped = []

def reap_everything(signum, frame):  # what daemons do: every child, whoever's
    try:
        while (pid := os.waitpid(-1, os.WNOHANG)[0]) > 0:
            reaped.append(pid)
    except ChildProcessError:
        pass  # no child left

signal.signal(signal.SIGCHLD, reap_everything)


def call(kind, i):
    if kind == "result":
        return killable_wrapper(jobs.add, i, 1) == i + 1, "value"
    if kind == "exception":
        try:
            killable_wrapper(jobs.raise_job_error, f"boom {i}")
        except jobs.JobError as why:
            return str(why) == f"boom {i}", "JobError"
        return False, "no exception"
    if kind == "timeout":
        try:
            killable_wrapper(jobs.sleep_return, 30, killable_wrapper_timeout=0.02)
        except ProcessTimeoutError:
            return True, "ProcessTimeoutError"
        return False, "no timeout"
    if kind == "cancel":
        sender, receiver = multiprocessing.Pipe()
        try:
            sender.send({"cancel_timeout": 0.02})  # the job runs, then is killed
            killable_wrapper(jobs.sleep_return, 30, killable_wrapper_cancel_pipe=receiver)
        except ProcessCancelledError:
            return True, "ProcessCancelledError"
        finally:
            sender.close()
            receiver.close()
        return False, "not cancelled"
    if kind == "death":
        try:
            killable_wrapper(jobs.exit_with, 3)
        except ProcessDiedError as why:
            # the status is lost when the handler reaped the job first
            return why.exitcode in (3, None) and why.signal is None, "ProcessDiedError"
        return False, "no death"
    raise ValueError(kind)


kinds = ["result", "exception", "timeout", "cancel", "death"]
calls = int(sys.argv[1])
outcomes = {kind: {} for kind in kinds}
for i in range(calls):
    for kind in kinds:
        try:
            right, what = call(kind, i)
        except BaseException as why:
            right, what = False, f"{type(why).__name__}: {why}"
        key = "right" if right else what
        outcomes[kind][key] = outcomes[kind].get(key, 0) + 1

getattr(cancelk.wrapper, "stop_standby", lambda: None)()
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    left = [f"{p.pid} {p.status()}" for p in psutil.Process().children(recursive=True)]
    if not left:
        break
    time.sleep(0.02)
fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []
print(json.dumps({"outcomes": outcomes, "left": left, "reaped_by_handler": len(reaped),
                  "fds": len(fds)}))
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize("standby", ["0", "1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reaping_sigchld_handler_never_breaks_a_call(backend, standby, tmp_path):
    if backend == "pidfd" and not procs.pidfd_supported():
        pytest.skip("this kernel (or a seccomp filter) does not allow pidfd_open(2)")
    script = tmp_path / "reaping_host.py"
    script.write_text(HOST)
    env = dict(os.environ, CANCELK_BACKEND=backend, CANCELK_WRAPPER_STANDBY=standby)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    before = set(procs.descendant_infos())
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(CALLS), tests_dir],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(tmp_path),
            env=env,
        )
    finally:
        left = [i for key, i in procs.descendant_infos().items() if key not in before]
        procs.kill_records([(i.pid, i.created) for i in left])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = {
        kind: counts for kind, counts in report["outcomes"].items() if counts != {"right": CALLS}
    }
    reaped = report["reaped_by_handler"]
    assert not wrong, f"calls with a wrong outcome (the handler reaped {reaped}): {wrong}"
    assert not report["left"], f"processes left in the host: {report['left']}"
    assert not left, f"processes left under the test: {[i.describe() for i in left]}"
    print(
        f"{backend}, standby {standby}: {5 * CALLS} calls right; the host's handler "
        f"reaped {reaped} children; {report['fds']} fds open at the end"
    )
