"""Service registry: register instances, discover healthy ones, watch changes.

An instance is one KV key, ``taskspace/services/<service>/<instance_id>``,
holding a JSON document (service, id, address, tags, meta, check, health
``status``/``output``/``since``/``checked``, ``registered``; times are the
store's wall clock) with a TTL.

Guarantees and faults:

- **Liveness.** A registration lives while its process heartbeats: one
  background thread per :class:`Registry` refreshes every registration at a
  third of its TTL with ``kv.touch`` (no new revision, so heartbeats never
  flood the change feed). A process that dies, is SIGKILLed or paused past
  its TTL disappears from :meth:`Registry.discover` at once when the TTL
  runs out, and watchers see an ``expired`` change. A pause shorter than the
  TTL minus one heartbeat interval (two thirds of the TTL) never lets the
  key expire; a longer one may (no heartbeat can cover it: the last one may
  have run ttl/3 before the pause). A heartbeat that fails
  (backend down) is logged and retried with backoff; the thread never dies
  of an exception. A heartbeat that finds its key gone while the process is
  still alive (it expired during a pause) writes the registration again,
  with its initial health, until :meth:`Registration.deregister` is called.
  An instance the *maintainer* deregistered (critical past
  ``deregister_after``) does not come back: the maintainer's delete leaves a
  tombstone (``<key>/deregistered``, naming the registration's incarnation,
  for TOMBSTONE_TTL_S or 3 TTLs, whichever is longer); the owner's next
  heartbeat sees it, logs it once, marks the :class:`Registration` inactive
  (``evicted``) and stops. Only an owner paused for longer than the
  tombstone lives registers again. ``register`` again is a new incarnation.
- **Health.** ``passing`` | ``warning`` | ``critical``. An instance without
  a check is ``passing`` while it lives (its TTL is its check), unless its
  owner reports otherwise (:meth:`Registration.update`). An instance with a
  ``check`` URL (see :mod:`taskspace.coordination.health`) starts
  ``critical`` ("not checked yet", as Consul does) and the elected
  maintainer (:func:`maintain_registry`) probes it every ``interval``
  seconds. A status change (and the first check's result) is a real write
  (a revision: watchers see it); a check that finds the same status writes
  nothing. An instance found ``critical`` (by a check, or by its owner's
  report) for longer than its ``deregister_after`` is deregistered by the
  maintainer; one never checked yet is not (its ``since`` restarts at its
  first check), so a maintainer that starts late evicts nothing unseen.
- **Discovery.** ``discover(service)`` returns only ``passing`` instances by
  default (Consul's ``?passing``); ``include_warning=True`` adds
  ``warning`` ones, ``healthy_only=False`` returns every live instance.
- **Watching.** :meth:`Registry.watch` follows the KV change feed: it
  resumes after a BackendError (reconnect, backoff) from the last revision
  it delivered, and after ``Compacted`` re-lists with ``scan`` and yields the
  *net difference* between what it knew and the store (not every
  intermediate change, which the store no longer has), then follows the
  feed again. It never misses a change of state: after any fault its view
  equals the store's. (A watch resumed with ``since`` below the compaction
  point knows nothing yet: it reports every live instance ``added``, and
  cannot report the removal of one it never saw.) Resuming from the
  ``revision`` of *any* delivered change misses nothing after it, also in
  the middle of a listing (see :class:`ServiceChange`). With
  ``idle_timeout`` the watch ends on time also while the backend is down,
  and the ``watch()`` call never blocks longer than ``idle_timeout`` (or
  WATCH_START_S) before raising BackendError.
- **Closing.** :meth:`Registry.close` deregisters what it registered and
  stops its heartbeat thread; a process that exits without it leaves its
  instances to their TTL.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import orjson

from taskspace.backends.base import Change, Delete, Put, Store, Versioned, VersionIs
from taskspace.backends.checks import check_seconds
from taskspace.codec import JSON
from taskspace.coordination.health import (
    OUTPUT_MAX,
    STATUSES,
    CheckResult,
    Status,
    run_check,
    validate_check,
)
from taskspace.errors import BackendError, Compacted, ConfigError, SerializationError, SpaceLost

if TYPE_CHECKING:
    from taskspace.space import Space

log = logging.getLogger("taskspace.registry")

PREFIX = "taskspace/services/"
WORKER_SERVICE = "taskspace.worker"
DEFAULT_TTL_S = 10.0
DEFAULT_INTERVAL_S = 10.0
DEFAULT_CHECK_TIMEOUT_S = 2.0
DEFAULT_DEREGISTER_AFTER_S = 60.0
SCAN_PAGE = 1000
WATCH_WAIT_S = 1.0  # one kv.wait at most this long, so a stop is seen within it
WATCH_START_S = 10.0  # watch() fixes its start within this (or idle_timeout), else BackendError
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0
MAINTAIN_BUDGET_S = 1.0  # maintain_registry returns within about this long
RECORD_SHARE = 0.25  # of the budget kept for writing results after waiting for checks
CHECK_THREADS = 16
UPDATE_RETRIES = 10
TOMBSTONE_SUFFIX = "/deregistered"  # <instance key>/deregistered: see the module docstring
TOMBSTONE_TTL_S = 60.0
# Floors of the duration options (every one is checked by checks.check_seconds):
MIN_TTL_S = 0.1  # heartbeats run every ttl/3; as for leases, shorter cannot be kept
MIN_INTERVAL_S = 0.1  # between two checks of one instance
MIN_CHECK_TIMEOUT_S = 0.01

SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@~-]{0,199}")
ChangeKindName = Literal["added", "updated", "removed", "expired"]
# Fields the maintainer (or a status report) owns; an owner's update keeps them.
HEALTH_FIELDS = ("status", "output", "since", "checked")


# -- validation -----------------------------------------------------------------


def check_service(service: object) -> str:
    """A service name: letters, digits, ``.``, ``_``, ``-`` (1-128, starting alphanumeric)."""
    if not isinstance(service, str) or SERVICE_RE.fullmatch(service) is None:
        raise ConfigError(
            f"service={service!r}: must be 1-128 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return service


def check_instance_id(instance_id: object) -> str:
    """An instance id: letters, digits, ``.``, ``_``, ``-``, ``:``, ``@``, ``~`` (1-200)."""
    if not isinstance(instance_id, str) or INSTANCE_RE.fullmatch(instance_id) is None:
        raise ConfigError(
            f"instance_id={instance_id!r}: must be 1-200 letters, digits, '.', '_', '-', ':',"
            " '@' or '~', starting with a letter or digit"
        )
    return instance_id


def _check_tags(tags: object) -> list[str]:
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise ConfigError(f"tags={tags!r}: must be a list of non-empty strings")
    out = list(tags)
    if not all(isinstance(t, str) and t for t in out):
        raise ConfigError(f"tags={tags!r}: must be a list of non-empty strings")
    return out


def _check_meta(meta: object) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise ConfigError(f"meta={meta!r}: must be a dict with string keys")
    try:  # exact JSON: a value that would not read back equal (nan, a tuple) is refused
        JSON.encode(dict(meta), "meta")
    except SerializationError as exc:
        raise ConfigError(f"meta={meta!r}: {exc}") from None
    return dict(meta)


def _check_address(address: object) -> str:
    if not isinstance(address, str) or not address or len(address) > 1024:
        raise ConfigError(f"address={address!r}: must be a non-empty string (host:port, a URL)")
    return address


def _check_status(status: object) -> Status:
    if status not in STATUSES:
        raise ConfigError(f"status={status!r}: must be one of {', '.join(STATUSES)}")
    return status


def _check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}={value!r}: must be True or False")
    return value


def _seconds(
    value: object, what: str, minimum: float = 0.0, optional: bool = False
) -> float | None:
    """``value`` as a float once checks.check_seconds accepts it (None only when ``optional``)."""
    check_seconds(value, what, minimum=minimum, optional=optional)  # type: ignore[arg-type]
    return None if value is None else float(value)  # type: ignore[arg-type]


# -- instances and changes ----------------------------------------------------------


def instance_key(service: str, instance_id: str) -> str:
    """The KV key of an instance."""
    return f"{PREFIX}{service}/{instance_id}"


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance as the store holds it (a snapshot).

    ``status`` is its health, ``output`` why; ``since`` when the status last
    changed and ``checked`` when a check last changed it, ``registered`` when
    it was (re-)registered: wall-clock epoch seconds. ``version``/``revision``
    are the KV key's; ``expires`` is on the store's lease clock (None: no TTL).
    """

    service: str
    id: str
    address: str
    tags: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    status: Status = "passing"
    output: str = ""
    check: str | None = None
    interval: float = DEFAULT_INTERVAL_S
    timeout: float = DEFAULT_CHECK_TIMEOUT_S
    ttl: float | None = DEFAULT_TTL_S
    deregister_after: float | None = DEFAULT_DEREGISTER_AFTER_S
    registered: float = 0.0
    since: float = 0.0
    checked: float | None = None
    version: int = 0
    revision: int = 0
    expires: float | None = None
    incarnation: str | None = None  # one per register() call: whose tombstone is whose

    @property
    def key(self) -> str:
        return instance_key(self.service, self.id)

    @property
    def healthy(self) -> bool:
        """True when ``passing``."""
        return self.status == "passing"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the CLI)."""
        return {
            "service": self.service, "id": self.id, "address": self.address,
            "tags": list(self.tags), "meta": self.meta, "status": self.status,
            "output": self.output, "check": self.check, "interval": self.interval,
            "ttl": self.ttl, "deregister_after": self.deregister_after,
            "registered": self.registered, "since": self.since, "checked": self.checked,
        }  # fmt: skip


def _decode(key: str, item: Versioned | Change) -> Instance | None:
    """The instance a KV value holds, or None (logged) if it is not one."""
    value = item.value
    try:
        doc = orjson.loads(value or b"")
        inst = Instance(
            service=str(doc["service"]), id=str(doc["id"]), address=str(doc["address"]),
            tags=tuple(doc.get("tags") or ()), meta=dict(doc.get("meta") or {}),
            status=doc.get("status", "passing"), output=str(doc.get("output", "")),
            check=doc.get("check"), interval=float(doc.get("interval", DEFAULT_INTERVAL_S)),
            timeout=float(doc.get("timeout", DEFAULT_CHECK_TIMEOUT_S)), ttl=doc.get("ttl"),
            deregister_after=doc.get("deregister_after"),
            registered=float(doc.get("registered", 0.0)), since=float(doc.get("since", 0.0)),
            checked=doc.get("checked"), version=item.version,
            incarnation=doc.get("incarnation"),
            revision=item.revision,
            expires=item.expires if isinstance(item, Versioned) else None,
        )  # fmt: skip
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        log.warning("registry: %s does not hold an instance; ignored", key)
        return None
    if inst.key != key or inst.status not in STATUSES:
        log.warning("registry: %s does not hold a valid instance; ignored", key)
        return None
    return inst


def _split(key: str) -> tuple[str, str] | None:
    service, _, instance_id = key[len(PREFIX) :].partition("/")
    return (service, instance_id) if service and instance_id and "/" not in instance_id else None


@dataclass(frozen=True, slots=True)
class ServiceChange:
    """One change seen by :meth:`Registry.watch`.

    ``kind``: ``added`` (a new instance), ``updated`` (its document changed:
    health, meta, tags...), ``removed`` (deregistered) or ``expired`` (its TTL
    ran out: the process stopped heartbeating). ``instance`` is the new state
    (added/updated) or the last known one (removed/expired; None if the
    watch never saw it, which only happens when resuming with ``since``);
    ``previous`` the state before an update.

    ``revision`` is the KV revision to resume from
    (``watch(since=change.revision)``): a watch resumed from any delivered
    change yields every change after it, at least once. For a change of the
    feed it is that change's revision. A listing (``relist=True``: the
    ``initial=True`` adds, or the net difference after ``Compacted``) comes
    as a batch, and only its *last* change carries the listing's revision.
    Each earlier one carries a revision that makes a resumed watch deliver
    the rest of the batch again: after ``Compacted`` the revision the watch
    stood at before it (below the compaction point: the resumed watch gets
    ``Compacted`` and re-lists too); for ``initial=True``, whose adds come in
    the order of their instances' revisions, one below the next add's
    instance revision (the resumed watch replays the feed from there, or
    re-lists if that part was compacted). A resumed watch knows nothing yet:
    what it replays comes as ``added``/``updated`` again.
    """

    kind: ChangeKindName
    service: str
    id: str
    instance: Instance | None
    revision: int
    previous: Instance | None = None
    relist: bool = False


def scan_all(store: Store, prefix: str) -> Iterator[tuple[str, Versioned]]:
    """Every live pair under ``prefix``, page by page."""
    after: str | None = None
    while True:
        page = store.kv.scan(prefix, after_key=after, limit=SCAN_PAGE)
        yield from page
        if len(page) < SCAN_PAGE:
            return
        after = page[-1][0]


def list_instances(store: Store, service: str | None = None) -> list[Instance]:
    """Every live instance (of ``service``, or all), ordered by service and id."""
    prefix = PREFIX if service is None else f"{PREFIX}{check_service(service)}/"
    out = []
    for key, item in scan_all(store, prefix):
        if _split(key) is not None and (inst := _decode(key, item)) is not None:
            out.append(inst)
    return out


# -- writing --------------------------------------------------------------------------


def _tombstone(key: str) -> str:
    return key + TOMBSTONE_SUFFIX


def _tombstoned(store: Store, key: str, incarnation: str | None) -> bool:
    """True if the maintainer deregistered this incarnation of ``key``."""
    item = store.kv.get(_tombstone(key))
    if item is None:
        return False
    try:
        return bool(orjson.loads(item.value).get("incarnation") == incarnation)
    except (orjson.JSONDecodeError, AttributeError):
        return False


def _initial_health(check: str | None, wall: float) -> dict[str, Any]:
    if check is None:
        return {"status": "passing", "output": "registered", "since": wall, "checked": None}
    return {"status": "critical", "output": "not checked yet", "since": wall, "checked": None}


def write_instance(
    store: Store, doc: dict[str, Any], ttl: float | None, health: Mapping[str, Any] | None = None
) -> Versioned:
    """Write the owner's fields of an instance (``doc``: service, id, address,
    tags, meta, check, interval, timeout, ttl, deregister_after, registered),
    keeping the health the store holds (a read and a compare-and-set, retried
    on a concurrent write); ``health`` overrides it; an absent instance gets
    its initial health. One new revision."""
    key = instance_key(doc["service"], doc["id"])
    for _ in range(UPDATE_RETRIES):
        current = store.kv.get(key)
        kept = _current_health(current)
        if kept is None:
            kept = _initial_health(doc.get("check"), store.clock.wall())
        value = orjson.dumps({**doc, **kept, **(health or {})})
        written = store.kv.cas(key, None if current is None else current.version, value, ttl)
        if written is not None:
            return written
    raise BackendError(f"registry: {key} kept changing under {UPDATE_RETRIES} writes; try again")


def _current_health(current: Versioned | None) -> dict[str, Any] | None:
    if current is None:
        return None
    try:
        doc = orjson.loads(current.value)
        return {name: doc[name] for name in HEALTH_FIELDS}
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


class Registration:
    """One instance this process registered: refreshed by its Registry's
    heartbeat thread until :meth:`deregister` (also on leaving a ``with``)."""

    def __init__(self, registry: Registry, doc: dict[str, Any], heartbeat: bool) -> None:
        self.registry = registry
        self.service: str = doc["service"]
        self.id: str = doc["id"]
        self.key = instance_key(self.service, self.id)
        self.ttl: float | None = doc["ttl"]
        self.heartbeat_enabled = heartbeat and self.ttl is not None
        self._doc = doc
        self._lock = threading.Lock()
        self._closed = False
        self.rewrites = 0  # times a heartbeat found the key gone and wrote it again
        self.evicted = False  # the maintainer deregistered it (critical past deregister_after)

    def __repr__(self) -> str:
        return f"<Registration {self.key}{' deregistered' if self._closed else ''}>"

    @property
    def active(self) -> bool:
        """False once deregistered (by :meth:`deregister`, or by the maintainer: ``evicted``)."""
        return not self._closed

    @property
    def interval(self) -> float:
        """Seconds between heartbeats: a third of the TTL."""
        return (self.ttl or DEFAULT_TTL_S) / 3

    def heartbeat(self) -> bool:
        """Refresh the TTL now (``kv.touch``: no revision); if the key is gone,
        write the registration again, unless the maintainer deregistered it
        (a tombstone: then ``evicted``, inactive, logged once). False once
        deregistered."""
        with self._lock:
            if self._closed:
                return False
            store = self.registry.space.store
            if store.kv.touch(self.key, self.ttl) is not None:
                return True
            if not _tombstoned(store, self.key, self._doc.get("incarnation")):
                write_instance(store, self._doc, self.ttl)
                self.rewrites += 1
                log.warning("registry: %s was gone while its process lives; registered again",
                            self.key)  # fmt: skip
                return True
            self._closed = self.evicted = True
        log.warning("registry: %s was deregistered by the maintainer (critical for longer than"
                    " deregister_after); its heartbeat stops", self.key)  # fmt: skip
        self.registry._forget(self)
        return False

    def update(
        self,
        *,
        address: str | None = None,
        tags: Iterable[str] | None = None,
        meta: Mapping[str, Any] | None = None,
        status: Status | None = None,
        output: str = "",
    ) -> Instance:
        """Change the instance's address, tags or meta (replaced whole), or report
        its health (``status`` + ``output``, as a Consul TTL check); one write."""
        changes: dict[str, Any] = {}
        if address is not None:
            changes["address"] = _check_address(address)
        if tags is not None:
            changes["tags"] = _check_tags(tags)
        if meta is not None:
            changes["meta"] = _check_meta(meta)
        if not isinstance(output, str):
            raise ConfigError(f"output={output!r}: must be a string")
        health = None
        if status is not None:
            store = self.registry.space.store
            wall = store.clock.wall()
            health = {"status": _check_status(status), "output": output[:OUTPUT_MAX],
                      "since": wall, "checked": wall}  # fmt: skip
        with self._lock:
            if self._closed:
                raise ConfigError(f"{self.key} was deregistered; register it again")
            doc = {**self._doc, **changes}
            store = self.registry.space.store
            if health is not None:
                current = _current_health(store.kv.get(self.key))
                if current is not None and current["status"] == health["status"]:
                    health["since"] = current["since"]
            written = write_instance(store, doc, self.ttl, health)
            self._doc = doc
        inst = _decode(self.key, written)
        assert inst is not None
        return inst

    def deregister(self) -> bool:
        """Remove the instance and stop its heartbeat; True if it was live.
        BackendError if the store is unreachable: the heartbeat has stopped
        anyway, so the instance is gone within its TTL."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        self.registry._forget(self)
        return self.registry.space.store.kv.delete(self.key)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deregister()


