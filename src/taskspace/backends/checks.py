"""Argument checks of the store contract, written once for every backend.

Each raises :class:`~taskspace.errors.ConfigError` naming the bad value
before a backend touches its store, so a bad call changes nothing and reads
the same on memory, SQLite and Redis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from taskspace.backends.base import (
    INT64_MAX,
    INT64_MIN,
    MAX_DURATION_S,
    Compare,
    Delete,
    Exists,
    GrantHeld,
    Put,
    ValueIs,
    VersionIs,
    Write,
)
from taskspace.errors import ConfigError

# What ``kv.incr`` accepts as an integer value: optional sign, decimal digits.
INTEGER = re.compile(rb"[+-]?[0-9]+")


def is_integer(value: bytes) -> bool:
    """True if ``incr`` may add to ``value``: a decimal integer in the int64
    range (else incr raises NotAnInteger)."""
    return INTEGER.fullmatch(value) is not None and INT64_MIN <= int(value) <= INT64_MAX


def in_int64(value: int) -> bool:
    """True if an ``incr`` result fits (else incr raises NotAnInteger)."""
    return INT64_MIN <= value <= INT64_MAX


def check_delta(delta: int) -> None:
    """An ``incr`` delta: an int (not a bool) in the int64 range."""
    if isinstance(delta, bool) or not isinstance(delta, int) or not in_int64(delta):
        raise ConfigError(f"delta={delta!r}: must be an integer in the 64-bit range")


def check_key(key: str, what: str = "key") -> None:
    """A KV key, lease name or stream name: a non-empty string."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{what}={key!r}: must be a non-empty string")


def check_ttl(ttl: float | None, what: str = "ttl", optional: bool = True) -> None:
    """A positive number of seconds, at most MAX_DURATION_S (or None when ``optional``)."""
    if ttl is None and optional:
        return
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_DURATION_S:
        raise ConfigError(
            f"{what}={ttl!r}: must be a positive number of seconds, at most ten years"
        )


def check_seconds(
    value: float | None, what: str, *, minimum: float = 0.0, optional: bool = False
) -> None:
    """A number of seconds from ``minimum`` (inclusive) to MAX_DURATION_S (or
    None when ``optional``); bools, NaN and infinities are refused. Every
    duration option of taskspace (waits, intervals, TTLs with a floor) is
    checked here, so they all read alike."""
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not minimum <= value <= MAX_DURATION_S
    ):
        none = " (or None)" if optional else ""
        raise ConfigError(
            f"{what}={value!r}: must be a number of seconds from {minimum:g} to ten years{none}"
        )


def check_limit(limit: int | None, what: str = "limit", optional: bool = False) -> None:
    """An integer of at least 1 (or None when ``optional``: no bound)."""
    if limit is None and optional:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{what}={limit!r}: must be an integer >= 1")


def check_wait(wait: float, what: str = "wait") -> None:
    """A number of seconds from 0 to MAX_DURATION_S."""
    if (
        isinstance(wait, bool)
        or not isinstance(wait, int | float)
        or not 0 <= wait <= MAX_DURATION_S
    ):
        raise ConfigError(f"{what}={wait!r}: must be a number of seconds >= 0, at most ten years")


def check_txn(compares: Sequence[Compare], writes: Sequence[Write]) -> None:
    """Every compare and write of a txn is well formed, and no key is written twice."""
    for compare in compares:
        if isinstance(compare, GrantHeld):
            continue
        if not isinstance(compare, VersionIs | ValueIs | Exists):
            raise ConfigError(
                f"txn compare {compare!r}: not a VersionIs, ValueIs, Exists or GrantHeld"
            )
        check_key(compare.key)
    seen: set[str] = set()
    for write in writes:
        if not isinstance(write, Put | Delete):
            raise ConfigError(f"txn write {write!r}: not a Put or Delete")
        check_key(write.key)
        if isinstance(write, Put):
            check_ttl(write.ttl)
        if write.key in seen:
            raise ConfigError(f"txn writes key {write.key!r} twice")
        seen.add(write.key)


def check_acquire(name: str, ttl: float, capacity: int, grant_id: str | None) -> None:
    """The arguments of ``leases.acquire``."""
    check_key(name, "name")
    check_ttl(ttl, optional=False)
    check_limit(capacity, "capacity")
    if grant_id is not None:
        check_key(grant_id, "grant_id")


def check_append(stream: str, maxlen: int | None) -> None:
    """The arguments of ``streams.append`` / ``append_many``."""
    check_key(stream, "stream")
    check_limit(maxlen, "maxlen", optional=True)


def check_read(stream: str, limit: int, wait: float) -> None:
    """The arguments of ``streams.read``."""
    check_key(stream, "stream")
    check_limit(limit)
    check_wait(wait)


def check_trim(stream: str, maxlen: int | None, max_age: float | None) -> None:
    """The arguments of ``streams.trim``."""
    check_append(stream, maxlen)
    if max_age is not None:
        check_wait(max_age, "max_age")
