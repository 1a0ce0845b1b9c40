"""Connections to one Redis: clients, scripts, error mapping and bounded waits.

Two clients share the URL: ``client`` (socket timeout SOCKET_TIMEOUT_S) runs
the scripts that change state, and ``reads`` (READ_TIMEOUT_S) serves reads and
blocking waits, so that a call made with a timeout, or a read behind a
stalled connection, returns (or raises BackendError) within about that
timeout rather than after the long socket timeout. For ``redis+sentinel://``
both follow the master that the Sentinels name (``sentinel.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from taskspace.backends import display_url
from taskspace.backends.outcomes import lua_rules
from taskspace.backends.redis.records import lua_fields
from taskspace.errors import BackendError, InvalidURL, MissingDependency

T = TypeVar("T")
# A library a Lua script or library needs: a line `-- requires: _name.lua`.
REQUIRES = re.compile(r"^-- requires: (_\w+\.lua)\s*$", re.MULTILINE)
DEFAULT_NAMESPACE = "default"
# Redis behind Sentinels: the clients follow the master they name.
SENTINEL_SCHEME = "redis+sentinel"
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0
# Reads and the steps of a wait: short, so a stalled connection is noticed
# within about a second (Redis answers a healthy read in well under that).
READ_TIMEOUT_S = 1.0
# Script calls of one run_many in flight at once: two overlap the client's
# encoding of a call with Redis running the one before.
RUN_MANY_WINDOW = 2
# How long past a BLPOP's own timeout its reply may take before the
# connection counts as stalled.
BLOCK_MARGIN_S = 0.5


def import_redis() -> Any:
    """The redis-py module, or MissingDependency naming the extra to install."""
    try:
        import redis
    except ImportError:
        raise MissingDependency(
            "the Redis backend needs redis-py: pip install 'taskspace[redis]'"
        ) from None
    return redis


def load_scripts() -> dict[str, str]:
    """Every script of ``lua/`` by name. Each is prefixed with the task state
    rules generated from ``outcomes``, the task fields generated from
    ``records.FIELDS``, ``common.lua``, then its libraries: ``_<group>.lua``
    for a script named ``<group>_<verb>.lua`` (functions its group shares),
    and every library a ``-- requires: _name.lua`` line of the script or of
    a library names (each once, before what requires it)."""
    lua = resources.files(__package__).joinpath("lua")
    prelude = lua_rules() + lua_fields() + lua.joinpath("common.lua").read_text()
    sources = {e.name: e.read_text() for e in lua.iterdir() if e.name.endswith(".lua")}

    def with_libraries(name: str, seen: list[str]) -> None:
        for required in REQUIRES.findall(sources[name]):
            if required not in seen:
                with_libraries(required, seen)
        if name not in seen:
            seen.append(name)

    scripts = {}
    for name in sources:
        if name == "common.lua" or name.startswith("_"):
            continue
        libraries: list[str] = []
        group = "_" + name.removesuffix(".lua").split("_")[0] + ".lua"
        if group in sources:
            with_libraries(group, libraries)
        with_libraries(name, libraries)
        body = "".join(sources[lib] for lib in libraries)
        scripts[name.removesuffix(".lua")] = prelude + body
    return scripts


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


def _client(redis_mod: Any, url: str, plain: str, timeout: float, connect: float) -> Any:
    try:
        return redis_mod.Redis.from_url(
            plain, socket_timeout=timeout, socket_connect_timeout=connect,
            health_check_interval=30,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise InvalidURL(f"malformed Redis URL {url!r}: {exc}") from None


class RedisConnection:
    """The clients and scripts of one space on one Redis; every Redis failure
    (command, pipeline, script load, NOSCRIPT after a restart, socket) surfaces
    as BackendError."""

    def __init__(self, url: str, namespace: str | None = None) -> None:
        redis_mod = import_redis()
        self.url = display_url(url)  # for messages: never the password
        plain, in_url = split_namespace(url)
        self.namespace = check_namespace(namespace or in_url or DEFAULT_NAMESPACE)
        self.prefix = f"ts:{{{self.namespace}}}:"
        self.client: Any
        self.reads: Any
        if plain.lower().startswith(SENTINEL_SCHEME + "://"):
            from taskspace.backends.redis.sentinel import sentinel_clients

            self.client, self.reads = sentinel_clients(
                url,
                socket_timeout=SOCKET_TIMEOUT_S,
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
            )
        else:
            self.client = _client(redis_mod, url, plain, SOCKET_TIMEOUT_S, CONNECT_TIMEOUT_S)
            self.reads = _client(redis_mod, url, plain, READ_TIMEOUT_S, READ_TIMEOUT_S)
        self._errors: tuple[type[BaseException], ...] = (redis_mod.RedisError, OSError)
        self._noscript: type[BaseException] = redis_mod.exceptions.NoScriptError
        self._scripts = {
            name: self.client.register_script(source) for name, source in load_scripts().items()
        }

    def call(self, op: Callable[[], T]) -> T:
        """Run one Redis operation, turning any Redis failure into BackendError."""
        try:
            return op()
        except self._errors as exc:
            raise BackendError(f"Redis at {self.url}: {type(exc).__name__}: {exc}") from exc

    def run(self, script: str, args: Sequence[Any], read: bool = False) -> Any:
        """Run a script (on the short-timeout client when ``read``)."""
        fn = self._scripts[script]
        client = self.reads if read else self.client
        return self.call(lambda: fn(keys=[self.prefix], args=list(args), client=client))

    def run_many(self, script: str, arg_lists: Iterable[Sequence[Any]]) -> list[Any]:
        """Run ``script`` once per argument list, in order, each call atomic on
        its own, keeping up to RUN_MANY_WINDOW calls in flight on one
        connection, so that the client encodes the next call while Redis runs
        this one. The first call goes alone (it loads the script after a
        Redis restart: NOSCRIPT)."""
        lists = iter(arg_lists)
        first = next(lists, None)
        if first is None:
            return []
        replies = [self.run(script, first)]
        second = next(lists, None)
        if second is None:  # the common case: no pipeline, no second connection checkout
            return replies
        rest = itertools.chain([second], lists)
        return replies + self.call(lambda: self._pipelined(script, rest))

    def _pipelined(self, script: str, lists: Iterator[Sequence[Any]]) -> list[Any]:
        sha, pool = self._scripts[script].sha, self.client.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py < 6 wants a command name
            conn = pool.get_connection("EVALSHA")
        replies: list[Any] = []
        sent = 0
        try:
            for args in lists:
                conn.send_command("EVALSHA", sha, 1, self.prefix, *args)
                sent += 1
                if sent - len(replies) >= RUN_MANY_WINDOW:
                    replies.append(conn.read_response())
            while len(replies) < sent:
                replies.append(conn.read_response())
        except BaseException:
            conn.disconnect()  # replies may still be on the way: never reuse it
            raise
        finally:
            pool.release(conn)
        return replies

    def block(self, keys: Sequence[str], timeout: float) -> tuple[bytes, bytes] | None:
        """BLPOP ``keys`` for up to ``timeout`` s: the (key, value) popped, or None
        after the timeout; BackendError if no reply comes within BLOCK_MARGIN_S
        after that (a stalled connection)."""
        return self.call(lambda: self._blpop(None, keys, max(timeout, 0.001))[1])

    def run_then_block(
        self, script: str, args: Sequence[Any], keys: Sequence[str], timeout: float
    ) -> tuple[Any, tuple[bytes, bytes] | None]:
        """Run ``script`` and, sent with it in one write on the same connection,
        BLPOP ``keys`` (as ``block``): one round trip. Returns the script's
        reply and what BLPOP popped. A script that fails abandons the
        connection, and with it the BLPOP; a script missing from Redis's cache
        (a restart) is loaded and the pair sent again."""
        call = (script, args)
        try:
            return self.call(lambda: self._blpop(call, keys, max(timeout, 0.001)))
        except BackendError as exc:
            if not isinstance(exc.__cause__, self._noscript):
                raise
        self.call(lambda: self.reads.script_load(self._scripts[script].script))
        return self.call(lambda: self._blpop(call, keys, max(timeout, 0.001)))

    def run_pair(
        self, first: tuple[str, Sequence[Any]], second: tuple[str, Sequence[Any]]
    ) -> tuple[Any, Any]:
        """Run two scripts (each atomic on its own, in order) sent in one write
        on the short-timeout client: one round trip; their replies. A script
        missing from Redis's cache (a restart) is loaded and run again on its
        own, the other's reply kept."""
        calls = (first, second)
        replies = self.call(lambda: self._send_scripts(calls))
        for i, (script, args) in enumerate(calls):
            if isinstance(replies[i], self._noscript):
                replies[i] = self.run(script, args, read=True)
        return replies[0], replies[1]

    def _send_scripts(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        pool = self.reads.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py < 6 wants a command name
            conn = pool.get_connection("EVALSHA")
        commands = [
            ("EVALSHA", self._scripts[script].sha, 1, self.prefix, *args) for script, args in calls
        ]
        replies: list[Any] = []
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except self._noscript as exc:  # the other reply still comes
                    replies.append(exc)
        except BaseException:
            conn.disconnect()  # replies may still be on the way: never reuse it
            raise
        finally:
            pool.release(conn)
        return replies

    def block_then_run(
        self, keys: Sequence[str], timeout: float, script: str, args: Sequence[Any]
    ) -> tuple[tuple[bytes, bytes] | None, Any]:
        """BLPOP ``keys`` (as ``block``) and, sent with it in one write on the
        same connection, run ``script``, which Redis runs as soon as the BLPOP
        returns or times out: one round trip. Returns what BLPOP popped and the
        script's reply. A script missing from Redis's cache (a restart) is
        loaded and run once more on its own (the BLPOP is not repeated: it may
        have popped)."""
        call = (script, args)
        try:
            reply, popped = self.call(lambda: self._blpop(None, keys, max(timeout, 0.001), call))
        except BackendError as exc:
            if not isinstance(exc.__cause__, self._noscript):
                raise
            return None, self.run(script, args, read=True)
        return popped, reply

    def _blpop(
        self,
        call: tuple[str, Sequence[Any]] | None,
        keys: Sequence[str],
        timeout: float,
        after: tuple[str, Sequence[Any]] | None = None,
    ) -> tuple[Any, tuple[bytes, bytes] | None]:
        """Send ``call`` (a script, or None), BLPOP and ``after`` (a script, or
        None) in one write; the reply of the script sent (``after``'s when
        given) and what BLPOP popped."""
        pool = self.reads.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py < 6 wants a command name
            conn = pool.get_connection("BLPOP")
        deadline = time.monotonic() + timeout + BLOCK_MARGIN_S
        commands: list[tuple[Any, ...]] = [("BLPOP", *keys, f"{timeout:.3f}")]
        if call is not None:
            script, args = call
            commands.insert(0, ("EVALSHA", self._scripts[script].sha, 1, self.prefix, *args))
        if after is not None:
            script, args = after
            commands.append(("EVALSHA", self._scripts[script].sha, 1, self.prefix, *args))
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies = []
            for _ in commands:
                if not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
                    raise BackendError(
                        f"Redis at {self.url}: no reply to a {timeout:.3f} s wait within "
                        f"{BLOCK_MARGIN_S} s after it (stalled connection)"
                    )
                replies.append(conn.read_response())
        except BaseException:
            conn.disconnect()  # its reply may still arrive: never reuse it
            raise
        finally:
            pool.release(conn)
        if after is not None:
            reply, popped = replies[-1], replies[-2]
        else:
            reply, popped = replies[0] if call else None, replies[-1]
        return reply, None if not popped else (popped[0], popped[1])

    def close(self) -> None:
        """Close both clients; idempotent."""
        for client in (self.client, self.reads):
            with contextlib.suppress(*self._errors):  # a connection that is already gone
                client.close()