class _Heartbeat:
    """The one thread per Registry that refreshes its registrations; it never
    dies of an exception (each failure is logged and retried with backoff)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Registration, float] = {}
        self._failures: dict[Registration, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = False

    def add(self, reg: Registration) -> None:
        with self._cond:
            self._due[reg] = time.monotonic() + reg.interval
            self._failures.pop(reg, None)
            self._stop = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="taskspace-registry-heartbeat", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def remove(self, reg: Registration) -> None:
        with self._cond:
            self._due.pop(reg, None)
            self._failures.pop(reg, None)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _next(self) -> list[Registration] | None:
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                due = [reg for reg, at in self._due.items() if at <= now]
                if due:
                    return due
                until = min(self._due.values(), default=now + 3600) - now
                self._cond.wait(until)
            return None

    def _run(self) -> None:
        while (due := self._next()) is not None:
            for reg in due:
                self._beat(reg)

    def _beat(self, reg: Registration) -> None:
        try:
            alive = reg.heartbeat()
            delay = reg.interval
            failures = 0
        except SpaceLost:
            log.error("registry: the space of %s was lost; its heartbeat stops", reg.key)
            self.remove(reg)
            return
        except Exception as exc:  # noqa: BLE001 - the heartbeat thread never dies
            alive = True
            failures = self._failures.get(reg, 0) + 1
            delay = min(BACKOFF_START_S * 2 ** (failures - 1), BACKOFF_MAX_S, reg.interval)
            log.warning("registry: heartbeat of %s failed (retrying in %.2f s): %s",
                        reg.key, delay, exc)  # fmt: skip
        with self._cond:
            if not alive or reg not in self._due:
                return
            self._due[reg] = time.monotonic() + delay
            self._failures[reg] = failures


# -- the registry ------------------------------------------------------------------------


class Registry:
    """Service discovery on a Space (``space.registry``); see the module docstring."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self._beats = _Heartbeat()
        self._lock = threading.Lock()
        self._mine: dict[str, Registration] = {}
        self._checker: _Checker | None = None

    def __repr__(self) -> str:
        return f"<Registry {self.space.url} registered={len(self._mine)}>"

    def register(
        self,
        service: str,
        instance_id: str,
        address: str,
        *,
        tags: Iterable[str] = (),
        meta: Mapping[str, Any] | None = None,
        ttl: float | None = DEFAULT_TTL_S,
        check: str | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        timeout: float = DEFAULT_CHECK_TIMEOUT_S,
        deregister_after: float | None = DEFAULT_DEREGISTER_AFTER_S,
        heartbeat: bool = True,
    ) -> Registration:
        """Register (or re-register: the same key is overwritten) an instance.

        ``ttl``: seconds the entry lives without a heartbeat (None: until
        deregistered; no heartbeat). ``heartbeat=False``: the caller refreshes it
        with :meth:`Registration.heartbeat`. ``check``: an ``http(s)://`` or
        ``tcp://host:port`` URL the maintainer probes every ``interval`` seconds,
        giving up after ``timeout``; ``deregister_after``: seconds an instance may
        stay critical before the maintainer removes it (None: never).
        Durations are seconds (checks.check_seconds: no bool, NaN or
        infinity): ``ttl`` >= MIN_TTL_S (0.1), ``interval`` >= MIN_INTERVAL_S
        (0.1), ``timeout`` >= MIN_CHECK_TIMEOUT_S (0.01), ``deregister_after``
        >= 0; ``meta`` must be exact JSON (no NaN, no tuple). Bad input raises
        one ConfigError naming it, and nothing is written."""
        check_url = None if check is None else validate_check(check)
        doc = {
            "service": check_service(service), "id": check_instance_id(instance_id),
            "address": _check_address(address), "tags": _check_tags(tags),
            "meta": _check_meta(meta),
            "check": check_url,
            "interval": _seconds(interval, "interval", MIN_INTERVAL_S),
            "timeout": _seconds(timeout, "timeout", MIN_CHECK_TIMEOUT_S),
            "ttl": _seconds(ttl, "ttl", MIN_TTL_S, optional=True),
            "deregister_after": _seconds(deregister_after, "deregister_after", 0.0,
                                          optional=True),
        }  # fmt: skip
        _check_bool(heartbeat, "heartbeat")
        store = self.space.store
        wall = store.clock.wall()
        doc["registered"] = wall
        doc["incarnation"] = uuid.uuid4().hex
        reg = Registration(self, doc, heartbeat)
        with self._lock:
            old = self._mine.pop(reg.key, None)
        if old is not None:
            with old._lock:  # a heartbeat in flight finishes first; none follows
                old._closed = True
            self._beats.remove(old)
        write_instance(store, doc, reg.ttl, _initial_health(check_url, wall))
        with self._lock:
            self._mine[reg.key] = reg
        if reg.heartbeat_enabled:
            self._beats.add(reg)
        return reg

    def _forget(self, reg: Registration) -> None:
        self._beats.remove(reg)
        with self._lock:
            if self._mine.get(reg.key) is reg:
                del self._mine[reg.key]

    def deregister(self, service: str, instance_id: str) -> bool:
        """Remove an instance (registered by any process); True if it was live.
        One this process registered also stops heartbeating."""
        key = instance_key(check_service(service), check_instance_id(instance_id))
        with self._lock:
            mine = self._mine.get(key)
        if mine is not None:
            return mine.deregister()
        return self.space.store.kv.delete(key)

    def get(self, service: str, instance_id: str) -> Instance | None:
        """One instance, or None."""
        key = instance_key(check_service(service), check_instance_id(instance_id))
        item = self.space.store.kv.get(key)
        return None if item is None else _decode(key, item)

    def discover(
        self,
        service: str,
        tags: Iterable[str] = (),
        healthy_only: bool = True,
        include_warning: bool = False,
    ) -> list[Instance]:
        """Live instances of ``service`` carrying every tag in ``tags``, by id.
        ``healthy_only``: only ``passing`` ones (plus ``warning`` ones with
        ``include_warning``); False: every live instance."""
        wanted = set(_check_tags(tags))
        _check_bool(healthy_only, "healthy_only")
        _check_bool(include_warning, "include_warning")
        ok: tuple[str, ...] = ("passing", "warning") if include_warning else ("passing",)
        return [
            inst
            for inst in list_instances(self.space.store, service)
            if wanted.issubset(inst.tags) and (not healthy_only or inst.status in ok)
        ]

    def services(self) -> dict[str, list[Instance]]:
        """Every live instance, by service name."""
        out: dict[str, list[Instance]] = {}
        for inst in list_instances(self.space.store):
            out.setdefault(inst.service, []).append(inst)
        return out

    def watch(
        self,
        service: str | None = None,
        *,
        since: int | None = None,
        initial: bool = False,
        stop: threading.Event | None = None,
        idle_timeout: float | None = None,
    ) -> Iterator[ServiceChange]:
        """Yield every change of ``service``'s instances (every service: None).

        ``since=None`` starts now, at this call (not at the first ``next``;
        ``initial=True``: first an ``added`` for each live instance, the
        race-free way to list and then follow); ``since=R``
        resumes after revision R (a change's ``revision``), and the first put
        it sees of an instance it does not know is reported ``added``. Ends
        when ``stop`` is set (seen within WATCH_WAIT_S) or after
        ``idle_timeout`` seconds without a change: also while the backend is
        down (the watch cannot tell an outage from silence), within one store
        call's timeout. BackendError while following: retried with backoff
        from the same revision (without ``idle_timeout``, until it answers);
        Compacted: re-listed, the net difference yielded (see the module
        docstring); SpaceLost is raised.

        The call itself reads the start (the revision, and a scan with
        ``since=None``), retrying a BackendError with backoff for at most
        ``idle_timeout`` or WATCH_START_S (10 s), whichever is shorter, then
        raises BackendError: it never blocks longer than that (plus one store
        call's timeout). Resuming from a known revision (``since=R``) reads
        nothing at the call."""
        prefix = PREFIX if service is None else f"{PREFIX}{check_service(service)}/"
        if since is not None and (isinstance(since, bool) or not isinstance(since, int)
                                  or since < 0):  # fmt: skip
            raise ConfigError(f"since={since!r}: must be a revision (an integer >= 0) or None")
        _seconds(idle_timeout, "idle_timeout", optional=True)
        _check_bool(initial, "initial")
        return _Watch(self.space, prefix, stop or threading.Event(), idle_timeout).begin(
            since, initial
        )

    def maintain(self, budget: float = MAINTAIN_BUDGET_S) -> None:
        """One maintainer pass (see :func:`maintain_registry`)."""
        _seconds(budget, "budget")
        with self._lock:
            if self._checker is None:
                self._checker = _Checker()
            checker = self._checker
        checker.run(self.space.store, budget)

    def close(self) -> None:
        """Deregister every instance this Registry registered (best effort) and
        stop its heartbeat thread and check pool."""
        with self._lock:
            mine = list(self._mine.values())
        for reg in mine:
            try:
                reg.deregister()
            except BackendError as exc:
                log.warning("registry: could not deregister %s: %s", reg.key, exc)
        self._beats.stop()
        if self._checker is not None:
            self._checker.close()


