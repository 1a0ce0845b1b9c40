"""The dashboard in a real browser (Chromium through Playwright), over a real
server (uvicorn on a loopback port, in a thread) on a SQLite space with a
real worker process: a task submitted during the test shows up live, a
task's log lines follow live on its page and in the log view, cancel and
retry work from the page (the store says so), bulk retry works from the dead
page, the workers and usage pages show the worker and the recorded usage.

Screenshots are written to artifacts/screenshots/ under the repository (not
tracked). Chromium is /usr/bin/chromium (or $TASKSPACE_CHROMIUM); without
it the browser tests skip, or fail under TASKSPACE_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskspace import Space, current_task
from tests.services import free_port, missing

REPO_ROOT = Path(__file__).resolve().parents[2]
SHOTS = REPO_ROOT / "artifacts" / "screenshots"
CHROMIUM = os.environ.get("TASKSPACE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
APP = "tests.observability.test_dashboard:make_space"
WAIT_MS = 10_000
GATE_WAIT_S = 20.0


def make_space(url: str | None = None) -> Space:
    """The test's app: tasks that log, wait on a file, fail once, record usage."""
    space = Space(url)

    @space.task(name="dash.add")
    def add(a: int, b: int) -> int:
        return a + b

    @space.task(name="dash.talk")
    def talk(marker: str, gate: str) -> str:
        log = logging.getLogger("dash.talk")
        log.info("waiting for the gate")
        deadline = time.monotonic() + GATE_WAIT_S
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("marker %s", marker)
        return marker

    @space.task(name="dash.flaky", max_attempts=1)
    def flaky(flag: str) -> str:
        if not Path(flag).exists():
            Path(flag).touch()
            raise RuntimeError("the first attempt fails")
        return "ok"

    @space.task(name="dash.llm")
    def llm(n: int) -> int:
        current_task().record(tokens_in=n, tokens_out=2 * n, cost_usd=0.001 * n, model="test-model")
        return n

    return space


@dataclass
class Dashboard:
    """A served dashboard, its space (the test's own handle), its worker and a workdir."""

    url: str
    space: Space
    workdir: Path
    worker: subprocess.Popen[bytes]

    def state(self, task_id: str) -> str:
        """The task's state as the store holds it."""
        return self.space.handle(task_id).status()

    def wait_state(self, task_id: str, states: set[str], timeout: float = 10.0) -> str:
        """Wait (bounded) until the store holds the task in one of ``states``."""
        deadline = time.monotonic() + timeout
        while (state := self.state(task_id)) not in states:
            if time.monotonic() > deadline:
                log = (self.workdir / "worker.log").read_text(errors="replace")[-3000:]
                code = self.worker.poll()
                alive = "alive" if code is None else f"exited {code}"
                raise AssertionError(f"task {task_id} still {state}, wanted {states};"
                                     f" worker {alive}, its log ends:\n{log}")  # fmt: skip
            self.space.store.queue.wait_for_finish([task_id], 0.1)
        return state


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _serve(app: Any, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none",
                            lifespan="on", timeout_graceful_shutdown=2)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread


