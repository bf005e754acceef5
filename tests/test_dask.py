"""cancelk.dask on real Dask clusters: time limits, client.cancel(), retries, teardown.

Dask never enters the pytest process: importing it there would double the
memory of the process every later test forks its pools from (and slow those
forks down), and a cluster there would leave Dask's offload thread behind.
Each cluster runs in a helper process that also holds the Client; a test
calls one of the scenario functions below (``_scenario_*``) in the helper,
which asserts and returns what the test checks from outside with psutil.

Two module-scoped LocalClusters of two single-threaded workers each:

- ``proc_cluster``: worker processes under nannies (daemonic processes), the
  plugin registered from the client (``client.register_plugin``);
- ``thread_cluster``: ``processes=False`` (both workers in the helper
  process), the plugin given to ``LocalCluster(plugins=...)`` with
  ``default=True``.

The cancelk pools of the workers replace a killed runner with a new process
during a test; ``_settle`` adds those pool processes (never what a job
started) to the ``long_lived`` set so that conftest's leak check still
catches anything a stopped job leaves behind.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import psutil
import pytest

import cancelk

import dask_jobs
import procs

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SLACK = 1.0  # "within about a second", on a loaded 2-core machine
MIN_DISTRIBUTED = (2025, 1, 0)  # the `test` extra's Dask
_REPLY = "@cancelk-test@ "  # marks the helper's replies among whatever else it prints


def _why_no_dask() -> str | None:
    if importlib.util.find_spec("distributed") is None:  # finds it without importing it
        return "Dask distributed is not installed (pip install '.[test]' on Python 3.10+)"
    version = importlib.metadata.version("distributed")
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    if numbers < MIN_DISTRIBUTED:
        return f"distributed {version} is older than the tested minimum"
    return None


pytestmark = pytest.mark.skipif(_why_no_dask() is not None, reason=str(_why_no_dask()))


def _helper_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, *sys.path[1:]]))


# --------------------------------------------------------------------------
# the helper process side


def _reply(message: Any) -> None:
    sys.stdout.write(_REPLY + json.dumps(message) + "\n")
    sys.stdout.flush()


def _serve(kind: str) -> None:
    """Main of a cluster helper: start the cluster and a Client, then run the
    scenarios the test asks for, one JSON line each way, until stdin closes."""
    from dask.distributed import Client, LocalCluster

    import cancelk.dask

    processes = kind == "processes"
    extra = {} if processes else {"plugins": {cancelk.dask.CancelkPlugin(default=True)}}
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=processes,
        protocol="tcp",  # processes=False would use inproc://, closed to `dask worker`
        dashboard_address=None,
        **extra,
    )
    client = Client(cluster)
    if processes:
        client.register_plugin(cancelk.dask.CancelkPlugin())
    with cancelk.dask.annotate():  # one task through each worker's pool
        for worker in client.scheduler_info()["workers"]:
            client.submit(dask_jobs.pid, pure=False, workers=[worker]).result(timeout=60)
    _reply({"address": cluster.scheduler_address})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            outcome = {"ok": globals()[request["call"]](client, **request["kwargs"])}
        except BaseException:
            outcome = {"error": traceback.format_exc()}
        _reply(outcome)
    client.close()
    cluster.close()


def _worker_pids(client: Any) -> dict[str, int]:
    return client.run(os.getpid)


def _pool_stats(dask_worker: Any) -> dict[str, int]:
    import cancelk.dask

    return dask_worker.executors[cancelk.dask.EXECUTOR_NAME].stats()


def _executor_names(dask_worker: Any) -> list[str]:
    return sorted(dask_worker.executors)


def _thread_names() -> list[str]:
    return [t.name for t in threading.enumerate()]


# --------------------------------------------------------------------------
# the pytest side


@dataclass
class DaskCluster:
    helper: subprocess.Popen[str]
    address: str
    levels: int  # generations from the helper down to the pools' runners
    registered: set[int] = field(default_factory=set)

    def call(self, scenario: Callable[..., Any], **kwargs: Any) -> Any:
        """Run ``scenario(client, **kwargs)`` in the helper; its result, or
        AssertionError with the helper's traceback."""
        assert self.helper.stdin is not None
        self.helper.stdin.write(json.dumps({"call": scenario.__name__, "kwargs": kwargs}) + "\n")
        self.helper.stdin.flush()
        outcome = _read_reply(self.helper)
        if "error" in outcome:
            raise AssertionError(f"{scenario.__name__} failed in the helper:\n{outcome['error']}")
        return outcome["ok"]

    def pool_processes(self) -> set[int]:
        """The helper, its workers and their cancelk pools down to the runners;
        not what a job started (one generation further)."""
        found: set[int] = set()
        try:
            level = [psutil.Process(self.helper.pid)]
        except psutil.NoSuchProcess:
            return found
        for _ in range(self.levels):
            found.update(p.pid for p in level)
            children = []
            for proc in level:
                try:
                    children.extend(proc.children())
                except psutil.NoSuchProcess:
                    continue
            level = children
        return found

    def settle(self, long_lived: set[int]) -> None:
        """Wait until the pools have replaced what was killed, then register them."""
        seen = self.pool_processes()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            time.sleep(0.1)
            again = self.pool_processes()
            if again == seen:
                break
            seen = again
        self.registered |= seen
        long_lived.update(seen)


