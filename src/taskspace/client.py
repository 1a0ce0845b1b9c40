"""A client for the taskspace HTTP API (``taskspace serve``): submit, follow and
manage tasks from a machine with no access to the backend.

::

    from taskspace.client import Client

    with Client("http://tasks.internal:8750", token=os.environ["TASKSPACE_API_TOKEN"]) as c:
        task = c.submit("train", args=[{"C": 1.0}], queue="gpu")
        print(c.result(task["id"], wait=600))
        for record in c.follow_logs(task_id=task["id"], timeout=60):
            print(record["level"], record["message"])

Tasks are plain dicts, as the API returns them (see ``/docs``). Errors map
back to :mod:`taskspace.errors`: ``task_not_found`` → TaskNotFound,
``unknown_task`` → UnknownTask, ``invalid_argument`` → ConfigError, a failed
task's ``result`` → TaskFailed (TaskCancelled), a server that cannot reach its
backend (503) or cannot be reached itself → BackendError. A wrong or missing
token is a ConfigError saying so. Every call is bounded by ``timeout``.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

from taskspace.errors import (
    BackendError,
    ConfigError,
    MissingDependency,
    ResultTimeout,
    SpaceLost,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TaskspaceError,
    UnknownTask,
)

try:
    import httpx
except ImportError as exc:  # pragma: no cover - the client extra is missing
    raise MissingDependency(
        "taskspace.client needs httpx: pip install 'taskspace[client]'"
    ) from exc

FINAL_STATES = frozenset({"succeeded", "failed", "dead", "cancelled"})
WAIT_SLICE_S = 20.0  # one long poll; the server caps it at 30 s
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0


def _error_for(response: httpx.Response) -> TaskspaceError:
    """The taskspace exception for an error response."""
    from taskspace.api.errors import CODE_EXCEPTIONS

    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:500] or "no body"
    text = f"{code}: {message}"
    if code == "task_not_found":
        return TaskNotFound(response.request.url.path.split("/")[3])
    if code == "unknown_task":
        unknown = UnknownTask("?")
        unknown.args = (message,)
        return unknown
    cls = CODE_EXCEPTIONS.get(code)
    fallback: type[TaskspaceError] = BackendError if response.status_code >= 500 else ConfigError
    if cls is None or cls in (TaskFailed, TaskCancelled):
        cls = fallback
    try:
        return cls(text)
    except TypeError:  # a class that needs fields the body does not carry
        return fallback(text)


class Client:
    """A client of one taskspace server. Thread-safe (one connection pool);
    ``close()`` (or ``with``) releases it.

    ``url``: the server (``http://host:8750``); ``token``: its API token (sent
    as a bearer token); ``timeout``: seconds for each call (long polls and
    streams add their own wait to it). ConfigError for a bad argument."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"url must be an http(s) URL of a taskspace server, got {url!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("token must be a non-empty string or None")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"<taskspace.Client {self.url}>"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> Any:
        clean = None if params is None else {k: v for k, v in params.items() if v is not None}
        try:
            response = self._http.request(method, path, params=clean, json=json,
                                          timeout=timeout or self.timeout)  # fmt: skip
        except httpx.HTTPError as exc:
            raise BackendError(f"taskspace server at {self.url} unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            raise _error_for(response)
        try:
            return response.json()
        except ValueError as exc:
            raise BackendError(f"{method} {path}: the server sent no JSON") from exc

    @staticmethod
    def _task_path(task_id: str, suffix: str = "") -> str:
        if not isinstance(task_id, str) or not task_id or "/" in task_id:
            raise ConfigError(f"task_id must be a task id string, got {task_id!r}")
        return f"/api/tasks/{task_id}{suffix}"

    # -- tasks --------------------------------------------------------------------------------

    def submit(
        self,
        name: str,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        countdown: float | None = None,
        dedup_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit the task registered as ``name`` on the server's app; returns the
        task (``["id"]``). UnknownTask if the server does not register it;
        ConfigError (nothing submitted) for bad arguments. The task id is chosen
        here, so a submit that met a server or backend outage is retried (for
        up to ``timeout`` seconds) without ever making a second task; then
        BackendError."""
        body: dict[str, Any] = {"name": name, "args": list(args), "kwargs": kwargs or {},
                                "id": os.urandom(16).hex()}  # fmt: skip
        for key, value in (("queue", queue), ("priority", priority), ("countdown", countdown),
                           ("dedup_key", dedup_key)):  # fmt: skip
            if value is not None:
                body[key] = value
        deadline = time.monotonic() + self.timeout
        delay = BACKOFF_START_S
        while True:
            try:
                return dict(self._call("POST", "/api/tasks", json=body))
            except SpaceLost:
                raise  # the space was wiped: retrying cannot help
            except BackendError:
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    def get(self, task_id: str, wait: float = 0.0) -> dict[str, Any]:
        """The task in full (TaskNotFound if there is none); with ``wait`` (at
        most 30), the server first waits that long for it to end."""
        return dict(self._call("GET", self._task_path(task_id), params={"wait": wait or None},
                               timeout=self.timeout + float(wait or 0)))  # fmt: skip

    def result(self, task_id: str, wait: float | None = None) -> Any:
        """Wait up to ``wait`` seconds (None: for ever) for the task and return its
        value. TaskFailed (remote type, message, traceback) if it failed or
        died, TaskCancelled if cancelled, ResultTimeout if it has not ended in
        time. A server or backend that is away is waited out until the
        deadline (then ResultTimeout chained to the BackendError)."""
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, int | float)
                                 or wait < 0):  # fmt: skip
            raise ConfigError(f"wait must be a number of seconds >= 0 or None, got {wait!r}")
        deadline = None if wait is None else time.monotonic() + wait
        delay = BACKOFF_START_S
        while True:
            left = WAIT_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                task = self.get(task_id, wait=round(min(left, WAIT_SLICE_S), 3))
            except SpaceLost:
                raise
            except BackendError as exc:
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise ResultTimeout(
                        f"task {task_id}: no result within {wait} s; {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            delay = BACKOFF_START_S
            if task["state"] in FINAL_STATES:
                return self._value(task)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"task {task_id} still {task['state']} after waiting {wait} s")

    @staticmethod
    def _value(task: dict[str, Any]) -> Any:
        if task["state"] == "succeeded":
            return task["result"]
        error = task.get("error") or {}
        cls = TaskCancelled if task["state"] == "cancelled" else TaskFailed
        default = "Cancelled" if cls is TaskCancelled else "Error"
        raise cls(
            task["id"],
            task["state"],
            str(error.get("type", default)),
            str(error.get("message", task["state"])),
            str(task.get("traceback") or ""),
        )

    def cancel(self, task_id: str, terminate: bool = False) -> dict[str, Any]:
        """Cancel a task (a running one is asked to stop); returns the task."""
        if not isinstance(terminate, bool):
            raise ConfigError(f"terminate must be True or False, got {terminate!r}")
        params = {"terminate": "true"} if terminate else None
        return dict(self._call("POST", self._task_path(task_id, "/cancel"), params=params))

    def retry(self, task_id: str) -> dict[str, Any]:
        """Requeue a failed or dead task; ConfigError (``invalid_state``) otherwise."""
        return dict(self._call("POST", self._task_path(task_id, "/retry")))

    def retry_many(self, ids: builtins.list[str]) -> dict[str, builtins.list[str]]:
        """Requeue every failed or dead task of ``ids``: ``{"retried", "skipped"}``."""
        return dict(self._call("POST", "/api/dead/retry", json={"ids": list(ids)}))

    def list(
        self,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of tasks, oldest first: ``{"items": [...], "next_cursor"}``."""
        params = {"state": state, "queue": queue, "name": name, "limit": limit, "cursor": cursor}
        return dict(self._call("GET", "/api/tasks", params=params))

    def iter_tasks(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every task matching ``filters`` (as :meth:`list`), page by page."""
        cursor = None
        while True:
            page = self.list(cursor=cursor, **filters)
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    # -- queues, workers, logs, events ------------------------------------------------------

    def queues(self) -> builtins.list[dict[str, Any]]:
        """Every queue: ``name``, ``counts`` by state, ``oldest_age``."""
        return list(self._call("GET", "/api/queues"))

    def workers(self) -> builtins.list[dict[str, Any]]:
        """The live workers."""
        return list(self._call("GET", "/api/workers"))

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", ...}``; BackendError if the server cannot reach its backend."""
        return dict(self._call("GET", "/api/health"))

    def logs(
        self,
        task_id: str | None = None,
        worker: str | None = None,
        level: str | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 200,
    ) -> dict[str, Any]:
        """Shipped log records: ``{"items": [...], "last_id"}`` (pass ``last_id``
        as ``after`` for the next page)."""
        return dict(self._call("GET", "/api/logs", params={
            "task_id": task_id, "worker": worker, "level": level, "since": since,
            "after": after, "limit": limit}))  # fmt: skip

    def events(self, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """Task events: ``{"items": [...], "last_id"}``."""
        return dict(self._call("GET", "/api/events", params={"after": after, "limit": limit}))

    def usage(self) -> dict[str, Any]:
        """Tokens and cost recorded by tasks, by task and by model."""
        return dict(self._call("GET", "/api/usage"))

    def follow_logs(
        self,
        task_id: str | None = None,
        worker: str | None = None,
        level: str | None = None,
        after: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Log records as they are shipped (None ``after``: only new ones), until
        ``timeout`` seconds have passed (None: until the caller stops)."""
        params = {"task_id": task_id, "worker": worker, "level": level, "after": after,
                  "timeout": timeout}  # fmt: skip
        return self._follow("/api/logs/stream", params)

    def follow_events(
        self, after: int | None = None, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Task events as they happen (None ``after``: only new ones), until
        ``timeout`` seconds have passed (None: until the caller stops)."""
        return self._follow("/api/events/stream", {"after": after, "timeout": timeout})

    def _follow(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import orjson

        clean = {k: v for k, v in params.items() if v is not None}
        # Reads wait at most heartbeat + timeout: the server sends a comment when idle.
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 60.0))
        try:
            headers = {"Accept": "text/event-stream"}
            with self._http.stream(
                "GET", path, params=clean, timeout=timeout, headers=headers
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_for(response)
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        doc = orjson.loads(line[6:])
                        if "error" in doc and set(doc) == {"error"}:
                            continue  # the server's backend blipped; it carries on
                        yield doc
        except httpx.HTTPError as exc:
            raise BackendError(f"taskspace server at {self.url}: stream broke: {exc!r}") from exc
