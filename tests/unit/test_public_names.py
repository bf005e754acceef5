"""cancelk's public names, some loaded on first use (cancelk/__init__)."""

from __future__ import annotations

import pytest

import cancelk
from cancelk.executor import ProcessPoolExecutor
from cancelk.wrapper import killable_wrapper

pytestmark = pytest.mark.timeout(10)


def test_every_public_name_resolves_to_its_object():
    namespace: dict = {}
    exec("from cancelk import *", namespace)
    assert set(cancelk.__all__) <= set(namespace)
    assert namespace["ProcessPoolExecutor"] is ProcessPoolExecutor
    assert cancelk.killable_wrapper is killable_wrapper
    assert set(cancelk.__all__) <= set(dir(cancelk))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'ProcessPool'"):
        cancelk.ProcessPool  # noqa: B018
    assert not hasattr(cancelk, "executors")
