"""A supervisor that cannot start breaks the pool once, with its reason;
one that keeps dying is restarted with a growing delay, then given up (issue 11).

The missing ``if __name__ == "__main__":`` guard, the commonest reason, is
tested with the README's own examples in test_readme_examples.
"""

from __future__ import annotations

import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from cancelk import ProcessDiedError
from cancelk._restarts import GIVE_UP_AFTER

import jobs
import procs
from jobs import RESULT_WAIT


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_supervisor_failing_at_start_is_not_restarted(make_pool, method):
    # The initializer's arguments pickle, but unpickling them in the
    # supervisor fails: every supervisor started would fail the same way.
    exe = make_pool(1, mp_context=method, initializer=jobs.echo, initargs=(jobs.Unloadable(1, 2),))
    started = time.monotonic()
    futures = [exe.submit(jobs.add, i, 1) for i in range(3)]
    for future in futures:
        err = future.exception(timeout=RESULT_WAIT)
        assert isinstance(err, BrokenProcessPool), repr(err)
        assert "could not start" in str(err) and "TypeError" in str(err), str(err)
        # its traceback: the unpickling that failed (3.10+ also names Unloadable)
        assert "pickle.loads" in str(err.__cause__), str(err.__cause__)
        assert "__init__() missing" in str(err.__cause__), str(err.__cause__)
    assert time.monotonic() - started < 10
    with pytest.raises(BrokenProcessPool, match="could not start"):
        exe.submit(jobs.add, 1, 1)
    time.sleep(0.3)  # time enough for a restart loop to show
    assert exe.stats()["supervisors_started"] == 1


@pytest.mark.timeout(90)
def test_a_supervisor_that_keeps_dying_is_restarted_with_backoff_then_given_up(make_pool):
    exe = make_pool(1, mp_context="fork")
    kills, waits, err = 0, [], None
    for _ in range(2 * GIVE_UP_AFTER):
        try:
            future = exe.submit(jobs.sleep_return, 60)
        except BrokenProcessPool as why:
            err = why
            break
        killed_at = time.monotonic()
        try:
            pid = procs.wait_running(future)
        except AssertionError:  # it ended before it ran: the pool gave up
            err = future.exception(timeout=0)
            break
        if kills:
            waits.append(time.monotonic() - killed_at)
        procs.supervisor_of(pid).kill()
        kills += 1
        assert isinstance(future.exception(timeout=5), ProcessDiedError)
    assert isinstance(err, BrokenProcessPool), f"still restarting after {kills} deaths: {err!r}"
    assert f"died {GIVE_UP_AFTER} times in a row" in str(err), str(err)
    assert kills == GIVE_UP_AFTER
    assert exe.stats()["supervisors_started"] == GIVE_UP_AFTER
    # the first death is answered at once, later ones after a growing delay
    assert waits[-1] > 1.0 and waits[-1] > waits[0], waits


@pytest.mark.timeout(60)
def test_a_supervisor_that_finished_jobs_is_always_replaced_at_once(make_pool):
    exe = make_pool(1, mp_context="fork")
    for _ in range(GIVE_UP_AFTER + 2):
        assert exe.submit(jobs.add, 1, 1).result(timeout=RESULT_WAIT) == 2
        running = exe.submit(jobs.sleep_return, 60)
        procs.supervisor_of(procs.wait_running(running)).kill()
        assert isinstance(running.exception(timeout=5), ProcessDiedError)
    assert exe.submit(jobs.add, 2, 2).result(timeout=RESULT_WAIT) == 4
    assert exe.stats()["supervisors_started"] == GIVE_UP_AFTER + 3


LOADED_SCRIPT = """
import sys
import cancelk

def loaded():
    return sorted(name for name in sys.modules if name.startswith("cancelk"))

if __name__ == "__main__":
    with cancelk.ProcessPoolExecutor(1, mp_context=sys.argv[1]) as pool:
        print(" ".join(pool.submit(loaded).result(timeout=30)))
"""

USER_SIDE = ("cancelk.executor", "cancelk._manager", "cancelk._manager_thread", "cancelk._pool")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_supervisor_and_runners_do_not_load_the_user_side_pool(tmp_path, method):
    """A spawned supervisor imports only its own side of cancelk (P7: its
    start time and every runner's memory); a forked one inherits the user's."""
    proc = procs.run_script(tmp_path, "loaded.py", LOADED_SCRIPT, method)
    assert proc.returncode == 0, proc.stderr
    in_runner = set(proc.stdout.split())
    assert "cancelk.runner" in in_runner, in_runner
    if method == "spawn":
        assert not in_runner & {*USER_SIDE, "cancelk._standby"}, sorted(in_runner)
    else:
        assert set(USER_SIDE) <= in_runner, "forked from the user process, which has them"
