"""``taskspace periodic list``: each schedule with its spec, zone, policy, next and
last run; it never creates a space, and ``--url`` reads that URL only."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from taskspace.cli import main
from taskspace.coordination.periodic import fire_due
from taskspace.space import Space

APP = textwrap.dedent(
    """
    from taskspace import Space

    space = Space()

    @space.periodic(cron="*/5 * * * *", tz="Europe/Berlin")
    def report():
        return "ok"

    @space.periodic(every=30, catch_up="all", args=(1,), queue="beats")
    def ping(x):
        return x

    empty = Space()
    """
)


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "papp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASKSPACE_URL", f"sqlite:///{tmp_path}/space.db")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("papp", None)
    sys.modules.pop("badapp", None)


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def listed(*args: str) -> dict[str, dict[str, Any]]:
    code, output = cli("periodic", "list", "papp:space", "--json", *args)
    assert code == 0, output
    return {row["name"]: row for row in orjson.loads(output)}


def app_space() -> Space:
    import papp  # type: ignore[import-not-found]

    space = papp.space
    assert isinstance(space, Space)
    return space


def test_list_before_any_space_exists_creates_none(app_dir: Path) -> None:
    rows = listed()
    assert not (app_dir / "space.db").exists()
    assert set(rows) == {"papp.report", "papp.ping"}
    report, ping = rows["papp.report"], rows["papp.ping"]
    assert (report["spec"], report["tz"], report["catch_up"]) == (
        "cron */5 * * * *",
        "Europe/Berlin",
        "latest",
    )
    assert (ping["every"], ping["catch_up"], ping["queue"]) == (30, "all", "beats")
    now = time.time()
    assert 0 < report["next_run"] - now <= 300 and report["next_run"] % 300 == 0
    assert report["next_run_local"].endswith(("+01:00", "+02:00"))
    assert 0 < ping["next_in_s"] <= 30 and not report["seen"] and report["last_run"] is None
    code, output = cli("periodic", "list", "papp:space")
    assert code == 0 and "no maintainer has seen it yet" in output and "no space there" in output
    assert "cron */5 * * * *" in output and "Europe/Berlin" in output
    assert not (app_dir / "space.db").exists()


def test_list_shows_the_last_run_from_the_store(app_dir: Path) -> None:
    space = app_space()
    now = space.store.clock.wall()
    tick = (int(now) // 30 + 1) * 30  # the first tick after now
    fire_due(space, at=now)
    fire_due(space, at=tick + 0.5)  # (now, tick + 0.5] holds that tick alone
    ping = listed()["papp.ping"]
    assert ping["seen"] and ping["last_run"] == tick and ping["fired"] == 1
    assert ping["last_task_id"] == f"periodic:papp.ping:{tick}"
    assert ping["last_task_state"] == "queued" and ping["pending"] == []
    assert ping["next_run"] == tick + 30
    code, output = cli("periodic", "list", "papp:space")
    assert code == 0 and "ago, queued" in output and "papp.ping" in output
    space.store.queue.purge("beats", ["queued"])
    assert listed()["papp.ping"]["last_task_state"] == "deleted"


def test_list_reads_the_url_given(app_dir: Path) -> None:
    space = app_space()
    fire_due(space)
    other = f"sqlite:///{app_dir}/other.db"
    rows = listed("--url", other)
    assert not rows["papp.ping"]["seen"] and not (app_dir / "other.db").exists()
    assert listed()["papp.ping"]["seen"]


def test_an_app_without_schedules_says_so(app_dir: Path) -> None:
    code, output = cli("periodic", "list", "papp:empty")
    assert code == 0 and "no periodic schedules in papp:empty" in output
    code, output = cli("periodic", "list", "papp:empty", "--json")
    assert code == 0 and orjson.loads(output) == []


def test_a_bad_app_is_one_line_and_exit_2(app_dir: Path) -> None:
    code, output = cli("periodic", "list", "nope:space")
    assert code == 2 and "cannot import app module 'nope'" in output
    (app_dir / "badapp.py").write_text(
        "from taskspace import Space\nspace = Space()\n"
        "@space.periodic(cron='*/5 * * *')\ndef f():\n    pass\n"
    )
    code, output = cli("periodic", "list", "badapp:space")
    assert code == 2 and "invalid cron expression '*/5 * * *'" in output
    assert len(output.strip().splitlines()) == 1


def test_help_explains_the_command() -> None:
    code, output = cli("periodic", "list", "--help")
    assert code == 0 and "next run" in output and "--json" in output and "--url" in output
    code, output = cli("periodic", "--help")
    assert code == 0 and "exactly once" in output
