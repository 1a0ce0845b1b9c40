"""Schemathesis against the API's own OpenAPI document: every operation under
/api and /metrics (the SSE streams excepted: they do not end by themselves)
with a bounded number of generated requests each, every default check on
(no server errors, documented status codes and content types, response
bodies matching their schemas, invalid input rejected, valid input accepted,
auth not ignored)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from taskspace.api.app import create_app
from tests.observability.test_api import TOKEN, drain, make_space

MAX_EXAMPLES = 25
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# The schema is read at collection time, so the app exists at import; its
# space (a SQLite file in a private directory) opens on first use.
WORKDIR = Path(tempfile.mkdtemp(prefix="taskspace-schemathesis-"))
SPACE = make_space(f"sqlite:///{WORKDIR}/schema.db")
APP = create_app(SPACE, token=TOKEN, tail_events=False)
schema = (
    schemathesis.openapi.from_asgi("/openapi.json", APP)
    .include(path_regex=r"^/(api|metrics)")
    .exclude(path_regex=r"/stream$")
)


@pytest.fixture(scope="module", autouse=True)
def seeded() -> Iterator[None]:
    """Tasks in several states for the generated requests to find."""
    for name, args in (("add", [1, 2]), ("boom", []), ("add", [3, 4])):
        SPACE.submit(name, *args)
    drain(SPACE)
    SPACE.submit("slow", 0.01)
    yield
    SPACE.close()
    shutil.rmtree(WORKDIR, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_openapi_conformance(case: Any) -> None:
    case.call_and_validate(headers=AUTH)
