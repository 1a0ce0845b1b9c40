"""The README's examples and commands, and every file in examples/, run exactly
as written: a newcomer's first steps must work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = [(lang, body) for lang, body in FENCE.findall(README)]
EXECUTED = ("python", "sh")


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env.pop("TASKSPACE_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_every_block_says_whether_it_runs() -> None:
    assert BLOCKS, "the README has no fenced blocks"
    for lang, body in BLOCKS:
        assert lang in (*EXECUTED, "text"), f"fence without a known language: {body[:60]!r}"


def test_readme_never_points_outside_the_repository() -> None:
    assert "../" not in README
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert link.startswith("http") or (ROOT / link).exists(), link


def test_readme_example_and_commands_run_as_written(tmp_path: Path) -> None:
    python = [body for lang, body in BLOCKS if lang == "python"]
    shell = [body for lang, body in BLOCKS if lang == "sh"]
    assert len(python) == 1, "the README's example is saved as app.py; keep one python block"
    (tmp_path / "app.py").write_text(python[0])
    ran = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "'score': 0.97" in ran.stdout
    for body in shell:
        for line in body.strip().splitlines():
            done = subprocess.run(["bash", "-ec", line], cwd=tmp_path, env=_env(),
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    listed = subprocess.run(["taskspace", "tasks", "list", "--json", "--state", "queued"],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True)  # fmt: skip
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout + listed.stderr


def test_readme_coordination_block_runs_as_written(tmp_path: Path) -> None:
    """The Coordination section's block is real code: run it on a fresh space."""
    (block,) = [body for lang, body in BLOCKS if body.startswith("# coordination.py")]
    prelude = f"from taskspace import Space\nspace = Space('sqlite:///{tmp_path}/c.db')\n"
    (tmp_path / "coordination.py").write_text(prelude + block + "space.close()\n")
    ran = subprocess.run([sys.executable, "coordination.py"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "gpu-a" in ran.stdout and "True" in ran.stdout


def test_readme_shared_state_block_runs_as_written(tmp_path: Path) -> None:
    """The Shared state section's block is real code: run it on a fresh space."""
    (block,) = [body for lang, body in BLOCKS if body.startswith("# shared_state.py")]
    prelude = f"from taskspace import Space\nspace = Space('sqlite:///{tmp_path}/s.db')\n"
    (tmp_path / "shared_state.py").write_text(prelude + block + "space.close()\n")
    ran = subprocess.run([sys.executable, "shared_state.py"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "('put', 'jobs/1', {'state': 'queued'})" in ran.stdout
    assert "[5.0] [5.0]" in ran.stdout and "{'doc': 1} 1" in ran.stdout


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_run(example: Path, tmp_path: Path) -> None:
    ran = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
