"""I6: when the user process dies -- even by SIGKILL -- the supervisors,
runners, jobs and everything the jobs started are gone within 100 ms; no
orphans, no zombies, nothing left in /dev/shm.

Fault injected: a user program (a script in tmp_path, run as a subprocess)
starts one pool per start method (fork, forkserver, spawn), two jobs each;
every job starts a child, a grandchild, a child in its own session (setsid)
and a double-fork daemon (detached grandchild). The program writes the pid and
create time of every one of those processes to a file, then it is SIGKILLed
(or SIGTERMed with the default disposition, or it exits normally while its
jobs run). The test polls every ~1 ms with psutil and measures the time from
the signal (or from the program's exit) until every recorded process is dead,
then checks that all were reaped and that no /dev/shm file any process of the
program had mapped or open survives it (other tests running at the same time
create and remove their own /dev/shm semaphores, so a global listing would
blame them on this program). The stdlib's
own helpers in the user program (forkserver, resource tracker) are not
cancelk's; they are only required to go away within 2 s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

import procs

pytestmark = procs.needs_proc

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
BOUND = 0.100  # I6: every pool process dead this long after the user process died
WORST = 1.0  # no single run, however loaded the machine, may take longer
KINDS = ("child", "grandchild", "setsid", "daemon")

USER_PROGRAM = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {tests_dir!r})
    import cancelk, psutil
    import jobs
    from procs import SINGLETON_MARKS as MARKS, read_record

    if __name__ == "__main__":
        mode, out, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
        kinds = {kinds!r}
        pools = [
            cancelk.ProcessPoolExecutor(2, mp_context=m) for m in jobs.START_METHODS
        ]
        paths, futures = [], []
        for i, exe in enumerate(pools):
            for j in range(2):
                path = os.path.join(tmp, f"tree{{i}}{{j}}.json")
                paths.append(path)
                if mode == "exit":
                    futures.append(exe.submit(jobs.tree_then_return, path, 1.0, kinds))
                else:
                    futures.append(exe.submit(jobs.tree_job, path, kinds))
        trees = [r for path in paths for r in read_record(path, wait=60)]
        time.sleep(0.05)  # the pools start their warm spares, if any
        pool, helpers = [], []
        tree_pids = {{pid for pid, _ in trees}}
        for proc in psutil.Process().children(recursive=True):
            try:
                entry = [proc.pid, proc.create_time()]
                cmd = " ".join(proc.cmdline())
            except psutil.NoSuchProcess:
                continue
            if proc.pid in tree_pids:
                continue
            (helpers if any(m in cmd for m in MARKS) else pool).append(entry)
        shm = set()
        for pid in [os.getpid()] + [p for p, _ in pool + trees + helpers]:
            try:
                with open(f"/proc/{{pid}}/maps") as f:
                    shm.update(line.split()[-1] for line in f if "/dev/shm/" in line)
                for fd in os.listdir(f"/proc/{{pid}}/fd"):
                    target = os.readlink(f"/proc/{{pid}}/fd/{{fd}}")
                    if target.startswith("/dev/shm/"):
                        shm.add(target)
            except OSError:
                continue
        with open(out + ".tmp", "w") as f:
            json.dump(
                {{"trees": trees, "pool": pool, "helpers": helpers, "shm": sorted(shm)}}, f
            )
        os.replace(out + ".tmp", out)
        print("ready", flush=True)
        if mode == "exit":
            sys.exit(0)  # with six jobs running: the interpreter's exit waits for them
        time.sleep(120)
    """
)


