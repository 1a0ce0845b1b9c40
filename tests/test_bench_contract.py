"""Smoke test of ``python -m bench contract``: a tiny run prints a figure for every
measure of the store contract (no timing is asserted)."""

from __future__ import annotations

import re

import pytest
from bench.__main__ import main
from bench.contract import MEASURES, Run
from click.testing import CliRunner


@pytest.mark.parametrize(("backend", "repeat"), [("memory", 2), ("sqlite", 1)])
def test_contract_bench_prints_every_row(backend: str, repeat: int) -> None:
    args = ["contract", "--backend", backend, "--n", "3", "--repeat", str(repeat), "--warmup", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(re.match(rf"[│|]\s*{backend}\s*[│|]", line) for line in lines), result.output
    for measure in MEASURES:
        cell = re.compile(rf"[│|]\s*{re.escape(measure.label)}\s*[│|]")
        rows = [line for line in lines if cell.search(line)]
        assert len(rows) == 1, (measure.label, result.output)
        # p50 and p99 columns: two figures in ms, and no error cell.
        assert len(re.findall(r"\d+\.\d{3} ms", rows[0])) == 2, rows[0]
        assert "error" not in rows[0]
    wake = next(line for line in lines if "release → blocked leases.wait" in line)
    assert re.search(r"p50 (met|MISSED), p99 (met|MISSED)", wake), wake
    assert "early returns" in wake


def test_quantile_interpolates() -> None:
    run = Run([4.0, 1.0, 3.0, 2.0])
    assert run.quantile(0.5) == 2.5
    assert run.quantile(0.0) == 1.0
    assert run.quantile(1.0) == 4.0
