"""The public exceptions (DESIGN A6) and the remote-traceback carrier."""

from __future__ import annotations

import asyncio
import concurrent.futures
import pickle
import signal
import sys

import pytest

import cancelk
from cancelk.errors import (
    ProcessCancelledError,
    ProcessDiedError,
    ProcessTimeoutError,
    RemoteTraceback,
    ResultPicklingError,
    died_error,
    format_remote,
    oom_detail,
    signal_name,
)


def test_exported_from_package():
    assert cancelk.ProcessTimeoutError is ProcessTimeoutError
    assert cancelk.ProcessCancelledError is ProcessCancelledError
    assert cancelk.ProcessDiedError is ProcessDiedError
    for name in ("ProcessTimeoutError", "ProcessCancelledError", "ProcessDiedError"):
        assert name in cancelk.__all__


def test_timeout_error_hierarchy():
    error = ProcessTimeoutError("late")
    assert isinstance(error, concurrent.futures.TimeoutError)
    if sys.version_info >= (3, 11):
        assert isinstance(error, TimeoutError)
        assert isinstance(error, asyncio.TimeoutError)
    assert isinstance(error, Exception)


def test_cancelled_error_hierarchy():
    error = ProcessCancelledError("stopped")
    assert isinstance(error, concurrent.futures.CancelledError)
    assert isinstance(error, Exception)
    # Not asyncio's CancelledError (a BaseException): the caller's task is not cancelled.
    assert not isinstance(error, asyncio.CancelledError)


def test_died_error_is_neither_timeout_nor_cancel():
    error = ProcessDiedError(10, exitcode=1)
    assert isinstance(error, Exception)
    assert not isinstance(error, concurrent.futures.TimeoutError)
    assert not isinstance(error, concurrent.futures.CancelledError)


def test_died_by_signal():
    error = ProcessDiedError(1234, signal=signal.SIGSEGV)
    assert (error.pid, error.exitcode, error.signal) == (1234, None, signal.SIGSEGV)
    assert "SIGSEGV" in str(error)
    assert "1234" in str(error)
    assert "signal 11" in str(error)
    assert "OOM" not in str(error)


def test_died_by_sigkill_blames_the_oom_killer_only_with_evidence():
    error = ProcessDiedError(5, signal=signal.SIGKILL)
    assert "SIGKILL" in str(error)
    assert "OOM" not in str(error)
    assert "outside cancelk" in str(error)
    assert oom_detail(0) is None and oom_detail(-1) is None
    evidenced = died_error(5, signal.SIGKILL, oom_detail(2))
    assert evidenced.signal == signal.SIGKILL
    assert "OOM killer killed 2 process(es)" in str(evidenced)


def test_died_by_exit_code():
    error = ProcessDiedError(77, exitcode=3)
    assert (error.pid, error.exitcode, error.signal) == (77, 3, None)
    assert "code 3" in str(error)


def test_died_without_details_and_with_detail():
    assert "ended without a result" in str(ProcessDiedError(8))
    assert "(runner lost)" in str(ProcessDiedError(8, exitcode=1, detail="runner lost"))


def test_unknown_signal_number_is_still_described():
    assert signal_name(200) == "signal 200"
    assert "signal 200" in str(ProcessDiedError(9, signal=200))
    assert signal_name(int(signal.SIGTERM)) == "SIGTERM"


@pytest.mark.parametrize(
    "error",
    [
        ProcessDiedError(42, signal=signal.SIGSEGV),
        ProcessDiedError(42, exitcode=3, detail="why"),
        ProcessDiedError(42),
    ],
)
def test_died_error_pickles(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ProcessDiedError
    assert (copy.pid, copy.exitcode, copy.signal, copy.detail) == (
        error.pid,
        error.exitcode,
        error.signal,
        error.detail,
    )
    assert str(copy) == str(error)


@pytest.mark.parametrize(
    "error",
    [
        ProcessTimeoutError("job 1 ran past its time limit"),
        ProcessCancelledError("job 1 was cancelled"),
        ResultPicklingError("cannot pickle"),
        RemoteTraceback("Traceback ..."),
    ],
)
def test_other_errors_pickle(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)


def test_remote_traceback_text():
    try:
        raise KeyError("missing")
    except KeyError as exc:
        text = format_remote(exc)
    assert "KeyError: 'missing'" in text
    assert "test_remote_traceback_text" in text
    carrier = RemoteTraceback(text)
    assert carrier.tb == text
    assert str(carrier) == text
