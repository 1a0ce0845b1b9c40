"""Redis backend: one Space across many machines.

Atomicity: every store operation is one Lua script (``lua/``), which Redis
runs without interleaving any other command; reads that need no decision
are single commands.

Keys: every key of a space starts with ``ts:{<namespace>}:``. The braces are
a hash tag, so all keys of a space live in one slot and the scripts work on
Redis Cluster; several spaces share one Redis under different namespaces.

Clock: the Redis server's ``TIME``, read inside each script, so client clock
skew cannot extend or steal a lease.

Wake-ups: idle workers block in ``BLPOP`` on per-queue wake lists that every
push fills (bounded); result waiters register interest and block in
``BLPOP`` on a per-task done list that the finishing script fills only when
someone registered. Nothing sleep-polls.

Faults: every Redis error surfaces as :class:`~taskspace.errors.BackendError`;
workers retry with backoff and resume when Redis returns. A claim whose
reply was lost is retried with the same request id and returns the tasks the
first call leased, so no task is leased to nobody. (A finish whose reply was
lost and that is retried is refused as stale the second time; the first one
took effect.) Durability is Redis's: with ``appendonly yes`` and ``appendfsync
always`` nothing acknowledged is lost across a Redis crash; with
``everysec`` up to about one second of acknowledged writes can be.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from taskspace.backends.base import (
    Closeable,
    Grant,
    Lease,
    LeaseStatus,
    Message,
    Outcome,
    QueueStats,
    StreamEntry,
    TaskRecord,
    TaskSpec,
    TaskState,
    Versioned,
)
from taskspace.errors import BackendError, InvalidURL, MissingDependency

T = TypeVar("T")
SCRIPTS = (
    "push", "claim", "renew", "finish", "progress", "requeue", "promote", "cancel", "watch",
    "next_due", "lease_acquire", "lease_renew", "lease_release", "lease_holders", "kv_get",
    "kv_set", "kv_incr", "kv_delete", "kv_scan", "append",
)  # fmt: skip
FIELDS = (
    "id", "name", "payload", "codec", "queue", "priority", "max_attempts", "lease_s", "timeout",
    "dedup_key", "state", "ready_at", "attempts", "lost", "token", "worker", "lease_expires",
    "result", "error", "pdone", "ptotal", "cancel", "created", "started", "finished",
)  # fmt: skip
DEFAULT_NAMESPACE = "default"
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise MissingDependency(
            "the Redis backend needs redis-py: pip install 'taskspace[redis]'"
        ) from None
    return redis


def split_namespace(url: str) -> tuple[str, str | None]:
    """The URL without taskspace's ``namespace`` option, and that option."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    namespace = next((v for k, v in query if k == "namespace"), None)
    rest = urlencode([(k, v) for k, v in query if k != "namespace"])
    return urlunsplit(parts._replace(query=rest)), namespace


