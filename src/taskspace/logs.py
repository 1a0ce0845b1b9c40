"""Log aggregation: every worker's log records, with task context, on the stream ``taskspace/logs``.

Writing: :class:`Handler` is a ``logging.Handler`` (a worker installs one
on the root logger by default) that ships records in batches from a
background thread (:class:`taskspace.events.Shipper`: one
``append_many`` per batch, at most ``interval`` seconds after the record).
Each record carries the task id, task name and attempt of the task running
in the logging thread or asyncio task (``current_task()``; for
process-isolated tasks the child sends its records to its worker over the
attempt's pipe), the worker's name, the host, level, logger, message and
exception text. Output a task writes with ``print`` (``sys.stdout`` /
``sys.stderr``) is captured too when :func:`install` is asked to
(``capture_print``, on in workers): it still reaches the original stream,
and each complete line becomes a record of logger ``task.stdout`` (INFO) or
``task.stderr`` (WARNING). Output outside a task is not captured.

Outages: a handler that cannot reach the backend keeps at most
``capacity`` records (HANDLER_CAPACITY, 10,000), drops the oldest beyond
that, and once the backend answers again ships a WARNING record "dropped N
log records while the backend was unreachable" (and logs it locally). A
handler never blocks or raises into the code that logs.

Retention: by size, each record's message is cut to MAX_MESSAGE_CHARS and
its exception text to MAX_EXC_CHARS, and producers trim the stream to
LOGS_MAXLEN records at least every second (see ``events.TRIM_EVERY_S``), so
it holds at most about LOGS_MAXLEN x 25 KB; by age, the elected maintainer
drops records older than LOGS_MAX_AGE_S (``worker.maintainer``).

Reading: :class:`Logs` (``space.logs``) queries and follows with filters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from taskspace.errors import BackendError, ConfigError, SpaceLost
from taskspace.events import (
    CLOSE_TIMEOUT_S,
    FOLLOW_WAIT_S,
    READ_PAGE,
    SHIPPER_THREADS,
    Shipper,
    _check_int,
    first_id_since,
    last_stream_id,
)
from taskspace.tasks.context import TaskContext, _current

if TYPE_CHECKING:
    from taskspace.backends.base import Store, StreamEntry
    from taskspace.space import Space

log = logging.getLogger("taskspace.logs")

LOGS_STREAM = "taskspace/logs"
LOGS_MAXLEN = 200_000
LOGS_MAX_AGE_S = 3 * 24 * 3600.0
FOLLOW_RETRY_S = 0.1  # follow's first back-off after a backend error, doubling to
FOLLOW_RETRY_MAX_S = 2.0  # this
HANDLER_CAPACITY = 10_000
HANDLER_INTERVAL_S = 0.25
MAX_MESSAGE_CHARS = 8_192
MAX_EXC_CHARS = 16_384
# A partial line of captured output is shipped once it is this long.
MAX_PARTIAL_CHARS = 8_192
# Entries appended this long before ``since`` are scanned too (producers' clocks differ).
SINCE_SLACK_S = 5.0
HOST = socket.gethostname()
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One shipped log record. ``id``: the stream id; ``time``: when it was
    logged (unix seconds, the logging process's clock); task fields are None
    for records logged outside a task."""

    id: int
    time: float
    level: str
    levelno: int
    logger: str
    message: str
    task_id: str | None
    task: str | None
    attempt: int | None
    worker: str | None
    host: str
    exc: str | None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (every field, None included)."""
        return {
            "id": self.id,
            "time": self.time,
            "level": self.level,
            "levelno": self.levelno,
            "logger": self.logger,
            "message": self.message,
            "task_id": self.task_id,
            "task": self.task,
            "attempt": self.attempt,
            "worker": self.worker,
            "host": self.host,
            "exc": self.exc,
        }


def decode_record(entry: StreamEntry) -> LogRecord | None:
    """The record stored in ``entry``, or None if it is not one (skipped by readers)."""
    try:
        doc = orjson.loads(entry.data)
        attempt = doc.get("attempt")
        return LogRecord(
            id=entry.id,
            time=float(doc.get("time") or entry.time),
            level=str(doc["level"]),
            levelno=int(doc["levelno"]),
            logger=str(doc.get("logger") or ""),
            message=str(doc.get("message") or ""),
            task_id=doc.get("task_id"),
            task=doc.get("task"),
            attempt=None if attempt is None else int(attempt),
            worker=doc.get("worker"),
            host=str(doc.get("host") or ""),
            exc=doc.get("exc"),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def parse_level(level: str | int | None) -> int | None:
    """A level name (any case: debug, info, warning, error, critical) or
    number as a number; None stays None; ConfigError otherwise."""
    if level is None:
        return None
    if isinstance(level, bool):
        raise ConfigError(f"level must be a level name or number, got {level!r}")
    if isinstance(level, int):
        if level < 0:
            raise ConfigError(f"level must be >= 0, got {level!r}")
        return level
    if isinstance(level, str) and level.upper() in LEVEL_NAMES:
        return int(logging.getLevelName(level.upper()))
    raise ConfigError(f"unknown level {level!r}; valid: {', '.join(LEVEL_NAMES)} or a number")


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} characters cut]"


def _payload(
    levelno: int,
    level: str,
    logger: str,
    message: str,
    created: float,
    ctx: TaskContext | None,
    worker: str | None,
    exc: str | None,
    extra: logging.LogRecord | None = None,
) -> dict[str, Any]:
    task_id: str | None = None
    task: str | None = None
    attempt: int | None = None
    if ctx is not None:
        task_id, task, attempt = ctx.id, ctx.name, ctx.attempt
        worker = worker or ctx.worker
    elif extra is not None:  # the worker's own lines about a task carry these attributes
        task_id = getattr(extra, "task_id", None)
        task = getattr(extra, "task", None)
        attempt = getattr(extra, "attempt", None)
        worker = worker or getattr(extra, "worker", None)
    return {
        "time": created,
        "level": level,
        "levelno": levelno,
        "logger": logger,
        "message": _cut(message, MAX_MESSAGE_CHARS),
        "task_id": task_id,
        "task": task,
        "attempt": attempt,
        "worker": worker,
        "host": HOST,
        "exc": None if exc is None else _cut(exc, MAX_EXC_CHARS),
    }


# In a forked task process: where records go instead (the pipe to the worker).
_fork_sink: Callable[[dict[str, Any]], None] | None = None
_handlers: dict[str | None, Handler] = {}
_handlers_lock = threading.Lock()


def set_fork_sink(sink: Callable[[dict[str, Any]], None] | None) -> None:
    """In a forked task process: send every record to ``sink`` (the worker
    forwards them with :func:`ship_payload`)."""
    global _fork_sink
    _fork_sink = sink


def ship_payload(worker: str | None, payload: dict[str, Any]) -> None:
    """Ship a record that a task process sent to its worker ``worker``."""
    handler = _handlers.get(worker)
    if handler is not None:
        handler.shipper.put(payload)


class Handler(logging.Handler):
    """A logging handler that ships records to the space's LOGS_STREAM in
    batches (see the module docstring: bounded buffer, background thread,
    drop count reported, flush on close).

    ``worker``: the worker name recorded with each record (a worker passes
    its own); when several workers share a process, a record logged inside
    another worker's task is left to that worker's handler, and one logged
    outside any task is shipped once, by the first installed handler still
    installed (:func:`install`). ``store``: the
    store to write to (default ``space.store``). ConfigError for a capacity
    or interval out of range."""

    def __init__(
        self,
        space: Space,
        *,
        worker: str | None = None,
        level: int | str = logging.NOTSET,
        capacity: int = HANDLER_CAPACITY,
        interval: float = HANDLER_INTERVAL_S,
        store: Callable[[], Store] | None = None,
    ) -> None:
        super().__init__(parse_level(level) or logging.NOTSET)
        self.space = space
        self.worker = worker
        self._pid = os.getpid()
        self._exc_formatter = logging.Formatter()
        self.shipper: Shipper[dict[str, Any]] = Shipper(
            store or (lambda: space.store), LOGS_STREAM, orjson.dumps, maxlen=LOGS_MAXLEN,
            capacity=capacity, interval=interval, name="taskspace-logs",
            on_recovered=self._report_dropped,
        )  # fmt: skip

    @property
    def dropped(self) -> int:
        """Records dropped (buffer full while the backend was unreachable) so far."""
        return self.shipper.dropped

    def emit(self, record: logging.LogRecord) -> None:
        """Buffer ``record`` for shipping; never blocks on the backend."""
        if record.thread in SHIPPER_THREADS:
            return  # the shippers' own complaints: shipping them could loop
        ctx = _current.get()
        if ctx is not None and self.worker is not None and ctx.worker != self.worker:
            return  # another worker of this process ships its tasks' records
        if ctx is None and not self._ships_unowned():
            return  # another installed handler ships the process's own records
        try:
            exc = None
            if record.exc_info:
                exc = self._exc_formatter.formatException(record.exc_info)
            elif record.exc_text:
                exc = record.exc_text
            message = self.format(record) if self.formatter is not None else record.getMessage()
            payload = _payload(record.levelno, record.levelname, record.name, message,
                               record.created, ctx, self.worker, exc, record)  # fmt: skip
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)
            return
        self.ship(payload)

    def _ships_unowned(self) -> bool:
        """True if this handler ships records logged outside any task: it is
        the first installed handler (dicts keep insertion order), or it was
        never installed (added to a logger by hand)."""
        installed = tuple(_handlers.values())
        return not installed or installed[0] is self or self not in installed

    def ship(self, payload: dict[str, Any]) -> None:
        """Buffer an already-built record (forwarded by a forked task process
        when this is one)."""
        if os.getpid() != self._pid:
            if _fork_sink is not None:
                _fork_sink(payload)
            return
        self.shipper.put(payload)

    def ship_line(self, ctx: TaskContext, stream: str, line: str) -> None:
        """Ship one line a task wrote to ``stream`` (``stdout``/``stderr``)."""
        levelno = logging.INFO if stream == "stdout" else logging.WARNING
        self.ship(_payload(levelno, logging.getLevelName(levelno), f"task.{stream}", line,
                           time.time(), ctx, self.worker, None))  # fmt: skip

    def _report_dropped(self, n: int) -> None:
        message = f"dropped {n} log records while the backend was unreachable"
        log.warning("%s", message)  # locally (never shipped: this is a shipper thread)
        self.shipper.put(_payload(logging.WARNING, "WARNING", "taskspace.logs", message,
                                  time.time(), None, self.worker, None))  # fmt: skip

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Wait up to ``timeout`` seconds for the buffered records to be stored."""
        self.shipper.flush(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Ship what is buffered (at most ``timeout`` seconds) and stop."""
        left = self.shipper.close(timeout)
        if left:
            log.warning("%d log records not stored at close (backend unreachable)", left)
        super().close()


# -- print capture -------------------------------------------------------------------------

_partial: dict[tuple[int, str], tuple[TaskContext, str]] = {}
_partial_lock = threading.Lock()
_capture_users = 0
_originals: tuple[TextIO, TextIO] | None = None


class TaskOutput:
    """Stands in for ``sys.stdout``/``sys.stderr``: every write goes to the
    original stream; a write made inside a task (a bound ``current_task()``)
    is also shipped, one record per complete line."""

    def __init__(self, original: TextIO, stream: str) -> None:
        self._original = original
        self._stream = stream

    def write(self, text: str) -> int:
        written = self._original.write(text)
        ctx = _current.get()
        if ctx is not None and text:
            with contextlib.suppress(Exception):  # capture must never break a print
                _capture(ctx, self._stream, text)
        return written

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _handler_for(ctx: TaskContext) -> Handler | None:
    return _handlers.get(ctx.worker) or _handlers.get(None)


def _capture(ctx: TaskContext, stream: str, text: str) -> None:
    key = (id(ctx), stream)
    with _partial_lock:
        held = _partial.pop(key, None)
        if held is not None and held[0] is ctx:
            text = held[1] + text
        *lines, rest = text.split("\n")
        if len(rest) >= MAX_PARTIAL_CHARS:
            lines.append(rest)
            rest = ""
        if rest:
            _partial[key] = (ctx, rest)
    handler = _handler_for(ctx)
    if handler is not None:
        for line in lines:
            handler.ship_line(ctx, stream, line)


def end_task_output(ctx: TaskContext) -> None:
    """Ship what a task printed without a final newline (the worker calls it
    when the attempt ends)."""
    if not _partial:
        return
    with _partial_lock:
        held = [(s, _partial.pop((id(ctx), s), None)) for s in ("stdout", "stderr")]
    handler = _handler_for(ctx)
    for stream, item in held:
        if item is not None and item[0] is ctx and handler is not None:
            handler.ship_line(ctx, stream, item[1])


def install(handler: Handler, capture_print: bool = True) -> Callable[[], None]:
    """Add ``handler`` to the root logger and, with ``capture_print``, route
    task output to it (sys.stdout/stderr are wrapped while any installer
    wants it). Returns the function that undoes this (it does not close the
    handler)."""
    global _capture_users, _originals
    logging.getLogger().addHandler(handler)
    with _handlers_lock:
        _handlers[handler.worker] = handler
        if capture_print:
            _capture_users += 1
            if _capture_users == 1:
                _originals = (sys.stdout, sys.stderr)
                sys.stdout = TaskOutput(sys.stdout, "stdout")
                sys.stderr = TaskOutput(sys.stderr, "stderr")
    done = threading.Event()

    def uninstall() -> None:
        global _capture_users, _originals
        if done.is_set():
            return
        done.set()
        logging.getLogger().removeHandler(handler)
        with _handlers_lock:
            if _handlers.get(handler.worker) is handler:
                del _handlers[handler.worker]
            if capture_print:
                _capture_users -= 1
                if _capture_users == 0 and _originals is not None:
                    out, err = _originals
                    # Only undo our own wrapping (someone may have replaced them since).
                    if isinstance(sys.stdout, TaskOutput):
                        sys.stdout = out
                    if isinstance(sys.stderr, TaskOutput):
                        sys.stderr = err
                    _originals = None

    return uninstall


def trim_logs(store: Store, max_age: float = LOGS_MAX_AGE_S) -> int:
    """Drop records older than ``max_age`` seconds and beyond LOGS_MAXLEN; how many."""
    return store.streams.trim(LOGS_STREAM, maxlen=LOGS_MAXLEN, max_age=max_age)


# -- reading -----------------------------------------------------------------------------------


def _check_filter(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_since(since: Any) -> float | None:
    if since is None:
        return None
    if isinstance(since, bool) or not isinstance(since, int | float) or since != since:
        raise ConfigError(f"since must be unix seconds (a number), got {since!r}")
    return float(since)


class Logs:
    """The space's shipped log records (``space.logs``).

    Filters: ``task_id``, ``worker`` (exact), ``level`` (that level and
    above: a name or number), ``since`` (records logged at or after that
    unix time). Reads raise BackendError while the backend is down;
    ``follow`` never blocks forever (it waits in steps of FOLLOW_WAIT_S).
    ConfigError names a bad argument."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self._closed = threading.Event()

    def query(
        self,
        *,
        task_id: str | None = None,
        worker: str | None = None,
        level: str | int | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[LogRecord]:
        """Matching records with id above ``after``, oldest first, at most
        ``limit`` (1..100,000). ``since`` starts the scan by a binary search on
        append times, so it costs a few reads, not a scan of the stream."""
        match = self._matcher(task_id, worker, level)
        since_f = _check_since(since)
        _check_int("after", after, 0)
        _check_int("limit", limit, 1, 100_000)
        store = self.space.store
        cursor = after
        if since_f is not None and after == 0:  # (a later page goes on from ``after``)
            cursor = first_id_since(store, LOGS_STREAM, since_f - SINCE_SLACK_S)
        out: list[LogRecord] = []
        while len(out) < limit:
            entries = store.streams.read(LOGS_STREAM, after=cursor, limit=READ_PAGE)
            for entry in entries:
                record = decode_record(entry)
                if (
                    record is not None
                    and match(record)
                    and (since_f is None or record.time >= since_f)
                ):
                    out.append(record)
                    if len(out) >= limit:
                        break
            if len(entries) < READ_PAGE:
                break
            cursor = entries[-1].id
        return out

    def follow(
        self,
        *,
        task_id: str | None = None,
        worker: str | None = None,
        level: str | int | None = None,
        after: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[LogRecord]:
        """Matching records with id above ``after`` (None: only those shipped
        after this call) as they come. Ends after ``timeout`` seconds without a
        new matching record (None: never), at :meth:`close`, or when the
        caller stops iterating."""
        match = self._matcher(task_id, worker, level)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise ConfigError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        if after is not None:
            _check_int("after", after, 0)
        return self._follow(match, self.last_id() if after is None else after, timeout)

    def _follow(
        self, match: Callable[[LogRecord], bool], cursor: int, timeout: float | None
    ) -> Iterator[LogRecord]:
        store = self.space.store
        quiet_since = time.monotonic()
        backoff = 0.0  # > 0 while the backend is unreachable
        while not self._closed.is_set():
            wait = FOLLOW_WAIT_S
            if timeout is not None:
                left = quiet_since + timeout - time.monotonic()
                if left <= 0:
                    return
                wait = min(wait, left)
            try:
                entries = store.streams.read(LOGS_STREAM, after=cursor, limit=READ_PAGE, wait=wait)
            except SpaceLost:
                raise
            except BackendError as exc:
                # A blip: resume from the last record seen, never skip or repeat one;
                # with a timeout, an outage that outlasts it raises.
                if timeout is not None and time.monotonic() - quiet_since >= timeout:
                    raise
                if backoff == 0.0:
                    log.warning("following logs: backend unreachable, retrying: %s", exc)
                backoff = min(max(backoff * 2, FOLLOW_RETRY_S), FOLLOW_RETRY_MAX_S)
                self._closed.wait(backoff)
                continue
            if backoff:
                log.warning("following logs: backend reachable again")
                backoff = 0.0
            for entry in entries:
                cursor = entry.id
                record = decode_record(entry)
                if record is not None and match(record):
                    quiet_since = time.monotonic()
                    yield record

    def last_id(self) -> int:
        """The id of the newest record (0 if there is none)."""
        return last_stream_id(self.space.store, LOGS_STREAM)

    @staticmethod
    def _matcher(
        task_id: str | None, worker: str | None, level: str | int | None
    ) -> Callable[[LogRecord], bool]:
        task_id = _check_filter("task_id", task_id)
        worker = _check_filter("worker", worker)
        minimum = parse_level(level)

        def match(record: LogRecord) -> bool:
            return (
                (task_id is None or record.task_id == task_id)
                and (worker is None or record.worker == worker)
                and (minimum is None or record.levelno >= minimum)
            )

        return match

    def close(self) -> None:
        """End every follower of this facade (at their next wake-up)."""
        self._closed.set()
