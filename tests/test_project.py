"""The README's promises: its set-up commands are what CI runs, its router table is complete, the main job runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import hf_condroute

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_readme_lists_every_router():
    text = (ROOT / "README.md").read_text()
    for name in hf_condroute.ROUTERS:
        assert f"| `{name}` |" in text


def test_quickstart_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--steps", "3", "--routers", "tag"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "share of task 0 / task 1 sent to expert 0, 1" in result.stdout
