"""Helpers shared by the queue conformance tests."""

from __future__ import annotations

import uuid
from typing import Any

from taskspace.backends.base import Outcome, TaskRecord, TaskSpec

ERR_A = {"type": "ValueError", "message": "first", "traceback": "tb-a"}
ERR_B = {"type": "KeyError", "message": "second", "traceback": "tb-b", "detail": [1, 2]}


def spec(queue: str = "default", **kw: object) -> TaskSpec:
    kw.setdefault("id", uuid.uuid4().hex)
    kw.setdefault("name", "job")
    kw.setdefault("payload", b"{}")
    return TaskSpec(queue=queue, **kw)  # type: ignore[arg-type]


def claim_one(store: Any, queue: str = "default", worker: str = "w") -> TaskRecord:
    records = store.queue.claim([queue], worker, 1)
    assert len(records) == 1, records
    return records[0]


def push_one(store: Any, **kw: object) -> str:
    (task_id,) = store.queue.push([spec(**kw)])
    return task_id


SUCCEEDED = Outcome("succeeded", result=b"ok")
RELEASE = Outcome("release")


def retry(delay: float = 0.0, error: dict | None = None) -> Outcome:
    return Outcome("retry", error=error, delay=delay)
