"""The KV blackboard of a space (``space.kv``): JSON values, versions, fenced writes.

::

    space.kv.put("report", {"rows": 3})
    space.kv.get("report")                                # {"rows": 3}
    v = space.kv.get_versioned("report").version
    space.kv.cas("report", {"rows": 4}, version=v)        # VersionConflict if it moved
    space.kv.put("report", value, fence=lease)           # LeaseLost once the lease is lost

**Guarantees** (those of ``store.kv``): every write is atomic and gets a new
version, strictly increasing per key and never reused (no ABA across delete
and re-create); an expired key is absent at once.

**Fenced writes.** ``put``/``delete`` with ``fence=lease`` are one store
transaction that writes only if the lease's grant is still current on the
store (not released, not expired, same token): a holder whose lease was lost
(expired while it was paused, taken by another holder) can never write, even
if it does not know yet. A fence whose holder already knows it lost the
lease (``lease.held`` is False) is refused without a store call. Either way
LeaseLost is raised and nothing is written.

**Faults.** BackendError when the store cannot be reached: the write may or
may not have happened (read it back). Keys must be non-empty strings
(ConfigError); values must survive JSON exactly (SerializationError, naming
the part that would not). Nothing is written on a refused call.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from taskspace.backends.base import Compare, Delete, Exists, GrantHeld, Put, Versioned
from taskspace.backends.checks import check_ttl
from taskspace.codec import JSON
from taskspace.errors import (
    BackendError,
    ConfigError,
    LeaseLost,
    SerializationError,
    SpaceLost,
    VersionConflict,
)

if TYPE_CHECKING:
    from taskspace.coordination.lease import Lease
    from taskspace.space import Space

SCAN_PAGE = 500


@dataclass(frozen=True, slots=True)
class Entry:
    """A live value: ``value`` decoded, ``version`` (per key, never reused),
    ``revision`` (the space revision of the write), ``expires`` (store's lease
    clock; None: no TTL)."""

    value: Any
    version: int
    revision: int
    expires: float | None = None


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"key={key!r}: must be a non-empty string")


class KV:
    """JSON values in the space's versioned key-value store (one per Space)."""

    def __init__(self, space: Space) -> None:
        self._space = space
        self._codec = JSON.limited(space.max_payload)

    def _encode(self, key: str, value: Any) -> bytes:
        _check_key(key)
        return self._codec.encode(value, f"the value of {key!r}")

    def _decode(self, key: str, data: bytes) -> Any:
        try:
            return self._codec.decode(data)
        except SerializationError as exc:
            raise SerializationError(f"the value of {key!r} is not JSON: {exc}") from None

    def _entry(self, key: str, found: Versioned) -> Entry:
        return Entry(self._decode(key, found.value), found.version, found.revision, found.expires)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is absent or expired."""
        found = self.get_versioned(key)
        return default if found is None else found.value

    def get_versioned(self, key: str) -> Entry | None:
        """The value of ``key`` with its version, revision and expiry, or None."""
        _check_key(key)
        found = self._space.store.kv.get(key)
        return None if found is None else self._entry(key, found)

    def put(
        self, key: str, value: Any, *, ttl: float | None = None, fence: Lease | None = None
    ) -> int:
        """Write ``value`` (expiring after ``ttl`` seconds; None: never); return
        the new version. With ``fence``: only while that lease is current on
        the store, else LeaseLost and nothing is written."""
        check_ttl(ttl)
        data = self._encode(key, value)
        kv = self._space.store.kv
        if fence is None:
            return kv.put(key, data, ttl=ttl).version
        _check_fence(fence)
        result = _once(lambda rid: kv.txn([GrantHeld(fence.grant)], [Put(key, data, ttl)], rid))
        if not result.ok:
            raise _refused(fence, f"put {key!r}")
        return result.versions[0]

    def cas(self, key: str, value: Any, *, version: int | None, ttl: float | None = None) -> int:
        """Write only if ``key`` is at ``version`` (None: only if absent);
        return the new version, or raise VersionConflict (``.current``: the
        version found, None if absent) and write nothing."""
        check_ttl(ttl)
        data = self._encode(key, value)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ConfigError(f"version={version!r}: must be an integer or None")
        kv = self._space.store.kv
        written = kv.cas(key, version, data, ttl=ttl)
        if written is not None:
            return written.version
        found = kv.get(key)
        current = None if found is None else found.version
        raise VersionConflict(
            f"{key!r} is at version {current}, not {version}: nothing written", current
        )

    def delete(self, key: str, *, fence: Lease | None = None) -> bool:
        """Delete ``key``; True if it existed. With ``fence``: only while that
        lease is current on the store, else LeaseLost and nothing is deleted."""
        _check_key(key)
        kv = self._space.store.kv
        if fence is None:
            return kv.delete(key)
        _check_fence(fence)
        compares: list[Compare] = [GrantHeld(fence.grant), Exists(key)]
        result = _once(lambda rid: kv.txn(compares, [Delete(key)], rid))
        if result.failed == 0:
            raise _refused(fence, f"delete {key!r}")
        return result.ok

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the integer at ``key`` (absent: 0) and return the
        result; NotAnInteger if the value is not an integer (nothing written).
        A BackendError is retried once with the same request id, so a reply
        lost on the network never counts twice."""
        _check_key(key)
        kv = self._space.store.kv
        return _once(lambda rid: kv.incr(key, delta, request_id=rid))

    def scan(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """Every live ``(key, value)`` whose key starts with ``prefix``, in key
        order, read page by page (a key written during the scan may or may not
        appear). A value that is not JSON (written through ``store.kv``
        directly) raises SerializationError naming its key; taskspace's own
        records under ``taskspace/`` are all JSON."""
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix={prefix!r}: must be a string")
        after: str | None = None
        while True:
            page = self._space.store.kv.scan(prefix, after_key=after, limit=SCAN_PAGE)
            for key, found in page:
                yield key, self._decode(key, found.value)
            if len(page) < SCAN_PAGE:
                return
            after = page[-1][0]


def _check_fence(fence: Lease) -> None:
    from taskspace.coordination.lease import Lease

    if not isinstance(fence, Lease):
        raise ConfigError(f"fence={fence!r}: must be a Lease (from a lock, semaphore or term)")
    if not fence.held:
        raise _refused(fence, "a fenced write")


def _refused(fence: Lease, what: str) -> LeaseLost:
    return LeaseLost(f"{what} refused: lease {fence.name} (token {fence.token}) is no longer held")


T = TypeVar("T")
RETRY_AFTER_S = 0.05


def _once(call: Callable[[str], T]) -> T:
    """``call(request_id)``, retried once after a BackendError with the same
    request id: the store returns the first call's result if it had applied
    (a reply lost on the network), so the write happens at most once."""
    request_id = uuid.uuid4().hex
    try:
        return call(request_id)
    except SpaceLost:
        raise
    except BackendError:
        time.sleep(RETRY_AFTER_S)
        return call(request_id)
