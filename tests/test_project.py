"""The README's promises: its set-up commands are what CI runs, its router table is complete, the main job runs."""

from __future__ import annotations

import os
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


def test_quickstart_prints_labelled_routing_tables_and_saves_a_model_with_card_and_heatmaps(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, whatever is installed
    out = tmp_path / "model"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "quickstart.py"),
            "--steps",
            "4",
            "--routers",
            "tag",
            "top_k",
            "--output_dir",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for router in ("tag", "top_k"):
        assert re.search(rf"^{router}: accuracy max \d+% \(chance \d+%\), min \d+% \(chance \d+%\)", text, re.M)
        assert re.search(
            rf"^  {router} sends max to expert \d in \d of 8 blocks; min to expert \d in \d of 8", text, re.M
        )
    header = r"^  task +enc0\.attn +enc0\.ffn +enc1\.attn +enc1\.ffn +dec0\.attn +dec0\.ffn +dec1\.attn +dec1\.ffn$"
    assert len(re.findall(header, text, re.M)) == 2  # all 8 blocks, labelled
    assert re.search(r"^  max( +e\d +\d+%){8}$", text, re.M)
    assert "Focus 1.00, Cover 1.00" in text  # tag routing, by construction
    assert f"python -m hf_condroute.report {out}" in text
    assert {"README.md", "adapter_config.json", "routing_stats.json", "routing_load.png", "routing_alignment.png"} <= {
        p.name for p in out.iterdir()
    }
    assert "Warning" not in result.stderr and "{'" not in result.stderr  # no stray warnings, only the bars
    assert "What to look for: " in text


def test_quickstarts_closing_paragraph_follows_the_numbers():
    from tests.recipe_loader import load_recipe

    quickstart = load_recipe("quickstart")

    def run(acc: float, focus: float) -> dict:
        return {
            "accuracy": {"max": acc, "min": acc},
            "chance": {"max": 0.3, "min": 0.3},
            "focus": focus,
            "cover": focus,
        }

    untrained = quickstart.closing_paragraph({"tag": run(0.0, 1.0), "top_k": run(0.0, 0.5)}, steps=20)
    assert "No router has learned the tasks after 20 steps" in untrained and "far above chance" not in untrained
    mixed = quickstart.closing_paragraph({"tag": run(0.99, 1.0), "top_k": run(0.4, 0.6)}, steps=100)
    assert "tag learn both tasks far above chance; top_k not yet after 100 steps" in mixed
    trained = quickstart.closing_paragraph(
        {"tag": run(0.99, 1.0), "hash": run(0.98, 0.5), "top_k": run(0.97, 0.6)}, 600
    )
    assert trained.startswith("What to look for: Every router learns both tasks far above chance.")
    assert "Focus/Cover 1.00/1.00" in trained and "Hash routing ignores the task (Focus/Cover 0.50/0.50" in trained
    assert "top_k find the tasks only in part" in trained


def test_the_version_is_one_and_has_a_changelog_entry():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    assert hf_condroute.__version__ == version
    with open(os.path.join(root, "CHANGELOG.md")) as f:
        assert f"## {version}" in f.read()
