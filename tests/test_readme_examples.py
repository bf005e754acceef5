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


def _run(tmp_path: Path, name: str, text: str, method: str, timeout: float = 60):
    """Run ``text`` as tmp_path/name.py with ``method`` as the default start method."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    script = tmp_path / f"readme_{name}.py"  # not asyncio.py: it would shadow asyncio
    script.write_text(text)
    env = dict(os.environ, CANCELK_TEST_START_METHOD=method)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
        env=env,
        stdin=subprocess.DEVNULL,
    )


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


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(tmp_path, name, method):
    proc = _run(tmp_path, name, EXAMPLES[name], method)
    assert proc.returncode == 0, f"{name} under {method}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(set(lines)), f"a line was printed twice:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr, proc.stderr


USES_CANCELK_POOL = sorted(
    n for n, text in EXAMPLES.items() if "cancelk.ProcessPoolExecutor" in text
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
@pytest.mark.parametrize("name", USES_CANCELK_POOL)
def test_readme_example_without_guard_fails_at_once_naming_the_guard(tmp_path, name, method):
    proc = _run(tmp_path, name, without_guard(EXAMPLES[name]), method, timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "BrokenProcessPool" in proc.stderr and GUARD in proc.stderr, out
    assert "could not start" in proc.stderr, out
    # the program ran once, in the user process only
    lines = proc.stdout.splitlines()
    assert len(lines) == len(set(lines)), out
    # one supervisor, one report: no restart loop
    assert proc.stderr.count("Traceback (most recent call last)") <= 2, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", USES_CANCELK_POOL)
def test_readme_example_without_guard_runs_under_fork(tmp_path, name):
    """fork never imports the main module: the guard is not needed there."""
    proc = _run(tmp_path, name, without_guard(EXAMPLES[name]), "fork")
    assert proc.returncode == 0, proc.stdout + proc.stderr
