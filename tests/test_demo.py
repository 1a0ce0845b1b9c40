"""``taskspace demo`` as a newcomer runs it: it loses nothing, names the
trial retried after the worker kill, and does not wrap mid-phrase when piped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_loses_nothing_and_marks_the_retried_trial(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "60"}  # a narrow terminal must not matter when piped
    done = subprocess.run(
        [sys.executable, "-m", "taskspace", "demo", "--trials", "48"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    summary = [line for line in out.splitlines() if line.startswith("submitted 48")]
    assert summary, out
    assert "succeeded 48 · failed 0 · retried after worker loss" in summary[0]
    assert "lost 0" in summary[0]
    assert "retried: worker pid" in out
    killed = [line for line in out.splitlines() if "SIGKILLed worker pid" in line]
    assert killed and "starting a replacement" in killed[0]
