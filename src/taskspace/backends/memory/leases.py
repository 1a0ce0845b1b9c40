"""LeaseStore of the in-process backend.

Guarantees (as the contract): at most ``capacity`` unexpired grants per name;
the capacity is kept with the name while it has live grants and a different
one is refused (ConfigError); every acquisition is its own grant with a fresh
token from the space's fencing counter (shared with task claims); only the
current grant (same id and token, unexpired) can be renewed or released; an
expired grant stops counting at once, reaped or not. ``wait`` blocks on the
space's condition variable: a release wakes it, and it ends by the earliest
live grant's expiry (with a ManualClock, ``advance`` wakes it to re-check).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import replace

from taskspace.backends.base import Grant
from taskspace.backends.checks import (
    check_acquire,
    check_ttl,
)
from taskspace.backends.memory.state import MemoryState
from taskspace.errors import ConfigError


class MemoryLeases:
    """Named leases over the space's ``grants`` table (name -> grant id -> grant)."""

    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def acquire(
        self,
        name: str,
        holder: str,
        ttl: float,
        capacity: int = 1,
        data: bytes = b"",
        grant_id: str | None = None,
    ) -> Grant | None:
        check_acquire(name, ttl, capacity, grant_id)
        s = self._s
        with s.cond:
            now = s.clock.now()
            live = s.live_grants(name, now)
            if grant_id is not None and grant_id in live:
                return live[grant_id]
            other = s.grant_names.get(grant_id) if grant_id is not None else None
            if other is not None and grant_id in s.live_grants(other, now):
                raise ConfigError(
                    f"grant_id={grant_id!r} is a live grant of lease {other!r}, not of {name!r}"
                )
            if live and s.capacity[name] != capacity:
                raise ConfigError(
                    f"lease {name!r} is held with capacity={s.capacity[name]};"
                    f" acquire asked for capacity={capacity}"
                )
            if len(live) >= capacity:
                return None
            grant = Grant(
                name=name,
                id=grant_id if grant_id is not None else uuid.uuid4().hex,
                holder=holder,
                token=s.next_token(),
                expires=now + ttl,
                data=data,
            )
            s.grants.setdefault(name, {})[grant.id] = grant
            s.grant_names[grant.id] = name
            s.capacity[name] = capacity
            return grant

    def renew(self, grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        check_ttl(ttl, optional=False)
        s = self._s
        out: list[Grant | None] = []
        with s.cond:
            now = s.clock.now()
            for grant in grants:
                current = s.grant_current(grant, now)
                if current is None:
                    out.append(None)
                    continue
                renewed = replace(current, expires=now + ttl)
                s.grants[grant.name][grant.id] = renewed
                out.append(renewed)
        return out

    def release(self, grant: Grant) -> bool:
        s = self._s
        with s.cond:
            now = s.clock.now()
            if s.grant_current(grant, now) is None:
                return False
            del s.grants[grant.name][grant.id]
            s.grant_names.pop(grant.id, None)
            s.live_grants(grant.name, now)  # forgets the name once it has no grant
            s.cond.notify_all()
            return True

    def holders(self, name: str) -> list[Grant]:
        s = self._s
        with s.cond:
            grants = s.live_grants(name, s.clock.now())
            return sorted(grants.values(), key=lambda g: g.token)

    def wait(self, name: str, timeout: float) -> None:
        """Return once a slot of ``name`` is free or one of the grants live at
        the call has ended (released or expired), or after ``timeout``."""
        s = self._s
        with s.cond:
            first = set(s.live_grants(name, s.clock.now()))

            def ready(now: float) -> float | None:
                live = s.live_grants(name, now)
                if not live or len(live) < s.capacity[name] or not first <= live.keys():
                    return None
                return min((g.expires for g in live.values()), default=math.inf)

            s.wait_for(ready, timeout)
