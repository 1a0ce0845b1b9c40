"""A client stopped in the middle of a PostgreSQL transaction blocks the others
for at most ``idle_in_transaction_timeout``, not until it wakes.

The child acquires a lease and SIGSTOPs itself right after locking the lease
name's row (inside the acquire's transaction), the worst moment: every other
acquire of the name waits for that row lock. The server ends the stopped
session after the timeout, and the parent's acquire goes through. Without the
setting it would wait for ``statement_timeout`` (30 s) and fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from taskspace.backends import open_store
from tests.services import postgres_url

IDLE_S = 1.0

CHILD = """
import os, signal, sys
from taskspace.backends import open_store
from taskspace.backends.postgres.leases import PgLeases

real = PgLeases._lock_name

def lock_then_stop(cur, name):
    real(cur, name)
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)

PgLeases._lock_name = staticmethod(lock_then_stop)
store = open_store(sys.argv[1])
store.leases.acquire("stall", "child", ttl=30)
"""


@pytest.mark.fault
@pytest.mark.timeout(60)
def test_a_client_stopped_inside_a_transaction_blocks_others_only_for_the_idle_timeout() -> None:
    url = f"{postgres_url()}&idle_in_transaction_timeout={IDLE_S}"
    store = open_store(url)
    child = subprocess.Popen([sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        started = time.monotonic()
        grant = store.leases.acquire("stall", "parent", ttl=5)
        waited = time.monotonic() - started
        print(f"acquire behind a stopped transaction took {waited:.2f} s (timeout {IDLE_S} s)")
        assert grant is not None  # the stopped child never got the lease
        assert IDLE_S * 0.5 <= waited <= IDLE_S + 3.0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        store.close()
