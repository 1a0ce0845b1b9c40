"""StreamStore of the in-process backend.

Guarantees (as the contract): ids are 1, 2, 3... per stream, increasing and
never reused, also after a trim (the last id is kept when the entries go);
an append is one step under the space's lock; ``time`` is the wall clock of
the append; ``read`` with ``wait`` blocks on the space's condition variable,
which every append notifies. ``append_many`` remembers a ``request_id`` for
REQUEST_ID_TTL_S and answers a repeat with the first call's ids.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from taskspace.backends.base import StreamEntry
from taskspace.backends.checks import (
    check_append,
    check_read,
    check_trim,
)
from taskspace.backends.memory.state import MemoryState


class MemoryStreams:
    """Streams as lists of entries in id order, one per name."""

    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        return self.append_many(stream, [data], maxlen)[0]

    def append_many(
        self,
        stream: str,
        items: Sequence[bytes],
        maxlen: int | None = None,
        request_id: str | None = None,
    ) -> list[int]:
        check_append(stream, maxlen)
        s = self._s
        with s.cond:
            now, wall = s.clock.now(), s.clock.wall()
            seen, first = s.recall("append", request_id, now)
            if seen:
                return list(first)
            last = s.stream_last.get(stream, 0)
            ids = list(range(last + 1, last + 1 + len(items)))
            if ids:
                s.stream_last[stream] = ids[-1]
                entries = s.streams.setdefault(stream, [])
                new = zip(ids, items, strict=True)
                entries.extend(StreamEntry(i, data, wall) for i, data in new)
                if maxlen is not None and len(entries) > maxlen:
                    del entries[: len(entries) - maxlen]
                s.cond.notify_all()
            s.remember("append", request_id, now, tuple(ids))
            return ids

    def _after(self, stream: str, after: int) -> tuple[list[StreamEntry], int]:
        entries = self._s.streams.get(stream, [])
        return entries, bisect.bisect_right(entries, after, key=lambda e: e.id)

    def read(
        self, stream: str, after: int = 0, limit: int = 100, wait: float = 0.0
    ) -> list[StreamEntry]:
        check_read(stream, limit, wait)
        s = self._s
        with s.cond:
            if wait > 0:

                def ready(now: float) -> float | None:
                    entries, i = self._after(stream, after)
                    return None if i < len(entries) else math.inf

                s.wait_for(ready, wait)
            entries, i = self._after(stream, after)
            return entries[i : i + limit]

    def trim(
        self,
        stream: str,
        maxlen: int | None = None,
        min_id: int | None = None,
        max_age: float | None = None,
    ) -> int:
        check_trim(stream, maxlen, max_age)
        s = self._s
        with s.cond:
            entries = s.streams.get(stream)
            if not entries:
                return 0
            keep = entries
            if min_id is not None:
                keep = [e for e in keep if e.id >= min_id]
            if max_age is not None:
                cutoff = s.clock.wall() - max_age
                keep = [e for e in keep if e.time >= cutoff]
            if maxlen is not None and len(keep) > maxlen:
                keep = keep[len(keep) - maxlen :]
            dropped = len(entries) - len(keep)
            entries[:] = keep
            return dropped
