"""Closing a SQLite store while other threads are using it must never crash the
interpreter: sqlite3 segfaults when a connection is closed under a running call
(the lease keeper's cleaner, a worker thread, a Space closed by its owner)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HAMMER = """
import sys, threading, time
from taskspace.backends import open_store
from taskspace.errors import TaskspaceError
for round_ in range(20):
    store = open_store(f"sqlite:///{sys.argv[1]}/s{round_}.db")
    stop = []
    def hammer():
        while not stop:
            try:
                store.kv.put("k", b"v"); store.kv.get("k"); store.kv.delete("k")
            except TaskspaceError:
                pass
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.03)
    store.close()  # while the four threads run calls
    time.sleep(0.01)
    stop.append(1)
    for t in threads:
        t.join()
    store.close()
print("ok")
"""


def test_close_while_other_threads_run_calls_never_crashes(tmp_path: Path) -> None:
    ran = subprocess.run([sys.executable, "-c", HAMMER, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ran.returncode == 0, f"exit {ran.returncode}: {ran.stderr[-2000:]}"
    assert ran.stdout.strip() == "ok"
