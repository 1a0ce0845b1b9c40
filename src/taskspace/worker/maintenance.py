"""Maintenance: the store's housekeeping, run by every worker on its ticker thread.

Each step is one atomic store operation (or a bounded series of them), so
any number of workers may run it at once: leases that expired go back to
their queues (or ``dead``), due tasks become claimable, finished tasks past
their ``result_ttl`` are deleted and expired KV keys are recorded as expired
(and the KV change feed compacted).
"""

from __future__ import annotations

from taskspace.backends.base import Store

REAP_BATCH = 1000
REAP_BATCHES_PER_PASS = 10


def maintain(store: Store) -> None:
    """One maintenance pass. Retention is bounded per pass (REAP_BATCHES_PER_PASS
    batches of REAP_BATCH each for tasks and for KV keys) so that a pass stays
    short; a backlog is worked off over the next passes."""
    store.queue.requeue_expired()
    store.queue.promote_due()
    for reap in (store.queue.reap, store.kv.reap):
        for _ in range(REAP_BATCHES_PER_PASS):
            if reap(REAP_BATCH) < REAP_BATCH:
                break
