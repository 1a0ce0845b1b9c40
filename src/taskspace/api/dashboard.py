"""The dashboard: server-rendered HTML pages over a Space, served at ``/`` by
``taskspace serve`` (``create_app`` includes :data:`router`).

Pages: ``/`` queues (depths, throughput, latency sparkline, live events),
``/workers``, ``/tasks`` (filters, cursor paging), ``/tasks/{id}`` (arguments,
result, error, timings, live logs, cancel/retry), ``/dead`` (bulk retry),
``/logs`` (live) and ``/usage``. Each page has a ``/partials/...`` twin that
returns only its live part, which the page's script re-fetches when an event
arrives (EventSource on ``/api/events/stream`` and ``/api/logs/stream``) or,
without one, every few seconds. Actions call the JSON API (``POST
/api/tasks/{id}/cancel``, ``/retry``, ``/api/dead/retry``).

Every page and partial reads ``request.app.state.space`` and needs the API
token when the app has one (``taskspace.api.auth.require_token``: a bearer
header or the ``taskspace_token`` cookie, which ``/login`` sets). A backend
that is down gives a 503 page, an unknown task a 404 page, a bad filter a 400
page naming it; no page writes anything.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from taskspace.api import dashboard_data as data
from taskspace.api.auth import COOKIE as TOKEN_COOKIE
from taskspace.api.auth import require_token, token_matches
from taskspace.api.errors import ApiError, redact_text
from taskspace.backends.base import TASK_STATES
from taskspace.errors import BackendError, ConfigError, SpaceLost, TaskNotFound, TaskspaceError
from taskspace.space import Space

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
STATIC_FILES = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())
PAGE_LIMIT = 50
PAGE_LIMIT_MAX = 500
TASK_LOGS_MAX = 1000
LOG_VIEW_MAX = 500
LOG_VIEW_WINDOWS_S = (600.0, 120.0, 30.0, 5.0)
CLOCK_SLACK_S = 60.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEAD_STATES = ("dead", "failed")
ORDERS = ("submitted", "recent")
NONE = "\u2013"  # an en dash: no value
NAV = (
    ("/", "Queues"),
    ("/workers", "Workers"),
    ("/tasks", "Tasks"),
    ("/dead", "Dead"),
    ("/logs", "Logs"),
    ("/usage", "Usage"),
)


def _page_auth(request: Request) -> None:
    """:func:`~taskspace.api.auth.require_token` for pages: a browser without
    the token is sent to ``/login`` (303), which returns it here after."""
    try:
        require_token(request)
    except ApiError as exc:
        if exc.status != 401:
            raise
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        location = f"{_base(request)}/login?{urlencode({'next': path})}"
        raise HTTPException(303, "sign in first", headers={"Location": location}) from None


router = APIRouter(include_in_schema=False)
_auth = [Depends(require_token)]  # partials and data: a plain 401
_page = [Depends(_page_auth)]


# -- rendering -----------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return NONE
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _ago_phrase(seconds: float | None) -> str:
    text = _ago(seconds)
    return text if text in (NONE, "now") else f"{text} ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return _ago(seconds)


def _num(value: float | None) -> str:
    return NONE if value is None else f"{value:,.6g}"


def _clock(wall: float | None) -> str:
    if wall is None:
        return NONE
    return datetime.fromtimestamp(wall, UTC).strftime("%H:%M:%S")


def _stamp(wall: float | None) -> str:
    if wall is None:
        return NONE
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
templates.env.filters.update(
    ago=_ago, ago_phrase=_ago_phrase, duration=_duration, stamp=_stamp, clock=_clock, num=_num
)
templates.env.globals.update(nav=NAV, states=TASK_STATES, log_levels=LOG_LEVELS)


def _space(request: Request) -> Space:
    space = getattr(request.app.state, "space", None)
    if not isinstance(space, Space):
        raise HTTPException(500, "app.state.space is not a taskspace.Space")
    return space


def _base(request: Request) -> str:
    """The path the app is mounted at ("" at the root), prefixed to every link."""
    return str(request.scope.get("root_path", "")).rstrip("/")


_digest_lock = threading.Lock()


def _digest(request: Request) -> data.EventDigest:
    """The app's event digest (one per app and space), refreshed."""
    space = _space(request)
    with _digest_lock:
        digest = getattr(request.app.state, "dashboard_digest", None)
        if not isinstance(digest, data.EventDigest) or digest.space is not space:
            digest = data.EventDigest(space)
            request.app.state.dashboard_digest = digest
    digest.refresh()
    return digest


