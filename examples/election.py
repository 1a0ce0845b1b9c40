"""Leader election: one leader at a time, fenced terms, failover, and watching.

Two candidates (two Spaces on one SQLite file, as two processes would have)
campaign for "report-writer". The leader writes with its term as the fence;
when it steps down the other wins a larger term at once, and the old term's
writes are refused. A watcher follows the changes. Workers elect their
maintainer the same way (election "maintainer"). Run: python examples/election.py
"""

from __future__ import annotations

import threading

from taskspace import LeaseLost, Space

URL = "sqlite:///.taskspace/election-example.db"
host_a, host_b = Space(URL), Space(URL)
election_a = host_a.election("report-writer")
election_b = host_b.election("report-writer")
since = host_a.store.kv.revision()

# host-a wins; the term number is its fencing epoch
term_a = election_a.campaign(identity="host-a:1", ttl=2.0)
print("leader:", election_b.leader() == ("host-a:1", term_a.number))
host_a.kv.put("report", "written by host-a", fence=term_a.lease)

# host-b blocks in campaign() until host-a steps down (or its term expires)
won = threading.Event()
terms: list[int] = []


def host_b_campaigns() -> None:
    with election_b.campaign(identity="host-b:2", ttl=2.0, wait=10) as term:
        terms.append(term.number)
        host_b.kv.put("report", "written by host-b", fence=term.lease)
        won.set()  # leads until the end of the block, then resigns


candidate = threading.Thread(target=host_b_campaigns)
candidate.start()
term_a.resign()  # a graceful step-down: failover is immediate
assert won.wait(5)
print("new term is larger:", terms[0] > term_a.number, "| old term active:", term_a.active)

# the deposed leader's fenced write is refused and changes nothing
try:
    host_a.kv.put("report", "stale write by host-a", fence=term_a.lease)
except LeaseLost:
    print("stale write refused; report =", host_a.kv.get("report"))
candidate.join()

# everything that happened, from the leader record's change feed
for change in election_a.observe(since=since, idle_timeout=0.3):
    print("change:", change.identity or "(no leader)")
host_a.close()
host_b.close()
