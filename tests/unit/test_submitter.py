"""executor._Submitter: what it hands the manager for each submit."""

from __future__ import annotations

import functools
import json
import os.path

import pytest

from cancelk.executor import _Submitter
from cancelk.options import JobOptions

pytestmark = pytest.mark.timeout(10)


class _RecordingManager:
    """Stands for the Manager: keeps what each submit was given."""

    def __init__(self) -> None:
        self.modules: list[str | None] = []

    def submit(self, job: object, module: str | None) -> None:
        self.modules.append(module)


def _submit_each(functions: list) -> list[str | None]:
    manager = _RecordingManager()
    submitter = _Submitter(manager)  # type: ignore[arg-type]
    for fn in functions:
        submitter.submit(fn, (), {}, JobOptions())
    return manager.modules


def test_a_loops_function_has_its_module_named_once_and_again_after_another():
    dumps, join = json.dumps, os.path.join
    modules = _submit_each([dumps, dumps, dumps, join, join, dumps])
    assert modules == ["json", None, None, join.__module__, None, "json"]


def test_a_partial_names_the_module_of_its_function():
    assert _submit_each([functools.partial(json.dumps, 1)]) == ["json"]


def test_builtins_are_never_named():
    assert _submit_each([len, print, len]) == [None, None, None]
