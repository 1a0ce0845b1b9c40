"""The HTTP API (FastAPI, OpenAPI 3 at ``/openapi.json``, docs at ``/docs``).

``create_app(space)`` serves the space's tasks, queues, workers, logs, events
and coordination state as JSON under ``/api``, Prometheus metrics at
``/metrics`` and, when ``taskspace.api.dashboard`` is installed, the
dashboard at ``/``. Every endpoint calls the same Space methods as the CLI.

Guarantees:

- **Errors** are ``{"error": {"code", "message"}}`` with a stable code
  (:mod:`taskspace.api.errors`). Bad input is a 4xx that changed nothing:
  bodies and parameters are validated before any store call, and a request
  body above ``max_body`` bytes (1 MiB) is refused with 413 before it is read
  whole.
- **Backend down**: a call that cannot reach the store answers 503
  ``backend_unavailable``; nothing is cached across requests, so the next
  request after the backend comes back succeeds (the store reconnects by
  itself). ``space_lost`` (503) means the space was wiped or replaced: restart
  the server. Every store call is bounded by the store's own timeouts.
- **Background work**: one daemon thread tails the events stream into the
  metrics and usage sums; it logs, backs off and carries on through any
  error, and stops when the app shuts down (lifespan).
- **Streams** (``/api/events/stream``, ``/api/logs/stream``) are Server-Sent
  Events: the blocking reads run on a thread pool of their own (at most
  ``SSE_MAX`` at once, so streams never starve the API), each for at most a
  second, with a comment line every ``heartbeat`` seconds; a stream ends
  within about a second of its client going away.

Listing locks, elections, services and streams is best effort, from what the
store lets one enumerate: locks appear while someone waits for them (the
lease store cannot list held leases; ``?name=`` asks about one directly),
elections appear while their leader record lives, services are the registry,
and streams are the system streams plus those named with ``?name=``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Annotated, Any, TypeVar
from urllib.parse import unquote

import anyio
import anyio.to_thread
import orjson
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskspace.api import models as M
from taskspace.api.auth import (
    HostCheck,
    allowed_host_names,
    check_bind,
    require_token,
    require_token_documented,
)
from taskspace.api.errors import ApiError, body, classify, redact_text
from taskspace.api.metrics import EventMetrics, SpaceCollector
from taskspace.api.models import responses
from taskspace.backends.base import FINAL_STATES, TASK_STATES, TaskRecord, TaskSpec
from taskspace.codec import decoder_for
from taskspace.errors import (
    BackendError,
    ConfigError,
    SerializationError,
    SpaceLost,
    TaskNotFound,
    TaskspaceError,
)
from taskspace.space import Space
from taskspace.tasks.handle import Handle

log = logging.getLogger("taskspace.api")

MAX_BODY = 1024 * 1024
HEARTBEAT_S = 15.0
SSE_MAX = 64  # streams served at once (each holds a thread for up to SSE_READ_S at a time)
SSE_READ_S = 1.0
WAITS_MAX = 64  # long polls (GET /api/tasks/{id}?wait=) waiting at once
LIST_MAX = 1000
WAIT_MAX_S = 30.0
SUBMIT_RETRY_S = 2.0  # a submit rides out a backend blip this long, then answers 503
SCAN_MAX = 10_000  # keys read at most by a best-effort listing
EVENTS_STREAM = "taskspace/events"
LOGS_STREAM = "taskspace/logs"
USAGE_KEYS_MAX = 10_000  # distinct task names / models summed; later ones go to "(other)"
TAILER_PAGE = 500
TAILER_BACKOFF_MAX_S = 5.0
SPACE_CHECK_S = 1.0  # a read is checked against a wiped space at most this often (writes: always)

R = TypeVar("R")

TaskId = Annotated[str, Path(pattern=M.TASK_ID_PATTERN, description="The task id.")]


# -- presenting records ------------------------------------------------------------------


def _plain(value: Any) -> tuple[Any, str | None]:
    """``value`` if it is JSON, else (None, why)."""
    try:
        orjson.dumps(value)
    except TypeError as exc:
        return None, f"not shown as JSON: {exc}"
    return value, None


def _summary(record: TaskRecord) -> dict[str, Any]:
    progress = record.progress
    return {
        "id": record.id,
        "name": record.name,
        "queue": record.queue,
        "state": record.state,
        "priority": record.priority,
        "attempts": record.attempts,
        "max_attempts": record.max_attempts,
        "lost": record.lost,
        "worker": record.worker,
        "created": record.created,
        "started": record.started,
        "finished": record.finished,
        "error_type": None if record.error is None else str(record.error.get("type", "")),
        "progress": None if progress is None else {"done": progress[0], "total": progress[1]},
        "cancel_requested": bool(record.cancel_requested),
    }


def _detail(record: TaskRecord) -> dict[str, Any]:
    doc = _summary(record)
    notes: list[str] = []
    args: Any = None
    kwargs: Any = None
    result: Any = None
    codec = None
    try:
        codec = decoder_for(record.codec, allow_pickle=False)
    except (SerializationError, ConfigError) as exc:
        notes.append(f"{record.codec} values are not shown: {exc}")
    if codec is not None and record.payload:
        try:
            call = codec.decode(record.payload)
            args = list(call[0])
            kwargs = dict(call[1]) if len(call) > 1 else {}
        except (SerializationError, TypeError, IndexError, ValueError, KeyError) as exc:
            notes.append(f"arguments not shown: {exc}")
    if codec is not None and record.state == "succeeded" and record.result is not None:
        try:
            result = codec.decode(record.result)
        except SerializationError as exc:
            notes.append(f"result not shown: {exc}")
    for label, value in (("args", args), ("kwargs", kwargs), ("result", result)):
        shown, why = _plain(value)
        if why is not None:
            notes.append(f"{label} {why}")
        if label == "args":
            args = shown
        elif label == "kwargs":
            kwargs = shown
        else:
            result = shown
    error = None
    traceback = None
    if record.error is not None:
        extra = {k: v for k, v in record.error.items() if k not in ("type", "message", "traceback")}
        extra, _ = _plain(extra)
        error = {
            **(extra or {}),
            "type": str(record.error.get("type", "Error")),
            "message": str(record.error.get("message", "")),
        }
        traceback = record.error.get("traceback") or None
    doc.update(
        args=args,
        kwargs=kwargs,
        result=result,
        error=error,
        traceback=traceback,
        timeout=record.timeout,
        lease_s=record.lease_s,
        dedup_key=record.dedup_key,
        display_note="; ".join(notes) or None,
    )
    return doc


def _event_doc(event: Any) -> dict[str, Any]:
    return dict(event.to_json())


# -- request size ------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with 413
    ``request_too_large`` (by Content-Length at once, else as the body streams
    in), before the endpoint runs."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # disconnected: nothing to serve
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        data = orjson.dumps(
            body("request_too_large", f"the request body is larger than {self.limit} bytes")
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


# -- background: events into metrics and usage ----------------------------------------------


class UsageTotals:
    """Sums of ``usage`` events by task name and by model (thread-safe, bounded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_task: dict[str, dict[str, float]] = {}
        self.by_model: dict[str, dict[str, float]] = {}
        self.events_read = 0

    def observe(self, event: Any) -> None:
        """Count one event (only ``usage`` events add to the sums)."""
        with self._lock:
            self.events_read += 1
            if event.kind != "usage" or not isinstance(event.usage, dict):
                return
            usage = event.usage
            for table, key in (
                (self.by_task, str(event.name)),
                (self.by_model, str(usage.get("model") or "")),
            ):
                if key not in table and len(table) >= USAGE_KEYS_MAX:
                    key = "(other)"
                sums = table.setdefault(
                    key, {"records": 0, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
                )
                sums["records"] += 1
                for field in ("tokens_in", "tokens_out", "cost_usd"):
                    value = usage.get(field)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        sums[field] += value

    def snapshot(self) -> dict[str, Any]:
        """A copy of the sums, as the ``/api/usage`` body."""
        with self._lock:
            return {
                "by_task": {k: dict(v) for k, v in self.by_task.items()},
                "by_model": {k: dict(v) for k, v in self.by_model.items()},
                "events_read": self.events_read,
            }


class EventTailer:
    """A daemon thread reading the events stream from its start into
    ``sinks``; it never dies of an exception (logs, backs off up to
    TAILER_BACKOFF_MAX_S, carries on) and stops within about a second of
    ``close()``."""

    def __init__(self, space: Space, sinks: Sequence[Callable[[Any], None]]) -> None:
        self.space = space
        self.sinks = list(sinks)
        self.after = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="taskspace-api-events", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                events = self.space.events.read(
                    after=self.after, limit=TAILER_PAGE, wait=SSE_READ_S
                )
            except ImportError:
                log.warning("taskspace.events is not available: metrics from events are off")
                return
            except Exception as exc:  # noqa: BLE001 - the tailer outlives any error
                log.warning("events tailer: %s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, TAILER_BACKOFF_MAX_S)
                continue
            delay = 0.1
            for event in events:
                for sink in self.sinks:
                    try:
                        sink(event)
                    except Exception:  # a sink's bug must not stop the others
                        log.exception("events tailer: a sink failed on %r", event)
                self.after = max(self.after, int(event.id))

    def close(self) -> None:
        """Stop the thread and wait for it (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# -- the app -------------------------------------------------------------------------------


def create_app(
    space: Space,
    *,
    token: str | None = None,
    host: str = "127.0.0.1",
    cors_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
    heartbeat: float = HEARTBEAT_S,
    max_body: int = MAX_BODY,
    tail_events: bool = True,
) -> FastAPI:
    """The API app for ``space`` (see the module docstring).

    ``token``: required on every API call and page when given (bearer or the
    ``taskspace_token`` cookie); ``host``: the address it will be served on —
    a non-loopback host without a token is refused (ConfigError);
    ``cors_origins``: origins allowed by CORS (none: CORS off);
    ``allowed_hosts``: Host names served besides the bound address and the
    loopback names (a server without a token refuses any other Host with 400
    ``invalid_host``; with a token the Host check applies only when this is
    given). ``tail_events``
    runs the events tailer (metrics, usage) while the app is up. Bad
    arguments raise ConfigError naming them; nothing is started until the
    app's lifespan begins.
    """
    if not isinstance(space, Space):
        raise ConfigError(f"space must be a taskspace.Space, got {space!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise ConfigError("token must be a non-empty string or None")
    check_bind(host, token)
    if isinstance(cors_origins, str) or not all(isinstance(o, str) and o for o in cors_origins):
        raise ConfigError(
            f"cors_origins must be a sequence of origin strings, got {cors_origins!r}"
        )
    allowed = allowed_host_names(host, allowed_hosts)
    for label, value in (("heartbeat", heartbeat), ("max_body", max_body)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{label} must be a positive number, got {value!r}")

    metrics = EventMetrics()
    metrics.registry.register(SpaceCollector(space))
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    ProcessCollector(registry=metrics.registry)  # the server process's CPU, memory, fds
    PlatformCollector(registry=metrics.registry)
    GCCollector(registry=metrics.registry)
    usage = UsageTotals()
    tailer = EventTailer(space, [metrics.observe, usage.observe])
    stopping = threading.Event()  # set on shutdown: the event streams end (see cli/serve.py)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if tail_events:
            tailer.start()
        try:
            yield
        finally:
            stopping.set()
            await anyio.to_thread.run_sync(tailer.close)

    app = FastAPI(
        title="taskspace",
        summary="Submit, follow and manage the tasks of a taskspace space.",
        description=__doc__,
        version=_version(),
        lifespan=lifespan,
    )
    app.state.space = space
    app.state.token = token
    app.state.metrics = metrics
    app.state.usage = usage
    app.state.tailer = tailer
    app.state.stopping = stopping
    app.state.space_check = SpaceCheck(space)
    app.state.heartbeat = float(heartbeat)
    app.state.sse_limiter = anyio.CapacityLimiter(SSE_MAX)
    app.state.wait_limiter = anyio.CapacityLimiter(WAITS_MAX)

    _install_error_handlers(app)
    auth = require_token_documented if token is not None else require_token
    api = APIRouter(
        prefix="/api",
        dependencies=[Depends(auth), Depends(_single_values), Depends(space_alive)],
    )
    _task_routes(api, space)
    _info_routes(api, space, usage)
    _stream_routes(api, space)
    app.include_router(api)
    _open_routes(app, space, metrics, auth)
    _include_dashboard(app)
    app.add_middleware(BodyLimit, limit=int(max_body))
    if token is None or allowed_hosts:
        app.add_middleware(HostCheck, allowed=allowed, cors_origins=cors_origins)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            allow_credentials=True,
        )
    return app


class SpaceCheck:
    """Whether the space this app serves still exists (its identity record is
    the one read at open): the stores see a wiped Redis (FLUSHALL, a restart
    without persistence) only as empty keys, and check the identity only when
    they reconnect, so the API checks it itself. ``check(fresh=False)`` reads
    the identity at most once per SPACE_CHECK_S (``fresh``: always, before a
    write) and raises SpaceLost, for good once seen; a backend that cannot be
    read is left to the request's own store calls (BackendError: 503)."""

    def __init__(self, space: Space, every: float = SPACE_CHECK_S) -> None:
        self.space = space
        self.every = every
        self._lock = threading.Lock()
        self._checked = -float("inf")
        self._lost: SpaceLost | None = None

    def check(self, fresh: bool = False, strict: bool = False) -> None:
        """Raise SpaceLost if the space was wiped or replaced (see the class);
        ``strict``: read now and raise BackendError too (``/api/health``)."""
        fresh = fresh or strict
        if self._lost is not None:
            raise self._lost
        now = time.monotonic()
        if not fresh and now - self._checked < self.every:
            return
        try:
            self.space.store.check_space()
        except SpaceLost as exc:
            self._lost = exc
            raise
        except BackendError:
            if strict:
                raise
            return
        with self._lock:
            self._checked = max(self._checked, now)


def space_alive(request: Request) -> None:
    """FastAPI dependency: 503 ``space_lost`` once the space was wiped or
    replaced (:class:`SpaceCheck`; fresh for a POST, else at most once a second)."""
    checker = getattr(request.app.state, "space_check", None)
    if isinstance(checker, SpaceCheck):
        checker.check(fresh=request.method == "POST")


def _single_values(request: Request) -> None:
    """Refuse a query parameter given twice (every API parameter takes one value):
    422 rather than silently using one of them."""
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key in seen:
            raise ApiError(422, "invalid_argument", f"query parameter {key!r} given more than once")
        seen.add(key)


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route serves at the request's path (routers may nest)."""
    from starlette.routing import Match

    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def _version() -> str:
    from taskspace import __version__

    return str(__version__)


def _include_dashboard(app: FastAPI) -> None:
    try:
        from taskspace.api.dashboard import router
    except ImportError as exc:
        log.info("dashboard not available (%s); serving the API only", exc)

        @app.get("/", include_in_schema=False)
        def root() -> JSONResponse:
            return JSONResponse({"api": "/api", "docs": "/docs", "openapi": "/openapi.json"})

        return
    app.include_router(router)


def _install_error_handlers(app: FastAPI) -> None:
    def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(body(exc.code, exc.message), exc.status, headers=exc.headers)

    def taskspace_error(request: Request, exc: Exception) -> JSONResponse:
        status, code = classify(exc)
        if status >= 500 and status != 503:
            log.error("%s %s failed: %s", request.method, request.url.path, redact_text(repr(exc)))
        message = redact_text(" ".join(str(exc).split())) or type(exc).__name__
        return JSONResponse(body(code, message), status)

    def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(body("invalid_argument", "; ".join(parts) or "invalid request"), 422)

    def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        from taskspace.api.errors import HTTP_CODES

        status = exc.status_code
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 400:  # a body that is not JSON: the same as any other bad input
            status = 422
        if status == 405:  # every method of the path, not only those of the first route
            headers["Allow"] = ", ".join(_allowed_methods(request))
        code = HTTP_CODES.get(status, f"http_{status}")
        message = exc.detail if isinstance(exc.detail, str) else code
        return JSONResponse(body(code, message), status, headers=headers or None)

    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(body("internal_error", "internal error (logged by the server)"), 500)

    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(TaskspaceError, taskspace_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


# -- tasks ----------------------------------------------------------------------------------


def _task_routes(api: APIRouter, space: Space) -> None:  # noqa: C901 - one closure per route
    read_errors = responses(401, 404, 422, 503)

    @api.post(
        "/tasks",
        status_code=201,
        response_model=M.Task,
        tags=["tasks"],
        responses=responses(401, 404, 409, 413, 422, 503),
    )
    def submit(req: M.SubmitRequest) -> dict[str, Any]:
        """Submit a registered task by name; 404 ``unknown_task`` if this server's
        app does not register it (a server started with ``--url`` alone has no
        tasks: start it as ``taskspace serve APP``). With ``id``, a submit is
        idempotent: an existing task with that id and the same name and
        arguments is returned (201) without a second one; one with another name
        or other arguments is a 409 ``id_conflict`` (nothing written)."""
        if not space.task_names:
            raise ApiError(
                404,
                "unknown_task",
                f"unknown task {req.name!r}: this server has no registered tasks;"
                " start it with the app (taskspace serve module:space)",
            )
        task = space.get_task(req.name)
        overrides = {
            k: v
            for k, v in {
                "queue": req.queue,
                "priority": req.priority,
                "countdown": req.countdown,
                "dedup_key": req.dedup_key,
            }.items()
            if v is not None
        }
        if overrides:
            task = task.options(**overrides)
        spec = task.spec(req.args, req.kwargs)  # encodes (and refuses) before any write
        if req.id is not None:
            spec.id = req.id
            existing = space.store.queue.get(req.id)
            if existing is not None:  # a retried submit: the task it made
                _same_submit(existing, spec)
                return _detail(existing)
        task_id = _push(space, spec)
        record = Handle(space, task_id).info()
        if req.id is not None:
            _same_submit(record, spec)  # a concurrent submit of another body may have won the id
        return _detail(record)

    @api.get("/tasks", response_model=M.TaskPage, tags=["tasks"], responses=read_errors)
    def list_tasks(
        state: M.TaskStateName | None = None,
        queue: Annotated[str | None, Query(pattern=M.QUEUE_PATTERN)] = None,
        name: Annotated[str | None, Query(pattern=M.NAME_PATTERN)] = None,
        cursor: Annotated[
            str | None,
            Query(pattern=M.TASK_ID_PATTERN, description="next_cursor of the page before"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 50,
    ) -> dict[str, Any]:
        """Tasks matching every filter given, oldest first, one page at a time.
        A cursor whose task was deleted since is a 404 ``cursor_not_found``."""
        if cursor is not None and space.store.queue.state(cursor) is None:
            space.store.check_space()
            raise ApiError(
                404,
                "cursor_not_found",
                f"cursor {cursor!r}: its task is gone; list again from the start",
            )
        page = space.tasks(state=state, queue=queue, name=name, limit=limit, after=cursor)
        return {
            "items": [_summary(r) for r in page],
            "next_cursor": page[-1].id if len(page) == limit else None,
        }

    @api.get("/tasks/{task_id}", response_model=M.Task, tags=["tasks"], responses=read_errors)
    async def get_task(
        request: Request,
        task_id: TaskId,
        wait: Annotated[
            float, Query(ge=0, le=WAIT_MAX_S, description="Seconds to wait for the task to end.")
        ] = 0,
    ) -> dict[str, Any]:
        """One task in full; with ``wait``, first wait up to that long for it to end.
        Long polls wait on a thread pool of their own (WAITS_MAX at once), so
        waiting clients never starve the other endpoints."""
        handle = Handle(space, task_id)  # one read: info() raises TaskNotFound itself
        record = await anyio.to_thread.run_sync(handle.info)
        if wait > 0 and record.state not in FINAL_STATES:
            limiter: anyio.CapacityLimiter = request.app.state.wait_limiter
            await anyio.to_thread.run_sync(
                space.store.queue.wait_for_finish, [task_id], float(wait), limiter=limiter
            )
            record = await anyio.to_thread.run_sync(handle.info)
        return _detail(record)

    @api.post(
        "/tasks/{task_id}/cancel", response_model=M.Task, tags=["tasks"], responses=read_errors
    )
    def cancel_task(
        task_id: TaskId,
        terminate: Annotated[bool, Query(description="Kill a running process task.")] = False,
    ) -> dict[str, Any]:
        """Cancel: a queued task never runs; a running one is asked to stop. A
        task that already ended is returned unchanged."""
        space.handle(task_id).cancel(terminate=terminate)
        return _detail(space.handle(task_id).info())

    @api.post(
        "/tasks/{task_id}/retry",
        response_model=M.Task,
        tags=["tasks"],
        responses=responses(401, 404, 409, 422, 503),
    )
    def retry_task(task_id: TaskId) -> dict[str, Any]:
        """Requeue a failed or dead task with fresh attempts; 409 ``invalid_state``
        for a task in any other state (nothing changes)."""
        handle = space.handle(task_id)
        try:
            handle.retry()
        except ConfigError as exc:  # its state: nothing changed
            raise ApiError(409, "invalid_state", str(exc)) from exc
        return _detail(handle.info())

    @api.post(
        "/dead/retry",
        response_model=M.RetryResult,
        tags=["tasks"],
        responses=responses(401, 413, 422, 503),
    )
    def retry_many(req: M.RetryRequest) -> dict[str, Any]:
        """Requeue every failed or dead task of ``ids``; the others are skipped."""
        retried: list[str] = []
        skipped: list[str] = []
        for task_id in dict.fromkeys(req.ids):
            try:
                space.handle(task_id).retry()
                retried.append(task_id)
            except (ConfigError, TaskNotFound):
                skipped.append(task_id)
        return {"retried": retried, "skipped": skipped}


def _same_submit(record: TaskRecord, spec: TaskSpec) -> None:
    """409 ``id_conflict`` unless ``record`` (the task stored under the
    submitted id) has the submit's name and encoded arguments."""
    if record.name != spec.name or record.codec != spec.codec or record.payload != spec.payload:
        raise ApiError(
            409,
            "id_conflict",
            f"task id {spec.id} is already used by another submit ({record.name} with other"
            " arguments); use a new id",
        )


# -- queues, workers, logs, events, usage, coordination ----------------------------------------


def _push(space: Space, spec: TaskSpec) -> str:
    """Write one task, retrying a BackendError for at most SUBMIT_RETRY_S (the
    same id: never a second task), then 503: a request never waits long on a
    backend that is down. Records its ``submitted`` event as Space.push does."""
    deadline = time.monotonic() + SUBMIT_RETRY_S
    delay = 0.05
    while True:
        try:
            ids = space.store.queue.push([spec])
            break
        except SpaceLost:
            raise
        except BackendError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
    with contextlib.suppress(ImportError):
        space.events.submitted([spec], ids)
    return ids[0]


def _info_routes(api: APIRouter, space: Space, usage: UsageTotals) -> None:  # noqa: C901
    errs = responses(401, 422, 503)

    @api.get(
        "/queues", response_model=list[M.QueueInfo], tags=["queues"], responses=responses(401, 503)
    )
    def queues() -> list[dict[str, Any]]:
        """Every queue's task counts by state and its oldest queued task's age."""
        stats = space.stats()
        now = space.store.clock.wall()
        out = []
        for name, by_state in sorted(stats.counts.items()):
            oldest = None
            if by_state.get("queued"):
                first = space.tasks(state="queued", queue=name, limit=1)
                oldest = max(0.0, now - first[0].created) if first else None
            out.append(
                {
                    "name": name,
                    "counts": {s: int(by_state.get(s, 0)) for s in TASK_STATES},
                    "oldest_age": oldest,
                }
            )
        return out

    @api.get(
        "/workers",
        response_model=list[dict[str, Any]],
        tags=["workers"],
        responses=responses(401, 503),
    )
    def workers() -> list[dict[str, Any]]:
        """Live workers as they last registered themselves (at most a few seconds old)."""
        return [_plain(w)[0] or {"name": str(w.get("name"))} for w in space.workers()]

    @api.get("/logs", response_model=M.LogPage, tags=["logs"], responses=errs)
    def logs(
        task_id: Annotated[str | None, Query(pattern=M.TASK_ID_PATTERN)] = None,
        worker: Annotated[str | None, Query(pattern=M.NAME_PATTERN)] = None,
        level: M.LevelName | None = None,
        since: Annotated[float | None, Query(description="Wall-clock Unix seconds.")] = None,
        after: Annotated[int, Query(ge=0, le=M.MAX_STREAM_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 200,
    ) -> dict[str, Any]:
        """Shipped log records matching the filters, oldest first."""
        records = _logs(space).query(
            task_id=task_id, worker=worker, level=level, since=since, after=after, limit=limit
        )
        items = [r.to_json() for r in records]
        return {"items": items, "last_id": items[-1]["id"] if items else after}

    @api.get("/events", response_model=M.EventPage, tags=["events"], responses=errs)
    def events(
        after: Annotated[int, Query(ge=0, le=M.MAX_STREAM_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 100,
    ) -> dict[str, Any]:
        """Task events after ``after``, oldest first."""
        items = [_event_doc(e) for e in _events(space).read(after=after, limit=limit)]
        return {"items": items, "last_id": items[-1]["id"] if items else after}

    @api.get("/usage", response_model=M.Usage, tags=["events"], responses=responses(401))
    def usage_sums() -> dict[str, Any]:
        """Tokens and cost recorded by tasks, by task name and by model."""
        return usage.snapshot()

    @api.get("/locks", response_model=list[M.LockInfo], tags=["coordination"], responses=errs)
    def locks(
        name: Annotated[
            str | None,
            Query(pattern=M.NAME_PATTERN, description="A lock or semaphore name to look up."),
        ] = None,
    ) -> list[dict[str, Any]]:
        """Locks and semaphores someone waits for, with holders (best effort: a held
        lock nobody waits for is listed only when asked for by ``name``)."""
        from taskspace.coordination.lease import QUEUE_PREFIX

        waiters: dict[str, int] = {}
        for key, _ in _scan(space, QUEUE_PREFIX):
            quoted, sep, _rest = key[len(QUEUE_PREFIX) :].partition("/q/")
            if sep:
                lease_name = unquote(quoted)
                waiters[lease_name] = waiters.get(lease_name, 0) + 1
        names = set(waiters)
        if name is not None:
            names.update((f"lock/{name}", f"sem/{name}"))
        now = space.store.clock.now()
        out = []
        for lease_name in sorted(names):
            holders = space.store.leases.holders(lease_name)
            if not holders and not waiters.get(lease_name):
                continue
            out.append(
                {
                    "name": lease_name,
                    "waiters": waiters.get(lease_name, 0),
                    "holders": [
                        {
                            "holder": g.holder,
                            "token": g.token,
                            "expires_in": round(g.expires - now, 3),
                        }
                        for g in holders
                    ],
                }
            )
        return out

    @api.get(
        "/elections",
        response_model=list[M.ElectionInfo],
        tags=["coordination"],
        responses=responses(401, 503),
    )
    def elections() -> list[dict[str, Any]]:
        """Elections whose leader record lives, with the leader from the lease."""
        from taskspace.coordination.election import LEASE_PREFIX, RECORD_PREFIX

        out = []
        for key, _ in _scan(space, RECORD_PREFIX):
            name = key[len(RECORD_PREFIX) :]
            holders = space.store.leases.holders(LEASE_PREFIX + name)
            grant = holders[0] if holders else None
            leader = None if grant is None else grant.data.decode(errors="replace") or grant.holder
            out.append(
                {"name": name, "leader": leader, "term": None if grant is None else grant.token}
            )
        return out

    @api.get(
        "/services",
        response_model=dict[str, list[dict[str, Any]]],
        tags=["coordination"],
        responses=responses(401, 503),
    )
    def services() -> dict[str, list[dict[str, Any]]]:
        """Every live instance of the service registry, by service name."""
        found = space.registry.services()
        return {
            svc: [_plain(i.to_dict())[0] or {"id": i.id} for i in insts]
            for svc, insts in sorted(found.items())
        }

    @api.get("/streams", response_model=list[M.StreamInfo], tags=["coordination"], responses=errs)
    def streams(
        name: Annotated[
            str | None, Query(pattern=M.NAME_PATTERN, description="Another stream to describe.")
        ] = None,
    ) -> list[dict[str, Any]]:
        """The system streams (events, logs) and the stream named, with their
        oldest retained entry (best effort: the store cannot list streams)."""
        names = [EVENTS_STREAM, LOGS_STREAM]
        if name is not None and name not in names:
            names.append(name)
        out = []
        for stream in names:
            first = space.store.streams.read(stream, after=0, limit=1)
            last = None
            if stream == EVENTS_STREAM:
                with contextlib.suppress(ImportError):
                    last = _events(space).last_id() or None
            out.append(
                {
                    "name": stream,
                    "first_id": first[0].id if first else None,
                    "first_time": first[0].time if first else None,
                    "last_id": last if last is not None else (first[0].id if first else None),
                }
            )
        return out


def _scan(space: Space, prefix: str) -> Iterator[tuple[str, Any]]:
    after: str | None = None
    seen = 0
    while seen < SCAN_MAX:
        page = space.store.kv.scan(prefix, after_key=after, limit=1000)
        if not page:
            return
        yield from page
        seen += len(page)
        after = page[-1][0]


def _events(space: Space) -> Any:
    try:
        return space.events
    except ImportError as exc:
        raise ApiError(501, "missing_dependency", f"task events are not available: {exc}") from exc


def _logs(space: Space) -> Any:
    try:
        return space.logs
    except ImportError as exc:
        raise ApiError(501, "missing_dependency", f"shipped logs are not available: {exc}") from exc


# -- Server-Sent Events ------------------------------------------------------------------------


Frame = tuple[str, dict[str, Any]]  # an SSE frame: its id and its JSON item


def _sse(frame: Frame) -> bytes:
    frame_id, item = frame
    return b"id: %s\ndata: %s\n\n" % (frame_id.encode(), orjson.dumps(item))


def _last_event_id(request: Request, after: int | None) -> tuple[int, int] | None:
    """Where a stream resumes: (stream id to read after, items of the next
    entry already sent). ``after`` wins; else a Last-Event-ID ``<id>`` (that
    entry was sent whole) or ``<id>.<k>`` (its items 0..k were sent); None:
    only new items."""
    if after is not None:
        return after, 0
    header = request.headers.get("last-event-id") or ""
    entry, dot, index = header.partition(".")
    if entry.isdigit() and int(entry) <= M.MAX_STREAM_ID:
        if not dot:
            return int(entry), 0
        if index.isdigit() and int(entry) > 0:
            return int(entry) - 1, int(index) + 1
    return None


def _event_frames(events: list[Any]) -> list[Frame]:
    """SSE frames of events read whole by entry: the last event of an entry
    has the entry's id, an earlier one ``<id>.<k>`` (its index in the entry),
    so a client cut off mid-entry resumes at the event after the last one it
    got (events of one entry share a stream id)."""
    frames: list[Frame] = []
    k = 0
    for i, event in enumerate(events):
        last = i + 1 == len(events) or events[i + 1].id != event.id
        frames.append((str(event.id) if last else f"{event.id}.{k}", _event_doc(event)))
        k = 0 if last else k + 1
    return frames


async def _stream(
    request: Request,
    read: Callable[[], list[Frame]],
    timeout: float | None,
) -> AsyncIterator[bytes]:
    """Yield SSE frames from ``read`` (a blocking read of at most SSE_READ_S),
    heartbeats when idle; stop when the client goes away, ``timeout`` passes or
    the server shuts down (``app.state.stopping``, checked at least once a
    second: EventSource reconnects to the next server). A wiped space ends the
    stream after one ``space_lost`` error frame."""
    app = request.app
    checker = app.state.space_check

    def checked_read() -> list[Frame]:
        checker.check()  # at most one identity read a second (SpaceCheck)
        return read()

    limiter: anyio.CapacityLimiter = app.state.sse_limiter
    heartbeat: float = app.state.heartbeat
    stopping: threading.Event = app.state.stopping
    deadline = None if timeout is None else time.monotonic() + timeout
    last_sent = time.monotonic()
    delay = 0.1
    yield b": connected\n\n"
    while deadline is None or time.monotonic() < deadline:
        if stopping.is_set() or await request.is_disconnected():
            return
        try:
            items = await anyio.to_thread.run_sync(checked_read, limiter=limiter)
            delay = 0.1
        except TaskspaceError as exc:  # backend away: say so, back off, carry on
            _status, code = classify(exc)
            message = redact_text(" ".join(str(exc).split()))
            yield b"event: error\ndata: %s\n\n" % orjson.dumps(body(code, message))
            if isinstance(exc, SpaceLost):
                return  # for good: the server needs a restart
            pause_until = time.monotonic() + delay
            while not stopping.is_set() and time.monotonic() < pause_until:
                await anyio.sleep(min(0.25, max(0.0, pause_until - time.monotonic())))
            delay = min(delay * 2, TAILER_BACKOFF_MAX_S)
            continue
        if stopping.is_set():
            return
        for item in items:
            yield _sse(item)
        if items:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= heartbeat:
            yield b": keepalive\n\n"
            last_sent = time.monotonic()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "Server-Sent Events; each `data:` is one JSON item, `id:` its id.",
    },
    **M.json_responses(401, 422, 503),
}


def _stream_routes(api: APIRouter, space: Space) -> None:
    @api.get(
        "/events/stream", response_class=StreamingResponse, tags=["events"], responses=SSE_RESPONSES
    )
    def events_stream(
        request: Request,
        after: Annotated[
            int | None, Query(ge=0, le=M.MAX_STREAM_ID, description="Default: only new events.")
        ] = None,
        timeout: Annotated[
            float | None, Query(gt=0, le=86400, description="Close after this many seconds.")
        ] = None,
    ) -> StreamingResponse:
        """Follow task events as Server-Sent Events (resumable with Last-Event-ID)."""
        events = _events(space)
        start = _last_event_id(request, after)
        position, skip = (events.last_id(), 0) if start is None else start
        cursor = [position, skip]

        def read() -> list[Frame]:
            got = events.read(after=cursor[0], limit=TAILER_PAGE, wait=SSE_READ_S)
            frames = _event_frames(got)
            if cursor[1]:  # resuming mid-entry: drop what the client has of it
                partial = cursor[0] + 1
                frames = frames[sum(1 for e in got[: cursor[1]] if e.id == partial) :]
            cursor[1] = 0
            if got:
                cursor[0] = int(got[-1].id)
            return frames

        return StreamingResponse(
            _stream(request, read, timeout), media_type="text/event-stream", headers=SSE_HEADERS
        )

    @api.get(
        "/logs/stream", response_class=StreamingResponse, tags=["logs"], responses=SSE_RESPONSES
    )
    def logs_stream(
        request: Request,
        task_id: Annotated[str | None, Query(pattern=M.TASK_ID_PATTERN)] = None,
        worker: Annotated[str | None, Query(pattern=M.NAME_PATTERN)] = None,
        level: M.LevelName | None = None,
        after: Annotated[
            int | None, Query(ge=0, le=M.MAX_STREAM_ID, description="Default: only new records.")
        ] = None,
        timeout: Annotated[
            float | None, Query(gt=0, le=86400, description="Close after this many seconds.")
        ] = None,
    ) -> StreamingResponse:
        """Follow shipped log records as Server-Sent Events (resumable with Last-Event-ID)."""
        logs = _logs(space)
        from taskspace.logs import decode_record, parse_level

        minimum = parse_level(level)
        start = _last_event_id(request, after)  # one record per entry: no mid-entry resume
        cursor = [logs.last_id() if start is None else start[0] + (1 if start[1] else 0)]

        def read() -> list[Frame]:
            entries = space.store.streams.read(
                LOGS_STREAM, after=cursor[0], limit=TAILER_PAGE, wait=SSE_READ_S
            )
            out = []
            for entry in entries:
                cursor[0] = entry.id
                record = decode_record(entry)
                if (
                    record is not None
                    and (task_id is None or record.task_id == task_id)
                    and (worker is None or record.worker == worker)
                    and (minimum is None or record.levelno >= minimum)
                ):
                    out.append((str(entry.id), record.to_json()))
            return out

        return StreamingResponse(
            _stream(request, read, timeout), media_type="text/event-stream", headers=SSE_HEADERS
        )


# -- open routes: health and metrics -------------------------------------------------------------


def _open_routes(app: FastAPI, space: Space, metrics: EventMetrics, auth: Any) -> None:
    @app.get("/api/health", response_model=M.Health, tags=["health"], responses=responses(503))
    def health() -> dict[str, Any]:
        """200 if the backend answers, else 503 ``backend_unavailable`` (no token needed);
        503 ``space_lost`` if the space was wiped or replaced."""
        app.state.space_check.check(strict=True)
        return {"status": "ok", "backend": space.scheme}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        tags=["health"],
        dependencies=[Depends(auth), Depends(space_alive)],
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format.",
            },
            **M.json_responses(401),
        },
    )
    def prometheus() -> PlainTextResponse:
        """Prometheus metrics (see taskspace.api.metrics for the names)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
