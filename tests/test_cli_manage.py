"""The CLI as a newcomer meets it: commands that inspect never create a space,
input is validated before anything is written, ``--url`` acts on that URL
only, and tasks can be listed, shown, retried, cancelled and purged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from taskspace import Space
from taskspace.cli import main
from tests.services import shared_redis

APP = textwrap.dedent(
    """
    from taskspace import Space

    space = Space()

    @space.task
    def add(a, b):
        return a + b

    @space.task(max_attempts=1)
    def fail():
        raise ValueError("no luck")
    """
)


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "mapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASKSPACE_URL", f"sqlite:///{tmp_path}/space.db")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mapp", None)


def cli(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=input)
    return result.exit_code, result.output


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskspace", *args], cwd=cwd, env=env or os.environ.copy(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def assert_timings(doc: dict[str, object]) -> None:
    """Ages in a shown task are seconds ago on the wall clock (a minute at most
    here), and the run took no longer than the time since it started."""
    for key in ("age_s", "started_s_ago", "finished_s_ago"):
        value = doc[key]
        assert isinstance(value, float | int) and 0 <= value < 60, (key, doc)
    ran = doc["ran_s"]
    assert isinstance(ran, float | int) and 0 <= ran <= doc["started_s_ago"], doc  # type: ignore[operator]


@pytest.mark.parametrize("command", [["status"], ["tasks", "list"], ["tasks", "show", "x" * 32]])
def test_inspecting_an_absent_space_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKSPACE_URL", raising=False)
    code, output = cli(*command)
    assert code == 2 and "no space" in output, output
    assert list(tmp_path.iterdir()) == []
    code, output = cli(*command, "--url", "sqlite:////nonexistent/dir/space.db")
    assert code == 2 and "no space" in output, output
    assert not Path("/nonexistent").exists()


def test_submit_validates_everything_before_submitting(app_dir: Path) -> None:
    code, output = cli("submit", "mapp:space", "add", "--args", "[1, 2]", "--timeout", "-1",
                       "--wait")  # fmt: skip
    assert code == 2 and "--timeout" in output
    assert not (app_dir / "space.db").exists()


def test_short_task_names_and_tasks_commands(app_dir: Path) -> None:
    code, out = cli("submit", "mapp:space", "add", "--args", "[2, 40]")
    assert code == 0, out
    ok_id = out.strip()
    code, out = cli("submit", "mapp:space", "fail")
    fail_id = out.strip()
    worker = run("worker", "mapp:space", "--burst", cwd=app_dir)
    assert worker.returncode == 0, worker.stderr

    code, out = cli("tasks", "list", "--json")
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert [(r["id"], r["name"], r["state"]) for r in rows] == [
        (ok_id, "mapp.add", "succeeded"), (fail_id, "mapp.fail", "failed")
    ]  # fmt: skip
    assert all(0 <= r["age_s"] < 60 for r in rows), rows
    code, out = cli("tasks", "list", "--state", "failed")
    assert code == 0 and fail_id in out and ok_id not in out

    code, out = cli("tasks", "show", ok_id)
    doc = orjson.loads(out)
    assert (doc["arguments"], doc["result"], doc["attempts"]) == ([[2, 40]], 42, 1)
    assert_timings(doc)
    code, out = cli("tasks", "show", fail_id)
    assert "ValueError" in out and "no luck" in out and "Traceback" in out

    code, out = cli("tasks", "retry", "--state", "failed")
    assert code == 0 and "requeued 1" in out
    assert Space().handle(fail_id).status() == "queued"
    code, out = cli("tasks", "cancel", fail_id)
    assert code == 0 and "cancelled" in out
    code, out = cli("tasks", "retry", ok_id)
    assert code == 2 and "only failed or dead" in out


def test_queues_purge_asks_first(app_dir: Path) -> None:
    for i in range(3):
        assert cli("submit", "mapp:space", "add", "--args", f"[{i}, 0]")[0] == 0
    code, out = cli("queues", "purge", "default", input="n\n")
    assert code == 1 and "delete 3 queued task(s)" in out
    assert Space().stats().total("queued") == 3
    code, out = cli("queues", "purge", "default", "--yes")
    assert code == 0 and "deleted 3" in out
    assert Space().stats().total("queued") == 0
    code, out = cli("queues", "purge", "default", "--state", "running", "--yes")
    assert code == 2


def test_status_names_tasks_no_live_worker_runs(app_dir: Path) -> None:
    (app_dir / "other.py").write_text(
        "from taskspace import Space\nspace = Space()\n@space.task\ndef lonely():\n    return 1\n"
    )
    assert cli("submit", "other:space", "lonely")[0] == 0
    space = Space()
    space.store.kv.put(  # a live worker that runs only mapp's tasks
        "taskspace/workers/w1",
        orjson.dumps(
            {
                "name": "w1",
                "queues": ["default"],
                "concurrency": 1,
                "running": 0,
                "succeeded": 0,
                "started": 0,
                "tasks": ["mapp.add"],
            }
        ),
        ttl=30,
    )
    _, out = cli("status", "--json")
    assert orjson.loads(out)["unrunnable"] == {"other.lonely": 1}
    _, out = cli("status")
    assert "no live worker runs this task" in out


def test_url_option_acts_on_that_url_only(app_dir: Path) -> None:
    redis_url = shared_redis().namespaced_url()
    env = os.environ.copy()
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskspace", "worker", "mapp:space", "--url", redis_url],
        cwd=app_dir, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        done = run("submit", "mapp:space", "add", "--args", "[20, 22]", "--wait", "--timeout",
                   "30", "--url", redis_url, cwd=app_dir)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "42"
        task_id = done.stdout.splitlines()[0]
        code, out = cli("status", "--json", "--url", redis_url)
        status = orjson.loads(out)
        assert status["queues"]["default"]["succeeded"] == 1
        now = Space(redis_url).store.clock.wall()
        assert [0 <= now - w["started"] < 60 for w in status["workers"]] == [True], status
        code, out = cli("tasks", "list", "--json", "--url", redis_url)
        assert orjson.loads(out.splitlines()[0])["id"] == task_id
        code, out = cli("tasks", "show", task_id, "--url", redis_url)
        assert orjson.loads(out)["result"] == 42
        assert_timings(orjson.loads(out))
        code, out = cli("tasks", "cancel", task_id, "--url", redis_url)
        assert code == 0 and "succeeded" in out
        assert not (app_dir / "space.db").exists()  # the app's own SQLite URL was never touched
        assert not (app_dir / ".taskspace").exists()
    finally:
        worker.terminate()
        worker.communicate(timeout=30)


def test_help_is_light() -> None:
    """--help must not import what only some commands need (rich, the worker,
    redis, the demo): they made start-up slow."""
    probe = (
        "import sys; from taskspace.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('rich', 'taskspace.worker.worker', 'redis', 'sklearn', 'asyncio')"
        " if m in sys.modules]\nprint('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