def _launch_browser() -> tuple[Any, Any]:
    if not Path(CHROMIUM).exists():
        missing(f"chromium ({CHROMIUM})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception:
        playwright.stop()
        raise
    return playwright, browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright, browser = _launch_browser()
    try:
        yield browser
    finally:
        browser.close()
        playwright.stop()


def _page(browser: Any) -> Any:
    """A new page with a laptop-sized viewport."""
    return browser.new_page(viewport={"width": 1366, "height": 800})


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    from taskspace.api.app import create_app

    workdir = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{workdir}/space.db"
    space = make_space(url)
    space.stats()  # create the space before the worker and the server open it
    server, thread = _serve(create_app(space), free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TASKSPACE_URL": url}
    with open(workdir / "worker.log", "wb") as worker_log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "taskspace", "worker", APP, "--url", url, "--concurrency", "4",
             "--log-level", "info", "--maintainer-ttl", "2", "--maintainer-retry", "1"],
            cwd=REPO_ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield Dashboard(f"http://127.0.0.1:{server.config.port}", space, workdir, worker)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        server.should_exit = True
        thread.join(timeout=10)
        space.close()


def _expect(locator: Any) -> Any:
    from playwright.sync_api import expect

    return expect(locator)


def _until(check: Callable[[], bool], page: Any, timeout: float = 10.0) -> None:
    """Reload ``page`` until ``check()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        page.wait_for_timeout(300)
        page.reload()


def test_a_task_submitted_during_the_test_shows_up_live(dash: Dashboard, browser: Any) -> None:
    page = _page(browser)
    page.goto(dash.url + "/")
    _expect(page.locator("#live")).to_have_attribute("data-state", "on", timeout=WAIT_MS)
    handle = dash.space.get_task("dash.add").submit(2, 3)
    # The event feed and the queue table update without a reload.
    _expect(page.locator(f'#feed li[data-task-id="{handle.id}"]').first).to_be_visible(
        timeout=WAIT_MS
    )
    assert handle.result(timeout=10) == 5
    row = page.locator('#queues tr[data-queue="default"]')
    _expect(row.locator('a[data-state="succeeded"]')).not_to_have_text("0", timeout=WAIT_MS)
    _shot(page, "queues")

    page.goto(dash.url + "/tasks?name=dash.add")
    _expect(page.locator(f'tr[data-id="{handle.id}"]')).to_be_visible()
    later = dash.space.get_task("dash.add").submit(4, 5)  # while the table is open
    _expect(page.locator(f'tr[data-id="{later.id}"]')).to_be_visible(timeout=WAIT_MS)
    later.result(timeout=10)
    _expect(page.locator(f'tr[data-id="{later.id}"] .badge')).to_have_text(
        "succeeded", timeout=WAIT_MS
    )
    _shot(page, "tasks")
    page.goto(dash.url + "/tasks?order=recent")  # latest activity first
    _expect(page.locator("tr[data-id]").first).to_have_attribute("data-id", later.id)
    _expect(page.locator(f'tr[data-id="{handle.id}"]')).to_be_visible()
    page.close()


def test_a_task_page_follows_its_logs_live(dash: Dashboard, browser: Any) -> None:
    marker = uuid.uuid4().hex[:12]
    gate = dash.workdir / f"gate-{marker}"
    handle = dash.space.get_task("dash.talk").submit(marker, str(gate))
    dash.wait_state(handle.id, {"running"})
    page = _page(browser)
    page.goto(f"{dash.url}/tasks/{handle.id}")
    _expect(page.locator("#task-state")).to_have_text("running")
    logs = page.locator("#logs")
    _expect(logs).to_contain_text("waiting for the gate", timeout=WAIT_MS)
    assert f"marker {marker}" not in logs.inner_text()
    gate.touch()  # the task logs its marker and ends while the page is open
    _expect(logs).to_contain_text(f"marker {marker}", timeout=WAIT_MS)
    _expect(page.locator("#task-state")).to_have_text("succeeded", timeout=WAIT_MS)
    _expect(page.locator("#task-result")).to_contain_text(marker)
    _shot(page, "task")

    # The log view follows every task's records as they arrive.
    page.goto(dash.url + "/logs")
    _expect(page.locator("#live")).to_have_attribute("data-state", "on", timeout=WAIT_MS)
    other = uuid.uuid4().hex[:12]
    open_gate = dash.workdir / f"gate-{other}"
    open_gate.touch()
    dash.space.get_task("dash.talk").submit(other, str(open_gate))
    _expect(page.locator("#logs")).to_contain_text(f"marker {other}", timeout=WAIT_MS)
    _shot(page, "logs")
    page.close()


def test_cancel_and_retry_from_the_task_page(dash: Dashboard, browser: Any) -> None:
    page = _page(browser)
    parked = dash.space.get_task("dash.add").options(queue="parked").submit(1, 1)  # no worker
    page.goto(f"{dash.url}/tasks/{parked.id}")
    _expect(page.locator('button[data-action="retry"]')).to_be_disabled()
    page.click('button[data-action="cancel"]')
    _expect(page.locator("#task-state")).to_have_text("cancelled", timeout=WAIT_MS)
    assert dash.state(parked.id) == "cancelled"
    _expect(page.locator('button[data-action="cancel"]')).to_be_disabled()

    flag = dash.workdir / f"flag-{uuid.uuid4().hex}"
    flaky = dash.space.get_task("dash.flaky").submit(str(flag))
    assert dash.wait_state(flaky.id, {"failed", "succeeded"}) == "failed"
    page.goto(f"{dash.url}/tasks/{flaky.id}")
    _expect(page.locator(".traceback")).to_contain_text("the first attempt fails")
    page.click('button[data-action="retry"]')
    _expect(page.locator("#toast")).to_contain_text("retry: task is", timeout=WAIT_MS)
    assert dash.wait_state(flaky.id, {"succeeded", "failed"}) == "succeeded"
    assert dash.space.handle(flaky.id).info().attempts == 1  # a fresh attempt, run once
    _expect(page.locator("#task-state")).to_have_text("succeeded", timeout=WAIT_MS)
    _shot(page, "task-retried")
    page.close()


def test_bulk_retry_from_the_dead_page(dash: Dashboard, browser: Any) -> None:
    flaky = dash.space.get_task("dash.flaky")
    handles = [flaky.submit(str(dash.workdir / f"flag-{uuid.uuid4().hex}")) for _ in range(2)]
    for handle in handles:
        assert dash.wait_state(handle.id, {"failed", "succeeded"}) == "failed"
    page = _page(browser)
    page.goto(dash.url + "/dead?state=failed&name=dash.flaky")
    for handle in handles:
        _expect(page.locator(f'tr[data-id="{handle.id}"]')).to_be_visible()
    _shot(page, "dead")
    for handle in handles:
        page.check(f'input.pick[value="{handle.id}"]')
    _expect(page.locator("#selected-count")).to_have_text("2 selected")
    page.click("#retry-selected")
    _expect(page.locator("#toast")).to_contain_text("retried 2", timeout=WAIT_MS)
    for handle in handles:
        assert dash.wait_state(handle.id, {"succeeded", "failed"}) == "succeeded"
    page.close()


def test_workers_and_usage_pages(dash: Dashboard, browser: Any) -> None:
    page = _page(browser)
    page.goto(dash.url + "/workers")
    row = page.locator("tr[data-worker]").first
    _expect(row).to_be_visible(timeout=WAIT_MS)
    _expect(row.locator(".badge")).to_have_text("passing")
    row.locator("summary").click()
    _expect(row).to_contain_text("dash.talk")
    _shot(page, "workers")

    dash.space.get_task("dash.llm").submit(100).result(timeout=10)
    page.goto(dash.url + "/usage")
    _until(lambda: "test-model" in page.locator("#usage").inner_text(), page)
    _expect(page.locator("#usage")).to_contain_text("dash.llm")
    _shot(page, "usage")
    page.close()


def test_the_event_digest_reads_only_the_recent_window_then_what_is_new(space: Space) -> None:
    from taskspace.api.dashboard_data import WINDOW_S, EventDigest, queue_rows
    from taskspace.events import EVENTS_STREAM, TaskEvent, encode_event

    now = space.store.clock.wall()

    def events(times: list[float], kind: str = "succeeded") -> list[bytes]:
        return [encode_event(TaskEvent(0, t, kind, f"t{i}", "dash.add", "default", "w", 1,
                                       duration=0.5)) for i, t in enumerate(times)]  # fmt: skip

    old = [now - WINDOW_S - 600 + i for i in range(10)]
    recent = [now - 60 + i for i in range(5)]
    space.store.streams.append_many(EVENTS_STREAM, events(old + recent))
    digest = EventDigest(space)
    assert digest.refresh() and digest.caught_up
    assert [e.time for e in digest.recent] == recent  # the old ones were never read
    space.store.streams.append_many(EVENTS_STREAM, events([now + 1, now + 2], "failed"))
    assert digest.refresh()
    assert [e.kind for e in digest.recent][-2:] == ["failed", "failed"]
    assert len(digest.recent) == 7
    (row,) = queue_rows(space, space.stats(), digest)
    assert row["name"] == "default" and row["p50"] == 0.5 and row["spark"]
    assert row["per_minute"] == pytest.approx(7 * 60 / 300)


def test_bad_input_gets_a_clear_page_and_nothing_changes(dash: Dashboard) -> None:
    import html

    import httpx

    before = dash.space.stats().counts
    with httpx.Client(base_url=dash.url, timeout=10) as client:
        for path, status, words in [
            ("/tasks?state=bogus", 400, "unknown state 'bogus'"),
            ("/tasks?limit=100000", 400, "limit must be an integer from 1 to 500"),
            ("/dead?state=queued", 400, "unknown state 'queued'"),
            ("/logs?level=loud", 400, "unknown level 'loud'"),
            ("/tasks/" + "f" * 32, 404, "f" * 32),
            ("/static/..%2Fdashboard.py", 404, "not_found"),
            ("/static/dashboard.py", 404, "no static file"),
        ]:
            response = client.get(path)
            assert response.status_code == status, path
            assert words in html.unescape(response.text), (path, response.text)
    assert dash.space.stats().counts == before


def test_with_a_token_pages_send_a_browser_to_login(dash: Dashboard) -> None:
    import httpx

    from taskspace.api.app import create_app

    token = "t" * 24
    server, thread = _serve(create_app(dash.space, token=token, tail_events=False), free_port())
    try:
        url = f"http://127.0.0.1:{server.config.port}"
        with httpx.Client(base_url=url, timeout=10) as client:
            page = client.get("/tasks?state=queued")
            assert page.status_code == 303
            assert page.headers["location"] == "/login?next=%2Ftasks%3Fstate%3Dqueued"
            assert client.get("/partials/queues").status_code == 401
            assert client.post("/login", json={"token": "x" * 24}).status_code == 401
            assert client.post("/login", json={"token": token}).status_code == 200
            assert client.get("/tasks?state=queued").status_code == 200  # the cookie now
            for given, kept in (("/\t/evil.example/phish", "/"), ("/workers", "/workers")):
                login = client.get("/login", params={"next": given})  # F6
                assert f'data-next="{kept}"' in login.text
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_worker_rows_show_heartbeats_and_survive_malformed_info(space: Space) -> None:
    from taskspace.api.dashboard_data import worker_rows
    from taskspace.coordination.registry import WORKER_SERVICE
    from taskspace.worker.registry import announce

    info = {"name": "w1", "host": "h", "pid": 1, "queues": ["default"], "tasks": ["a.b"],
            "concurrency": 4, "running": 3, "started": space.store.clock.wall() - 60,
            "succeeded": 7, "failed": 1}  # fmt: skip
    announce(space.store, "w1", info, ttl=30)
    odd_meta = {"concurrency": "four", "queues": 5, "running": None}
    odd = space.registry.register(WORKER_SERVICE, "w2", "there", heartbeat=False, meta=odd_meta)
    try:
        rows = {r["name"]: r for r in worker_rows(space)}
        good = rows["w1"]
        assert good["load"] == 0.75 and good["tasks"] == ["a.b"] and good["succeeded"] == 7
        assert 0 <= good["heartbeat_s"] < 5 and 59 <= good["up_s"] < 70
        bad = rows["w2"]
        assert bad["concurrency"] == 0 and bad["queues"] == [] and bad["load"] == 0.0
    finally:
        odd.deregister()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u:pw@h/db?password=x&sslmode=require",
         "postgresql://u:***@h/db?password=***&sslmode=require"),
        ("postgresql:///db?PASSWORD=x", "postgresql:///db?PASSWORD=***"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ],
)  # fmt: skip
def test_the_header_never_shows_a_password(url: str, shown: str) -> None:
    from taskspace.api.dashboard_data import redact_url

    assert redact_url(url) == shown


def test_every_page_and_partial_answers_200(dash: Dashboard) -> None:
    """F9: every GET route of the dashboard (pages and their /partials twins,
    found from the router, so a new one is covered too) renders with 200."""
    import httpx

    from taskspace.api.dashboard import STATIC_FILES, router

    handle = dash.space.get_task("dash.add").submit(1, 1)
    paths = []
    for route in router.routes:
        methods = getattr(route, "methods", None) or set()
        path = str(getattr(route, "path", ""))
        if "GET" not in methods or path == "/login":  # /login without a token: 303 to /
            continue
        path = path.replace("{task_id}", handle.id).replace("{name}", sorted(STATIC_FILES)[0])
        paths.append(path)
    assert "/partials/dead" in paths and "/dead" in paths and len(paths) >= 12
    paths += ["/partials/dead?state=failed", "/partials/tasks?order=recent"]
    with httpx.Client(base_url=dash.url, timeout=10) as client:
        for path in paths:
            response = client.get(path)
            assert response.status_code == 200, (path, response.text[:300])


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("/tasks?state=queued", "/tasks?state=queued"),
        ("/", "/"),
        ("/tasks/ab?q=a%20b", "/tasks/ab?q=a%20b"),
        ("/\t/evil.example/phish", "/"),  # F6: browsers drop the TAB: //evil.example
        ("/\n/evil.example", "/"),
        ("/%09/evil.example", "/"),  # the same, percent-encoded once more
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("/%5Cevil.example", "/"),
        ("https://evil.example", "/"),
        ("evil", "/"),
        ("", "/"),
    ],
)
def test_login_returns_only_to_a_same_site_path(given: str, kept: str) -> None:
    from taskspace.api.dashboard import _safe_next

    assert _safe_next(given) == kept
