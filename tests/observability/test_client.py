"""taskspace.client.Client against a real uvicorn on SQLite and Redis: every
verb, errors mapped back to taskspace.errors, results waited for across a
server restart, SSE follows, and a process with no backend access that
submits and follows a task through the API only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.api.app import create_app
from taskspace.client import Client
from taskspace.errors import (
    BackendError,
    ConfigError,
    ResultTimeout,
    SerializationError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    UnknownTask,
)
from tests.observability.test_api import TOKEN, ApiServer, api_space, drain, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
__all__ = ["api_space"]  # the fixture, imported for its parametrization


def _drain_soon(space: Space) -> threading.Thread:
    thread = threading.Thread(target=drain, args=(space,), daemon=True)
    thread.start()
    return thread


def test_client_verbs(api_space: Space) -> None:
    app = create_app(api_space, token=TOKEN)
    with ApiServer(app) as server, Client(server.url, token=TOKEN) as client:
        assert client.health()["status"] == "ok"
        task = client.submit("add", [2, 3])
        assert task["state"] == "queued" and task["args"] == [2, 3]
        assert client.get(task["id"])["name"] == "add"
        worker = _drain_soon(api_space)
        assert client.result(task["id"], wait=20) == 5
        worker.join(timeout=20)

        failing = client.submit("boom")
        cancelled = client.submit("add", kwargs={"a": 1, "b": 1}, queue="later", priority=5)
        assert client.cancel(cancelled["id"])["state"] == "cancelled"
        drain(api_space)
        with pytest.raises(TaskFailed) as failed:
            client.result(failing["id"], wait=5)
        assert failed.value.remote_type == "ValueError"
        assert failed.value.remote_message == "kaboom"
        assert "kaboom" in failed.value.remote_traceback
        with pytest.raises(TaskCancelled):
            client.result(cancelled["id"], wait=5)

        assert client.retry(failing["id"])["state"] == "queued"
        with pytest.raises(ConfigError, match="invalid_state"):
            client.retry(cancelled["id"])
        assert client.retry_many([failing["id"]]) == {"retried": [], "skipped": [failing["id"]]}

        page = client.list(limit=2)
        assert len(page["items"]) == 2 and page["next_cursor"]
        assert [t["id"] for t in client.iter_tasks(limit=1)] == [
            task["id"], failing["id"], cancelled["id"]]  # fmt: skip
        assert client.list(state="cancelled")["items"][0]["id"] == cancelled["id"]
        counts = {q["name"]: q["counts"] for q in client.queues()}
        assert counts["default"]["queued"] == 1 and counts["later"]["cancelled"] == 1
        assert isinstance(client.workers(), list)

        def shipped() -> bool:  # events are shipped in the background
            kinds = [e["kind"] for e in client.events(limit=100)["items"]]
            return kinds.count("submitted") == 3 and "succeeded" in kinds and "failed" in kinds

        wait_until(shipped, what="the events")
        assert "items" in client.logs(task_id=failing["id"])
        assert client.usage()["by_task"] == {} or isinstance(client.usage()["by_task"], dict)

        queued = client.submit("add", [1, 1])
        with pytest.raises(ResultTimeout):
            client.result(queued["id"], wait=0.3)


def test_client_errors(api_space: Space) -> None:
    app = create_app(api_space, token=TOKEN, tail_events=False)
    with ApiServer(app) as server:
        with Client(server.url, token=TOKEN) as client:
            with pytest.raises(TaskNotFound):
                client.get("0" * 32)
            with pytest.raises(UnknownTask, match="nope"):
                client.submit("nope")
            with pytest.raises(ConfigError, match="invalid_argument"):
                client.submit("add", [1], priority=10**9)
            with pytest.raises(SerializationError, match="64-bit"):
                client.submit("add", [2**70, 1])
            assert client.list()["items"] == []  # nothing was submitted
        wrong = Client(server.url, token="wrong")
        with wrong as client, pytest.raises(ConfigError, match="unauth"):
            client.list()
        with pytest.raises(ConfigError):
            Client("tcp://nowhere")
        url = server.url
    with Client(url, timeout=1) as client, pytest.raises(BackendError, match="unreachable"):
        client.list()


def test_follow_events_and_logs(api_space: Space) -> None:
    app = create_app(api_space, heartbeat=0.2)
    with ApiServer(app) as server, Client(server.url) as client:
        seen: list[dict[str, object]] = []
        stream = client.follow_events(after=0, timeout=10)
        first = client.submit("add", [1, 2])
        for event in stream:
            seen.append(event)
            if event["task_id"] == first["id"]:
                break
        stream.close()  # type: ignore[attr-defined]
        assert seen[-1]["kind"] == "submitted"
        records = list(client.follow_logs(level="error", timeout=0.5))
        assert records == []


def test_result_waits_out_a_server_restart(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/restart.db")

    @space.task(name="add", max_attempts=1)
    def add(a: int, b: int) -> int:
        return a + b

    try:
        server = ApiServer(create_app(space, tail_events=False))
        port = server.port
        with server, Client(server.url, timeout=2) as client:
            task = client.submit("add", [20, 22])
        result: list[object] = []
        waiter = threading.Thread(target=lambda: result.append(client.result(task["id"], wait=30)))
        with Client(server.url, timeout=2) as client:
            waiter.start()  # the server is down: the client backs off and retries
            drain(space)
            with ApiServer(create_app(space, tail_events=False), port=port):
                waiter.join(timeout=30)
        assert result == [42]
    finally:
        space.close()


CHILD = textwrap.dedent(
    """
    import sys
    from taskspace.client import Client

    with Client(sys.argv[1]) as client:
        task = client.submit("add", [40, 2])
        print(task["id"], flush=True)
        print(client.result(task["id"], wait=30), flush=True)
    """
)


def test_a_process_without_backend_access_submits_and_follows(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/remote.db")

    @space.task(name="add", max_attempts=1)
    def add(a: int, b: int) -> int:
        return a + b

    env = {**os.environ, "TASKSPACE_URL": "redis://127.0.0.1:1/0",
           "PYTHONPATH": str(REPO_ROOT / "src")}  # fmt: skip
    try:
        with ApiServer(create_app(space, tail_events=False)) as server:
            child = subprocess.Popen([sys.executable, "-c", CHILD, server.url], env=env,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert child.stdout is not None
            task_id = child.stdout.readline().strip()
            wait_until(lambda: space.tasks(state="queued"), what="the remote submit")
            assert space.tasks()[0].id == task_id
            drain(space)
            out, _ = child.communicate(timeout=30)
            assert out.strip() == "42" and child.returncode == 0
    finally:
        space.close()


def test_every_code_maps_back_to_its_exception() -> None:
    import httpx

    from taskspace import errors
    from taskspace.api.errors import ERROR_TABLE, body
    from taskspace.client import _error_for

    request = httpx.Request("GET", "http://server/api/tasks/abc")
    for cls, status, code in ERROR_TABLE:
        response = httpx.Response(status, json=body(code, "why"), request=request)
        err = _error_for(response)
        if cls in (errors.TaskFailed, errors.TaskCancelled, errors.Compacted, errors.CachedError):
            # raised with fields the body does not carry: the family of the status
            expected: type[Exception] = errors.BackendError if status >= 500 else ConfigError
        elif cls is errors.SubscriptionLost:
            expected = BackendError  # the same code as BackendError
        else:
            expected = cls
        assert isinstance(err, expected), (code, err)
    garbled = httpx.Response(502, text="<html>bad gateway</html>", request=request)
    assert isinstance(_error_for(garbled), BackendError)
