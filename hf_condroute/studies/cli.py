"""How the recipes refuse bad flags, bad data folders and refused launches: one paragraph on stderr and exit
status 2 (argparse's, for a flag it cannot parse) instead of a traceback around the advice.

A recipe wraps its checking stage in `with usage_errors():`, which marks what it raises as the user's mistake
(the exception itself is unchanged, so `main(argv)` called from Python still raises it), and runs
`run_recipe(main)` as a script: marked errors print and exit 2, anything else keeps its traceback."""

from __future__ import annotations

import argparse
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


def at_least(low: int | float, kind: type = int) -> Callable[[str], int | float]:
    """An argparse `type`: a number >= low, so a negative seed or zero steps stops at the parser (exit 2)."""

    def parse(text: str):
        value = kind(text)  # not a number: argparse's "invalid int value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # the name argparse's message gives the type
    return parse


def check_at_least(args, lows: dict[str, int | float], flag: Callable[[str], str] = lambda n: f"--{n}") -> None:
    """The dataclass recipes' numeric flags (HfArgumentParser has no bounds): ValueError for one below its low;
    None (not given) passes."""
    for name, low in lows.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"{flag(name)} must be at least {low}, got {value}.")


# TrainingArguments' numbers that TrainingArguments does not check itself; max_steps -1 means "use the epochs"
TRAINING_LOWS = {
    "seed": 0,
    "learning_rate": 0,
    "num_train_epochs": 0,
    "max_steps": -1,
    "warmup_steps": 0,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0,
}


@contextmanager
def from_the_hub(what: str, name: str, local: str):
    """Loading `what` from `name`, a Hub id (or a local folder): when the Hub cannot be reached (offline, no
    network, HF_HUB_OFFLINE=1) or has no such id, one paragraph naming the local-path option `local` (exit 2
    under run_recipe) instead of the download's traceback."""
    try:
        yield
    except OSError as err:  # ConnectionError, huggingface_hub's and datasets' not-found errors, transformers' OSError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        error = RuntimeError(
            f"Could not load {what} {name!r} ({reason}). If it is a Hub id, the Hub is unreachable from here or has "
            f"no such repository: download it where the Hub is reachable and pass the local copy with {local}, or "
            "put it in the Hugging Face cache and set HF_HUB_OFFLINE=1."
        )
        setattr(error, _MARK, True)
        raise error from err


RESULTS_DIR = "results"  # committed: the full runs the README quotes
SCRATCH_DIR = "runs"  # ignored by git: --quick smoke runs


def output_dir(requested: str | None, quick: bool) -> str:
    """Where a study writes: the folder asked for, else `runs/` for a --quick run (so a smoke test leaves the
    checkout clean) and `results/` for every other run."""
    if requested is not None:
        return requested
    return SCRATCH_DIR if quick else RESULTS_DIR