def check_namespace(namespace: str) -> str:
    """A namespace is a non-empty name without braces (they delimit the hash tag)."""
    if not namespace or any(c in namespace for c in "{}") or not namespace.isprintable():
        raise InvalidURL(
            f"namespace must be a non-empty printable name without braces, got {namespace!r}"
        )
    return namespace


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _record(v: Sequence[bytes | None]) -> TaskRecord:
    """A TaskRecord from HMGET of FIELDS (in that order); on the hot path, so indexed."""
    done, total = v[19], v[20]
    return TaskRecord(
        id=v[0].decode(), name=v[1].decode(), payload=v[2] or b"",  # type: ignore[union-attr]
        codec=v[3].decode(), queue=v[4].decode(),  # type: ignore[union-attr]
        priority=int(v[5] or 0), max_attempts=int(v[6] or 1), lease_s=float(v[7] or 0),
        timeout=None if v[8] is None else float(v[8]),
        dedup_key=None if v[9] is None else v[9].decode(),
        state=v[10].decode(), ready_at=float(v[11] or 0),  # type: ignore[arg-type,union-attr]
        attempts=int(v[12] or 0), lost=int(v[13] or 0), token=int(v[14] or 0),
        worker=None if v[15] is None else v[15].decode(),
        lease_expires=None if v[16] is None else float(v[16]), result=v[17],
        error=None if v[18] is None else orjson.loads(v[18]),
        progress=None if done is None or total is None else (float(done), float(total)),
        cancel_requested=v[21] == b"1", created=float(v[22] or 0),
        started=None if v[23] is None else float(v[23]),
        finished=None if v[24] is None else float(v[24]),
    )  # fmt: skip


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class _RedisSubscription(Closeable):
    def __init__(self, store: RedisStore, channels: Sequence[str]) -> None:
        self._prefix = store.prefix + "ch:"
        self._pubsub = store.client.pubsub(ignore_subscribe_messages=True)
        names = [self._prefix + c for c in channels]
        store.call(lambda: self._pubsub.subscribe(*names))
        # Wait for every confirmation, so that anything published after
        # subscribe() returns is delivered.
        confirmed = 0
        while confirmed < len(set(names)):
            reply = store.call(lambda: self._pubsub.parse_response(block=True, timeout=5))
            if reply is None:
                raise BackendError("Redis did not confirm the subscription")
            if reply[0] in (b"subscribe", "subscribe"):
                confirmed += 1
        self._closed = False

    def get(self, timeout: float | None = None) -> Message | None:
        if self._closed:
            return None
        try:
            reply = self._pubsub.get_message(timeout=timeout if timeout is not None else 1e6)
        except Exception:
            return None
        if reply is None or reply.get("type") != "message":
            return None
        channel = reply["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        return Message(channel[len(self._prefix) :], reply["data"])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._pubsub.close()


class RedisStore:
    """All five store protocols on Redis (see the module docstring)."""

    def __init__(self, url: str, namespace: str | None = None) -> None:
        redis_mod = _import_redis()
        self.url = url
        plain, in_url = split_namespace(url)
        self.namespace = check_namespace(namespace or in_url or DEFAULT_NAMESPACE)
        self.prefix = f"ts:{{{self.namespace}}}:"
        try:
            self.client: Any = redis_mod.Redis.from_url(
                plain,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                health_check_interval=30,
            )
        except (ValueError, TypeError) as exc:
            raise InvalidURL(f"malformed Redis URL {url!r}: {exc}") from None
        self._errors: tuple[type[BaseException], ...] = (redis_mod.RedisError,)
        common = resources.files(__package__).joinpath("lua/common.lua").read_text()
        self._scripts = {
            name: self.client.register_script(
                common + resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()
            )
            for name in SCRIPTS
        }

    def call(self, op: Callable[[], T]) -> T:
        """Run one Redis operation, turning any Redis failure into BackendError."""
        try:
            return op()
        except self._errors as exc:
            raise BackendError(f"Redis at {self.url}: {type(exc).__name__}: {exc}") from exc

    def _run(self, script: str, args: Sequence[Any]) -> Any:
        fn = self._scripts[script]
        return self.call(lambda: fn(keys=[self.prefix], args=list(args)))

    def now(self) -> float:
        seconds, micros = self.call(self.client.time)
        return float(seconds) + float(micros) / 1e6

    def close(self) -> None:
        self.client.close()

    # -- QueueStore ---------------------------------------------------------

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        if not specs:
            return []
        args: list[Any] = []
        for s in specs:
            args += [s.id, s.name, s.payload, s.codec, s.queue, s.priority, s.max_attempts,
                     repr(float(s.lease_s)), _number(s.timeout), s.dedup_key or "",
                     repr(float(s.delay))]  # fmt: skip
        return [i.decode() for i in self._run("push", args)]

    def claim(
        self, queues: Sequence[str], worker: str, n: int, request_id: str | None = None
    ) -> list[TaskRecord]:
        if n <= 0:
            return []
        rows = self._run("claim", [worker, n, request_id or "", *queues])
        return [_record(row) for row in rows]

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        if not leases:
            return {}
        replies = self._run("renew", [x for lease in leases for x in lease])
        return {
            lease.task_id: cast(LeaseStatus, reply.decode())
            for lease, reply in zip(leases, replies, strict=True)
        }

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        if not items:
            return []
        args: list[Any] = []
        for lease, outcome in items:
            error = b"" if outcome.error is None else orjson.dumps(outcome.error)
            has_result = outcome.result is not None
            args += [lease.task_id, lease.token, outcome.kind, int(has_result),
                     outcome.result or b"", error, repr(float(outcome.delay))]  # fmt: skip
        return [bool(r) for r in self._run("finish", args)]

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        args = [lease.task_id, lease.token, repr(float(done)), repr(float(total))]
        return bool(self._run("progress", args))

    def requeue_expired(self) -> int:
        return int(self._run("requeue", []))

    def promote_due(self) -> int:
        return int(self._run("promote", []))

    def cancel(self, task_id: str) -> TaskState | None:
        state = self._run("cancel", [task_id])
        return None if state is None else cast(TaskState, state.decode())

    def get(self, task_id: str) -> TaskRecord | None:
        key = f"{self.prefix}t:{task_id}"
        values = self.call(lambda: self.client.hmget(key, FIELDS))
        return None if values[0] is None else _record(values)

    def stats(self) -> QueueStats:
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.prefix + "counts")
        pipe.get(self.prefix + "stale")
        raw, stale = self.call(pipe.execute)
        counts: dict[str, dict[str, int]] = {}
        for field, value in raw.items():
            queue, _, state = field.decode().partition("\n")
            if int(value):
                counts.setdefault(queue, {})[state] = int(value)
        return QueueStats(counts, int(stale or 0))

    def wait_for_tasks(self, queues: Sequence[str], timeout: float) -> None:
        due = float(self._run("next_due", list(queues)))
        if due == 0:
            return
        wait = timeout if due < 0 else min(timeout, due)
        keys = [f"{self.prefix}wake:{q}" for q in dict.fromkeys(queues)]
        self.call(lambda: self.client.blpop(keys, timeout=max(wait, 0.001)))

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        ids = list(dict.fromkeys(task_ids))
        if not ids or self._run("watch", ids):
            return
        keys = [f"{self.prefix}done:{i}" for i in ids]
        self.call(lambda: self.client.blpop(keys, timeout=max(timeout, 0.001)))

    # -- LeaseStore ---------------------------------------------------------

    def acquire(self, name: str, holder: str, capacity: int, ttl: float) -> Grant | None:
        reply = self._run("lease_acquire", [name, holder, capacity, repr(float(ttl))])
        return None if reply is None else Grant(name, holder, int(reply[0]), float(reply[1]))

    def renew_grant(self, grant: Grant, ttl: float) -> Grant | None:
        args = [grant.name, grant.holder, grant.token, repr(float(ttl))]
        reply = self._run("lease_renew", args)
        return None if reply is None else Grant(grant.name, grant.holder, grant.token, float(reply))

    def release(self, grant: Grant) -> bool:
        return bool(self._run("lease_release", [grant.name, grant.holder, grant.token]))

    def holders(self, name: str) -> list[Grant]:
        flat = self._run("lease_holders", [name])
        grants = [
            Grant(name, flat[i].decode(), int(flat[i + 1]), float(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
        return sorted(grants, key=lambda g: g.token)

    # -- KVStore ------------------------------------------------------------

    @staticmethod
    def _ttl_ms(ttl: float | None) -> str:
        return "" if ttl is None else str(max(1, round(ttl * 1000)))

    def kv_get(self, key: str) -> Versioned | None:
        reply = self._run("kv_get", [key])
        if reply is None:
            return None
        return Versioned(reply[0], int(reply[1]), _float(reply[2]))

    def kv_put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        return int(self._run("kv_set", [key, "put", "", value, self._ttl_ms(ttl)]))

    def kv_cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> int | None:
        expected = "" if expected_version is None else str(expected_version)
        reply = self._run("kv_set", [key, "cas", expected, value, self._ttl_ms(ttl)])
        return None if reply is None else int(reply)

    def kv_incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        return int(self._run("kv_incr", [key, delta, self._ttl_ms(ttl)]))

    def kv_delete(self, key: str, expected_version: int | None = None) -> bool:
        expected = "" if expected_version is None else str(expected_version)
        return bool(self._run("kv_delete", [key, expected]))

    def kv_scan(self, prefix: str, limit: int | None = None) -> list[tuple[str, Versioned]]:
        flat = self._run("kv_scan", [prefix, -1 if limit is None else limit])
        return [
            (
                flat[i].decode(),
                Versioned(flat[i + 1], int(flat[i + 2]), _float(flat[i + 3] or None)),
            )
            for i in range(0, len(flat), 4)
        ]

    # -- StreamStore --------------------------------------------------------

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        return int(self._run("append", [stream, data, "" if maxlen is None else maxlen]))

    def read(self, stream: str, after: int = 0, limit: int = 100) -> list[StreamEntry]:
        key = f"{self.prefix}s:{stream}"
        rows = self.call(lambda: self.client.xrange(key, min=f"{after + 1}-0", count=limit))
        return [
            StreamEntry(int(entry_id.split(b"-")[0]), fields[b"d"], float(fields[b"t"]))
            for entry_id, fields in rows
        ]

    def trim(self, stream: str, maxlen: int) -> int:
        key = f"{self.prefix}s:{stream}"
        return int(self.call(lambda: self.client.xtrim(key, maxlen=maxlen, approximate=False)))

    # -- PubSub -------------------------------------------------------------

    def publish(self, channel: str, data: bytes) -> None:
        self.call(lambda: self.client.publish(f"{self.prefix}ch:{channel}", data))

    def subscribe(self, channels: Sequence[str]) -> _RedisSubscription:
        return _RedisSubscription(self, channels)