# -- watching -------------------------------------------------------------------------


class _Watch:
    """The state of one watch: what it knows, and from which revision it follows."""

    def __init__(
        self, space: Space, prefix: str, stop: threading.Event, idle_timeout: float | None
    ) -> None:
        self.space = space
        self.prefix = prefix
        self.stop = stop
        self.idle_timeout = idle_timeout
        self.known: dict[str, Instance] = {}
        # True once ``known`` holds every instance (a scan): only then are repeats
        # (a change already reflected by the scan) recognised and skipped.
        self.complete = False
        self.delay = BACKOFF_START_S
        self.revision = 0
        self.idle_since = time.monotonic()
        self.failure: BackendError | None = None

    def _idle_deadline(self) -> float | None:
        if self.idle_timeout is None:
            return None
        return self.idle_since + self.idle_timeout

    def _retry(self, op: Callable[[], Any], deadline: float | None = None) -> Any:
        """``op()``, retried with backoff on BackendError until it succeeds;
        None once the watch is stopped or ``deadline`` (monotonic) passed.
        The last BackendError is kept in ``self.failure``."""
        while not self.stop.is_set():
            try:
                result = op()
                self.delay = BACKOFF_START_S
                self.failure = None
                return result
            except SpaceLost:
                raise
            except BackendError as exc:
                self.failure = exc
                pause = self.delay
                if deadline is not None:
                    pause = min(pause, deadline - time.monotonic())
                    if pause <= 0:
                        return None
                log.warning("registry watch: %s; retrying in %.2f s", exc, pause)
                self.stop.wait(pause)
                self.delay = min(self.delay * 2, BACKOFF_MAX_S)
        return None

    def _snapshot(self) -> tuple[int, dict[str, Instance]]:
        store = self.space.store
        revision = store.kv.revision()  # before the scan: changes after it are replayed
        found = {}
        for key, item in scan_all(store, self.prefix):
            if _split(key) is not None and (inst := _decode(key, item)) is not None:
                found[key] = inst
        return revision, found

    def begin(self, since: int | None, initial: bool) -> Iterator[ServiceChange]:
        """Fix the starting point now (at the ``watch`` call, not at the first
        ``next``), then return the generator of changes."""
        first: list[ServiceChange] = []
        if since is None:
            limit = WATCH_START_S
            if self.idle_timeout is not None:
                limit = min(limit, self.idle_timeout)
            snap = self._retry(self._snapshot, time.monotonic() + limit)
            if snap is None and not self.stop.is_set():
                raise BackendError(
                    f"registry watch: could not read its start within {limit:g} s: {self.failure}"
                )
            if snap is not None:
                since, found = snap
                if initial:
                    first = self._resync(found, since, None)
                self.known, self.complete = found, True
        self.revision = since or 0
        return self._run(first)

    def _run(self, first: list[ServiceChange]) -> Iterator[ServiceChange]:
        yield from first
        self.idle_since = time.monotonic()
        while not self.stop.is_set():
            try:
                page = self._retry(self._changes, self._idle_deadline())
            except Compacted:
                snap = self._retry(self._snapshot, self._idle_deadline())
                if snap is None:
                    return
                before = self.revision
                self.revision, found = snap
                yield from self._resync(found, self.revision, before)
                self.known, self.complete = found, True
                continue
            if page is None:
                return
            for change in page:
                event = self._apply(change)
                self.revision = change.revision
                if event is not None:
                    self.idle_since = time.monotonic()
                    yield event
            if not page and not self._wait():
                return

    def _changes(self) -> list[Change]:
        return self.space.store.kv.changes(self.prefix, self.revision)

    def _wait(self) -> bool:
        """Wait for a change (at most WATCH_WAIT_S); False once idle for ``idle_timeout``."""
        left = WATCH_WAIT_S
        deadline = self._idle_deadline()
        if deadline is not None:
            left = min(left, deadline - time.monotonic())
            if left <= 0:
                return False
        self._retry(lambda: self.space.store.kv.wait(self.prefix, self.revision, left), deadline)
        return True

    def _resync(
        self, found: dict[str, Instance], revision: int, before: int | None
    ) -> list[ServiceChange]:
        """The net difference between what the watch knew and ``found`` (listed
        at ``revision``), stamped as ServiceChange's docstring says: the last
        with ``revision``, the others with ``before`` (the watch's revision
        when it got Compacted) or, for the initial listing (None), in instance
        revision order, each with one below the next one's instance revision."""
        known = self.known
        out: list[ServiceChange] = []
        for key, inst in found.items():
            prev = known.get(key)
            if prev is None:
                out.append(ServiceChange("added", inst.service, inst.id, inst, revision))
            elif prev.version != inst.version:
                out.append(ServiceChange("updated", inst.service, inst.id, inst, revision, prev))
        for key, prev in known.items():
            if key not in found:
                out.append(ServiceChange("removed", prev.service, prev.id, prev, revision))
        if not out:
            return out
        if before is None:  # the initial listing: only adds, each with its instance
            out.sort(key=_instance_revision)
        stamps = [before if before is not None else max(0, _instance_revision(nxt) - 1)
                  for nxt in out[1:]] + [revision]  # fmt: skip
        return [
            replace(change, revision=stamp, relist=True)
            for change, stamp in zip(out, stamps, strict=True)
        ]

    def _apply(self, change: Change) -> ServiceChange | None:
        names = _split(change.key)
        if names is None:
            return None
        prev = self.known.get(change.key)
        if change.kind == "put":
            if self.complete and prev is not None and change.version <= prev.version:
                return None  # already reflected by the scan
            inst = _decode(change.key, change)
            if inst is None:
                return None
            self.known[change.key] = inst
            kind: ChangeKindName = "added" if prev is None else "updated"
            return ServiceChange(kind, inst.service, inst.id, inst, change.revision, prev)
        if self.complete and (prev is None or change.version < prev.version):
            return None  # an older incarnation, or one the scan already saw gone
        self.known.pop(change.key, None)
        kind = "expired" if change.kind == "expire" else "removed"
        return ServiceChange(kind, names[0], names[1], prev, change.revision)


