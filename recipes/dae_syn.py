"""Paper A's DAE-Syn study on a CPU: every router, tag supervision and subnet init, 3 seeds, one command.

    python recipes/dae_syn.py                                  # the whole study (~70 min on 2 idle cores, see README)
    python recipes/dae_syn.py --quick                          # every row, 1 seed, a few steps (a smoke test)
    python recipes/dae_syn.py --routing top_k --routing top_k+sup10 --seeds 1 --steps 1000

Rows: tag, hash, monolithic, top_k, st_gumbel, reinforce, moesart, dselect_k, comet, smear; ROUTER+sup1/sup10/sup100
(tag supervision on that percentage of the images) and ROUTER+init (experts and decoder from the tag row) for the
learned routers.
The full default study writes <output-dir>/dae_syn.{json,md,png}; --quick writes dae_syn_quick.* (into runs/, ignored by
git, unless --output-dir is given), any other run
dae_syn_custom.*, so a partial run never replaces the full study's results.
"""

from __future__ import annotations

import argparse
import os
import time

from hf_condroute.studies.cli import at_least, output_dir, run_recipe, usage_errors
from hf_condroute.studies.dae_syn.model import DAEConfig
from hf_condroute.studies.dae_syn.report import markdown_table, write_outputs
from hf_condroute.studies.dae_syn.runner import run_study
from hf_condroute.studies.dae_syn.study import Row, TrainSettings, default_rows, summarize

DEFAULTS = TrainSettings()
QUICK_STEPS = 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routing", action="append", metavar="NAME", help="a row to run (repeatable); default: every row")
    p.add_argument("--seeds", type=at_least(1), default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    p.add_argument(
        "--steps",
        type=at_least(1),
        default=None,
        help=f"training steps per row (default {DEFAULTS.steps}; --quick: {QUICK_STEPS})",
    )
    p.add_argument("--image-size", type=int, default=DEFAULTS.model.image_size, choices=(32, 64))
    p.add_argument(
        "--lr", type=at_least(0.0, float), default=DEFAULTS.lr, help="Adam learning rate (peak of the schedule)"
    )
    p.add_argument(
        "--output-dir", default=None, help="where to write (default: results/; with --quick: runs/, ignored by git)"
    )
    p.add_argument(
        "--workers", type=at_least(1), default=min(2, os.cpu_count() or 1), help="worker processes (default: up to 2)"
    )
    p.add_argument("--quick", action="store_true", help=f"every row, 1 seed, {QUICK_STEPS} steps: a smoke test")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with usage_errors():
        rows = [Row.parse(name) for name in args.routing] if args.routing else default_rows()
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULTS.steps)
    settings = TrainSettings(steps=steps, lr=args.lr, model=DAEConfig(image_size=args.image_size))
    full = (
        not args.quick
        and settings == DEFAULTS
        and seeds == 3
        and [r.name for r in rows] == [r.name for r in default_rows()]
    )
    stem = "dae_syn" if full else ("dae_syn_quick" if args.quick else "dae_syn_custom")

    start = time.perf_counter()
    per_seed = run_study(rows, seeds, settings, workers=args.workers, progress=not args.no_progress)
    wall = time.perf_counter() - start
    summary = {name: summarize(scores) for name, scores in per_seed.items()}
    written = write_outputs(summary, settings, args.workers, wall, output_dir(args.output_dir, args.quick), stem)
    print(markdown_table(summary))
    print(f"\nwall time {wall / 60:.1f} min; wrote {', '.join(written)}")
    return summary


if __name__ == "__main__":
    run_recipe(main)
