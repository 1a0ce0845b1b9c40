"""A process forked from a worker whose other threads write to SQLite can use
the store: process tasks fork inside ``store.fork_guard()``, so no thread of
the parent is mid-write at the fork (SQLite keeps file-lock bookkeeping per
process: a child forked during a parent's write would wait for that write for
ever), and the child forgets the parent's locks and connections."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from taskspace.backends import open_store
from taskspace.backends.sqlite import SQLiteStore


def test_a_child_forked_in_the_guard_while_a_parent_thread_writes_can_write(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/space.db")
    assert isinstance(store, SQLiteStore)
    store.kv.put("before", b"1")
    held, release = threading.Event(), threading.Event()

    def writer_in_flight() -> None:
        with store.conn.write():  # another thread is mid-write when the fork is asked for
            held.set()
            release.wait(10)

    thread = threading.Thread(target=writer_in_flight)
    thread.start()
    assert held.wait(5)
    threading.Timer(0.2, release.set).start()
    with store.fork_guard():  # waits for that write to end
        pid = os.fork()
    if pid == 0:  # the child: write, then report by exit code
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(10)  # a hang ends the child, not the test run
        try:
            store.kv.put("from-child", b"2")
            os._exit(0)
        except BaseException:  # noqa: BLE001 - any failure is exit code 1
            os._exit(1)
    thread.join()
    status = None
    deadline = time.monotonic() + 15
    while status is None and time.monotonic() < deadline:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = code
        else:
            time.sleep(0.02)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    found = store.kv.get("from-child")
    assert found is not None and found.value == b"2"
    store.close()