def _render(
    request: Request, template: str, build: Callable[[], dict[str, Any]], page: str = ""
) -> Response:
    """Render ``template`` with what ``build`` returns, or an error page: 400
    for a bad filter, 404 for an unknown task, 503 for a backend that is down."""
    try:
        _check_space(request)
        context = build()
        status = 200
    except TaskNotFound as exc:
        template, status, context = "error.html", 404, {"message": str(exc)}
    except SpaceLost as exc:
        message = f"the space was wiped or replaced; restart the server: {redact_text(str(exc))}"
        template, status, context = "error.html", 503, {"message": message}
    except BackendError as exc:
        message = f"backend unavailable: {redact_text(str(exc))}"
        template, status, context = "error.html", 503, {"message": message}
    except TaskspaceError as exc:  # ConfigError and the like: a bad filter
        template, status, context = "error.html", 400, {"message": redact_text(str(exc))}
    space = _space(request)
    context.setdefault("page", page)
    digest = getattr(request.app.state, "dashboard_digest", None)
    events_after = None
    if isinstance(digest, data.EventDigest) and digest.available and digest.caught_up:
        events_after = digest.last_id  # pages follow events from here (else: only new ones)
    context.update(
        space_url=data.redact_url(space.url),
        rendered=time.time(),
        base=_base(request),
        events_after=events_after,
    )
    return templates.TemplateResponse(request, template, context, status_code=status)


def _check_space(request: Request) -> None:
    """SpaceLost if the space was wiped (the API's cached check, when present)."""
    checker = getattr(request.app.state, "space_check", None)
    check = getattr(checker, "check", None)
    if callable(check):
        check()


# -- pages -----------------------------------------------------------------------


def _queues(request: Request) -> dict[str, Any]:
    space = _space(request)
    digest = _digest(request)  # first, as in _tasks
    stats = space.stats()
    return {
        "rows": data.queue_rows(space, stats, digest),
        "stale_finishes": stats.stale_finishes,
        "events_available": digest.available,
        "events_error": digest.error,
        "recent": list(digest.recent)[-20:][::-1],
        "window_min": data.WINDOW_S / 60,
        "throughput_min": data.THROUGHPUT_S / 60,
    }


@router.get("/", dependencies=_page)
def queues_page(request: Request) -> Response:
    """Queues: depths by state, throughput, latency sparkline; live events."""
    return _render(request, "queues.html", lambda: _queues(request), "/")


@router.get("/partials/queues", dependencies=_auth)
def queues_partial(request: Request) -> Response:
    """The queue table alone (re-fetched by the page)."""
    return _render(request, "_queues.html", lambda: _queues(request), "/")


def _workers(request: Request) -> dict[str, Any]:
    space = _space(request)
    return {"workers": data.worker_rows(space), "maintainer": data.maintainer(space)}


@router.get("/workers", dependencies=_page)
def workers_page(request: Request) -> Response:
    """Live workers: capabilities, load, health, last heartbeat."""
    return _render(request, "workers.html", lambda: _workers(request), "/workers")


@router.get("/partials/workers", dependencies=_auth)
def workers_partial(request: Request) -> Response:
    """The worker table alone."""
    return _render(request, "_workers.html", lambda: _workers(request), "/workers")


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return PAGE_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE_LIMIT_MAX:
        raise ConfigError(f"limit must be an integer from 1 to {PAGE_LIMIT_MAX}, got {value!r}")
    return limit


