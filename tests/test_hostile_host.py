"""Host programs that do ordinary hostile things: Ctrl-C in a terminal, a
SIGCHLD handler that reaps every child, an initializer that never returns, a
result whose unpickling raises SystemExit, jobs that fork and return.

Each scenario is a real program run in a fresh interpreter in a session of
its own (so a SIGINT to its process group is what a terminal sends), under a
hard timeout, and every process it started is checked gone afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)

PRELUDE = textwrap.dedent(
    """
    import os, signal, sys, time
    import cancelk

    def sleeper(seconds, path=None):
        if path:
            with open(path, "a") as f:
                f.write(f"{os.getpid()}\\n")
        time.sleep(seconds)
        return seconds

    def say(*words):
        print(*words, flush=True)
    """
)


def run_program(tmp_path, body: str, *args: str, timeout: float = 60) -> subprocess.Popen:
    script = tmp_path / "program.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job is
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_lines(path, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(line) for line in path.read_text().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.02)
    raise AssertionError(f"{count} jobs did not start within {timeout} s")


def assert_all_gone(pids, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.01)
    assert not alive, f"still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def session_members(sid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return found


# -- 1. Ctrl-C -------------------------------------------------------------------

CTRL_C = """
    mode, method, record = sys.argv[1], sys.argv[2], sys.argv[3]
    if __name__ == "__main__":
        if mode == "with":
            with cancelk.ProcessPoolExecutor(2, mp_context=method) as pool:
                futures = [pool.submit(sleeper, 30, record) for _ in range(6)]
                futures[0].result()
        else:  # no with block: the program ends through the interpreter's exit
            pool = cancelk.ProcessPoolExecutor(2, mp_context=method)
            futures = [pool.submit(sleeper, 30, record) for _ in range(6)]
            futures[0].result()
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("mode", ["with", "bare"])
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_ends_the_program_within_a_second_with_every_process_gone(
    tmp_path, method, mode, presses
):
    record = tmp_path / "pids"
    proc = run_program(tmp_path, CTRL_C, mode, method, str(record))
    try:
        job_pids = wait_for_lines(record, 2)
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        pressed = time.monotonic()
        for _ in range(presses):
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            time.sleep(0.05)
        proc.wait(timeout=10)
        took = time.monotonic() - pressed
    finally:
        _out, err = finish(proc)
    assert took < 1.0 + 0.05 * presses, f"exited {took:.2f} s after Ctrl-C\n{err[-3000:]}"
    assert "KeyboardInterrupt" in err
    assert_all_gone(job_pids + tree)
    assert not session_members(proc.pid)


# -- 2. a SIGCHLD handler that reaps every child ------------------------------------

REAPER = """
    from concurrent.futures import wait
    import psutil

    def reap_everything(signum, frame):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    if __name__ == "__main__":
        signal.signal(signal.SIGCHLD, reap_everything)
        method = sys.argv[1]
        pool = cancelk.ProcessPoolExecutor(1, mp_context=method)
        assert pool.submit(sleeper, 0).result(timeout=30) == 0
        running = pool.submit(sleeper, 30)
        queued = pool.submit(sleeper, 0.01)
        while not running.running():
            time.sleep(0.01)
        supervisor = pool._manager.io.supervisor.process.pid
        os.kill(supervisor, signal.SIGKILL)
        error = running.exception(timeout=10)
        assert isinstance(error, cancelk.ProcessDiedError), repr(error)
        assert "supervisor" in str(error), str(error)
        assert queued.result(timeout=30) == 0.01, "the queued job runs on a new supervisor"
        assert pool.submit(sleeper, 0).result(timeout=30) == 0
        pool.shutdown()
        for round in range(30):
            with cancelk.ProcessPoolExecutor(1, mp_context=method) as other:
                assert other.submit(sleeper, 0).result(timeout=30) == 0
        left = psutil.Process().children(recursive=True)
        assert not left, left
        say("OK")
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_reaping_sigchld_handler_breaks_nothing(tmp_path, method):
    proc = run_program(tmp_path, REAPER, method)
    out, err = finish(proc, timeout=90)
    assert proc.returncode == 0 and out.strip() == "OK", err[-4000:]
    assert "Traceback" not in err, err[-4000:]


# -- 3. an initializer that never returns -------------------------------------------

STUCK = """
    def hang():
        time.sleep(3600)

    if __name__ == "__main__":
        pool = cancelk.ProcessPoolExecutor(2, initializer=hang)
        future = pool.submit(sleeper, 0, cancelk.ProcessTimeout(1))
        time.sleep(2)
        say("running", future.running(), "pid", future.pid, "done", future.done())
        assert future.cancel(), "a job that never began cancels like a queued one"
        started = time.monotonic()
        pool.shutdown(wait=True)
        say("shutdown", round(time.monotonic() - started, 2))
