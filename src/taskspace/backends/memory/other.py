"""LeaseStore, KVStore, StreamStore and PubSub of the in-process backend."""

from __future__ import annotations

import heapq
import queue as queue_mod
from collections.abc import Sequence
from dataclasses import replace

from taskspace.backends.base import Closeable, Grant, Message, StreamEntry, Versioned
from taskspace.backends.memory.state import MemoryState


class MemorySubscription(Closeable):
    """A subscription delivered to by ``publish`` in the same process."""

    def __init__(self, owner: MemoryOther, channels: Sequence[str]) -> None:
        self.channels = frozenset(channels)
        self._queue: queue_mod.SimpleQueue[Message] = queue_mod.SimpleQueue()
        self._owner = owner
        self._closed = False

    def deliver(self, message: Message) -> None:
        self._queue.put(message)

    def get(self, timeout: float | None = None) -> Message | None:
        if self._closed:
            return None
        try:
            return self._queue.get(timeout=timeout)
        except queue_mod.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._unsubscribe(self)


class MemoryOther(MemoryState):
    """Named leases, versioned KV (expiry in a heap, so reaping is cheap), streams
    and pub/sub."""

    # -- LeaseStore ---------------------------------------------------------

    def _live_grants(self, name: str, now: float) -> dict[str, Grant]:
        grants = self._lease_grants.setdefault(name, {})
        for holder in [h for h, g in grants.items() if g.expires <= now]:
            del grants[holder]
        return grants

    def acquire(self, name: str, holder: str, capacity: int, ttl: float) -> Grant | None:
        with self._cond:
            now = self.now()
            grants = self._live_grants(name, now)
            if holder in grants:
                grants[holder] = replace(grants[holder], expires=now + ttl)
                return grants[holder]
            if len(grants) >= capacity:
                return None
            token = self._lease_tokens.get(name, 0) + 1
            self._lease_tokens[name] = token
            grants[holder] = Grant(name, holder, token, now + ttl)
            return grants[holder]

    def renew_grant(self, grant: Grant, ttl: float) -> Grant | None:
        with self._cond:
            now = self.now()
            current = self._live_grants(grant.name, now).get(grant.holder)
            if current is None or current.token != grant.token:
                return None
            renewed = replace(current, expires=now + ttl)
            self._lease_grants[grant.name][grant.holder] = renewed
            return renewed

    def release(self, grant: Grant) -> bool:
        with self._cond:
            grants = self._live_grants(grant.name, self.now())
            current = grants.get(grant.holder)
            if current is None or current.token != grant.token:
                return False
            del grants[grant.holder]
            if not grants:
                del self._lease_grants[grant.name]
            return True

    def holders(self, name: str) -> list[Grant]:
        with self._cond:
            grants = self._live_grants(name, self.now())
            return sorted(grants.values(), key=lambda g: g.token)

    # -- KVStore ------------------------------------------------------------

    def _kv_live(self, key: str, now: float) -> Versioned | None:
        item = self._kv.get(key)
        if item is not None and item.expires is not None and item.expires <= now:
            del self._kv[key]
            return None
        return item

    def _kv_set(self, key: str, value: bytes, expires: float | None) -> int:
        version = next(self._kv_versions)
        self._kv[key] = Versioned(value, version, expires)
        if expires is not None:
            heapq.heappush(self._kv_expiry, (expires, key, version))
        return version

    def _reap_kv(self, now: float, limit: int) -> int:
        deleted = 0
        while deleted < limit and self._kv_expiry and self._kv_expiry[0][0] <= now:
            _, key, version = heapq.heappop(self._kv_expiry)
            item = self._kv.get(key)
            if item is not None and item.version == version:
                del self._kv[key]
                deleted += 1
        return deleted

    def kv_get(self, key: str) -> Versioned | None:
        with self._cond:
            return self._kv_live(key, self.now())

    def kv_put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        with self._cond:
            return self._kv_set(key, value, None if ttl is None else self.now() + ttl)

    def kv_cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> int | None:
        with self._cond:
            now = self.now()
            item = self._kv_live(key, now)
            if (item.version if item else None) != expected_version:
                return None
            return self._kv_set(key, value, None if ttl is None else now + ttl)

    def kv_incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        with self._cond:
            now = self.now()
            item = self._kv_live(key, now)
            result = (int(item.value) if item else 0) + delta
            expires = item.expires if item else (None if ttl is None else now + ttl)
            self._kv_set(key, str(result).encode(), expires)
            return result

    def kv_delete(self, key: str, expected_version: int | None = None) -> bool:
        with self._cond:
            item = self._kv_live(key, self.now())
            if item is None or (expected_version is not None and item.version != expected_version):
                return False
            del self._kv[key]
            return True

    def kv_scan(self, prefix: str, limit: int | None = None) -> list[tuple[str, Versioned]]:
        with self._cond:
            now = self.now()
            keys = sorted(k for k in self._kv if k.startswith(prefix))
            pairs = [(k, v) for k in keys if (v := self._kv_live(k, now)) is not None]
            return pairs if limit is None else pairs[:limit]

    # -- StreamStore --------------------------------------------------------

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        with self._cond:
            entry_id = self._stream_ids.get(stream, 0) + 1
            self._stream_ids[stream] = entry_id
            entries = self._streams.setdefault(stream, [])
            entries.append(StreamEntry(entry_id, data, self.now()))
            if maxlen is not None and len(entries) > maxlen:
                del entries[: len(entries) - maxlen]
            return entry_id

    def read(self, stream: str, after: int = 0, limit: int = 100) -> list[StreamEntry]:
        with self._cond:
            entries = self._streams.get(stream, [])
            return [e for e in entries if e.id > after][:limit]

    def trim(self, stream: str, maxlen: int) -> int:
        with self._cond:
            entries = self._streams.get(stream, [])
            drop = max(0, len(entries) - maxlen)
            del entries[:drop]
            return drop

    # -- PubSub -------------------------------------------------------------

    def publish(self, channel: str, data: bytes) -> None:
        with self._cond:
            subs = [s for s in self._subs if channel in s.channels]
        for sub in subs:
            sub.deliver(Message(channel, data))

    def subscribe(self, channels: Sequence[str]) -> MemorySubscription:
        sub = MemorySubscription(self, channels)
        with self._cond:
            self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: MemorySubscription) -> None:
        with self._cond:
            if sub in self._subs:
                self._subs.remove(sub)
