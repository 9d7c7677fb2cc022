"""Runs recipes with bad flags in one process (started with HF_HUB_OFFLINE=1 by tests/test_recipe_errors.py): for
each [recipe, argv] of the JSON list in argv[1], the exit status and stderr the user sees, as one JSON line.
A case that does not stop within a few seconds (it got past the checks into loading or training) is cut off."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import traceback

from hf_condroute.studies.cli import run_recipe
from tests.recipe_loader import load_recipe


def _ran_on(signum, frame):
    raise TimeoutError("the recipe got past its checks: it was still running")


def run_case(name: str, argv: list[str]) -> dict:
    err = io.StringIO()
    code = 0
    sys.argv[0] = f"recipes/{name}.py"  # argparse's usage line names the script, as when run from the shell
    signal.signal(signal.SIGALRM, _ran_on)
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            run_recipe(lambda: load_recipe(name).main(argv), prog=f"{name}.py")
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # a traceback: what the user must not see
        code, err = "traceback", io.StringIO(err.getvalue() + traceback.format_exc())
    finally:
        signal.alarm(0)
    return {"code": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    print(json.dumps([run_case(name, argv) for name, argv in cases]))
