"""Recipes refuse bad flags with one paragraph on stderr and exit status 2; other failures keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hf_condroute.studies.cli import run_recipe, usage_errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_marked_error_prints_once_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def main():
        with usage_errors():
            raise ValueError("--top_k must be >= 1, got 0.")

    with pytest.raises(SystemExit) as exit_info:
        run_recipe(main, prog="glue.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "glue.py: error: --top_k must be >= 1, got 0.\n"
    monkeypatch.setenv("RANK", "1")  # other processes of a launch exit quietly
    with pytest.raises(SystemExit):
        run_recipe(main, prog="glue.py")
    assert capsys.readouterr().err == ""


def test_errors_outside_the_checks_keep_their_traceback():
    def main():
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_recipe(main)
    with pytest.raises(ValueError, match="inside"):  # main(argv) from Python still raises the error itself
        with usage_errors():
            raise ValueError("inside")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["recipes/glue.py", "--routing", "tga"], "--routing 'tga' is not a routing"),
        (["recipes/glue.py", "--top_k", "0"], "--top_k must be at least 1, got 0."),
        (["recipes/dae_syn.py", "--routing", "softmaxx"], "Unknown DAE-Syn router 'softmaxx'"),
    ],
)
def test_recipes_exit_2_with_one_paragraph(tmp_path, argv, message):
    if "glue" in argv[0]:
        argv = argv + ["--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{os.path.basename(argv[0])}: error: " in result.stderr
