"""Memoization across every process of a space, with single-flight (``space.cached``).

::

    @space.cached(ttl=3600)
    def embed(text: str) -> list[float]: ...

    @space.cached(ttl=600, key=lambda user, **_: user)     # your own key
    async def profile(user: str, verbose: bool = False) -> dict: ...

    @space.cached(ttl=3600)          # on a task: workers run the memoized function
    @space.task
    def summarize(doc_id: str) -> str: ...

**Keys.** ``<name>/<hash>``: ``name`` is the task's name, or the function's
``module.qualname`` (``name=`` overrides it); the hash is 128 bits of
BLAKE2b of the JSON of the call's arguments bound to the signature, defaults
applied (``f(1)``, ``f(x=1)`` and ``f()`` with default ``x=1`` are one key).
Arguments must survive JSON exactly (SerializationError naming the argument
otherwise: pass ``key=``, a callable taking the call's arguments and
returning a non-empty string, e.g. for methods). Results must survive JSON
too (SerializationError when the call returns). Results live in the space's
cache ``taskspace.memo`` (L1 in each process, L2 in the space, invalidated
across processes: :mod:`taskspace.state.cache`) for ``ttl`` seconds.

**Single-flight.** A caller that misses takes the lease ``memo/<key>``
(``store.leases``, ttl ``lease_ttl``, renewed in the background while it
computes) and computes; the others wait in ``store.leases.wait`` (woken
within milliseconds by the release, which follows the write of the result)
and read the result. N concurrent callers with one key, in any number of
processes, compute once. If the holder dies (SIGKILL), its lease expires
within ``lease_ttl`` and one waiter takes over and computes.

**Errors.** An exception of the function is not cached (the waiters then
compete for the lease again and one of them computes), unless
``cache_errors`` is True (any Exception) or a tuple of exception types:
then later callers get :class:`CachedError` (the type name and message)
until ``error_ttl`` (default ``ttl``) passes.

**Timeouts (a promise).** A waiter waits at most ``wait`` seconds (default
60) for another caller's result; then ``on_timeout="raise"`` (default)
raises ResultTimeout, ``on_timeout="compute"`` computes itself without the
lease (and stores its result). While the store is unreachable a call retries
with backoff until ``wait`` has passed, then raises the BackendError (or,
with ``on_timeout="compute"``, computes without caching). A result that
cannot be stored because the store failed is returned anyway (logged).

**asyncio.** An ``async def`` is memoized as a coroutine function: L1 is
checked on the loop, store calls and waits run on a daemon thread of their
own (never the loop's default executor); cancelling the caller while it
waits gives back a lease taken meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from taskspace.backends.checks import check_seconds, check_ttl
from taskspace.codec import JSON
from taskspace.coordination.lease import MIN_TTL_S, Lease, acquire_lease, run_in_thread, spawn
from taskspace.errors import (
    BackendError,
    CachedError,
    ConfigError,
    ResultTimeout,
    SpaceLost,
    TaskspaceError,
)
from taskspace.state.cache import MISSING, Cache
from taskspace.tasks.task import Task

if TYPE_CHECKING:
    from taskspace.space import Space

log = logging.getLogger("taskspace.cache")

MEMO_CACHE: Final = "taskspace.memo"
LEASE_PREFIX: Final = "memo/"
DEFAULT_TTL_S: Final = 3600.0
DEFAULT_WAIT_S: Final = 60.0
DEFAULT_LEASE_TTL_S: Final = 10.0
WAIT_STEP_S: Final = 1.0  # one leases.wait at most (it also ends on the holder's expiry)
CANCEL_STEP_S: Final = 0.2  # an async caller's wait sees its cancellation within this
BACKOFF_START_S: Final = 0.02
BACKOFF_MAX_S: Final = 1.0
ON_TIMEOUT: Final = ("raise", "compute")
_OK, _ERROR = 0, 1


@dataclass(frozen=True, slots=True)
class _Hit:
    payload: Any


class _Compute:
    """Compute without the lease (``on_timeout="compute"``)."""


_COMPUTE: Final = _Compute()


def _default_name(fn: Callable[..., Any]) -> str:
    from taskspace.space import module_of

    return f"{module_of(fn)}.{getattr(fn, '__qualname__', repr(fn))}"


class Memo:
    """The memoization of one function (see the module docstring); the
    decorated function's ``.memo``."""

    def __init__(
        self,
        space: Space,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        ttl: float | None = DEFAULT_TTL_S,
        key: Callable[..., str] | None = None,
        cache_errors: bool | tuple[type[BaseException], ...] = False,
        error_ttl: float | None = None,
        wait: float = DEFAULT_WAIT_S,
        on_timeout: str = "raise",
        lease_ttl: float = DEFAULT_LEASE_TTL_S,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigError(
                f"unknown option(s) of space.cached: {', '.join(sorted(unknown))}; valid: name,"
                " ttl, key, cache_errors, error_ttl, wait, on_timeout, lease_ttl"
            )
        if not callable(fn):
            raise ConfigError(f"space.cached needs a function, got {fn!r}")
        if name is None:
            name = _default_name(fn)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r}: must be a non-empty string")
        check_ttl(ttl)
        check_ttl(error_ttl, "error_ttl")
        if key is not None and not callable(key):
            raise ConfigError(f"key={key!r}: must be a callable returning a string, or None")
        if not isinstance(cache_errors, bool) and not (
            isinstance(cache_errors, tuple)
            and cache_errors
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in cache_errors)
        ):
            raise ConfigError(
                f"cache_errors={cache_errors!r}: must be True, False or a tuple of exception types"
            )
        check_seconds(wait, "wait")
        if on_timeout not in ON_TIMEOUT:
            raise ConfigError(f"on_timeout={on_timeout!r}: must be one of {', '.join(ON_TIMEOUT)}")
        check_seconds(lease_ttl, "lease_ttl", minimum=MIN_TTL_S)
        self.space = space
        self.fn = fn
        self.name = name
        self.ttl = ttl
        self.error_ttl = error_ttl if error_ttl is not None else ttl
        self.key = key
        self.cache_errors = cache_errors
        self.wait = float(wait)
        self.on_timeout = on_timeout
        self.lease_ttl = float(lease_ttl)
        try:
            self._signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self._signature = None

    def __repr__(self) -> str:
        return f"<Memo {self.name!r} ttl={self.ttl}>"

    @property
    def cache(self) -> Cache:
        """The space's memo cache (one per Space, closed by Space.close)."""
        return self.space.cache(MEMO_CACHE)

    # -- keys -------------------------------------------------------------------------

    def key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The cache key of one call (see the module docstring)."""
        if self.key is not None:
            own = self.key(*args, **kwargs)
            if not isinstance(own, str) or not own:
                raise ConfigError(
                    f"key= of {self.name} returned {own!r}: must be a non-empty string"
                )
            return f"{self.name}/{own}"
        if self._signature is not None:
            bound = self._signature.bind(*args, **kwargs)  # TypeError as the call itself would
            bound.apply_defaults()
            params = self._signature.parameters
            call: Any = {
                arg: list(value) if params[arg].kind is inspect.Parameter.VAR_POSITIONAL else value
                for arg, value in bound.arguments.items()
            }
        else:
            call = [list(args), kwargs]
        data = JSON.encode(call, f"the arguments of {self.name}")
        return f"{self.name}/{hashlib.blake2b(data, digest_size=16).hexdigest()}"

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached result of this call (everywhere); True if there was one."""
        return self.cache.delete(self.key_for(args, kwargs))

    # -- the protocol -------------------------------------------------------------------

    def begin(self, key: str, cancel: threading.Event | None = None) -> _Hit | Lease | _Compute:
        """A cached result, or the lease to compute it (or _COMPUTE on a
        timeout with ``on_timeout="compute"``); waits for another caller's
        computation at most ``wait`` seconds (ResultTimeout after that).
        ``cancel`` (set by a cancelled async caller) ends the wait within
        CANCEL_STEP_S, returning _COMPUTE (nobody uses it then)."""
        cache = self.cache
        lease_name = LEASE_PREFIX + key
        deadline = time.monotonic() + self.wait
        delay = BACKOFF_START_S
        step = WAIT_STEP_S if cancel is None else CANCEL_STEP_S
        while True:
            if cancel is not None and cancel.is_set():
                return _COMPUTE
            try:
                found = cache.get(key, MISSING)
                if found is not MISSING:
                    return _Hit(found)
                lease = acquire_lease(
                    self.space, lease_name, ttl=self.lease_ttl, wait=0, fair=False
                )
                if lease is not None:
                    found = cache.get(key, MISSING)  # stored between our read and the acquire?
                    if found is not MISSING:
                        lease.release()
                        return _Hit(found)
                    return lease
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.space.store.leases.wait(lease_name, min(left, step))
            except SpaceLost:
                raise
            except BackendError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.on_timeout == "compute":
                        log.warning("memo %s: store unreachable (%s); computing uncached",
                                    self.name, exc)  # fmt: skip
                        return _COMPUTE
                    raise
                time.sleep(min(delay, left))
                delay = min(delay * 2, BACKOFF_MAX_S)
        if self.on_timeout == "compute":
            return _COMPUTE
        raise ResultTimeout(
            f"{self.name}: another caller has been computing {key} for longer than"
            f" wait={self.wait} s (raise it, or on_timeout='compute')"
        )

    def unwrap(self, payload: Any) -> Any:
        """The result a stored payload holds, or raise the CachedError it holds."""
        if isinstance(payload, list) and len(payload) == 2:
            kind, body = payload
            if kind == _OK:
                return body
            if kind == _ERROR and isinstance(body, dict):
                raise CachedError(self.name, str(body.get("type")), str(body.get("message")))
        raise TaskspaceError(f"{self.name}: the memo cache holds an unknown payload {payload!r}")

    def caches(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an error to cache."""
        if self.cache_errors is True:
            return isinstance(exc, Exception)
        if self.cache_errors is False:
            return False
        return isinstance(exc, self.cache_errors)

    def store_value(self, key: str, value: Any) -> None:
        """Store a result (SerializationError if it does not survive JSON; a
        BackendError is logged: the caller still gets its value)."""
        self._store(key, [_OK, value], self.ttl)

    def store_error(self, key: str, exc: BaseException) -> None:
        """Store an error to re-raise for later callers (errors are logged)."""
        body = {"type": type(exc).__qualname__, "message": str(exc)}
        try:
            self._store(key, [_ERROR, body], self.error_ttl)
        except TaskspaceError as failed:
            log.warning("memo %s: could not cache the error: %s", self.name, failed)

    def _store(self, key: str, payload: Any, ttl: float | None) -> None:
        try:
            self.cache.set(key, payload, ttl=ttl)
        except BackendError as exc:
            log.warning("memo %s: result not cached, the store failed: %s", self.name, exc)

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One memoized call of a plain function."""
        key = self.key_for(args, kwargs)
        got = self.begin(key)
        if isinstance(got, _Hit):
            return self.unwrap(got.payload)
        lease = got if isinstance(got, Lease) else None
        try:
            value = self.fn(*args, **kwargs)
        except BaseException as exc:
            if self.caches(exc):
                self.store_error(key, exc)
            raise
        else:
            self.store_value(key, value)
            return value
        finally:
            if lease is not None:
                lease.release()

    async def call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One memoized call of an ``async def``."""
        key = self.key_for(args, kwargs)
        found = self.cache.peek(key, MISSING)
        if found is not MISSING:
            return self.unwrap(found)

        def orphan(got: _Hit | Lease | _Compute) -> None:
            if isinstance(got, Lease):
                got.release()

        cancel = threading.Event()
        future = spawn(lambda: self.begin(key, cancel), f"taskspace-memo-{self.name}", orphan)
        try:
            got = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()  # the waiting thread stops; a lease it took goes back (orphan)
            raise
        if isinstance(got, _Hit):
            return self.unwrap(got.payload)
        lease = got if isinstance(got, Lease) else None
        try:
            value = await self.fn(*args, **kwargs)
        except BaseException as exc:
            if self.caches(exc):
                error = exc
                await run_in_thread(lambda: self.store_error(key, error), "taskspace-memo-store")
            raise
        else:
            await run_in_thread(lambda: self.store_value(key, value), "taskspace-memo-store")
            return value
        finally:
            if lease is not None:
                await run_in_thread(lease.release, "taskspace-memo-release")


def cached(space: Space, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """``@space.cached`` / ``@space.cached(ttl=..., key=..., cache_errors=...,
    error_ttl=..., wait=..., on_timeout=..., lease_ttl=..., name=...)``: the
    memoized function (same signature; ``.memo`` is its :class:`Memo`,
    ``.forget(*args)`` drops one result), or, for a :class:`Task`, the same
    task now running the memoized function. ConfigError for bad options."""
    if fn is None:
        Memo(space, _probe, **options)  # refuse bad options at decoration time

        def decorate(func: Callable[..., Any]) -> Any:
            return cached(space, func, **options)

        return decorate
    if isinstance(fn, Task):
        options.setdefault("name", fn.name)
        fn.fn = _wrap(Memo(space, fn.fn, **options))
        return fn
    return _wrap(Memo(space, fn, **options))


def _probe() -> None:
    """Stands in for the function while options are checked."""


def _wrap(memo: Memo) -> Callable[..., Any]:
    fn = memo.fn
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def memoized_async(*args: Any, **kwargs: Any) -> Any:
            return await memo.call_async(args, kwargs)

        memoized_async.memo = memo  # type: ignore[attr-defined]
        memoized_async.forget = memo.forget  # type: ignore[attr-defined]
        return memoized_async

    @functools.wraps(fn)
    def memoized(*args: Any, **kwargs: Any) -> Any:
        return memo.call(args, kwargs)

    memoized.memo = memo  # type: ignore[attr-defined]
    memoized.forget = memo.forget  # type: ignore[attr-defined]
    return memoized