def _tasks(
    request: Request,
    path: str = "/tasks",
    states: tuple[str, ...] = TASK_STATES,
    default_state: str | None = None,
) -> dict[str, Any]:
    space = _space(request)
    q = request.query_params
    state = q.get("state") or default_state
    if state is not None and state not in states:
        raise ConfigError(f"unknown state {state!r}; valid: {', '.join(states)}")
    order = q.get("order") or "submitted"
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    filters = {"state": state, "queue": q.get("queue") or None, "name": q.get("name") or None}
    limit = _limit(q.get("limit"))
    after = q.get("after") or None
    digest = _digest(request)  # first: an event after the rows are read is followed, not lost
    if order == "recent":
        rows = data.recently_active(space, digest, limit=limit, **filters)
        after = next_cursor = None
    else:
        rows = space.tasks(limit=limit, after=after, **filters)
        next_cursor = rows[-1].id if len(rows) == limit else None
    kept = {k: v for k, v in {**filters, "limit": str(limit)}.items() if v}
    href = f"{_base(request)}{path}?"
    return {
        "rows": rows,
        "filters": filters,
        "order": order,
        "limit": limit,
        "after": after,
        "next_cursor": next_cursor,
        "first_href": href + urlencode(kept),
        "next_href": href + urlencode({**kept, "after": next_cursor or ""}),
        "order_hrefs": {o: href + urlencode({**kept, "order": o}) for o in ORDERS},
        "selectable": path == "/dead",
        "queues": sorted(space.stats().counts),
        "names": sorted(set(space.task_names) | set(digest.names())),
        "now": space.store.clock.wall(),
        "query": str(q),
        "events_available": digest.available,
        "window_min": data.WINDOW_S / 60,
    }


@router.get("/tasks", dependencies=_page)
def tasks_page(request: Request) -> Response:
    """The task table: filters by state, queue and name; in submission order
    with cursor paging, or (``order=recent``) the tasks with an event in the
    last minutes, latest first."""
    return _render(request, "tasks.html", lambda: _tasks(request), "/tasks")


@router.get("/partials/tasks", dependencies=_auth)
def tasks_partial(request: Request) -> Response:
    """The task table's rows alone."""
    return _render(request, "_tasks.html", lambda: _tasks(request), "/tasks")


def _task(request: Request, task_id: str) -> dict[str, Any]:
    space = _space(request)
    digest = _digest(request)  # first, as in _tasks
    return data.task_detail(space, space.handle(task_id).info(), digest)


def _task_logs(request: Request, task_id: str, created: float) -> dict[str, Any]:
    space = _space(request)
    try:
        logs = space.logs
    except (ImportError, AttributeError):
        return {"logs": [], "logs_available": False}
    follow_after = logs.last_id()  # read first: a record in between shows once, not never
    # Nothing of the task was logged before it was created (CLOCK_SLACK_S: producers' clocks).
    since = created - CLOCK_SLACK_S
    records = logs.query(task_id=task_id, since=since, limit=TASK_LOGS_MAX)
    return {
        "logs": records,
        "logs_available": True,
        "hide_task": True,
        "follow_after": follow_after,
    }


def _task_with_logs(request: Request, task_id: str) -> dict[str, Any]:
    detail = _task(request, task_id)
    return {**detail, **_task_logs(request, task_id, detail["record"].created)}


@router.get("/tasks/{task_id}", dependencies=_page)
def task_page(request: Request, task_id: str) -> Response:
    """One task: arguments, result or error, attempts, timings, live logs, actions."""
    return _render(
        request,
        "task.html",
        lambda: _task_with_logs(request, task_id),
        "/tasks",
    )


@router.get("/partials/tasks/{task_id}", dependencies=_auth)
def task_partial(request: Request, task_id: str) -> Response:
    """A task's detail alone (state, buttons, result, error, timings)."""
    return _render(request, "_task.html", lambda: _task(request, task_id), "/tasks")


def _dead(request: Request) -> dict[str, Any]:
    return _tasks(request, "/dead", states=DEAD_STATES, default_state="dead")


@router.get("/dead", dependencies=_page)
def dead_page(request: Request) -> Response:
    """Dead (or, with ``?state=failed``, failed) tasks with bulk retry."""
    return _render(request, "dead.html", lambda: _dead(request), "/dead")


@router.get("/partials/dead", dependencies=_auth)
def dead_partial(request: Request) -> Response:
    """The dead-task table alone."""
    return _render(request, "_tasks.html", lambda: _dead(request), "/dead")


