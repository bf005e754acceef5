"""The Python side's macOS paths, taken on Linux (issue 11, point 8).

macOS has no os.waitid in Python, no memfd_create and no MSG_CMSG_CLOEXEC;
cancelk must take its fallbacks there and degrade as the README's
Limitations say, not fail. Each test removes one Linux facility and runs
what uses it. (The C core's portable backend is tested on Linux by every
backend-parametrised test; the C core's macOS build by
scripts/check-macos-build.sh.)
"""

from __future__ import annotations

import os
import socket
import time

import pytest

import cancelk
from cancelk import _manager_thread

import jobs
import procs
from jobs import RESULT_WAIT, START_METHODS


@pytest.mark.timeout(30)
def test_killable_wrapper_stops_a_job_without_os_waitid(monkeypatch, single_threaded):
    monkeypatch.delattr(os, "waitid", raising=False)
    started = time.monotonic()
    with pytest.raises(cancelk.ProcessTimeoutError):
        cancelk.killable_wrapper(time.sleep, 30, killable_wrapper_timeout=0.2)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_pool_without_memfd_create(make_pool, monkeypatch, method):
    """The job words live in an unlinked temporary file instead."""
    monkeypatch.delattr(os, "memfd_create", raising=False)
    exe = make_pool(2, mp_context=method)
    procs.assert_pool_works(exe)
    late = exe.submit(jobs.sleep_return, 30, None, cancelk.ProcessTimeout(0.2))
    assert isinstance(late.exception(timeout=RESULT_WAIT), cancelk.ProcessTimeoutError)
    procs.assert_pool_works(exe)


@pytest.mark.timeout(60)
def test_received_descriptors_are_not_inheritable_without_msg_cmsg_cloexec(make_pool, monkeypatch):
    monkeypatch.setattr(_manager_thread, "_RECV_CLOEXEC", 0)
    received = []
    real = socket.recv_fds

    def spy(sock, bufsize, maxfds, flags=0):
        data, fds, msg_flags, address = real(sock, bufsize, maxfds, flags)
        received.extend(fds)
        return data, fds, msg_flags, address

    monkeypatch.setattr(socket, "recv_fds", spy)
    exe = make_pool(2)
    procs.assert_pool_works(exe)
    assert received
    for fd in received:
        try:
            assert not os.get_inheritable(fd), fd
        except OSError:
            pass  # closed since (a runner's channel)
