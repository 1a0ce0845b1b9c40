"""Logs a person can read: one line per task start and end, with id, name, attempt
and duration (DEBUG for starts and successes, INFO for failures and retries), and
``setup_logging(level, "json")`` for one JSON object per line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from taskspace import Space
from taskspace.errors import ConfigError
from taskspace.worker.logfmt import setup_logging

LOGGER = "taskspace.worker"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger's handlers and level after a test that replaced them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def run_three(space: Space) -> tuple[str, str, str]:
    """One task that succeeds, one that fails once then succeeds, one that fails for good."""
    calls: list[int] = []

    @space.task(name="logs.ok")
    def ok() -> int:
        return 1

    @space.task(name="logs.flaky", max_attempts=2, retry_backoff=0.0)
    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first try fails")
        return 2

    @space.task(name="logs.bad", max_attempts=1)
    def bad() -> int:
        raise KeyError("always")

    ids = (ok.submit().id, flaky.submit().id, bad.submit().id)
    space.run_worker(burst=True, install_signal_handlers=False, name="w-logs")
    return ids


def test_task_lines_with_levels_ids_names_attempts_durations(
    space: Space, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    ok_id, flaky_id, bad_id = run_three(space)
    lines = [(r.levelno, r.getMessage(), r) for r in caplog.records if r.name == LOGGER]

    def find(task_id: str, word: str) -> list[tuple[int, str, logging.LogRecord]]:
        return [x for x in lines if task_id in x[1] and word in x[1]]

    (start,) = find(ok_id, "started")
    assert start[0] == logging.DEBUG and "logs.ok" in start[1] and "attempt 1/3" in start[1]
    (done,) = find(ok_id, "succeeded")
    assert done[0] == logging.DEBUG and " s (attempt 1/3)" in done[1]
    assert done[2].duration >= 0 and done[2].task == "logs.ok"  # type: ignore[attr-defined]

    (retry,) = find(flaky_id, "retrying")
    assert retry[0] == logging.INFO
    assert "attempt 1/2" in retry[1] and "ValueError: first try fails" in retry[1]
    assert [x[0] for x in find(flaky_id, "succeeded")] == [logging.DEBUG]

    (failed,) = find(bad_id, "failed")
    assert failed[0] == logging.INFO and "attempt 1/1" in failed[1] and "KeyError" in failed[1]
    assert "retrying" not in failed[1]


@pytest.mark.usefixtures("root_logging")
def test_json_format_is_one_object_per_line_with_task_fields(
    space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("debug", "json")
    ok_id, _, bad_id = run_three(space)
    err = capsys.readouterr().err
    objects = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert objects, "no log output"
    for obj in objects:
        assert {"time", "level", "logger", "message"} <= set(obj), obj
    ours = [o for o in objects if o.get("task_id") == ok_id]
    assert {o["message"].split()[3] for o in ours} == {"started", "succeeded"}
    done = next(o for o in ours if "succeeded" in o["message"])
    assert (done["level"], done["logger"], done["task"], done["attempt"]) == (
        "DEBUG", LOGGER, "logs.ok", 1,
    )  # fmt: skip
    assert done["worker"] == "w-logs" and done["duration"] >= 0
    failed = next(o for o in objects if o.get("task_id") == bad_id and o.get("outcome"))
    assert (failed["level"], failed["outcome"]) == ("INFO", "retry")


@pytest.mark.usefixtures("root_logging")
def test_json_lines_survive_awkward_messages_and_exceptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info", "json")
    log = logging.getLogger("taskspace.test")
    log.info('quote " newline \n and unicode é', extra={"task_id": object()})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    log.debug("not shown at info")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == 'quote " newline \n and unicode é'
    assert first["task_id"].startswith("<object object")
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exception"]


@pytest.mark.usefixtures("root_logging")
def test_text_format_and_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning", "text")
    logging.getLogger("taskspace.test").warning("plain %s", "words")
    logging.getLogger("taskspace.test").info("hidden")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("WARNING") is False and "WARNING" in line
    assert line.endswith("taskspace.test: plain words")
    with pytest.raises(ConfigError, match="log level 'loud'"):
        setup_logging("loud", "text")
    with pytest.raises(ConfigError, match="log format 'xml'"):
        setup_logging("info", "xml")  # type: ignore[arg-type]
