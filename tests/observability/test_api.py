"""The HTTP API on SQLite and Redis: submit, get, list (cursor paging), cancel,
retry, dead/retry, queues; bad input is a 4xx that changes nothing; errors are
JSON with stable codes; auth (token on non-loopback, bearer, cookie,
constant-time compare); CORS off by default; SSE streams end when the client
goes away; a Redis that goes down gives 503 and the server recovers by itself.

Helpers here (``ApiServer``, ``api_space``, ``test_client``) are shared by the
other API test modules."""

from __future__ import annotations

import hmac
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from taskspace import Space
from taskspace.api import auth
from taskspace.api.app import create_app
from taskspace.errors import ConfigError
from tests.conftest import backend_url
from tests.services import RedisServer, free_port

API_BACKENDS = ["sqlite", "redis"]
TOKEN = "t0ken-for-tests-0123456789"


def test_client(app: Any) -> Any:
    """A starlette TestClient (imported without its httpx deprecation warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    return TestClient(app, base_url="http://127.0.0.1")  # a Host the server accepts


test_client.__test__ = False  # type: ignore[attr-defined]


def make_space(url: str) -> Space:
    """A Space with the tasks the API tests submit."""
    space = Space(url)

    @space.task(name="add", max_attempts=1)
    def add(a: int, b: int) -> int:
        return a + b

    @space.task(name="boom", max_attempts=1)
    def boom() -> None:
        raise ValueError("kaboom")

    @space.task(name="flaky", max_attempts=2, retry_backoff=0.01)
    def flaky(path: str) -> str:
        marker = Path(path)
        if not marker.exists():
            marker.write_text("1")
            raise RuntimeError("first attempt fails")
        return "ok"

    @space.task(name="priced", max_attempts=1)
    def priced(n: int) -> int:
        from taskspace import current_task

        current_task().record(tokens_in=n, tokens_out=2 * n, cost_usd=0.5, model="m1")
        return n

    @space.task(name="slow", max_attempts=1)
    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    return space


@pytest.fixture(params=API_BACKENDS)
def api_space(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Space]:
    """A Space with the test tasks on SQLite and on Redis."""
    space = make_space(backend_url(str(request.param), tmp_path))
    yield space
    space.close()


def drain(space: Space) -> None:
    """Run a real worker in this process until the queues are empty."""
    space.run_worker(burst=True, concurrency=4, queues="default")


class ApiServer:
    """A real uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on",
                           timeout_graceful_shutdown=2)
        )  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def submitted_count(client: Any, task: str = "add", queue: str = "default") -> float:
    """``taskspace_tasks_submitted_total`` for ``task`` as /metrics shows it."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "taskspace_tasks_submitted_total" and sample.labels == {
                "task": task, "queue": queue}:  # fmt: skip
                return float(sample.value)
    return 0.0


def error_code(response: httpx.Response) -> str:
    """The stable code of a JSON error response (asserting its shape)."""
    doc = response.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, doc
    assert doc["error"]["message"]
    return str(doc["error"]["code"])


# -- tasks ---------------------------------------------------------------------------------


def test_submit_get_list_cancel(api_space: Space) -> None:
    with test_client(create_app(api_space, tail_events=False)) as client:
        r = client.post("/api/tasks", json={"name": "add", "args": [2], "kwargs": {"b": 3}})
        assert r.status_code == 201, r.text
        task = r.json()
        assert task["name"] == "add" and task["state"] == "queued"
        assert task["args"] == [2] and task["kwargs"] == {"b": 3}
        got = client.get(f"/api/tasks/{task['id']}").json()
        assert got["id"] == task["id"] and got["max_attempts"] == 1

        ids = [task["id"]]
        for i in range(4):
            r = client.post("/api/tasks", json={"name": "add", "args": [i, i], "priority": i,
                                                "queue": "default"})  # fmt: skip
            ids.append(r.json()["id"])
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2, "name": "add"}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/api/tasks", params=params).json()
            seen += [t["id"] for t in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids and pages == 3
        assert client.get("/api/tasks", params={"state": "running"}).json()["items"] == []

        r = client.post(f"/api/tasks/{ids[1]}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = client.post(f"/api/tasks/{ids[1]}/retry")
        assert r.status_code == 409 and error_code(r) == "invalid_state"
        assert client.get(f"/api/tasks/{ids[1]}").json()["state"] == "cancelled"

        queues = client.get("/api/queues").json()
        assert queues == [{"name": "default", "oldest_age": queues[0]["oldest_age"],
                           "counts": {"queued": 4, "running": 0, "succeeded": 0, "failed": 0,
                                      "dead": 0, "cancelled": 1}}]  # fmt: skip
        assert queues[0]["oldest_age"] >= 0


def test_result_retry_and_dead_retry(api_space: Space, tmp_path: Path) -> None:
    with test_client(create_app(api_space, tail_events=False)) as client:
        ok = client.post("/api/tasks", json={"name": "add", "args": [1, 2]}).json()
        bad = client.post("/api/tasks", json={"name": "boom"}).json()
        bad2 = client.post("/api/tasks", json={"name": "boom"}).json()
        drain(api_space)
        done = client.get(f"/api/tasks/{ok['id']}", params={"wait": 5}).json()
        assert done["state"] == "succeeded" and done["result"] == 3
        failed = client.get(f"/api/tasks/{bad['id']}").json()
        assert failed["state"] == "failed"
        assert failed["error"]["type"] == "ValueError" and failed["error"]["message"] == "kaboom"
        assert "kaboom" in failed["traceback"]

        r = client.post(f"/api/tasks/{bad['id']}/retry")
        assert r.status_code == 200 and r.json()["state"] == "queued"
        r = client.post("/api/dead/retry",
                        json={"ids": [bad2["id"], ok["id"], "0" * 32, bad2["id"]]})  # fmt: skip
        assert r.json() == {"retried": [bad2["id"]], "skipped": [ok["id"], "0" * 32]}
        assert client.get(f"/api/tasks/{bad2['id']}").json()["state"] == "queued"


def test_submit_with_an_id_is_idempotent(api_space: Space) -> None:
    with test_client(create_app(api_space, tail_events=False)) as client:
        doc = {"name": "add", "args": [1, 2], "id": "ab" * 16}
        first = client.post("/api/tasks", json=doc)
        again = client.post("/api/tasks", json=doc)  # a retried submit: the same task
        assert first.status_code == again.status_code == 201
        assert first.json()["id"] == again.json()["id"] == "ab" * 16
        assert again.json()["args"] == [1, 2]
        assert api_space.stats().total("queued") == 1
        # F12: the same id with other arguments or another name is a conflict, not that task
        for other in ({**doc, "args": [5, 5]}, {**doc, "name": "slow", "args": [0.01]}):
            r = client.post("/api/tasks", json=other)
            assert r.status_code == 409 and error_code(r) == "id_conflict", r.text
        assert api_space.stats().total("queued") == 1
        assert client.get(f"/api/tasks/{'ab' * 16}").json()["args"] == [1, 2]
        r = client.post("/api/tasks", json={**doc, "id": "not-hex"})
        assert r.status_code == 422 and api_space.stats().total("queued") == 1


def test_unknown_and_missing(api_space: Space) -> None:
    with test_client(create_app(api_space, tail_events=False)) as client:
        r = client.get("/api/tasks/" + "0" * 32)
        assert r.status_code == 404 and error_code(r) == "task_not_found"
        r = client.post("/api/tasks/" + "0" * 32 + "/cancel")
        assert r.status_code == 404 and error_code(r) == "task_not_found"
        r = client.get("/api/tasks", params={"cursor": "0" * 32})
        assert r.status_code == 404 and error_code(r) == "cursor_not_found"
        r = client.get("/api/nothing-here")
        assert r.status_code == 404 and error_code(r) == "not_found"
        r = client.delete("/api/tasks")
        assert r.status_code == 405 and error_code(r) == "method_not_allowed"
        assert "POST" in r.headers["allow"]


def _snapshot(space: Space) -> tuple[Any, int]:
    return dict(space.stats().counts), space.events.last_id()


BAD_SUBMITS: list[tuple[Any, int, str]] = [
    ({}, 422, "invalid_argument"),
    ({"name": ""}, 422, "invalid_argument"),
    ({"name": "add", "extra": 1}, 422, "invalid_argument"),
    ({"name": "add", "args": {"a": 1}}, 422, "invalid_argument"),
    ({"name": "add", "kwargs": [1]}, 422, "invalid_argument"),
    ({"name": "add", "priority": 10**9}, 422, "invalid_argument"),
    ({"name": "add", "priority": "high"}, 422, "invalid_argument"),
    ({"name": "add", "countdown": -1}, 422, "invalid_argument"),
    ({"name": "add", "queue": "a,b"}, 422, "invalid_argument"),
    ({"name": "add", "args": [2**70, 1]}, 422, "serialization_error"),
    ({"name": "nope"}, 404, "unknown_task"),
    ([1, 2], 422, "invalid_argument"),
]


def test_bad_input_is_4xx_and_changes_nothing(api_space: Space) -> None:
    app = create_app(api_space, tail_events=False, max_body=64 * 1024)
    with test_client(app) as client:
        before = _snapshot(api_space)
        for doc, status, code in BAD_SUBMITS:
            r = client.post("/api/tasks", json=doc)
            assert (r.status_code, error_code(r)) == (status, code), (doc, r.text)
        r = client.post("/api/tasks", content=b"{not json",
                        headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 422 and error_code(r) == "invalid_argument"
        big = {"name": "add", "args": ["x" * (100 * 1024), 1]}
        r = client.post("/api/tasks", json=big)
        assert r.status_code == 413 and error_code(r) == "request_too_large"

        def chunks() -> Iterator[bytes]:
            yield b'{"name": "add", "args": ["'
            for _ in range(100):
                yield b"y" * 1024
            yield b'", 1]}'

        r = client.post("/api/tasks", content=chunks(),
                        headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 413 and error_code(r) == "request_too_large"
        for path, params in [("/api/tasks", {"limit": 0}), ("/api/tasks", {"limit": 10**6}),
                             ("/api/tasks", {"state": "weird"}), ("/api/tasks/bad id!", {}),
                             ("/api/tasks/x", {"wait": 99}), ("/api/logs", {"level": "loud"}),
                             ("/api/events", {"after": -1})]:  # fmt: skip
            r = client.get(path, params=params)
            assert r.status_code == 422 and error_code(r) == "invalid_argument", (path, r.text)
        r = client.get("/api/tasks?limit=2&limit=3")
        assert r.status_code == 422 and "more than once" in r.json()["error"]["message"]
        r = client.post("/api/dead/retry", json={"ids": ["x"] * 1001})
        assert r.status_code == 422 and error_code(r) == "invalid_argument"
        r = client.post("/api/dead/retry", json={"ids": ["bad id"]})
        assert r.status_code == 422
        assert _snapshot(api_space) == before


def test_no_app_submit_is_a_clear_404(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/bare.db")
    try:
        with test_client(create_app(space, tail_events=False)) as client:
            r = client.post("/api/tasks", json={"name": "add", "args": [1, 2]})
            assert r.status_code == 404 and error_code(r) == "unknown_task"
            assert "taskspace serve" in r.json()["error"]["message"]
            assert client.get("/api/tasks").json() == {"items": [], "next_cursor": None}
    finally:
        space.close()


def test_info_endpoints(tmp_path: Path) -> None:
    space = make_space(f"sqlite:///{tmp_path}/info.db")
    try:
        with test_client(create_app(space, tail_events=False)) as client:
            assert client.get("/api/health").json() == {"status": "ok", "backend": "sqlite"}
            with space.lock("gpu-0", ttl=5):
                locks = client.get("/api/locks", params={"name": "gpu-0"}).json()
                assert [lk["name"] for lk in locks] == ["lock/gpu-0"]
                assert locks[0]["holders"][0]["expires_in"] > 0
            assert client.get("/api/locks", params={"name": "gpu-0"}).json() == []
            with space.election("leader").campaign(identity="me", wait=5):
                elections = client.get("/api/elections").json()
                assert elections[0]["name"] == "leader" and elections[0]["leader"] == "me"
            with space.registry.register("search", "s1", address="10.0.0.1:80"):
                services = client.get("/api/services").json()
                assert services["search"][0]["address"] == "10.0.0.1:80"
            names = [s["name"] for s in client.get("/api/streams").json()]
            assert names == ["taskspace/events", "taskspace/logs"]
            assert client.get("/api/workers").json() == []
            assert client.get("/api/events", params={"limit": 5}).json()["items"] == []
            assert client.get("/api/usage").json()["by_task"] == {}
            assert client.get("/openapi.json").json()["openapi"].startswith("3.")
    finally:
        space.close()


# -- auth and CORS -------------------------------------------------------------------------


def test_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = make_space(f"sqlite:///{tmp_path}/auth.db")
    with pytest.raises(ConfigError, match="without a token"):
        create_app(space, host="0.0.0.0")
    with pytest.raises(ConfigError, match="without a token"):
        create_app(space, host="example.com")
    create_app(space, host="::1")  # loopback: no token needed
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    app = create_app(space, token=TOKEN, host="0.0.0.0", tail_events=False)
    try:
        with test_client(app) as client:
            r = client.get("/api/tasks")
            assert r.status_code == 401 and error_code(r) == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            r = client.get("/api/tasks", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = client.post("/api/tasks", json={"name": "add", "args": [1, 2]})
            assert r.status_code == 401 and space.stats().counts == {}
            assert client.get("/metrics").status_code == 401
            ok = client.get("/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200
            assert compared[-1] == (TOKEN.encode(), TOKEN.encode())
            client.cookies.set(auth.COOKIE, TOKEN)
            assert client.get("/api/tasks").status_code == 200
            assert client.get("/metrics").status_code == 200
            client.cookies.set(auth.COOKIE, TOKEN + "x")
            assert client.get("/api/tasks").status_code == 401
            assert client.get("/api/health").status_code == 200  # open by design
            schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
            assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    finally:
        space.close()


def test_cors_off_by_default_and_on_when_asked(tmp_path: Path) -> None:
    space = make_space(f"sqlite:///{tmp_path}/cors.db")
    origin = {"Origin": "https://dash.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    try:
        with test_client(create_app(space, tail_events=False)) as client:
            r = client.get("/api/tasks", headers=origin)
            assert "access-control-allow-origin" not in r.headers
            r = client.options("/api/tasks", headers=preflight)
            assert "access-control-allow-origin" not in r.headers
        app = create_app(space, tail_events=False, cors_origins=["https://dash.example"])
        with test_client(app) as client:
            r = client.options("/api/tasks", headers=preflight)
            assert r.headers["access-control-allow-origin"] == "https://dash.example"
            r = client.get("/api/tasks", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers
        with pytest.raises(ConfigError, match="cors_origins"):
            create_app(space, cors_origins="https://dash.example")
    finally:
        space.close()


# -- SSE -------------------------------------------------------------------------------------


def _sse_items(lines: Iterator[str], want: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    import json

    for line in lines:
        if line.startswith("data: "):
            item = json.loads(line[6:])
            if want(item):
                return dict(item)
    raise AssertionError("stream ended")


def _frames(http: httpx.Client, params: dict[str, Any], headers: dict[str, str], n: int) -> list:
    """The first ``n`` (id, item) frames of the events stream."""
    import json

    frames = []
    with http.stream("GET", "/api/events/stream", params=params, headers=headers) as stream:
        frame_id = None
        for line in stream.iter_lines():
            if line.startswith("id: "):
                frame_id = line[4:]
            elif line.startswith("data: "):
                frames.append((frame_id, json.loads(line[6:])))
                if len(frames) == n:
                    break
    return frames


def test_sse_events_resume_mid_entry_with_last_event_id(api_space: Space) -> None:
    """Events of one stored entry share its stream id: frames before an
    entry's last carry ``<id>.<k>``, and a client cut off after one of them
    resumes at the next event (review F10: it skipped the rest of the entry)."""
    before = api_space.events.last_id()
    handles = api_space.get_task("add").submit_many([(i, i) for i in range(5)])
    assert api_space.events.flush(5)
    app = create_app(api_space, heartbeat=0.2)
    with ApiServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        params = {"after": before, "timeout": 3}
        whole = _frames(http, params, {}, 5)
        assert [item["task_id"] for _, item in whole] == [h.id for h in handles]
        entry = str(whole[-1][1]["id"])
        assert [i for i, _ in whole] == [f"{entry}.{k}" for k in range(4)] + [entry]
        resumed = _frames(http, {"timeout": 3}, {"Last-Event-ID": f"{entry}.1"}, 3)
        assert [item["task_id"] for _, item in resumed] == [h.id for h in handles[2:]]
        assert [i for i, _ in resumed] == [f"{entry}.2", f"{entry}.3", entry]
        later = api_space.submit("add", 9, 9)
        assert api_space.events.flush(5)
        after_whole = _frames(http, {"timeout": 3}, {"Last-Event-ID": entry}, 1)
        assert after_whole[0][1]["task_id"] == later.id


def test_sse_events_and_logs_follow_and_end_on_disconnect(api_space: Space) -> None:
    app = create_app(api_space, heartbeat=0.2)
    with ApiServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream("GET", "/api/events/stream", params={"timeout": 20}) as events:
            lines = events.iter_lines()
            assert next(lines) == ": connected"
            task = http.post("/api/tasks", json={"name": "add", "args": [1, 1]}).json()
            item = _sse_items(lines, lambda e: e["task_id"] == task["id"])
            assert item["kind"] == "submitted" and item["name"] == "add"
            assert wait_until(lambda: app.state.sse_limiter.borrowed_tokens <= 1, what="reads")
        # The client went away: the stream's reads stop within about a second.
        wait_until(lambda: app.state.sse_limiter.borrowed_tokens == 0, what="stream end")

        with http.stream("GET", "/api/logs/stream", params={"level": "warning"}) as logs:
            lines = logs.iter_lines()
            assert next(lines) == ": connected"
            import logging

            from taskspace.logs import Handler

            handler = Handler(api_space, worker="w-test", interval=0.01)
            logger = logging.getLogger("taskspace.test.sse")
            logger.addHandler(handler)
            logger.propagate = False
            try:
                logger.warning("info is filtered, this is not")
                handler.flush()
                item = _sse_items(lines, lambda r: r["logger"] == "taskspace.test.sse")
                assert item["message"] == "info is filtered, this is not"
                assert item["worker"] == "w-test" and item["level"] == "WARNING"
                heartbeat = next(line for line in lines if line.startswith(":"))
                assert heartbeat == ": keepalive"
            finally:
                logger.removeHandler(handler)
                handler.close()
        wait_until(lambda: app.state.sse_limiter.borrowed_tokens == 0, what="stream end")


# -- backend down ----------------------------------------------------------------------------


@pytest.mark.fault
def test_backend_down_is_503_then_recovers() -> None:
    redis = RedisServer(appendfsync="always").start()
    space = make_space(redis.url)
    app = create_app(space)
    try:
        with test_client(app) as client:
            task = client.post("/api/tasks", json={"name": "add", "args": [1, 2]}).json()
            redis.kill()
            for method, path in [("GET", f"/api/tasks/{task['id']}"), ("GET", "/api/tasks"),
                                 ("GET", "/api/queues"), ("GET", "/api/health"),
                                 ("POST", f"/api/tasks/{task['id']}/cancel")]:  # fmt: skip
                r = client.request(method, path)
                assert r.status_code == 503, (path, r.text)
                assert error_code(r) == "backend_unavailable"
            started = time.monotonic()
            r = client.post("/api/tasks", json={"name": "add", "args": [5, 6]})
            assert r.status_code == 503 and error_code(r) == "backend_unavailable"
            assert time.monotonic() - started < 8  # a short retry, not Space.push's 10 s
            metrics = client.get("/metrics")
            assert metrics.status_code == 200 and "taskspace_backend_up 0.0" in metrics.text
            redis.restart()
            wait_until(lambda: client.get("/api/health").status_code == 200, what="recovery")
            assert client.get(f"/api/tasks/{task['id']}").json()["state"] == "queued"
            again = client.post("/api/tasks", json={"name": "add", "args": [3, 4]})
            assert again.status_code == 201
            assert app.state.tailer._thread.is_alive()
            # The tailer carried on: both submits that were written are counted.
            wait_until(lambda: submitted_count(client) == 2, what="the tailer to catch up")
    finally:
        space.close()
        redis.close()


@pytest.mark.fault
def test_server_starts_with_the_backend_down() -> None:
    redis = RedisServer(appendfsync="always")  # not started yet
    space = make_space(redis.url)
    app = create_app(space)
    try:
        with test_client(app) as client:
            r = client.get("/api/health")
            assert r.status_code == 503 and error_code(r) == "backend_unavailable"
            r = client.post("/api/tasks", json={"name": "add", "args": [1, 2]})
            assert r.status_code == 503 and error_code(r) == "backend_unavailable"
            redis.start()
            wait_until(lambda: client.get("/api/health").status_code == 200, what="recovery")
            r = client.post("/api/tasks", json={"name": "add", "args": [1, 2]})
            assert r.status_code == 201
            wait_until(lambda: submitted_count(client) == 1, what="the tailer to recover")
    finally:
        space.close()
        redis.close()


def test_long_polls_do_not_starve_the_api(tmp_path: Path) -> None:
    import asyncio

    space = make_space(f"sqlite:///{tmp_path}/polls.db")
    task = space.submit("add", 1, 2)  # stays queued: no worker
    app = create_app(space, tail_events=False)
    n = 60  # more than the default thread pool (40)

    async def scenario(url: str) -> None:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            polls = [asyncio.create_task(http.get(f"/api/tasks/{task.id}", params={"wait": 20}))
                     for _ in range(n)]  # fmt: skip
            deadline = time.monotonic() + 15
            while app.state.wait_limiter.borrowed_tokens < n:
                assert time.monotonic() < deadline, "the long polls did not start"
                await asyncio.sleep(0.02)
            health = await http.get("/api/health")
            listing = await http.get("/api/tasks")
            assert health.status_code == listing.status_code == 200
            assert not any(p.done() for p in polls)
            await asyncio.to_thread(space.handle(task.id).cancel)
            answers = await asyncio.gather(*polls)
            assert {r.json()["state"] for r in answers} == {"cancelled"}

    try:
        with ApiServer(app) as server:
            asyncio.run(scenario(server.url))
    finally:
        space.close()


def test_every_taskspace_error_has_a_stable_code() -> None:
    import inspect

    from taskspace import errors
    from taskspace.api.errors import ERROR_TABLE, classify

    table = {cls for cls, _status, _code in ERROR_TABLE}
    classes = {c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.TaskspaceError)}  # fmt: skip
    assert classes <= table, classes - table
    assert classify(errors.TaskNotFound("x")) == (404, "task_not_found")
    assert classify(errors.SpaceLost("gone")) == (503, "space_lost")
    assert classify(errors.SubscriptionLost("x")) == (503, "backend_unavailable")
    assert classify(errors.InvalidURL("x")) == (422, "invalid_url")
    assert classify(errors.PayloadTooLarge("x")) == (413, "payload_too_large")
    assert classify(RuntimeError("x")) == (500, "internal_error")


@pytest.mark.fault
def test_sse_stream_survives_a_backend_outage() -> None:
    import json

    redis = RedisServer(appendfsync="always").start()
    space = make_space(redis.url)
    app = create_app(space, heartbeat=0.2)
    try:
        with (
            ApiServer(app) as server,
            httpx.Client(base_url=server.url, timeout=10) as http,
            http.stream("GET", "/api/events/stream", params={"timeout": 30}) as stream,
        ):
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            redis.kill()
            error = next(line for line in lines if line.startswith("data: "))
            assert json.loads(error[6:])["error"]["code"] == "backend_unavailable"
            redis.restart()

            def submit() -> httpx.Response | None:
                r = http.post("/api/tasks", json={"name": "add", "args": [1, 2]})
                return r if r.status_code == 201 else None

            task = wait_until(submit, what="submits to work again")
            item = _sse_items(lines, lambda e: e.get("task_id") == task.json()["id"])
            assert item["kind"] == "submitted"
    finally:
        space.close()
        redis.close()


def _wipe(space: Space) -> None:
    """Wipe the space behind ``space`` as FLUSHALL or a deleted file would."""
    if space.scheme == "sqlite":
        path = space.url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    import redis

    from taskspace.backends.redis.conn import split_namespace

    prefix = space.store.conn.prefix  # type: ignore[attr-defined]
    client = redis.Redis.from_url(split_namespace(space.url)[0])
    try:
        keys = [k for k in client.scan_iter(count=1000) if k.decode().startswith(prefix)]
        assert keys
        client.delete(*keys)
    finally:
        client.close()


def test_a_wiped_space_is_503_space_lost_on_every_endpoint(api_space: Space) -> None:
    """F7: reads notice within SPACE_CHECK_S, a submit at once; nothing is written."""
    with test_client(create_app(api_space, tail_events=False)) as client:
        assert client.post("/api/tasks", json={"name": "add", "args": [1, 2]}).status_code == 201
        assert client.get("/api/tasks").status_code == 200  # checked: cached for a second
        _wipe(api_space)
        wait_until(lambda: client.get("/api/tasks").status_code == 503, 5, "space_lost")
        for path in ("/api/tasks", "/api/queues", "/api/workers", "/api/usage", "/metrics",
                     "/api/health", "/api/events", "/api/locks"):  # fmt: skip
            r = client.get(path)
            assert r.status_code == 503 and error_code(r) == "space_lost", (path, r.text)
        r = client.post("/api/tasks", json={"name": "add", "args": [3, 4]})
        assert r.status_code == 503 and error_code(r) == "space_lost"
        page = client.get("/")
        assert page.status_code == 503 and "wiped or replaced" in page.text
    with test_client(create_app(api_space, tail_events=False)) as client:  # a fresh app
        r = client.post("/api/tasks", json={"name": "add", "args": [5, 6]})  # checked first
        assert r.status_code == 503 and error_code(r) == "space_lost"


def test_without_a_token_only_local_host_names_are_served(tmp_path: Path) -> None:
    """F5 (DNS rebinding): a token-less server answers only Host headers naming
    the bound address or loopback (any port), or an --allowed-host; others get
    400 invalid_host; a POST from a foreign Origin is 403."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    with Space(f"sqlite:///{tmp_path}/s.db") as space:
        app = create_app(space, tail_events=False, allowed_hosts=["dash.example.com"])
        with TestClient(app) as client:
            for host in ("attacker.example:18751", "attacker.example", "127.0.0.1.evil.example",
                         "localhost.evil", "0.0.0.0:8750", "bad host"):  # fmt: skip
                for method, path in (("GET", "/api/tasks"), ("POST", "/api/tasks"), ("GET", "/")):
                    r = client.request(method, path, headers={"Host": host}, json={"name": "x"})
                    assert r.status_code == 400 and error_code(r) == "invalid_host", (host, path)
            for host in ("127.0.0.1:8750", "localhost", "LOCALHOST:1", "[::1]:8750",
                         "dash.example.com:443"):  # fmt: skip
                assert client.get("/api/tasks", headers={"Host": host}).status_code == 200, host
            ok = {"Host": "127.0.0.1:8750"}
            evil = client.post("/api/dead/retry", json={"ids": []},
                               headers={**ok, "Origin": "http://attacker.example"})  # fmt: skip
            assert evil.status_code == 403
            same = client.post("/api/dead/retry", json={"ids": []},
                               headers={**ok, "Origin": "http://127.0.0.1:8750"})  # fmt: skip
            assert same.status_code == 200
        # bound to ::1: its name is served; a token turns the check off unless hosts are given
        with TestClient(create_app(space, host="::1", tail_events=False)) as client:
            assert client.get("/api/health", headers={"Host": "[::1]:9"}).status_code == 200
        with TestClient(create_app(space, token=TOKEN, tail_events=False)) as client:
            r = client.get("/api/health", headers={"Host": "dash.example.org"})
            assert r.status_code == 200
        for bad in ("http://x.example", "x.example:80", "a b", ""):
            with pytest.raises(ConfigError, match="allowed_hosts"):
                create_app(space, allowed_hosts=[bad])
        with pytest.raises(ConfigError, match="allowed_hosts"):
            create_app(space, allowed_hosts="x.example")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis+sentinel://:pw@h:26379,h2:26379/m?sentinel_password=SECRET&db=1",
         "redis+sentinel://:***@h:26379,h2:26379/m?sentinel_password=***&db=1"),
        ("redis://u:p@ss@h/0?password=x", "redis://u:***@h/0?password=***"),
        ("postgresql://h/db?sslpassword=x&api_token=y&sslmode=require",
         "postgresql://h/db?sslpassword=***&api_token=***&sslmode=require"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ],
)  # fmt: skip
def test_every_password_in_a_url_is_redacted(url: str, shown: str) -> None:
    from taskspace.api.errors import redact_text, redact_url

    assert redact_url(url) == shown
    assert redact_text(f"Redis at {url}: refused.") == f"Redis at {shown}: refused."


def test_health_and_the_dashboard_never_show_the_sentinel_password() -> None:
    """F18: the open /api/health and a signed-in dashboard page, with the
    sentinels unreachable, show neither password."""
    url = (f"redis+sentinel://:s3cretpw@127.0.0.1:{free_port()}/mymaster"
           "?sentinel_password=SENTINEL-SECRET")  # fmt: skip
    with Space(url) as space, test_client(create_app(space, token=TOKEN, tail_events=False)) as c:
        health = c.get("/api/health")
        assert health.status_code == 503 and error_code(health) == "backend_unavailable"
        assert "sentinel_password=***" in health.text, health.text
        c.cookies.set(auth.COOKIE, TOKEN)
        for path in ("/", "/api/queues"):
            r = c.get(path)
            assert r.status_code == 503, (path, r.text)
            assert "SENTINEL-SECRET" not in r.text and "s3cretpw" not in r.text, path
        assert "SENTINEL-SECRET" not in health.text and "s3cretpw" not in health.text