def _instance_revision(change: ServiceChange) -> int:
    return change.instance.revision if change.instance is not None else 0


# -- the maintainer's pass -----------------------------------------------------------------


class _Checker:
    """The maintainer's health checks: a thread pool, the checks in flight, and
    when each instance was last checked (this process's monotonic clock)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, tuple[Future[CheckResult], Instance]] = {}
        self._last: dict[str, float] = {}

    def _submit(self, inst: Instance) -> Future[CheckResult]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="taskspace-check")
        assert inst.check is not None
        future = self._pool.submit(run_check, inst.check, min(inst.timeout, inst.interval))
        self._inflight[inst.key] = (future, inst)
        self._last[inst.key] = time.monotonic()
        return future

    def run(self, store: Store, budget: float) -> None:
        """One pass (see :func:`maintain_registry`): a scan and the wall clock,
        the due deregistrations (one txn each) and checks, a wait for the
        checks started (until RECORD_SHARE of the budget is left), then the
        results: one ``get_many`` and one ``cas`` per *changed* status. A
        step that would start after the deadline is left to the next pass."""
        start = time.monotonic()
        deadline = start + budget
        instances = list_instances(store)
        wall = store.clock.wall()
        live = {inst.key for inst in instances}
        for key in [k for k in self._last if k not in live]:
            del self._last[key]
        submitted: list[Future[CheckResult]] = []
        for inst in instances:
            if _deregister_due(inst, wall):
                if time.monotonic() < deadline:
                    _evict(store, inst, wall)
                continue
            if inst.check is not None and self._due(inst):
                submitted.append(self._submit(inst))
        if submitted:  # a check still running from an earlier pass holds up no later one
            wait_until = deadline - budget * RECORD_SHARE
            wait_futures(submitted, timeout=max(0.0, wait_until - time.monotonic()))
        self._record(store, deadline)

    def _due(self, inst: Instance) -> bool:
        if inst.key in self._inflight:
            return False
        last = self._last.get(inst.key)
        return last is None or time.monotonic() - last >= inst.interval

    def _record(self, store: Store, deadline: float) -> None:
        """Write the results of the finished checks whose status changed (or
        that are an instance's first): no store call for an unchanged one;
        one ``get_many`` for the rest, then a ``cas`` each until ``deadline``.
        Results not written yet stay in flight for the next pass."""
        changed: list[tuple[str, Instance, CheckResult]] = []
        for key, (future, checked) in list(self._inflight.items()):
            if not future.done():
                continue
            result = future.result()
            if result.status == checked.status and checked.checked is not None:
                del self._inflight[key]  # unchanged: nothing to write
            else:
                changed.append((key, checked, result))
        if not changed or time.monotonic() >= deadline:
            return
        currents = store.kv.get_many([key for key, _, _ in changed])
        now, wall = store.clock.now(), store.clock.wall()
        for (key, checked, result), current in zip(changed, currents, strict=True):
            if time.monotonic() >= deadline:
                return  # the budget is spent: the rest next pass
            del self._inflight[key]
            _write_health(store, checked, result, current, now, wall)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _deregister_due(inst: Instance, wall: float) -> bool:
    return (
        inst.status == "critical"
        and inst.checked is not None
        and inst.deregister_after is not None
        and wall - inst.since >= inst.deregister_after
    )


def _evict(store: Store, inst: Instance, wall: float) -> bool:
    """Deregister ``inst`` (at the version seen: a re-registration meanwhile
    wins) and leave its tombstone, in one txn."""
    life = max(TOMBSTONE_TTL_S, 3 * (inst.ttl or 0.0))
    mark = orjson.dumps({"incarnation": inst.incarnation, "deregistered": wall})
    done = store.kv.txn(
        [VersionIs(inst.key, inst.version)],
        [Delete(inst.key), Put(_tombstone(inst.key), mark, life)],
    ).ok
    if done:
        log.warning("registry: %s critical for %.0f s; deregistered", inst.key, wall - inst.since)
    return done


def _write_health(store: Store, checked: Instance, result: CheckResult,
                  current: Versioned | None, now: float, wall: float) -> None:  # fmt: skip
    """Record ``result`` (a changed status, or the first check: it says why)
    over ``current``: a compare-and-set on the version checked (a
    re-registration meanwhile wins; its own check follows), keeping the
    remaining TTL (``current.expires``: heartbeats move it, the version not)."""
    if current is None or current.version != checked.version:
        return
    ttl = None
    if current.expires is not None:
        ttl = current.expires - now
        if ttl <= 0:
            return
    doc = orjson.loads(current.value)
    # a new status, or the first check: ``since`` starts now ("not checked yet" saw nothing)
    doc.update(status=result.status, output=result.output, since=wall, checked=wall)
    if store.kv.cas(checked.key, current.version, orjson.dumps(doc), ttl) is not None:
        log.info("registry: %s is %s (%s)", checked.key, result.status, result.output)


def maintain_registry(space: Space) -> None:
    """The maintainer's registry step, bounded to about MAINTAIN_BUDGET_S: runs
    the due HTTP/TCP checks concurrently (each at most every ``interval`` per
    instance, with its ``timeout``), writes each status change (a revision;
    nothing when unchanged) and deregisters instances critical for longer
    than their ``deregister_after``. Expired instances need no step: the TTL
    removes them (``kv.reap`` records it).

    Bounded: the budget covers the writes too. A pass makes one scan (a call
    per SCAN_PAGE instances) and one wall-clock read, waits for the checks it
    started until a quarter of the budget is left, then writes results: none
    for an unchanged status, one ``get_many`` + one clock read + one ``cas``
    per changed one. No step starts after the budget is spent (so the
    overrun is at most one store call); what is left (a check still running,
    a result or a deregistration not written) is done by a later pass.
    Raises BackendError/SpaceLost like any store call; nothing is lost (the
    next pass starts over from the store)."""
    space.registry.maintain()
