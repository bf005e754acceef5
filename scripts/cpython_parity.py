#!/usr/bin/env python3
"""Run CPython's own process-pool tests against cancelk.ProcessPoolExecutor.

CPython ships the tests of ``concurrent.futures`` as ``test.test_concurrent_futures``
(3.12 and later; Linux distributions sometimes leave the ``test`` package out, pyenv and
python.org builds have it). This script runs the process-pool parts of five of its modules
with ``cancelk.ProcessPoolExecutor`` put in place of the stdlib pool, the way a user
switches pools, and prints how many pass per module:

    test_process_pool  test_wait  test_as_completed  test_init  test_shutdown

The substitution is made at three seams, nothing else of the tests is changed:

- ``util.ProcessPoolForkMixin`` / ``...ForkserverMixin`` / ``...SpawnMixin``: their
  ``executor_type``, which every generated process-pool test class uses;
- ``concurrent.futures.ProcessPoolExecutor``, for tests that build a pool themselves;
- the scripts that ``test_shutdown`` runs in a fresh interpreter: their
  ``from concurrent.futures import ProcessPoolExecutor`` becomes an import from cancelk.

Thread-pool tests of the same modules are not run. Every module runs in a child process
with a time limit, so a hang costs that module's remaining tests, not the run.

Usage (with an interpreter that has both cancelk and the ``test`` package):

    python3.13 -m venv /tmp/v313 && /tmp/v313/bin/pip install .
    /tmp/v313/bin/python scripts/cpython_parity.py            # counts per module
    /tmp/v313/bin/python scripts/cpython_parity.py -v         # and each failure's reason
    /tmp/v313/bin/python scripts/cpython_parity.py --stdlib   # the same tests, stdlib pool

Exit status: 0 when at least ``--min`` percent of the tests that ran passed and every
failure is one of the deliberate differences listed in ``DIFFERENCES`` (README,
"Differences from the stdlib pool"); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

MODULES = ("test_process_pool", "test_wait", "test_as_completed", "test_init", "test_shutdown")
PACKAGE = "test.test_concurrent_futures"
MODULE_TIME_LIMIT = 300  # seconds

# Test method -> why cancelk deliberately behaves otherwise. A method listed here fails
# under every start method it runs with, unless the reason names one.
DIFFERENCES = {
    "test_killed_child": (
        "a killed worker breaks the stdlib pool (BrokenProcessPool for every future and "
        "submit); in cancelk only that job fails, with ProcessDiedError, and the pool goes on"
    ),
    "test_max_tasks_per_child": (
        "fork only: the stdlib refuses max_tasks_per_child with the fork start method "
        "(ValueError); cancelk supports it with every start method"
    ),
    "test_python_finalization_error": (
        "the test makes the second thread a pool starts fail; a cancelk pool starts only "
        "one (its manager thread), so nothing fails and map() returns its results"
    ),
    "test_processes_terminate": (
        "its jobs are a local function, which cannot be pickled: cancelk pickles a job at "
        "submit, so each fails at once and asks for no runner, where the stdlib starts a "
        "worker before it finds out (and, with fork, all of them at the first submit; "
        "cancelk starts runners on demand with every start method)"
    ),
    "test_saturation": (
        "its jobs are the acquire method of a multiprocessing Semaphore, which cannot be "
        "pickled outside a process start: cancelk pickles a job at submit, so each fails "
        "at once and asks for no runner, where the stdlib starts its workers first"
    ),
}


# -- the child: runs one module -----------------------------------------------------------
def substitute(executor_type: type) -> None:
    """Put ``executor_type`` where the tests look for the process pool."""
    import concurrent.futures
    import importlib

    util = importlib.import_module(f"{PACKAGE}.util")
    for mixin in ("ProcessPoolForkMixin", "ProcessPoolForkserverMixin", "ProcessPoolSpawnMixin"):
        getattr(util, mixin).executor_type = executor_type
    concurrent.futures.ProcessPoolExecutor = executor_type  # type: ignore[misc]
    if executor_type.__module__.startswith("cancelk"):
        shutdown = importlib.import_module(f"{PACKAGE}.test_shutdown")
        original = shutdown.assert_python_ok

        def assert_python_ok(*args, **env):  # type: ignore[no-untyped-def]
            old = "from concurrent.futures import ProcessPoolExecutor"
            new = "from cancelk import ProcessPoolExecutor"
            return original(
                *(a.replace(old, new) if isinstance(a, str) else a for a in args), **env
            )

        shutdown.assert_python_ok = assert_python_ok


def is_process_pool_test(test_id: str) -> bool:
    return "ThreadPool" not in test_id


def run_module(name: str, out_path: str, use_stdlib: bool) -> None:
    import importlib
    import unittest

    if use_stdlib:
        import concurrent.futures.process

        executor_type: type = concurrent.futures.process.ProcessPoolExecutor
    else:
        import cancelk

        executor_type = cancelk.ProcessPoolExecutor
    substitute(executor_type)
    module = importlib.import_module(f"{PACKAGE}.{name}")
    loaded = unittest.defaultTestLoader.loadTestsFromModule(module)

    def wanted(suite: unittest.TestSuite) -> unittest.TestSuite:
        kept = unittest.TestSuite()
        for test in suite:
            if isinstance(test, unittest.TestSuite):
                inner = wanted(test)
                if inner.countTestCases():
                    kept.addTest(inner)
            elif is_process_pool_test(test.id()):
                kept.addTest(test)
        return kept

    out = open(out_path, "a", buffering=1)

    def write(record: dict[str, object]) -> None:
        out.write(json.dumps(record) + "\n")

    class Result(unittest.TextTestResult):
        def startTest(self, test: unittest.TestCase) -> None:
            write({"test": test.id(), "event": "start"})
            self._started = time.monotonic()
            super().startTest(test)

        def _record(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
            seconds = round(time.monotonic() - getattr(self, "_started", time.monotonic()), 2)
            write({"test": test.id(), "event": outcome, "detail": detail, "seconds": seconds})

        def addSuccess(self, test: unittest.TestCase) -> None:
            super().addSuccess(test)
            self._record(test, "pass")

        def addFailure(self, test: unittest.TestCase, err) -> None:  # type: ignore[no-untyped-def]
            super().addFailure(test, err)
            self._record(test, "fail", self._exc_info_to_string(err, test))

        def addError(self, test: unittest.TestCase, err) -> None:  # type: ignore[no-untyped-def]
            super().addError(test, err)
            if isinstance(test, unittest.TestCase):
                self._record(test, "error", self._exc_info_to_string(err, test))
            else:  # a module or class fixture
                write(
                    {
                        "test": str(test),
                        "event": "fixture-error",
                        "detail": self._exc_info_to_string(err, test),
                    }
                )

        def addSkip(self, test: unittest.TestCase, reason: str) -> None:
            super().addSkip(test, reason)
            self._record(test, "skip", reason)

        def addExpectedFailure(self, test, err) -> None:  # type: ignore[no-untyped-def]
            super().addExpectedFailure(test, err)
            self._record(test, "pass")

        def addUnexpectedSuccess(self, test) -> None:  # type: ignore[no-untyped-def]
            super().addUnexpectedSuccess(test)
            self._record(test, "fail", "unexpected success")

        def addSubTest(self, test, subtest, err) -> None:  # type: ignore[no-untyped-def]
            super().addSubTest(test, subtest, err)
            if err is not None:  # a failed subtest fails its test
                self._subtest_failed = True
                self._record(test, "fail", self._exc_info_to_string(err, test))

    runner = unittest.TextTestRunner(stream=open(os.devnull, "w"), resultclass=Result)
    runner.run(wanted(loaded))
    out.close()


# -- the parent: runs every module, counts --------------------------------------------------
def method_of(test_id: str) -> str:
    for method in ("Forkserver", "Fork", "Spawn"):
        if f"ProcessPool{method}" in test_id:
            return method.lower()
    if test_id.endswith(".test_spawn"):
        return "spawn"
    if test_id.endswith(".test_forkserver"):
        return "forkserver"
    return ""


def is_deliberate(test_id: str) -> bool:
    name = test_id.rsplit(".", 1)[-1]
    reason = DIFFERENCES.get(name)
    if reason is None:
        return False
    method = method_of(test_id)
    if reason.startswith("fork only"):
        return method == "fork"
    if reason.startswith("spawn and forkserver"):
        return method in ("spawn", "forkserver")
    return True


def collect(name: str, use_stdlib: bool) -> dict[str, dict[str, object]]:
    """test id -> its last record, for one module run in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.jsonl")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, out_path]
        if use_stdlib:
            cmd.append("--stdlib")
        hung = False
        # A session of its own: whatever the tests leave behind (a Manager's server
        # whose test failed before its shutdown) is killed with it.
        child = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            child.wait(MODULE_TIME_LIMIT)
        except subprocess.TimeoutExpired:
            hung = True
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
        records: dict[str, dict[str, object]] = {}
        if os.path.exists(out_path):
            with open(out_path) as f:
                for line in f:
                    record = json.loads(line)
                    test = str(record["test"])
                    if record["event"] == "fail" and records.get(test, {}).get("event") == "fail":
                        continue  # the first failed subtest says enough
                    records[test] = record
        unfinished = [r for r in records.values() if r["event"] == "start"]
        for record in unfinished:
            record["event"] = "error"
            record["detail"] = "hung" if hung else "the test process died"
        if hung and not unfinished:
            print(f"  {name}: every test ended, then the module's clean-up hung", file=sys.stderr)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdlib", action="store_true", help="run them on the stdlib pool")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each failure")
    parser.add_argument("--min", type=float, default=90.0, help="percent that must pass")
    parser.add_argument("--json", help="write every test's outcome to this file")
    parser.add_argument("modules", nargs="*", default=list(MODULES))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_module(args.child[0], args.child[1], args.stdlib)
        return 0
    try:
        __import__(f"{PACKAGE}.util")
    except ImportError as why:
        print(f"this interpreter has no {PACKAGE} ({why}); use CPython 3.12+", file=sys.stderr)
        return 2
    pool = (
        "concurrent.futures.ProcessPoolExecutor" if args.stdlib else "cancelk.ProcessPoolExecutor"
    )
    print(f"CPython {sys.version.split()[0]} test suite, process pool = {pool}")
    total = {"pass": 0, "fail": 0, "skip": 0}
    unexpected: list[str] = []
    everything: dict[str, dict[str, object]] = {}
    for name in args.modules:
        started = time.monotonic()
        records = collect(name, args.stdlib)
        everything.update(records)
        counts = {"pass": 0, "fail": 0, "skip": 0}
        for test, record in sorted(records.items()):
            event = str(record["event"])
            kind = "pass" if event == "pass" else "skip" if event == "skip" else "fail"
            counts[kind] += 1
            if kind == "fail":
                deliberate = not args.stdlib and is_deliberate(test)
                if not deliberate:
                    unexpected.append(test)
                if args.verbose:
                    mark = "deliberate" if deliberate else "UNEXPECTED"
                    detail = str(record.get("detail", "")).strip().splitlines()
                    print(f"  {mark}: {test}\n      {detail[-1] if detail else ''}")
        ran = counts["pass"] + counts["fail"]
        print(
            f"{name:20} {counts['pass']:3} of {ran:3} passed"
            f" ({counts['skip']} skipped)  {time.monotonic() - started:5.1f} s"
        )
        for key in total:
            total[key] += counts[key]
    ran = total["pass"] + total["fail"]
    share = 100.0 * total["pass"] / ran if ran else 0.0
    print(
        f"{'total':20} {total['pass']:3} of {ran:3} passed ({share:.1f}%), {total['skip']} skipped"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1, sort_keys=True)
    if args.stdlib:
        return 0
    if unexpected:
        print("failures that are not listed deliberate differences:")
        for test in unexpected:
            print(f"  {test}")
    return 0 if share >= args.min and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
