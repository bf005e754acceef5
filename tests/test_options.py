"""Per-job option markers and duration validation (DESIGN A2)."""

from __future__ import annotations

import dataclasses
import fractions
import math
import pickle

import pytest

import cancelk
from cancelk.options import (
    JobOptions,
    ProcessCancelTimeout,
    ProcessTimeout,
    check_seconds,
    split_markers,
)

MARKERS = [ProcessTimeout, ProcessCancelTimeout]

BAD_VALUES = [
    (-1, ValueError),
    (-0.5, ValueError),
    (-math.inf, ValueError),
    (math.nan, ValueError),
    (True, TypeError),
    (False, TypeError),
    ("1", TypeError),
    (b"1", TypeError),
    ([1], TypeError),
    (fractions.Fraction(1, 2), TypeError),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (0, 0.0), (1, 1.0), (2.5, 2.5), (-0.0, 0.0), (math.inf, None), (10**9, 1e9)],
)
def test_check_seconds_accepts(value, expected):
    result = check_seconds(value, "limit")
    assert result == expected
    assert result is None or type(result) is float


@pytest.mark.parametrize(("value", "error"), BAD_VALUES)
def test_check_seconds_rejects(value, error):
    with pytest.raises(error, match="limit"):
        check_seconds(value, "limit")


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize(("value", "error"), BAD_VALUES)
def test_marker_rejects_bad_values(marker, value, error):
    with pytest.raises(error, match=marker.__name__):
        marker(value)


@pytest.mark.parametrize("marker", MARKERS)
def test_marker_infinity_means_no_limit(marker):
    assert marker(math.inf).seconds is None
    assert marker(None).seconds is None
    assert marker(math.inf) == marker(None)


@pytest.mark.parametrize("marker", MARKERS)
def test_marker_value_equality_and_hash(marker):
    assert marker(1) == marker(1.0)
    assert hash(marker(1)) == hash(marker(1.0))
    assert marker(1) != marker(2)
    assert len({marker(1), marker(1.0), marker(2)}) == 2
    assert repr(marker(1.5)) == f"{marker.__name__}(1.5)"


def test_kinds_of_marker_are_not_equal():
    assert ProcessTimeout(1) != ProcessCancelTimeout(1)
    assert ProcessTimeout(1) != 1.0


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize("value", [0.25, None])
def test_marker_pickles(marker, value):
    original = marker(value)
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is marker
    assert copy == original
    assert copy.seconds == original.seconds


def test_markers_exported_from_package():
    assert cancelk.ProcessTimeout is ProcessTimeout
    assert cancelk.ProcessCancelTimeout is ProcessCancelTimeout


def test_job_options_defaults_and_frozen():
    options = JobOptions()
    assert options.timeout is None
    assert options.cancel_timeout == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.timeout = 1  # type: ignore[misc]


def test_split_markers_from_args_and_kwarg_values():
    args = (1, ProcessTimeout(2), "x", ProcessCancelTimeout(0.5))
    kwargs = {"a": 3, "limit": ProcessTimeout(4), "grace": ProcessCancelTimeout(1)}
    clean_args, clean_kwargs, options = split_markers(args, kwargs, JobOptions())
    assert clean_args == (1, "x")
    assert clean_kwargs == {"a": 3}
    # the last marker of a kind wins; keyword values come after positionals
    assert options == JobOptions(timeout=4.0, cancel_timeout=1.0)


def test_split_markers_keeps_defaults_for_kinds_not_given():
    defaults = JobOptions(timeout=9.0, cancel_timeout=2.0)
    _, _, options = split_markers((ProcessTimeout(1),), {}, defaults)
    assert options == JobOptions(timeout=1.0, cancel_timeout=2.0)
    _, _, options = split_markers((), {"g": ProcessCancelTimeout(None)}, defaults)
    assert options == JobOptions(timeout=9.0, cancel_timeout=None)


def test_split_markers_without_markers_changes_nothing():
    args, kwargs, defaults = (1, [2]), {"k": 3}, JobOptions(timeout=5.0)
    out_args, out_kwargs, options = split_markers(args, kwargs, defaults)
    assert out_args is args
    assert out_kwargs is kwargs
    assert options is defaults


def test_split_markers_does_not_look_inside_containers():
    nested = [ProcessTimeout(1)]
    args, kwargs, options = split_markers((nested,), {"k": (ProcessTimeout(2),)}, JobOptions())
    assert args == (nested,)
    assert kwargs == {"k": (ProcessTimeout(2),)}
    assert options == JobOptions()


def test_split_markers_does_not_change_callers_objects():
    args = (ProcessTimeout(1), 2)
    kwargs = {"t": ProcessTimeout(1), "v": 3}
    split_markers(args, kwargs, JobOptions())
    assert args == (ProcessTimeout(1), 2)
    assert kwargs == {"t": ProcessTimeout(1), "v": 3}
