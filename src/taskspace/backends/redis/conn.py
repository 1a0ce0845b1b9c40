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
import functools
import hashlib
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


def load_scripts() -> dict[str, tuple[str, str]]:
    """Every script of ``lua/`` by name, as (head, body). The head is the task
    state rules generated from ``outcomes``, the task fields generated from
    ``records.FIELDS``, ``common.lua``, then the script's libraries:
    ``_<group>.lua`` for a script named ``<group>_<verb>.lua`` (functions its
    group shares), and every library a ``-- requires: _name.lua`` line of the
    script or of a library names (each once, before what requires it)."""
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
        head = "".join(sources[lib] for lib in libraries if lib != name)
        scripts[name.removesuffix(".lua")] = (prelude + head, sources[name])
    return scripts


@functools.cache
def load_libraries() -> dict[str, tuple[str, str]]:
    """Each script as a Redis function library: script name -> (function
    name, FUNCTION LOAD source).

    A library's top level (the rules, fields, common.lua and the libraries:
    about 20 KB of definitions) runs once when Redis loads it; each call then
    runs only the script's body, as a function of ``KEYS`` and ``ARGV`` that
    first sets the per-call state of common.lua (``P``, the key prefix, and
    the clock memo). With EVALSHA Redis re-ran the whole top level on every
    call, several times the cost of most bodies. Names end in a hash of all
    the code, so processes of different taskspace versions sharing a Redis
    never call each other's functions."""
    scripts = load_scripts()
    version = hashlib.sha1(repr(sorted(scripts.items())).encode()).hexdigest()[:12]
    libraries = {}
    for name, (head, body) in scripts.items():
        function = f"taskspace_{version}_{name}"
        code = (
            f"#!lua name={function}\n{head}\n"
            f"redis.register_function('{function}', function(KEYS, ARGV)\n"
            f"P = KEYS[1]\nclock_memo = nil\n{body}\nend)\n"
        )
        libraries[name] = (function, code)
    return libraries


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
    (command, pipeline, function load, a function missing after a restart, socket) surfaces
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
        self._response_error: type[BaseException] = redis_mod.exceptions.ResponseError
        self._libraries = load_libraries()

    def call(self, op: Callable[[], T]) -> T:
        """Run one Redis operation, turning any Redis failure into BackendError."""
        try:
            return op()
        except self._errors as exc:
            raise BackendError(f"Redis at {self.url}: {type(exc).__name__}: {exc}") from exc

    def function(self, script: str) -> str:
        """The Redis function that runs ``script``."""
        return self._libraries[script][0]

    def _fcall(self, script: str, args: Sequence[Any]) -> tuple[Any, ...]:
        return ("FCALL", self._libraries[script][0], 1, self.prefix, *args)

    def _missing(self, exc: BaseException | None) -> bool:
        """True if ``exc`` says Redis does not have our functions (a restarted
        or new server, FUNCTION FLUSH): the call did not run, load and retry.
        A Redis without functions (before 7.0) is refused with a clear error."""
        if not isinstance(exc, self._response_error):
            return False
        if "unknown command" in str(exc).lower():
            raise BackendError(
                f"Redis at {self.url} has no FCALL: taskspace needs Redis 7.0 or newer"
            ) from exc
        return str(exc).startswith("Function not found")

    def load_functions(self) -> None:
        """Load (or replace) every script's function library, in one round
        trip; safe to run from many processes at once."""

        def load() -> None:
            pipe = self.client.pipeline(transaction=False)
            for _, code in self._libraries.values():
                pipe.execute_command("FUNCTION", "LOAD", "REPLACE", code)
            pipe.execute()

        self.call(load)

    def run(self, script: str, args: Sequence[Any], read: bool = False) -> Any:
        """Run a script (on the short-timeout client when ``read``); its
        functions are loaded first if Redis does not have them."""
        client = self.reads if read else self.client
        command = self._fcall(script, args)
        try:
            return self.call(lambda: client.execute_command(*command))
        except BackendError as exc:
            if not self._missing(exc.__cause__):
                raise
        self.load_functions()
        return self.call(lambda: client.execute_command(*command))

    def run_many(self, script: str, arg_lists: Iterable[Sequence[Any]]) -> list[Any]:
        """Run ``script`` once per argument list, in order, each call atomic on
        its own, keeping up to RUN_MANY_WINDOW calls in flight on one
        connection, so that the client encodes the next call while Redis runs
        this one. The first call goes alone (it loads the functions after a
        Redis restart)."""
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
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py < 6 wants a command name
            conn = pool.get_connection("FCALL")
        replies: list[Any] = []
        sent = 0
        try:
            for args in lists:
                conn.send_command(*self._fcall(script, args))
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
        connection, and with it the BLPOP; functions missing from Redis (a
        restart) are loaded and the pair sent again."""
        call = (script, args)
        try:
            return self.call(lambda: self._blpop(call, keys, max(timeout, 0.001)))
        except BackendError as exc:
            if not self._missing(exc.__cause__):
                raise
        self.load_functions()
        return self.call(lambda: self._blpop(call, keys, max(timeout, 0.001)))

    def run_pair(
        self, first: tuple[str, Sequence[Any]], second: tuple[str, Sequence[Any]]
    ) -> tuple[Any, Any]:
        """Run two scripts (each atomic on its own, in order) sent in one write
        on the short-timeout client: one round trip; their replies. A script
        whose function Redis lacks (a restart) is run again on its own (which
        loads the functions), the other's reply kept."""
        calls = (first, second)
        replies = self.call(lambda: self._send_scripts(calls))
        for i, (script, args) in enumerate(calls):
            error = replies[i]
            if isinstance(error, self._response_error):
                if not self._missing(error):
                    raise BackendError(f"Redis at {self.url}: ResponseError: {error}") from error
                replies[i] = self.run(script, args, read=True)
        return replies[0], replies[1]

    def _send_scripts(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        pool = self.reads.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py < 6 wants a command name
            conn = pool.get_connection("FCALL")
        commands = [self._fcall(script, args) for script, args in calls]
        replies: list[Any] = []
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except self._response_error as exc:  # the other reply still comes
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
        script's reply. If Redis lacks the script's function (a restart), the
        functions are loaded and the script run once more on its own (the
        BLPOP is not repeated: it may have popped)."""
        call = (script, args)
        try:
            reply, popped = self.call(lambda: self._blpop(None, keys, max(timeout, 0.001), call))
        except BackendError as exc:
            if not self._missing(exc.__cause__):
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
            commands.insert(0, self._fcall(*call))
        if after is not None:
            commands.append(self._fcall(*after))
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