def _logs(request: Request) -> dict[str, Any]:
    space = _space(request)
    q = request.query_params
    filters = {
        "task_id": q.get("task_id") or None,
        "worker": q.get("worker") or None,
        "level": q.get("level") or None,
    }
    if filters["level"] is not None and filters["level"] not in LOG_LEVELS:
        raise ConfigError(f"unknown level {filters['level']!r}; valid: {', '.join(LOG_LEVELS)}")
    follow_query = urlencode({k: v for k, v in filters.items() if v})
    try:
        logs = space.logs
    except (ImportError, AttributeError):
        return {"logs": [], "logs_available": False, "filters": filters, "follow_query": ""}
    now = space.store.clock.wall()
    follow_after = logs.last_id()
    # The newest records: the widest window whose records fit in one view.
    for window in LOG_VIEW_WINDOWS_S:
        records = logs.query(
            task_id=filters["task_id"], worker=filters["worker"], level=filters["level"],
            since=now - window, limit=LOG_VIEW_MAX,
        )  # fmt: skip
        if len(records) < LOG_VIEW_MAX:
            break
    return {
        "logs": records,
        "logs_available": True,
        "filters": filters,
        "truncated": len(records) == LOG_VIEW_MAX,
        "follow_query": follow_query,
        "follow_after": follow_after,
        "window": window,
    }


@router.get("/logs", dependencies=_page)
def logs_page(request: Request) -> Response:
    """Logs of the last minutes, then followed live (filters: task, worker, level)."""
    return _render(request, "logs.html", lambda: _logs(request), "/logs")


def _usage(request: Request) -> dict[str, Any]:
    totals = getattr(request.app.state, "usage", None)
    snapshot = getattr(totals, "snapshot", None)
    if snapshot is None:
        return {"usage_available": False}
    return {"usage_available": True, **data.usage_rows(snapshot())}


@router.get("/usage", dependencies=_page)
def usage_page(request: Request) -> Response:
    """Tokens and cost per task name and model (from ``usage`` events)."""
    return _render(request, "usage.html", lambda: _usage(request), "/usage")


@router.get("/partials/usage", dependencies=_auth)
def usage_partial(request: Request) -> Response:
    """The usage tables alone."""
    return _render(request, "_usage.html", lambda: _usage(request), "/usage")


# -- login and static files (no token needed) ----------------------------------------


@router.get("/login")
def login_page(request: Request) -> Response:
    """A form asking for the API token (stored as an HttpOnly cookie)."""
    if getattr(request.app.state, "token", None) is None:
        return RedirectResponse(f"{_base(request)}/", status_code=303)
    context = {"page": "", "space_url": "", "next": _safe_next(request.query_params.get("next"))}
    return templates.TemplateResponse(request, "login.html", context)


def _safe_next(value: str | None) -> str:
    """A same-site path to return to after login: one ``/`` then anything but
    a second ``/`` first, with no backslash, whitespace or control character
    (browsers drop TAB/CR/LF, so ``/\t/evil.example`` would become
    ``//evil.example``); anything else gives ``/``."""
    if not value or not _SAFE_NEXT.fullmatch(value) or not _SAFE_DECODED.fullmatch(unquote(value)):
        return "/"  # percent-decoded too: ``/%09/evil`` sent encoded twice is refused as well
    return value


_SAFE_NEXT = re.compile(r"/(?:[^/\\\s\x00-\x1f\x7f][^\\\s\x00-\x1f\x7f]*)?")
_SAFE_DECODED = re.compile(r"/(?:[^/\\\x00-\x1f\x7f][^\\\x00-\x1f\x7f]*)?")


@router.post("/login")
async def login(request: Request) -> Response:
    """Check ``{"token": ...}`` against the app's token (constant time) and
    set the ``taskspace_token`` cookie; 401 with a JSON error otherwise."""
    expected = getattr(request.app.state, "token", None)
    try:
        body = await request.json()
    except ValueError:
        body = None
    given = body.get("token") if isinstance(body, dict) else None
    if not isinstance(given, str) or expected is None:
        return _json_error(400, "bad_request", 'send {"token": "<the API token>"}')
    if not token_matches(given, str(expected)):
        return _json_error(401, "unauthorized", "wrong token")
    response = JSONResponse({"ok": True})
    response.set_cookie(
        TOKEN_COOKIE, given, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )  # fmt: skip
    return response


def _json_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The dashboard's CSS and JS (only the files shipped with it)."""
    if name not in STATIC_FILES:
        return _json_error(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})
