"""Coordination on the store protocols: fenced locks and semaphores, leader
election with failover, periodic tasks, a service registry, global rate limits.

One primitive per module; each is written only on ``store.leases``,
``store.kv`` and ``store.clock``, so it behaves the same on every backend.
Each module's docstring states its guarantee and what happens on faults.
"""