def _read_reply(helper: subprocess.Popen[str]) -> Any:
    assert helper.stdout is not None
    while True:
        line = helper.stdout.readline()
        if not line:
            raise AssertionError(f"the helper process ended (exit status {helper.wait()})")
        if line.startswith(_REPLY):
            return json.loads(line[len(_REPLY) :])


_CLUSTERS: list[DaskCluster] = []


def _start_cluster(kind: str, long_lived: set[int]) -> DaskCluster:
    helper = subprocess.Popen(
        [sys.executable, "-c", f"import test_dask; test_dask._serve({kind!r})"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_helper_env(),
        text=True,
    )
    try:
        hello = _read_reply(helper)
    except BaseException:
        helper.kill()
        helper.wait()
        raise
    env = DaskCluster(helper, hello["address"], levels=4 if kind == "processes" else 3)
    env.settle(long_lived)
    return env


def _stop_cluster(env: DaskCluster, long_lived: set[int]) -> None:
    processes = [(pid, _created(pid)) for pid in env.pool_processes()]
    assert env.helper.stdin is not None and env.helper.stdout is not None
    env.helper.stdin.close()
    try:
        env.helper.wait(timeout=30)
    finally:
        env.helper.stdout.close()
        if env.helper.poll() is None:
            procs.kill_records(processes, reap=True)
            env.helper.wait()
        for pid in env.registered:
            long_lived.discard(pid)
    assert not procs.wait_gone(processes, timeout=3, orphaned_zombies_ok=True)


def _created(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0


def _cluster_fixture(kind: str, long_lived: set[int]) -> Any:
    env = _start_cluster(kind, long_lived)
    _CLUSTERS.append(env)
    try:
        yield env
    finally:
        _CLUSTERS.remove(env)
        _stop_cluster(env, long_lived)


@pytest.fixture(scope="module")
def proc_cluster(long_lived):
    """Two nanny-managed worker processes; the plugin registered from the client."""
    yield from _cluster_fixture("processes", long_lived)


@pytest.fixture(scope="module")
def thread_cluster(long_lived):
    """processes=False: two workers in one process; LocalCluster(plugins=...)
    with default=True, so every task runs under cancelk."""
    yield from _cluster_fixture("threads", long_lived)


@pytest.fixture(scope="module", params=["processes", "threads"])
def any_cluster(request):
    # Module-scoped, so the cluster exists before a test's leak check starts counting.
    return request.getfixturevalue(
        "proc_cluster" if request.param == "processes" else "thread_cluster"
    )


@pytest.fixture(autouse=True)
def _settle(leak_check, long_lived):
    """Torn down before leak_check: the pool processes a test made are the cluster's."""
    yield
    for env in list(_CLUSTERS):
        env.settle(long_lived)


# --------------------------------------------------------------------------
# without a cluster (run in the proc_cluster helper, which has Dask)


def _scenario_recognised(client: Any) -> None:
    from distributed import worker

    import cancelk.dask as cdask

    assert cdask.task_runner_recognised(), worker._run_task_simple
    task = SimpleNamespace(key="k")
    assert cdask._task_key(worker._run_task_simple, (task, {}, 0.0)) == "k"
    assert cdask._task_key(print, (task, {}, 0.0)) is None


@pytest.mark.timeout(60)
def test_installed_dask_is_recognised(proc_cluster):
    """The guard on Dask's private task runner: if this fails after a Dask
    upgrade, cancelk.dask runs tasks with pool-wide limits only."""
    proc_cluster.call(_scenario_recognised)


@pytest.mark.timeout(30)
def test_import_cancelk_does_not_import_dask():
    code = (
        "import sys, cancelk\n"
        "bad = [m for m in ('dask', 'distributed') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def _expect(error: type[BaseException], call: Callable[[], Any]) -> None:
    try:
        call()
    except error:
        return
    raise AssertionError(f"no {error.__name__}")


def _enter(context: Any) -> None:
    with context:
        pass


def _scenario_annotate(client: Any) -> None:
    import dask

    import cancelk.dask as cdask

    for bad in (-1, float("nan")):
        _expect(ValueError, lambda bad=bad: _enter(cdask.annotate(timeout=bad)))
    _expect(TypeError, lambda: _enter(cdask.annotate(cancel_timeout="1")))
    _expect(ValueError, lambda: cdask.CancelkPlugin(timeout=-1))
    with cdask.annotate(timeout=5, retries=2):
        with cdask.annotate(cancel_timeout=0.5):
            inner = dask.get_annotations()
    assert inner["executor"] == cdask.EXECUTOR_NAME, inner
    assert inner["retries"] == 2, inner
    assert inner[cdask.TIMEOUT_ANNOTATION] == 5.0, inner
    assert inner[cdask.CANCEL_TIMEOUT_ANNOTATION] == 0.5, inner


@pytest.mark.timeout(60)
def test_annotate_checks_values_and_nests(proc_cluster):
    proc_cluster.call(_scenario_annotate)


def _scenario_released_task(client: Any, paths: list[str]) -> list[list[list[float]]]:
    from dask._task_spec import Task
    from distributed.worker import _run_task_simple

    import cancelk.dask as cdask

    tasks: dict[int, SimpleNamespace] = {}
    worker = SimpleNamespace(state=SimpleNamespace(tasks=tasks))
    executor = cdask.CancelkExecutor(cancelk.ProcessPoolExecutor(2), worker)

    def run(key: int, path: str) -> Any:
        task = Task(key, dask_jobs.sleep_with_child, path)
        return asyncio.get_running_loop().run_in_executor(executor, _run_task_simple, task, {}, 0.0)

    async def scenario() -> list[Any]:
        for key in range(2):
            tasks[key] = SimpleNamespace(state="executing", annotations={})
        first, second = run(0, paths[0]), run(1, paths[1])
        records = [await asyncio.to_thread(procs.read_record, p, 20) for p in paths]

        tasks[0].state = "cancelled"
        executor.task_released(0)
        tasks[0].state = "executing"  # resumed before the loop turns
        await asyncio.sleep(0.3)
        assert not first.done(), "a resumed task was killed"
        assert len(procs.still_there(records[0], orphaned_zombies_ok=True)) == 2, (
            "a resumed task was killed"
        )

        tasks[0].state = "cancelled"
        executor.task_released(0)
        try:
            await first
        except cancelk.ProcessCancelledError:  # an Exception, not asyncio's CancelledError
            pass
        else:
            raise AssertionError("the released task was not cancelled")
        assert not await asyncio.to_thread(procs.wait_gone, records[0], orphaned_zombies_ok=True)

        second.cancel()  # the worker cancelling its execute() coroutine
        assert not await asyncio.to_thread(procs.wait_gone, records[1], orphaned_zombies_ok=True)

        # Released before it reached the executor: it never starts.
        tasks[2] = SimpleNamespace(state="cancelled", annotations={})
        submitted = executor.stats()["submitted"]
        try:
            await run(2, "unused")
        except cancelk.ProcessCancelledError:
            pass
        else:
            raise AssertionError("a task released before its submit ran")
        assert executor.stats()["submitted"] == submitted
        return records

    try:
        return asyncio.run(scenario())
    finally:
        executor.shutdown(wait=True, kill=True)


@pytest.mark.timeout(60)
def test_released_task_is_killed_unless_resumed(proc_cluster, tmp_path):
    """The executor alone, under an asyncio loop, with a stand-in worker state:
    a release that is undone in the same loop turn (the worker resumed the
    task) kills nothing; the next one kills the job, whose future then fails
    with ProcessCancelledError -- an exception the worker's ``execute`` can
    handle, never the cancelled state.  Cancelling the asyncio future around
    ``run_in_executor`` (what closing a worker does) kills the job too, and a
    task already released when the worker submits it never starts."""
    paths = [str(tmp_path / "first.json"), str(tmp_path / "second.json")]
    records = proc_cluster.call(_scenario_released_task, paths=paths)
    for record in records:
        assert not procs.still_there(
            [(int(pid), created) for pid, created in record], orphaned_zombies_ok=True
        )


# --------------------------------------------------------------------------
# on a cluster


def _scenario_gil_timeout(client: Any, path: str) -> dict[str, Any]:
    import cancelk.dask as cdask

    workers = _worker_pids(client)
    with cdask.annotate(timeout=1):
        future = client.submit(dask_jobs.gil_sleep, 30, path, pure=False)
    start = time.monotonic()
    try:
        future.result(timeout=20)
    except cancelk.ProcessTimeoutError:
        elapsed = time.monotonic() - start
    else:
        raise AssertionError("no ProcessTimeoutError")
    records = procs.read_record(path, wait=1)
    gone = procs.wait_gone(records, timeout=0.5, orphaned_zombies_ok=True)
    return {
        "elapsed": elapsed,
        "records": records,
        "left": gone,
        "workers": workers,
        "workers_after": _worker_pids(client),
    }


@pytest.mark.timeout(40)
def test_gil_holding_call_times_out(any_cluster, tmp_path):
    seen = any_cluster.call(_scenario_gil_timeout, path=str(tmp_path / "job.json"))
    # The limit counts from the job's start, a moment after the submit.
    assert 0.95 <= seen["elapsed"] < 1.0 + SLACK, seen
    assert seen["records"][0][0] not in seen["workers"].values()  # it ran in a job process
    assert not seen["left"]
    assert seen["workers_after"] == seen["workers"]  # no worker died or was replaced


def _scenario_cancel(client: Any, path: str) -> dict[str, Any]:
    import cancelk.dask as cdask

    workers = _worker_pids(client)
    address = sorted(workers)[0]
    with cdask.annotate():
        future = client.submit(dask_jobs.sleep_with_child, path, pure=False, workers=[address])
    records = procs.read_record(path, wait=20)
    start = time.monotonic()
    client.cancel(future)
    left = procs.wait_gone(records, timeout=5, orphaned_zombies_ok=True)
    gone = time.monotonic() - start

    # The worker's only thread is free at once: the next task runs there now.
    start = time.monotonic()
    with cdask.annotate():
        pid = client.submit(dask_jobs.pid, pure=False, workers=[address]).result(timeout=10)
    return {
        "records": records,
        "left": left,
        "gone": gone,
        "next": time.monotonic() - start,
        "next_pid": pid,
        "workers": workers,
        "workers_after": _worker_pids(client),
    }


@pytest.mark.timeout(40)
def test_cancel_kills_the_running_task_and_its_child(any_cluster, tmp_path):
    seen = any_cluster.call(_scenario_cancel, path=str(tmp_path / "job.json"))
    assert len(seen["records"]) == 2  # the task's process and the child it started
    assert not seen["left"]
    assert seen["gone"] < 1.0, f"gone {seen['gone']:.3f} s after client.cancel()"
    assert seen["next"] < 1.0, f"the next task took {seen['next']:.3f} s"
    assert seen["next_pid"] not in seen["workers"].values()
    assert seen["workers_after"] == seen["workers"]


def _scenario_retries(client: Any, marker: str) -> str:
    import cancelk.dask as cdask

    with cdask.annotate(timeout=1):
        future = client.submit(dask_jobs.timeout_first_try, marker, retries=1, pure=False)
    return future.result(timeout=30)


@pytest.mark.timeout(40)
def test_retries_after_a_timeout(proc_cluster, tmp_path):
    marker = str(tmp_path / "tried")
    assert proc_cluster.call(_scenario_retries, marker=marker) == "second try"
    assert os.path.exists(marker)  # the first try ran, and was stopped


def _scenario_pass_through(client: Any) -> dict[str, Any]:
    import numpy as np

    import cancelk.dask as cdask

    workers = _worker_pids(client)
    with cdask.annotate():
        pid = client.submit(dask_jobs.pid, pure=False)
        first = client.submit(lambda x: {"x": x, "more": (1, 2.5, None)}, 7, pure=False)
        second = client.submit(lambda d: d["x"] * 10, first, pure=False)  # a dependency
        array = client.submit(np.multiply, np.arange(5), 3, pure=False)
        failing = client.submit(dask_jobs.raise_task_error, "boom", 7, pure=False)
        dying = client.submit(os._exit, 3, pure=False)
        big = client.submit(bytes, 3 << 20, pure=False)
        size = client.submit(len, big, pure=False)  # over 1 MiB: pickled off the loop
        facts = client.submit(dask_jobs.job_facts, pure=False)
    assert pid.result(timeout=20) not in workers.values()
    assert first.result(timeout=20) == {"x": 7, "more": (1, 2.5, None)}
    assert second.result(timeout=20) == 70
    assert np.array_equal(array.result(timeout=20), np.arange(5) * 3)
    try:
        failing.result(timeout=20)
    except dask_jobs.TaskError as error:
        assert error.args == ("boom", 7) and error.code == 7, error.args
    else:
        raise AssertionError("no TaskError")
    try:
        dying.result(timeout=20)
    except cancelk.ProcessDiedError as error:
        assert error.exitcode == 3, error
    else:
        raise AssertionError("no ProcessDiedError")
    assert size.result(timeout=20) == 3 << 20
    threads = client.run(_thread_names)
    assert any("cancelk-dask-submit" in names for names in threads.values()), threads
    seen = facts.result(timeout=20)
    assert seen["pid"] not in workers.values(), seen
    return seen


@pytest.mark.timeout(40)
def test_results_and_exceptions_pass_through(any_cluster):
    seen = any_cluster.call(_scenario_pass_through)
    assert seen["get_worker"].startswith("unavailable"), seen


def _scenario_array(client: Any) -> int:
    import dask.array as da

    import cancelk.dask as cdask

    def finished() -> int:
        return sum(s["finished"] for s in client.run(_pool_stats).values())

    before = finished()
    x = da.arange(1000, chunks=100)
    y = (x * 2 + 1).sum()
    # Around the call that sends the graph: this Dask applies the annotations
    # in force at compute time (those of graph construction are lost to fusion).
    with cdask.annotate(timeout=30):
        total = client.compute(y)
    assert total.result(timeout=30) == sum(2 * i + 1 for i in range(1000))
    return finished() - before


@pytest.mark.timeout(40)
def test_dask_array_graph_under_annotate(proc_cluster):
    jobs = proc_cluster.call(_scenario_array)
    assert jobs >= 10  # at least one job per chunk ran under cancelk


def _scenario_default_executor(client: Any) -> dict[str, Any]:
    return {
        "pid": client.submit(dask_jobs.pid, pure=False).result(timeout=20),
        "workers": _worker_pids(client),
        "executors": client.run(_executor_names),
    }


@pytest.mark.timeout(30)
def test_default_executor(proc_cluster, thread_cluster):
    """default=True: tasks without annotations run under cancelk too; without
    it the worker's thread pool still runs them."""
    with_default = thread_cluster.call(_scenario_default_executor)
    assert with_default["pid"] not in with_default["workers"].values()  # a job process
    plain = proc_cluster.call(_scenario_default_executor)
    assert plain["pid"] in plain["workers"].values()
    assert all("cancelk" in names for names in plain["executors"].values())


def _close_cluster_main(kind: str, path: str) -> None:
    """Main of a helper: a cluster of its own, closed while a task runs."""
    from dask.distributed import Client, LocalCluster

    import cancelk.dask

    threads_before = {t.ident for t in threading.enumerate()}
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=kind == "processes", dashboard_address=None
    )
    client = Client(cluster)
    client.register_plugin(cancelk.dask.CancelkPlugin(timeout=120))
    with cancelk.dask.annotate():
        running = client.submit(dask_jobs.sleep_with_child, path, pure=False)
    _reply("submitted")
    sys.stdin.readline()
    start = time.monotonic()
    client.close()
    cluster.close()
    closed = time.monotonic() - start
    del running
    deadline = time.monotonic() + 3
    while True:
        left = [
            t.name
            for t in threading.enumerate()
            # Dask's offload thread serves the whole process and is never stopped.
            if t.ident not in threads_before and not t.name.startswith("Dask-Offload")
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _reply({"closed": closed, "threads": left})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_close_kills_running_jobs_and_leaves_nothing(kind, tmp_path):
    """Closing the cluster while a task runs: the worker cancels it, the
    plugin's teardown stops the pool, and no process or thread is left."""
    path = str(tmp_path / "job.json")
    helper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import test_dask; test_dask._close_cluster_main({kind!r}, {path!r})",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_helper_env(),
        text=True,
    )
    started: list[tuple[int, float]] = []
    try:
        assert helper.stdin is not None
        assert _read_reply(helper) == "submitted"
        records = procs.read_record(path, wait=30)
        for proc in psutil.Process(helper.pid).children(recursive=True):
            started.append((proc.pid, proc.create_time()))
        helper.stdin.write("close\n")
        helper.stdin.flush()
        report = _read_reply(helper)
        assert helper.wait(timeout=30) == 0
    finally:
        if helper.poll() is None:
            procs.kill_records(started, reap=True)
            helper.kill()
            helper.wait()
        for stream in (helper.stdin, helper.stdout):
            if stream is not None:
                stream.close()
    assert not procs.wait_gone(records + started, timeout=3, orphaned_zombies_ok=True)
    assert report["closed"] < 15, report
    assert not report["threads"], f"threads left: {report['threads']}"


def _scenario_cli_worker(client: Any, name: str) -> dict[str, Any]:
    import cancelk.dask as cdask

    client.wait_for_workers(3, timeout=30)
    (address,) = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == name]
    executors = client.run(_executor_names, workers=[address])[address]
    assert cdask.EXECUTOR_NAME in executors, executors
    with cdask.annotate():  # no limit here: the preload's --cancelk-timeout applies
        future = client.submit(dask_jobs.gil_sleep, 30, pure=False, workers=[address])
    start = time.monotonic()
    try:
        future.result(timeout=20)
    except cancelk.ProcessTimeoutError:
        return {"elapsed": time.monotonic() - start}
    raise AssertionError("no ProcessTimeoutError")


@pytest.mark.timeout(60)
def test_command_line_worker_with_preload(thread_cluster):
    """`dask worker ADDRESS --preload cancelk.dask --cancelk-timeout 1`: the
    preload installs the plugin, whose pool-wide limit applies to tasks that
    select the executor with a bare annotate().  (It joins the thread
    cluster, whose scheduler has no plugin registered: a registered one of
    the same name would replace the preloaded one.)"""
    command = [
        sys.executable, "-m", "dask", "worker", thread_cluster.address,
        "--nthreads", "1", "--name", "cli-worker", "--no-dashboard",
        "--preload", "cancelk.dask", "--cancelk-timeout", "1",
    ]  # fmt: skip
    cli = subprocess.Popen(
        command, env=_helper_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    tree: list[tuple[int, float]] = []
    try:
        seen = thread_cluster.call(_scenario_cli_worker, name="cli-worker")
        assert seen["elapsed"] < 1.0 + SLACK, seen
    finally:
        try:
            tree = [(p.pid, p.create_time()) for p in psutil.Process(cli.pid).children(True)]
        except psutil.NoSuchProcess:
            pass
        cli.terminate()
        try:
            cli.wait(timeout=20)
        except subprocess.TimeoutExpired:
            procs.kill_records(tree, reap=True)
            cli.kill()
            cli.wait()
    assert not procs.wait_gone(tree, timeout=3, orphaned_zombies_ok=True)