def _stat(pid):
    """(state, start time in clock ticks) from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0].decode(), fields[19].decode()


def alive_now(pids):
    """{pid: start time} of processes that must all be alive now."""
    starts = {}
    for pid in pids:
        stat = _stat(pid)
        assert stat is not None and stat[0] != "Z", f"pid {pid} died too early"
        starts[pid] = stat[1]
    return starts


def watch_deaths(workdir, user, starts, mode):
    """Have a high-priority watcher process end the user program as ``mode``
    says (or wait for it to exit) and time every death; {pid: seconds}."""
    spec = workdir / "watch.json"
    out = str(workdir / "deaths.json")
    user_start = starts.pop(user)
    spec.write_text(json.dumps({"user": user, "starts": starts}))
    starts[user] = user_start
    watcher = subprocess.Popen(
        [sys.executable, "-c", procs.DEATH_WATCHER, str(spec), out, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout.readline().strip() == "ready"
        watcher.stdin.write("go\n")
        watcher.stdin.flush()
        assert watcher.wait(timeout=30) == 0
    finally:
        procs.stop_process(watcher)
    with open(out) as handle:
        data = json.load(handle)
    PRIORITY[0] = data["priority"]
    return {int(pid): t for pid, t in data["died"].items()}


PRIORITY = ["?"]  # the watcher's scheduling priority, for the printed figures


def run_user_program(tmp_path, run, mode):
    """Start the user program, let it build its pools and trees, end it as
    ``mode`` says; return (seconds until every pool process was dead, number
    of pool processes recorded)."""
    workdir = tmp_path / f"run{run}"
    workdir.mkdir()
    out = str(workdir / "pids.json")
    program = USER_PROGRAM.format(tests_dir=TESTS_DIR, kinds=KINDS)
    proc = procs.start_script(workdir, "user_program.py", program, mode, out, str(workdir))
    recorded = []
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"the user program failed: {line!r}"
        with open(out) as handle:
            data = json.load(handle)
        pool = [tuple(r) for r in data["trees"] + data["pool"]]
        helpers = [tuple(r) for r in data["helpers"]]
        recorded = pool + helpers
        # 3 pools x 2 jobs (each in its runner) x (job + 5 tree processes)
        assert len(data["trees"]) == 6 * (1 + 5), data["trees"]
        assert len(data["pool"]) >= 3, data["pool"]  # the supervisors (runners are jobs)
        pids = [pid for pid, _ in pool]
        starts = alive_now([proc.pid, *pids])
        died = watch_deaths(workdir, proc.pid, starts, mode)
        if set(died) != set(starts):
            pytest.fail(
                f"[{mode}] pool processes outlive the user program by 5 s: "
                f"{procs.still_there(pool)}"
            )
        if mode == "exit":
            assert proc.wait(timeout=30) == 0
        proc.wait(timeout=10)
        left = procs.wait_gone(recorded, timeout=2.0)
        assert not left, f"[{mode}] left behind (zombies count) 2 s later: {left}"
        shm_left = [name for name in data["shm"] if os.path.exists(name)]
        assert not shm_left, f"[{mode}] the user program's /dev/shm files survive it: {shm_left}"
        user = died.pop(proc.pid, 0.0)
        supervisors = [died[pid] for pid, _ in data["pool"]]
        job_pids = {data["trees"][i][0] for i in range(0, len(data["trees"]), 6)}
        jobs_ = [died[pid] for pid in job_pids]
        others = [t for pid, t in died.items() if pid not in job_pids]
        breakdown = (
            f"user dead {user * 1000:.1f}, first supervisor {min(supervisors) * 1000:.1f}, "
            f"last job {max(jobs_) * 1000:.1f}, last other {max(others) * 1000:.1f} ms"
        )
        return max(died.values()), len(pool), data["shm"], breakdown
    finally:
        procs.stop_process(proc)
        procs.kill_records(recorded)


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["SIGKILL", "SIGTERM"])
def test_user_process_killed_takes_every_pool_process_within_100ms(backend, mode, tmp_path, scale):
    shm_used = set()
    # Three runs at least: the median of two is their mean, one slow run moves it.
    runs = scale(3, 50) if mode == "SIGKILL" else scale(3, 20)
    times, counts = [], []
    for run in range(runs):
        elapsed, count, shm, breakdown = run_user_program(tmp_path, run, mode)
        print(f"I6 [{backend}/{mode}] run {run}: {breakdown}")
        times.append(elapsed)
        counts.append(count)
        shm_used.update(shm)
    ms = [t * 1000 for t in times]
    load = os.getloadavg()[0]
    print(
        f"I6 [{backend}/{mode}]: {runs} runs, fork+forkserver+spawn pools, {max(counts)} pool "
        f"processes (setsid and double-fork grandchildren included); signal -> all dead: "
        f"median {statistics.median(ms):.1f} ms, worst {max(ms):.1f} ms; "
        f"/dev/shm files mapped or open in the program's tree: {len(shm_used)}; "
        f"timed by a watcher process at {PRIORITY[0]} priority; load average {load:.1f}"
    )
    # Structural delays (a polling slice, a timer, a wait on the wrong event)
    # would show in every run, so the best run must meet I6's 100 ms. On a
    # 2-core machine oversubscribed by other test runs every step of the chain
    # (the user's teardown, the supervisors' wake-up) waits for a CPU, so the
    # median is held to 100 ms only when the machine is not oversubscribed.
    assert min(times) < BOUND, f"I6 bound of {BOUND * 1000:.0f} ms broken in every run: {ms}"
    if load < 2 * (os.cpu_count() or 1):
        assert statistics.median(times) < BOUND, f"I6 median above 100 ms at load {load}: {ms}"
    assert max(times) < WORST, f"pool processes outlived the user program by {ms} ms"


@pytest.mark.timeout(120)
def test_user_process_exiting_with_running_jobs_leaves_nothing(backend, tmp_path):
    """The program calls sys.exit() while its jobs run (they return after 1 s,
    leaving their whole trees running): the exit waits for the jobs, as the
    stdlib does, and nothing outlives the program."""
    elapsed, count, _shm, breakdown = run_user_program(tmp_path, 0, "exit")
    print(f"I6 [{backend}/exit]: {breakdown}")
    print(
        f"I6 [{backend}/exit]: all {count} pool processes dead {elapsed * 1000:.1f} ms "
        "after the user program's exit (0.0: before it)"
    )
    assert elapsed < BOUND
