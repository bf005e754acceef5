"""Drop-in parity with concurrent.futures.ProcessPoolExecutor (issue 11).

What code written for the stdlib pool relies on, beyond the public API:
exception types it catches, private attributes it reads, what a job sees of
its process (stdin, the authkey), what ``help()`` says, and that the pool
works on every interpreter the project supports.
"""

from __future__ import annotations

import threading

import pytest

from cancelk._manager_thread import ManagerThread

# Instance attributes threading.Thread.__init__ sets, on CPython 3.9 to 3.14.
_THREAD_ATTRIBUTES = {
    "_args", "_daemonic", "_handle", "_ident", "_initialized", "_invoke_excepthook",
    "_is_stopped", "_kwargs", "_name", "_native_id", "_started", "_stderr", "_target",
    "_tstate_lock",
}  # fmt: skip


@pytest.mark.timeout(10)
def test_manager_thread_shadows_nothing_threading_sets():
    """A method of the manager thread named like an attribute Thread sets in
    its __init__ is replaced by that attribute (3.13 sets ``_handle``, which
    was a method here: every pool broke on 3.13)."""
    own = set(vars(ManagerThread))
    plain = set(vars(threading.Thread())) | _THREAD_ATTRIBUTES
    assert not own & plain
