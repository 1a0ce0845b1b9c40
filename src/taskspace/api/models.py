"""The API's request and response bodies (pydantic), which make its OpenAPI 3 schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from taskspace.api.errors import HTTP_CODES
from taskspace.backends.base import MAX_DURATION_S, PRIORITY_MAX, PRIORITY_MIN

TaskStateName = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]
LevelName = Literal[
    "debug", "info", "warning", "error", "critical", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"
]

# Task ids are 32 hex digits; other ids a store accepts are kept to this alphabet.
TASK_ID_PATTERN = r"^[A-Za-z0-9._:@~+-]{1,256}$"
# Names (tasks, queues, workers): printable, no control characters.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]{1,500}$"
QUEUE_PATTERN = r"^[^,\x00-\x20\x7f]{1,200}$"  # no \s: it differs between Python and JSON Schema
MAX_IDS = 1000
MAX_STREAM_ID = 2**63 - 1


def _json_integer(value: Any) -> Any:
    """A JSON integer: ``5`` or ``5.0`` (JSON Schema's integer), never ``true`` or ``"5"``."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON integer")
    return value


Priority = Annotated[
    int, Field(strict=False, ge=PRIORITY_MIN, le=PRIORITY_MAX), BeforeValidator(_json_integer)
]
TaskIdStr = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
NameStr = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class SubmitRequest(BaseModel):
    """A task to submit by its registered name (full, or the short name after the
    last dot when it is unambiguous), with JSON arguments."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=500, pattern=NAME_PATTERN)
    id: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="The task id to use (32 hex digits): a submit retried with the same id"
        " returns the task the first one made, never a second task.",
    )
    args: list[Any] = Field(default_factory=list, description="Positional arguments.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")
    queue: str | None = Field(None, pattern=QUEUE_PATTERN, description="Overrides the task's.")
    priority: Priority | None = Field(None, description="Higher first.")
    countdown: float | None = Field(
        None, ge=0, le=MAX_DURATION_S, description="Run no sooner than this many seconds from now."
    )
    dedup_key: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        pattern=NAME_PATTERN,
        description="Return the live task with this key instead.",
    )


class Progress(BaseModel):
    """Progress as last reported by the task."""

    done: float
    total: float


class TaskError(BaseModel):
    """Why a task failed: the remote exception type and message (plus detail keys)."""

    model_config = ConfigDict(extra="allow")

    type: str
    message: str


class TaskSummary(BaseModel):
    """A task without its arguments and result (list pages). Times are wall-clock
    Unix seconds on the store's clock."""

    id: str
    name: str
    queue: str
    state: TaskStateName
    priority: int
    attempts: int
    max_attempts: int
    lost: int = Field(description="Leases of this task that expired (worker lost).")
    worker: str | None
    created: float
    started: float | None
    finished: float | None
    error_type: str | None
    progress: Progress | None
    cancel_requested: bool


class Task(TaskSummary):
    """One task in full. ``args``/``kwargs``/``result`` are null when they cannot be
    shown as JSON (``display_note`` says why)."""

    args: list[Any] | None
    kwargs: dict[str, Any] | None
    result: Any = None
    error: TaskError | None
    traceback: str | None
    timeout: float | None
    lease_s: float
    dedup_key: str | None
    display_note: str | None = None


class TaskPage(BaseModel):
    """One page of tasks in submission order; pass ``next_cursor`` as ``cursor``
    for the next (null: this was the last page)."""

    items: list[TaskSummary]
    next_cursor: str | None


class RetryRequest(BaseModel):
    """Task ids to requeue (failed or dead ones; others are skipped)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[TaskIdStr] = Field(max_length=MAX_IDS)


class RetryResult(BaseModel):
    """Which tasks were requeued, and which were skipped (not failed/dead, or gone)."""

    retried: list[str]
    skipped: list[str]


class QueueInfo(BaseModel):
    """A queue's task counts by state, and the age in seconds of its oldest queued task."""

    name: str
    counts: dict[str, int]
    oldest_age: float | None


class LogItem(BaseModel):
    """One shipped log record."""

    model_config = ConfigDict(extra="allow")

    id: int
    time: float
    level: str
    levelno: int
    logger: str
    message: str
    task_id: str | None = None
    task: str | None = None
    attempt: int | None = None
    worker: str | None = None
    host: str = ""
    exc: str | None = None


class LogPage(BaseModel):
    """Log records, oldest first; ``last_id`` is the id to pass as ``after`` next."""

    items: list[LogItem]
    last_id: int


class EventItem(BaseModel):
    """One task event."""

    model_config = ConfigDict(extra="allow")

    id: int
    time: float
    kind: str
    task_id: str
    name: str
    queue: str
    worker: str | None = None
    attempt: int = 0
    duration: float | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None


class EventPage(BaseModel):
    """Events, oldest first; ``last_id`` is the id to pass as ``after`` next."""

    items: list[EventItem]
    last_id: int


class UsageSum(BaseModel):
    """Usage recorded by tasks (``TaskContext.record``)."""

    records: int = 0
    tokens_in: float = 0
    tokens_out: float = 0
    cost_usd: float = 0.0


class Usage(BaseModel):
    """Usage sums over the events this server has read (the retained events
    stream when it started, and every event since)."""

    by_task: dict[str, UsageSum]
    by_model: dict[str, UsageSum]
    events_read: int


class Health(BaseModel):
    """The backend answered."""

    status: Literal["ok"]
    backend: str


class Holder(BaseModel):
    """One holder of a lease: who, its fencing token, seconds until it expires."""

    holder: str
    token: int
    expires_in: float


class LockInfo(BaseModel):
    """A lock or semaphore (its lease name, e.g. ``lock/gpu-0``) with holders and waiters."""

    name: str
    holders: list[Holder]
    waiters: int


class ElectionInfo(BaseModel):
    """An election and its current leader (from the lease, the authority)."""

    name: str
    leader: str | None
    term: int | None


class StreamInfo(BaseModel):
    """A stream: its oldest retained entry, and its newest when known."""

    name: str
    first_id: int | None
    first_time: float | None
    last_id: int | None


class ErrorDetail(BaseModel):
    """What went wrong: a stable machine-readable ``code`` and a message for people."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting error statuses with ErrorBody."""
    return {s: {"model": ErrorBody, "description": HTTP_CODES.get(s, "error")} for s in statuses}


def json_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """As :func:`responses`, for routes whose own answer is not JSON (metrics,
    streams): the error bodies are still ``application/json``."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {
        s: {"description": HTTP_CODES.get(s, "error"),
            "content": {"application/json": {"schema": ref}}}
        for s in statuses
    }  # fmt: skip
