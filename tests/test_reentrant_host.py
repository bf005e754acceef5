"""submit() and cancel() from the places a host program calls them: signal
handlers, finalizers run by the cyclic GC, done-callbacks and many threads,
hundreds of times, at random moments inside cancelk's own code.

Each scenario runs in a fresh interpreter with faulthandler armed, so a
deadlock fails fast with every thread's traceback instead of hanging.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(180)

SCRIPT = textwrap.dedent(
    """
    import faulthandler, gc, os, random, signal, sys, threading, time
    from concurrent.futures import CancelledError, wait
    import psutil
    import cancelk

    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return seconds

    class Dropper:
        '''Garbage in a reference cycle: the cyclic GC runs its finalizer
        wherever an allocation happens to trigger a collection.'''
        def __init__(self, pool, future, extra):
            self.pool, self.future, self.extra, self.me = pool, future, extra, self
        def __del__(self):
            self.future.cancel()
            if len(self.extra) < 400:
                self.extra.append(self.pool.submit(spin, 0.0002))

    def main(method, mode, iterations):
        faulthandler.dump_traceback_later(100, exit=True)
        rng = random.Random(7)
        pool = cancelk.ProcessPoolExecutor(2, mp_context=method)
        futures, extra = [], []

        nested = []

        def from_handler(signum, frame):
            if nested:
                return  # the timer fired again inside this handler
            nested.append(True)
            try:
                for future in futures[-3:]:
                    future.cancel()
                if len(extra) < 400:
                    extra.append(pool.submit(spin, 0.0002))
            finally:
                nested.clear()

        def from_callback(future):
            if futures:
                futures[rng.randrange(len(futures))].cancel()
            if len(extra) < 400:
                extra.append(pool.submit(spin, 0.0001))

        if mode == "signal":
            signal.signal(signal.SIGALRM, from_handler)
            signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.001)
        if mode == "finalizer":
            gc.set_threshold(100, 5, 5)

        def work(count):
            for i in range(count):
                future = pool.submit(spin, rng.uniform(0, 0.002))
                futures.append(future)
                if mode == "callback":
                    future.add_done_callback(from_callback)
                if mode == "finalizer":
                    Dropper(pool, future, extra)
                if i % 5 == 0:
                    futures[rng.randrange(len(futures))].cancel()
                if i % 11 == 0:
                    wait([future], timeout=5)

        if mode == "threads":
            threads = [threading.Thread(target=work, args=(iterations // 4,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            work(iterations)
        signal.setitimer(signal.ITIMER_REAL, 0)
        gc.collect()
        everything = futures + extra
        done, not_done = wait(everything, timeout=60)
        assert not not_done, f"{len(not_done)} futures never ended"
        outcomes = {"result": 0, "cancelled": 0}
        for future in everything:
            try:
                future.result(0)
                outcomes["result"] += 1
            except CancelledError:
                outcomes["cancelled"] += 1
        pool.shutdown(wait=True)
        left = psutil.Process().children(recursive=True)
        assert not left, f"processes left: {left}"
        print("OK", len(everything), outcomes, flush=True)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


@pytest.mark.stress
@pytest.mark.parametrize("mode", ["signal", "finalizer", "callback", "threads"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_submit_and_cancel_from_any_context_never_deadlock(tmp_path, method, mode, scale):
    script = tmp_path / "host.py"
    script.write_text(SCRIPT)
    iterations = scale(200, 20_000)
    run = subprocess.run(
        [sys.executable, str(script), method, mode, str(iterations)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-6000:]}"
    assert run.stdout.startswith("OK"), run.stdout
    count = int(run.stdout.split()[1])
    assert count >= iterations, run.stdout
