"""Smoke test of ``python -m bench locks``: tiny runs print every table with figures
(no timing is asserted), and the round-trip counting of the Redis comparison is right."""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

import pytest
from bench.__main__ import main
from bench.locks import (
    OURS_FAIR,
    OURS_UNFAIR,
    REDIS_PY,
    BackendResults,
    Contended,
    LocksBench,
    failover,
    report,
    run_uncontended,
)
from click.testing import CliRunner
from rich.console import Console

from tests.services import shared_redis

FIGURE = re.compile(r"\d+\.\d{3} ms")


def _rows(output: str, label: str) -> list[str]:
    return [line for line in output.splitlines() if label in line]


@pytest.mark.parametrize(("backend", "procs"), [("memory", "3"), ("sqlite", "2")])
def test_locks_bench_prints_every_table(backend: str, procs: str) -> None:
    args = ["locks", "--backend", backend, "--ops", "20", "--repeat", "1", "--contend", "0.3",
            "--procs", procs, "--kills", "0"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for label in (OURS_FAIR, OURS_UNFAIR):
        latency, contended = _rows(result.output, label)
        assert len(FIGURE.findall(latency)) == 2, latency  # p50 and p99
        assert len(FIGURE.findall(contended)) == 2, contended  # handoff p50 and p99
        assert re.search(r"[│|]\s*0\s*[│|]\s*$", contended), contended  # no overlap
    assert "election failover" not in result.output


def test_failover_after_sigkill_is_timed_and_reported(tmp_path: Path) -> None:
    config = LocksBench(backends=("sqlite",), kills=1, candidates=2, failover_ttl=0.5)
    got = failover(f"sqlite:///{tmp_path / 'f.db'}", config, "t", random.Random(1))
    assert len(got.seconds) == 1 and len(got.terms) == 2, got
    assert got.terms[0] < got.terms[1]
    assert 0 < got.seconds[0] <= got.bound + 0.5, got  # the killed lease expires within ttl
    console = Console(record=True, width=200)
    assert report(config, [BackendResults("sqlite", failover=got)], console)
    row = next(line for line in console.export_text().splitlines() if "sqlite" in line)
    assert re.search(r"\d+\.\d{3} s .* yes", row), row


def test_redis_comparison_counts_round_trips() -> None:
    server = shared_redis()
    spec = {
        "url": f"{server.url}?namespace=bench-locks-{uuid.uuid4().hex[:8]}",
        "plain": server.url,
        "redis": True,
        "tag": uuid.uuid4().hex[:8],
        "ops": 10,
        "repeat": 2,
        "warmup": 2,
        "contenders": [OURS_UNFAIR, REDIS_PY],
    }
    ours, redis_py = run_uncontended(spec, [])
    assert not ours.error and not redis_py.error, (ours.error, redis_py.error)
    assert [len(run) for run in redis_py.runs] == [10, 10]
    assert redis_py.trips == 2.0  # SET NX PX, then the unlock script
    assert redis_py.calls is None and redis_py.version.startswith("redis-py ")
    assert ours.calls is not None and ours.calls >= 1
    assert ours.trips is not None and ours.trips >= 1


def test_handoffs_and_overlaps_from_intervals() -> None:
    row = Contended(OURS_FAIR, 2, events=[(0.0, 0.001, 1), (0.003, 0.004, 2),
                                          (0.0045, 0.005, 2), (0.0049, 0.006, 1)])  # fmt: skip
    assert row.handoffs_ms() == pytest.approx([2.0, -0.1])  # only to another holder
    assert row.other_share() == pytest.approx(2 / 3)
    assert row.overlaps() == 1  # the last interval began before the one before it ended
