"""How the recipes refuse bad flags, bad data folders and refused launches: one paragraph on stderr and exit
status 2 (argparse's, for a flag it cannot parse) instead of a traceback around the advice.

A recipe wraps its checking stage in `with usage_errors():`, which marks what it raises as the user's mistake
(the exception itself is unchanged, so `main(argv)` called from Python still raises it), and runs
`run_recipe(main)` as a script: marked errors print and exit 2, anything else keeps its traceback."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# what the recipes' checks raise: a bad value, a file that is not there, a launch that cannot train together
USAGE_ERRORS = (ValueError, FileNotFoundError, RuntimeError)
_MARK = "_hf_condroute_usage_error"


@contextmanager
def usage_errors():
    """Errors raised inside are the user's to fix (flags, configs, data folders, the launch)."""
    try:
        yield
    except USAGE_ERRORS as err:
        setattr(err, _MARK, True)
        raise


def run_recipe(main: Callable[[], T], prog: str = "") -> T:
    """main(), with the user's mistakes printed once (by the main process of a multi-process launch) and exit 2."""
    try:
        return main()
    except USAGE_ERRORS as err:
        if not getattr(err, _MARK, False):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            prog = prog or os.path.basename(sys.argv[0])
            message = textwrap.fill(str(err), width=110, subsequent_indent="  ", break_long_words=False)
            print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


RESULTS_DIR = "results"  # committed: the full runs the README quotes
SCRATCH_DIR = "runs"  # ignored by git: --quick smoke runs


def output_dir(requested: str | None, quick: bool) -> str:
    """Where a study writes: the folder asked for, else `runs/` for a --quick run (so a smoke test leaves the
    checkout clean) and `results/` for every other run."""
    if requested is not None:
        return requested
    return SCRATCH_DIR if quick else RESULTS_DIR
