"""Fenced locks and semaphores: mutual exclusion across processes, fencing
tokens, fenced KV writes, arrival order, async with.

Run: python examples/locks.py (a SQLite space under ./.taskspace; any URL works).
"""

from __future__ import annotations

import asyncio
import threading
import time

from taskspace import LeaseLost, LockTimeout, Space

space = Space("sqlite:///.taskspace/locks-example.db")

# A lock: auto-renewed while held, released on exit. The token is a fencing
# token: strictly increasing, never repeated.
with space.lock("gpu-0", ttl=10, wait=5) as lease:
    print(f"holding {lease.name} with token {lease.token}, held={lease.held}")
    # A fenced write lands only while this lease is still current on the store.
    space.kv.put("checkpoint", {"step": 100, "by": lease.token}, fence=lease)
    try:
        with space.lock("gpu-0", wait=0.2):
            pass
    except LockTimeout:
        print("a second holder timed out after 0.2 s, as promised")

# A stale holder is refused, whatever it believes.
old = space.lock("gpu-0").acquire()
assert old is not None
old.release()
new = space.lock("gpu-0").acquire()
assert new is not None and new.token > old.token
try:
    space.kv.put("checkpoint", {"step": 0}, fence=old)
except LeaseLost as exc:
    print(f"stale write refused: {exc}")
print(f"release of a stale grant: {old.release()}; checkpoint: {space.kv.get('checkpoint')}")
new.release()

# A semaphore: at most 2 of 6 threads inside at once, served in arrival order.
sem = space.semaphore("model", limit=2, ttl=30)
inside, peak, guard = [0], [0], threading.Lock()


def call_model(i: int) -> None:
    with sem:
        with guard:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.05)
        with guard:
            inside[0] -= 1


threads = [threading.Thread(target=call_model, args=(i,)) for i in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(f"semaphore limit 2: at most {peak[0]} inside at once")


# asyncio code uses the same lock with async with.
async def main() -> int:
    async with space.lock("gpu-0", ttl=10) as lease:
        return lease.token


print(f"async with: token {asyncio.run(main())}")
space.close()