"""


def test_a_stuck_initializer_never_shows_a_job_as_running(tmp_path):
    proc = run_program(tmp_path, STUCK)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err[-4000:]
    lines = out.splitlines()
    assert lines[0] == "running False pid None done False", out
    assert float(lines[1].split()[1]) < 5, out
    assert not session_members(proc.pid)


# -- 4. a result whose unpickling raises SystemExit ------------------------------------

POISON = """
    class Poison:
        def __reduce__(self):
            return (sys.exit, (3,))

    def poisoned():
        return Poison()

    if __name__ == "__main__":
        with cancelk.ProcessPoolExecutor(2) as pool:
            innocent = pool.submit(sleeper, 0.5)
            bad = pool.submit(poisoned)
            error = bad.exception(timeout=30)
            say("bad", type(error).__name__, type(error.__cause__).__name__)
            say("innocent", innocent.result(timeout=30))
            say("later", pool.submit(sleeper, 0).result(timeout=30))
"""


def test_a_result_raising_systemexit_when_unpickled_fails_only_its_future(tmp_path):
    proc = run_program(tmp_path, POISON)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err[-4000:]
    assert out.splitlines() == ["bad ResultPicklingError SystemExit", "innocent 0.5", "later 0"]


# -- 6. honest errors and counts -----------------------------------------------------------

HONEST = """
    import threading
    from concurrent.futures import CancelledError

    def kill_myself():
        os.kill(os.getpid(), signal.SIGKILL)

    def fork_and_return():
        time.sleep(0.5)  # running long enough for the caller to read its pid
        child = os.fork()
        return "child" if child == 0 else ("parent", os.getpid())

    if __name__ == "__main__":
        with cancelk.ProcessPoolExecutor(2) as pool:
            error = pool.submit(kill_myself).exception(timeout=30)
            say("sigkill", "OOM" in str(error), "outside cancelk" in str(error))

            future = pool.submit(fork_and_return)
            runner = None
            while runner is None and not future.done():
                runner = future.pid
                time.sleep(0.001)
            value = future.result(timeout=30)
            say("forked", value[0], value[1] == runner)
            say("after", pool.submit(sleeper, 0).result(timeout=30))

            with pool.options(timeout=5) as view:
                view.submit(sleeper, 0).result(timeout=30)
            say("view", pool.submit(sleeper, 0).result(timeout=30))

            bad = []
            parts = ("pending", "running", "finished", "failed", "timed_out", "cancelled",
                     "memory_exceeded", "died")
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    s = pool.stats()
                    if s["submitted"] != sum(s[k] for k in parts):
                        bad.append(s)

            sampler = threading.Thread(target=sample)
            sampler.start()
            futures = []
            for i in range(300):
                limit = (cancelk.ProcessTimeout(0.001),) if i % 7 == 0 else ()
                futures.append(pool.submit(sleeper, 0.002 * (i % 3), *limit))
                if i % 5 == 0:
                    futures[i // 2].cancel()
            for f in futures:
                try:
                    f.exception(timeout=30)
                except CancelledError:
                    pass
            time.sleep(0.2)
            stop.set()
            sampler.join()
            final = pool.stats()
            say("counts", len(bad), final["running"], final["pending"],
                final["submitted"] == sum(final[k] for k in parts))

        pool = cancelk.ProcessPoolExecutor(1)
        slow = pool.submit(sleeper, 5)
        while not slow.running():
            time.sleep(0.01)
        started = time.monotonic()
        pool.shutdown(wait=False, timeout=0.1)
        try:
            slow.result(timeout=5)
            say("shutdown-timeout", "ran to its end")
        except CancelledError:
            say("shutdown-timeout", round(time.monotonic() - started, 1) < 1.0)
"""


def test_honest_errors_counts_views_and_forked_jobs(tmp_path):
    proc = run_program(tmp_path, HONEST)
    out, err = finish(proc, timeout=90)
    assert proc.returncode == 0, err[-4000:]
    lines = out.splitlines()
    assert lines[0] == "sigkill False True", out  # SIGKILL from the job itself: no OOM claim
    assert lines[1] == "forked parent True", out  # the fork's child never acts as the runner
    assert lines[2] == "after 0", out
    assert lines[3] == "view 0", out  # leaving a view's with block shuts nothing down
    assert lines[4] == "counts 0 0 0 True", out  # the sum held at every sample
    assert lines[5] == "shutdown-timeout True", out
    assert not session_members(proc.pid)
