"""Eviction policies for in-process caches: bounded maps ``key -> value``.

::

    policy = make_policy("tinylfu", capacity=10_000, ttl=60.0)
    value = policy.get(key)              # MISSING on a miss (records the access)
    if value is MISSING:
        value = load(key)
        policy.put(key, value)           # may evict one entry

Policies (``POLICIES``):

``"tinylfu"`` (the default of ``space.cache``)
    W-TinyLFU: a window LRU of ~1% of the capacity in front of a segmented
    LRU main space (probation / protected). A key evicted from the window
    enters the main space only if a count-min sketch of recent access
    frequencies (4 rows of saturating 4-bit counters, all halved once
    ``10 * capacity`` accesses accumulate) rates it above the main space's
    eviction victim; otherwise the candidate itself is dropped. A burst of
    one-hit keys (a scan) therefore cannot flush a frequently used set. A
    sudden drop of the hit rate (the popular set moved) shrinks the
    protected segment and ages the sketch at once, so the policy follows
    shifting popularity at least as well as LRU (see :class:`TinyLFUPolicy`).
``"lru"``
    Least recently used; a hit moves the key to the most recent end. Same
    hits and evictions as ``cachetools.LRUCache`` for the same operations.
``"lfu"``
    Least frequently used among the cached keys (counts live as long as the
    entry; ties go to the least recently counted), like
    ``cachetools.LFUCache``.

``ttl`` (any policy): every entry also expires ``ttl`` seconds after its
``put`` by ``clock``; an expired entry is a miss, is dropped when touched,
and expired entries are swept from the oldest on every ``put`` and ``len``,
so they never hold capacity a live entry needs for long.

**Accesses.** ``get`` records an access: for ``tinylfu`` both hits and
misses count in the sketch (a miss followed by ``put`` is one access); for
``lru`` and ``lfu`` only hits count. ``put`` of a key already present
replaces its value and counts as a use for recency (and for ``lfu``'s
count), not in the sketch. ``pop``, ``in`` and ``len`` record nothing.

**Bounds.** ``len(policy) <= capacity`` after every call, and every
structure is bounded by ``capacity``: ``tinylfu``'s sketch takes
``16 * next_pow2(capacity)`` bytes (one byte per 4-bit counter; at most
64 MiB) whatever the number of distinct keys seen, and each of its entries
carries its 4 counter indices (~150 bytes) so that a hit does no hashing;
``ttl`` adds one deadline per held entry.

**Threads.** Not thread-safe: a policy is plain Python state with no lock
(to keep the hit path at ~0.1 µs for ``lru``). Use one from one thread, or wrap every
call in a lock as ``space.cache`` does (unlocked concurrent calls may raise
KeyError or break the recency order).

**Bad input.** An unknown policy name, a capacity that is not an int >= 1,
a ttl that is not a finite number > 0 or a clock that is not callable raise
:class:`~taskspace.errors.ConfigError` naming the argument. Keys must be
hashable (TypeError otherwise, from the dict). No backend is involved.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Final, Protocol, runtime_checkable

from taskspace.errors import ConfigError

__all__ = [
    "MISSING",
    "POLICIES",
    "LFUPolicy",
    "LRUPolicy",
    "Policy",
    "TTLPolicy",
    "TinyLFUPolicy",
    "make_policy",
]

MISSING: Final[Any] = object()
"""The sentinel ``get`` returns on a miss when no default is given."""

POLICIES: Final = ("tinylfu", "lru", "lfu")
"""Policy names accepted by :func:`make_policy`; the first is the default of ``space.cache``."""

_Evict = Callable[[Hashable], None] | None
_Entry = tuple[Any, int, int, int, int]  # TinyLFU: (value, counter index in each row)


@runtime_checkable
class Policy(Protocol):
    """A bounded in-process map ``key -> value`` with eviction (see the module docs)."""

    capacity: int

    def get(self, key: Hashable, default: Any = MISSING) -> Any:
        """The value of ``key``, or ``default`` on a miss; records the access."""
        ...

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace ``key``; may evict one entry (for tinylfu, possibly ``key``)."""
        ...

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key`` and return its value (``default`` if absent); records no access."""
        ...

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held (and not expired); records no access."""
        ...

    def __len__(self) -> int:
        """Entries held (expired ones excluded)."""
        ...

    def clear(self) -> None:
        """Drop every entry (and the frequency history)."""
        ...


