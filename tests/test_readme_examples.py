"""Every example of README.md runs as it is written, under every start method.

Each ```python block of the README is run as a script (its text unchanged) in
a fresh interpreter whose default start method is set to fork, forkserver or
spawn by a ``sitecustomize`` module, the way macOS (spawn) and Python 3.14 on
Linux (forkserver) set it: the README cannot drift from working code.

The same examples without their ``if __name__ == "__main__":`` guard, under
spawn and forkserver, must fail at once with an error that names the missing
guard: never hang, never restart the supervisor in a loop, never run the
program a second time inside the supervisor.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs import START_METHODS

README = Path(__file__).resolve().parent.parent / "README.md"
GUARD = 'if __name__ == "__main__":'

SITECUSTOMIZE = """
import multiprocessing, os
method = os.environ.get("CANCELK_TEST_START_METHOD")
if method:
    multiprocessing.set_start_method(method, force=True)
"""


def _examples() -> dict[str, str]:
    """The README's python blocks that use cancelk, named after their heading."""
    if not README.exists():  # tests run without the checkout
        return {}
    examples: dict[str, str] = {}
    heading = "readme"
    for match in re.finditer(
        r"^(#+ [^\n]*)$|^```python\n(.*?)^```", README.read_text(), re.S | re.M
    ):
        if match.group(1):
            heading = re.sub(r"\W+", "_", match.group(1).strip("# ").lower()).strip("_")
        elif "cancelk" in match.group(2):
            name = heading
            while name in examples:
                name += "_"
            examples[name] = match.group(2)
    return examples


EXAMPLES = _examples()


def _run_all(tmp_path: Path, name: str, text: str, methods, timeout: float = 60):
    """Run ``text`` as a script once per start method in ``methods`` (as the
    default one), all at once; {method: (returncode, stdout, stderr)}."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    script = tmp_path / f"readme_{name}.py"  # not asyncio.py: it would shadow asyncio
    script.write_text(text)
    running = {}
    for method in methods:
        env = dict(os.environ, CANCELK_TEST_START_METHOD=method)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
        running[method] = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=str(tmp_path),
            env=env,
        )
    results = {}
    try:
        for method, proc in running.items():
            out, err = proc.communicate(timeout=timeout)
            results[method] = (proc.returncode, out, err)
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def without_guard(text: str) -> str:
    """The example with its ``if __name__ == "__main__":`` block's body at top level."""
    lines = text.splitlines()
    at = lines.index(GUARD)
    body = textwrap.dedent("\n".join(lines[at + 1 :]))
    return "\n".join(lines[:at]) + "\n" + body + "\n"


def test_the_readme_has_examples():
    if not README.exists():
        pytest.skip("README.md is not next to the tests")
    assert len(EXAMPLES) >= 3, list(EXAMPLES)
    for name, text in EXAMPLES.items():
        assert GUARD in text.splitlines(), f"{name} has no {GUARD} guard:\n{text}"


def _uses_dask(text: str) -> bool:
    return "cancelk.dask" in text


# Dask's worker logs a task that failed (here: the time limit the example
# shows) with its traceback, at ERROR: that is Dask's report, not a failure.
_DASK_TASK_ERROR = re.compile(
    r"^.*distributed\.worker - ERROR - Exception during execution of task.*\n"
    r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*\S.*Error: .*\n?",
    re.M,
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs_under_every_start_method(tmp_path, name):
    text = EXAMPLES[name]
    methods = START_METHODS
    if _uses_dask(text):
        # find_spec, not importorskip: importing distributed here would change
        # how this process pickles every exception (tblib) for later tests.
        if importlib.util.find_spec("distributed") is None:
            pytest.skip("dask[distributed] is not installed")
        # The plugin starts its pools with spawn whatever the default is; one
        # cluster is enough (three at once do not fit a 2-core machine).
        methods = ("spawn",)
    for method, (code, out, err) in _run_all(tmp_path, name, text, methods).items():
        assert code == 0, f"{name} under {method}:\n{out}\n{err}"
        assert out.strip(), f"{name} under {method} printed nothing:\n{err}"
        lines = out.splitlines()
        assert len(lines) == len(set(lines)), f"{name} under {method} printed a line twice:\n{out}"
        if _uses_dask(text):
            err = _DASK_TASK_ERROR.sub("", err)
        assert "Traceback" not in err, f"{name} under {method}:\n{err}"


USES_CANCELK_POOL = sorted(
    n for n, text in EXAMPLES.items() if "cancelk.ProcessPoolExecutor" in text
)  # (the Dask example's pools live in the Dask workers, not in the script)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", USES_CANCELK_POOL)
def test_readme_example_without_guard_fails_at_once_naming_the_guard(tmp_path, name):
    """Under spawn and forkserver; fork never imports the main module."""
    results = _run_all(tmp_path, name, without_guard(EXAMPLES[name]), ["forkserver", "spawn"], 30)
    for method, (code, out, err) in results.items():
        context = f"{name} without its guard, under {method}:\n{out}\n{err}"
        assert code != 0, context
        assert "BrokenProcessPool" in err and GUARD in err and "could not start" in err, context
        # the program ran once, in the user process only
        lines = out.splitlines()
        assert len(lines) == len(set(lines)), context
        # one supervisor, one report: no restart loop
        assert err.count("Traceback (most recent call last)") <= 2, context
