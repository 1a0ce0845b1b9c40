"""``taskspace services`` and ``taskspace status`` on the registry: tables and
JSON, one service in detail, workers with their health, a missing space."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from taskspace import Space
from taskspace.cli import main
from taskspace.worker.registry import announce, withdraw


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/space.db"


@pytest.fixture
def space(url: str) -> Space:
    space = Space(url)
    reg = space.registry
    reg.register("api", "api-1", "10.0.0.1:8080", tags=["v1", "eu"], meta={"zone": "a"}, ttl=None)
    reg.register("api", "api-2", "10.0.0.2:8080", tags=["v2"], ttl=None).update(
        status="warning", output="slow replies"
    )
    reg.register("db", "db-1", "10.0.1.1:5432", check="tcp://127.0.0.1:1", ttl=None)
    return space


def test_services_lists_every_instance(space: Space, url: str) -> None:
    code, out = cli("services", "--url", url)
    assert code == 0, out
    for text in ("api-1", "api-2", "db-1", "10.0.0.1:8080", "v1,eu", "passing", "warning",
                 "critical"):  # fmt: skip
        assert text in out, text
    code, out = cli("services", "--url", url, "--json")
    doc = orjson.loads(out)
    assert sorted(doc) == ["api", "db"]
    assert [(i["id"], i["status"]) for i in doc["api"]] == [("api-1", "passing"),
                                                            ("api-2", "warning")]  # fmt: skip
    assert doc["db"][0]["check"] == "tcp://127.0.0.1:1" and doc["db"][0]["tags"] == []


def test_services_show_one_service(space: Space, url: str) -> None:
    code, out = cli("services", "show", "api", "--url", url)
    assert code == 0 and "slow replies" in out and "meta.zone    a" in out and "api-1" in out
    assert "db-1" not in out
    code, out = cli("services", "show", "api", "--url", url, "--json", "--healthy")
    assert [i["id"] for i in orjson.loads(out)] == ["api-1"]
    code, out = cli("services", "--url", url, "--json", "show", "api", "--tag", "v2")
    assert [i["id"] for i in orjson.loads(out)] == ["api-2"]
    code, out = cli("services", "show", "nothing", "--url", url)
    assert code == 0 and "no instances of 'nothing'" in out
    code, out = cli("services", "show", "bad name", "--url", url)
    assert code == 2 and "service='bad name'" in out


def test_services_on_a_missing_space_or_an_empty_one(tmp_path: Path) -> None:
    code, out = cli("services", "--url", f"sqlite:///{tmp_path}/none.db")
    assert code == 2 and not (tmp_path / "none.db").exists()
    empty = f"sqlite:///{tmp_path}/empty.db"
    Space(empty).stats()
    code, out = cli("services", "--url", empty)
    assert code == 0 and "no services registered" in out


def test_status_lists_workers_with_their_health(space: Space, url: str) -> None:
    info = {"name": "w1", "queues": ["default"], "tasks": [], "concurrency": 2, "running": 1,
            "succeeded": 5, "started": space.store.clock.wall()}  # fmt: skip
    announce(space.store, "w1", info, ttl=30)
    code, out = cli("status", "--url", url, "--json")
    (worker,) = orjson.loads(out)["workers"]
    assert worker["name"] == "w1" and worker["health"] == "passing" and worker["running"] == 1
    code, out = cli("status", "--url", url)
    assert code == 0 and "w1" in out and "passing" in out and "health" in out
    code, out = cli("services", "show", "taskspace.worker", "--url", url)
    assert "w1" in out and "queue:default" in out
    withdraw(space.store, "w1")
    assert orjson.loads(cli("status", "--url", url, "--json")[1])["workers"] == []


def test_help_explains_the_commands() -> None:
    code, out = cli("services", "--help")
    assert code == 0 and "passing, warning or critical" in out and "show" in out
    code, out = cli("services", "show", "--help")
    assert code == 0 and "--healthy" in out and "--tag" in out
    code, out = cli("--help")
    assert "services" in out


def test_status_names_the_elected_maintainer(space: Space, url: str) -> None:
    from taskspace.worker.maintainer import ELECTION

    assert orjson.loads(cli("status", "--url", url, "--json")[1])["maintainer"] is None
    code, out = cli("status", "--url", url)
    assert code == 0 and "maintainer: none elected" in out
    term = space.election(ELECTION).campaign(identity="host-a:7", ttl=30)
    try:
        doc = orjson.loads(cli("status", "--url", url, "--json")[1])
        assert doc["maintainer"] == {"identity": "host-a:7", "term": term.number}
        code, out = cli("status", "--url", url)
        assert code == 0 and f"maintainer: host-a:7 (term {term.number})" in out
    finally:
        term.resign()