class LRUPolicy:
    """Least recently used; hits move a key to the most recent end.

    Hit path: one membership test, ``OrderedDict.move_to_end`` and a lookup.
    Evicts the least recently used entry when a new key would exceed
    ``capacity``. Not thread-safe, with one exception kept on purpose:
    ``get`` is exactly those three ``OrderedDict`` calls (``in``,
    ``move_to_end``, ``[]``), each atomic under the GIL for keys with builtin
    hashing (str, int, ...), so it may run without a lock while every
    mutation takes one: a key removed between the calls makes ``get`` raise
    KeyError (read it as a miss). ``space.cache`` relies on this.
    """

    __slots__ = ("_data", "_on_evict", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._on_evict: _Evict = None

    def get(self, key: Hashable, default: Any = MISSING) -> Any:
        """The value of ``key`` (now the most recent), or ``default`` on a miss."""
        data = self._data
        if key in data:
            data.move_to_end(key)
            return data[key]
        return default

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace ``key`` as the most recent; evicts the least recent if full."""
        data = self._data
        if key in data:
            data.move_to_end(key)
            data[key] = value
            return
        data[key] = value
        if len(data) > self.capacity:
            victim = data.popitem(last=False)[0]
            if self._on_evict is not None:
                self._on_evict(victim)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key``; its value, or ``default`` if absent."""
        return self._data.pop(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Drop every entry."""
        self._data.clear()


class LFUPolicy:
    """Least frequently used among the cached keys, O(1) per call.

    Each entry counts its uses (``put`` of a new key counts 1; hits and
    replacing ``put`` add 1); the count is forgotten when the entry leaves.
    Evicts a key with the lowest count, the least recently counted among
    equals. Not thread-safe.
    """

    __slots__ = ("_buckets", "_counts", "_data", "_low", "_on_evict", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: dict[Hashable, Any] = {}
        self._counts: dict[Hashable, int] = {}
        # count -> keys with that count, least recently counted first
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._low = 1  # the lowest count held (exact whenever _data is non-empty)
        self._on_evict: _Evict = None

    def get(self, key: Hashable, default: Any = MISSING) -> Any:
        """The value of ``key`` (its count + 1), or ``default`` on a miss."""
        data = self._data
        if key in data:
            self._count(key)
            return data[key]
        return default

    def _count(self, key: Hashable) -> None:
        counts, buckets = self._counts, self._buckets
        n = counts[key]
        bucket = buckets[n]
        del bucket[key]
        if not bucket:
            del buckets[n]
            if self._low == n:
                self._low = n + 1
        n += 1
        counts[key] = n
        nxt = buckets.get(n)
        if nxt is None:
            buckets[n] = nxt = OrderedDict()
        nxt[key] = None

    def put(self, key: Hashable, value: Any) -> None:
        """Insert (count 1) or replace (count + 1) ``key``; evicts the least used if full."""
        data = self._data
        if key in data:
            data[key] = value
            self._count(key)
            return
        if len(data) >= self.capacity:
            bucket = self._buckets[self._low]
            victim = bucket.popitem(last=False)[0]
            if not bucket:
                del self._buckets[self._low]
            del data[victim], self._counts[victim]
            if self._on_evict is not None:
                self._on_evict(victim)
        data[key] = value
        self._counts[key] = 1
        ones = self._buckets.get(1)
        if ones is None:
            self._buckets[1] = ones = OrderedDict()
        ones[key] = None
        self._low = 1

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key``; its value, or ``default`` if absent."""
        data = self._data
        if key not in data:
            return default
        n = self._counts.pop(key)
        bucket = self._buckets[n]
        del bucket[key]
        if not bucket:
            del self._buckets[n]
            if self._low == n:  # the next lowest count, or 1 when empty
                self._low = min(self._buckets, default=1)
        return data.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Drop every entry and count."""
        self._data.clear()
        self._counts.clear()
        self._buckets.clear()
        self._low = 1


# Count-min sketch hashing: hash(key) times a 128-bit odd constant, modulo
# 2**128 (multiplicative hashing); each of the 4 rows takes its own slice of
# the well-mixed high bits.
_MIX: Final = 0x9E3779B97F4A7C15F39CC0605CEDC835
_M128: Final = (1 << 128) - 1
_WIDTH_FACTOR_BITS: Final = 2  # a row has next_pow2(capacity) * 4 counters
_MAX_WIDTH_BITS: Final = 24  # 4 rows x 16 MiB at most
_SATURATE: Final = bytes(min(v + 1, 15) for v in range(256))  # 4-bit counters: 15 stays 15
_HALVINGS: Final = [bytes(v >> n for v in range(256)) for n in range(8)]  # n halvings at once
_SAMPLE_FACTOR: Final = 10  # counters are halved once 10 * capacity increments accumulate
_PROTECTED_SHARE: Final = 0.9  # of the main space, when the workload is steady
_SHIFT_DROP: Final = 0.05  # a period's hit rate this far below the running mean: a shift
_SHIFT_SHARE: Final = 0.1  # ... then protected shrinks to this share of the main space
_SHARE_STEP: Final = 0.05  # and grows back by this much every steady period
_SHIFT_AGING: Final = 2  # ... and the sketch is halved this many times more
_PERIOD_DIV: Final = 4  # a hit-rate period is capacity / 4 accesses,
_MIN_PERIOD: Final = 1024  # but at least this many


class TinyLFUPolicy:
    """W-TinyLFU: window LRU (~1%) + segmented LRU main (probation / protected),
    admission to the main space by a count-min sketch with periodic halving.

    * A new key enters the window (LRU). The window's overflow is the
      *candidate*; the main space's *victim* is the first probation entry
      (protected's if probation is empty). The candidate is admitted (and
      the victim evicted) only if its estimated frequency is higher;
      otherwise the candidate is evicted and the victim, having defended its
      place, moves to probation's far end (so one stale entry with a high
      count cannot turn away every candidate). While the main space has
      room, the candidate is admitted without a contest.
    * A hit in probation promotes the key to protected; protected's overflow
      goes back to probation.
    * Every ``get`` (hit or miss) increments the key's 4 counters (saturating
      at 15, 4 rows of ``4 * next_pow2(capacity)``); once ``10 * capacity``
      increments have accumulated every counter is halved, so old
      popularity fades.
    * Protected holds 90% of the main space while the hit rate is steady.
      When a period's hit rate (``max(capacity // 4, 1024)`` accesses) falls
      5 points below its running mean, the popular set has probably
      shifted: protected shrinks to 10% at once (its least recent entries
      drop to probation, where new keys can displace them), the sketch is
      halved twice more (old counts stop outvoting new keys), and protected
      grows back by 5 points per period. Without this, W-TinyLFU trails LRU
      for a long while after each shift (see docs/cache-policies.md).

    Not thread-safe.
    """

    __slots__ = (
        "_additions",
        "_main_max",
        "_mask",
        "_misses",
        "_on_evict",
        "_period_ticks",
        "_periods",
        "_probation",
        "_protected",
        "_protected_max",
        "_rate",
        "_sample",
        "_share",
        "_shifts",
        "_table",
        "_tick_len",
        "_ticks",
        "_window",
        "_window_max",
        "capacity",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._window_max = max(1, capacity // 100)
        self._main_max = max(0, capacity - self._window_max)
        self._share = _PROTECTED_SHARE
        self._protected_max = int(self._main_max * self._share)
        self._window: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._probation: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._protected: OrderedDict[Hashable, _Entry] = OrderedDict()
        bits = max(4, (capacity - 1).bit_length() + _WIDTH_FACTOR_BITS)
        bits = min(bits, _MAX_WIDTH_BITS)
        self._mask = (1 << bits) - 1
        self._shifts = tuple(128 - bits * (row + 1) for row in range(4))
        self._table = bytearray(4 << bits)  # 4 rows of 1 << bits counters, one after another
        self._sample = _SAMPLE_FACTOR * capacity
        # Work is done every tick of `_tick_len` accesses: aging (due every
        # 5 * capacity accesses after the first 10 * capacity) and, every
        # `_period_ticks` ticks, the hit-rate check over >= 1024 accesses.
        period = max(_MIN_PERIOD, capacity // _PERIOD_DIV)
        self._tick_len = min(period, self._sample // 2)
        self._period_ticks = -(-period // self._tick_len)
        self._reset_counts()
        self._on_evict: _Evict = None

    def _reset_counts(self) -> None:
        self._additions = 0  # increments since the last halving (halved with the counters)
        self._ticks = self._tick_len  # accesses left in this tick
        self._periods = self._period_ticks  # ticks left in this period
        self._misses = 0  # misses in this period
        self._rate = 0.0  # running mean of the periods' hit rates

    # -- the sketch and the periodic work -------------------------------------

    def _address(self, key: Hashable) -> _Entry:
        """``(None, i0, i1, i2, i3)``: the key's counter index in each of the 4 rows."""
        h = hash(key) * _MIX & _M128
        mask, width = self._mask, self._mask + 1
        s0, s1, s2, s3 = self._shifts
        return (
            None,
            h >> s0 & mask,
            (h >> s1 & mask) + width,
            (h >> s2 & mask) + 2 * width,
            (h >> s3 & mask) + 3 * width,
        )

    def _count(self, entry: _Entry) -> None:
        """Increment the 4 counters at ``entry``'s indices (the slow path's version)."""
        _, i0, i1, i2, i3 = entry
        table = self._table
        table[i0] = _SATURATE[table[i0]]
        table[i1] = _SATURATE[table[i1]]
        table[i2] = _SATURATE[table[i2]]
        table[i3] = _SATURATE[table[i3]]
        self._ticks -= 1
        if not self._ticks:
            self._tick()

    def _estimate(self, entry: _Entry) -> int:
        _, i0, i1, i2, i3 = entry
        table = self._table
        return min(table[i0], table[i1], table[i2], table[i3])

    def _tick(self) -> None:
        """Every ``_tick_len`` accesses: age the sketch when due; at the end of a
        period, react to a hit-rate drop."""
        tick = self._tick_len
        self._ticks = tick
        self._additions += tick
        halvings = 0
        if self._additions >= self._sample:
            halvings, self._additions = 1, self._additions // 2
        self._periods -= 1
        if not self._periods:
            self._periods = self._period_ticks
            rate = 1.0 - self._misses / (tick * self._period_ticks)
            self._misses = 0
            if rate < self._rate - _SHIFT_DROP:
                self._resize_protected(_SHIFT_SHARE)
                halvings += _SHIFT_AGING
            elif self._share < _PROTECTED_SHARE:
                self._resize_protected(min(_PROTECTED_SHARE, self._share + _SHARE_STEP))
            self._rate += (rate - self._rate) / 4
        if halvings:
            self._table = self._table.translate(_HALVINGS[halvings])

    def _resize_protected(self, share: float) -> None:
        self._share = share
        self._protected_max = int(self._main_max * share)
        protected, probation = self._protected, self._probation
        while len(protected) > self._protected_max:
            key, value = protected.popitem(last=False)
            probation[key] = value

    def frequency(self, key: Hashable) -> int:
        """The sketch's estimate (0..15) of recent accesses to ``key``; records nothing."""
        return self._estimate(self._address(key))

    # -- the map: segments hold (value, i0, i1, i2, i3), the counter indices
    # computed once per put so that a hit does no hashing ---------------------

    def get(self, key: Hashable, default: Any = MISSING) -> Any:
        """The value of ``key``, or ``default`` on a miss; counts the access in the sketch."""
        protected = self._protected
        entry = protected.get(key)
        if entry is not None:  # the common hit, inline
            protected.move_to_end(key)
            value, i0, i1, i2, i3 = entry
            table = self._table
            table[i0] = _SATURATE[table[i0]]
            table[i1] = _SATURATE[table[i1]]
            table[i2] = _SATURATE[table[i2]]
            table[i3] = _SATURATE[table[i3]]
            self._ticks -= 1
            if not self._ticks:
                self._tick()
            return value
        return self._get_rest(key, default)

    def _get_rest(self, key: Hashable, default: Any) -> Any:
        probation = self._probation
        entry = probation.pop(key, None)
        if entry is not None:  # promoted; protected's overflow goes back to probation
            protected = self._protected
            protected[key] = entry
            if len(protected) > self._protected_max:
                old, old_entry = protected.popitem(last=False)
                probation[old] = old_entry
            self._count(entry)
            return entry[0]
        window = self._window
        entry = window.get(key)
        if entry is not None:
            window.move_to_end(key)
            self._count(entry)
            return entry[0]
        self._count(self._address(key))
        self._misses += 1
        return default

    def put(self, key: Hashable, value: Any) -> None:
        """Replace ``key`` in place (most recent of its segment) or add it to the window;
        a full cache then evicts one key: the window's candidate or the main victim."""
        for segment in (self._protected, self._probation, self._window):
            entry = segment.get(key)
            if entry is not None:
                segment[key] = (value, *entry[1:])
                segment.move_to_end(key)
                return
        window = self._window
        window[key] = (value, *self._address(key)[1:])
        if len(window) > self._window_max:
            self._admit(*window.popitem(last=False))

    def _admit(self, candidate: Hashable, entry: _Entry) -> None:
        probation, protected = self._probation, self._protected
        if len(probation) + len(protected) < self._main_max:
            probation[candidate] = entry
            return
        loser = candidate
        if self._main_max:
            segment = probation if probation else protected
            victim, victim_entry = next(iter(segment.items()))
            if self._estimate(entry) > self._estimate(victim_entry):
                del segment[victim]
                probation[candidate] = entry
                loser = victim
            else:
                segment.move_to_end(victim)
        if self._on_evict is not None:
            self._on_evict(loser)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key``; its value, or ``default`` if absent (the sketch is unchanged)."""
        for segment in (self._protected, self._probation, self._window):
            entry = segment.pop(key, None)
            if entry is not None:
                return entry[0]
        return default

    def __contains__(self, key: object) -> bool:
        return key in self._protected or key in self._probation or key in self._window

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def clear(self) -> None:
        """Drop every entry and the frequency history."""
        self._window.clear()
        self._probation.clear()
        self._protected.clear()
        self._table[:] = bytes(len(self._table))
        self._resize_protected(_PROTECTED_SHARE)
        self._reset_counts()


_Inner = LRUPolicy | LFUPolicy | TinyLFUPolicy


class TTLPolicy:
    """Any policy plus expiry ``ttl`` seconds after each ``put`` (by ``clock``).

    An expired entry is a miss for ``get`` (which still records the access
    for the inner policy's statistics), absent for ``in`` and ``pop``, and
    is dropped when touched; every ``put`` and ``len`` also drops expired
    entries from the oldest (deadlines are kept in put order, so this costs
    O(1) per expired entry). Eviction by the inner policy forgets the
    deadline too, so the bookkeeping stays bounded by ``capacity``.
    Not thread-safe.
    """

    __slots__ = ("_clock", "_deadlines", "_inner", "capacity", "ttl")

    def __init__(self, inner: _Inner, ttl: float, clock: Callable[[], float]) -> None:
        self.capacity = inner.capacity
        self.ttl = ttl
        self._inner = inner
        self._clock = clock
        self._deadlines: OrderedDict[Hashable, float] = OrderedDict()  # put order = deadline order
        inner._on_evict = self._forget

    def _forget(self, key: Hashable) -> None:
        self._deadlines.pop(key, None)

    def _expired(self, key: object) -> bool:
        """Whether ``key`` is held but expired (and then drop it)."""
        deadline = self._deadlines.get(key)
        if deadline is None or deadline > self._clock():
            return False
        del self._deadlines[key]
        self._inner.pop(key)
        return True

    def _sweep(self) -> None:
        deadlines = self._deadlines
        if not deadlines:
            return
        now = self._clock()
        while deadlines:
            key = next(iter(deadlines))
            if deadlines[key] > now:
                return
            del deadlines[key]
            self._inner.pop(key)

    def get(self, key: Hashable, default: Any = MISSING) -> Any:
        """The value of ``key`` if held and not expired, else ``default``; records the access."""
        self._expired(key)
        return self._inner.get(key, default)

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace ``key`` with a fresh deadline ``now + ttl``; may evict."""
        self._sweep()
        deadlines = self._deadlines
        deadlines.pop(key, None)
        self._inner.put(key, value)  # a new key is never its own victim (not even tinylfu's)
        deadlines[key] = self._clock() + self.ttl

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key``; its value, or ``default`` if absent or expired."""
        if self._expired(key):
            return default
        self._deadlines.pop(key, None)
        return self._inner.pop(key, default)

    def __contains__(self, key: object) -> bool:
        return not self._expired(key) and key in self._inner

    def __len__(self) -> int:
        self._sweep()
        return len(self._inner)

    def clear(self) -> None:
        """Drop every entry (and the inner policy's history)."""
        self._deadlines.clear()
        self._inner.clear()


_CLASSES: Final[dict[str, type[_Inner]]] = {
    "tinylfu": TinyLFUPolicy,
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
}


def make_policy(
    name: str,
    capacity: int,
    ttl: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Policy:
    """A new empty policy ``name`` (one of ``POLICIES``) holding at most ``capacity``
    entries; with ``ttl``, each entry also expires ``ttl`` seconds after its put.

    Raises ConfigError naming ``name``, ``capacity`` (an int >= 1), ``ttl``
    (None or a finite number > 0) or ``clock`` (a callable) when invalid.
    """
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"name must be one of {', '.join(POLICIES)}, got {name!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"capacity must be an int >= 1, got {capacity!r}")
    if ttl is not None and (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not math.isfinite(ttl)
        or ttl <= 0
    ):
        raise ConfigError(f"ttl must be None or a finite number of seconds > 0, got {ttl!r}")
    if not callable(clock):
        raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}")
    policy = cls(capacity)
    if ttl is None:
        return policy
    return TTLPolicy(policy, float(ttl), clock)
