"""Paper B's benchmarks (section 4.1, 4.3; supplement S3, S4): Table 1 (softmax, top_k, v_moe, smoe, expert_choice,
x_moe, moesart as the gates of multi-gate MoEs), Figure 3 (sampling with / without replacement), Figure 4 (k = 2, 4,
6), Table S1 (adjustment strategies), S2 (trimmed lasso), S3 (load balancing), S4 (DSelect-k, COMET, COMET+).
A random search per router on the validation split, then many seeds per row, mean +- standard error, and the
one-sided unpaired t-test of each table's tested row against its best competitor.

    python recipes/moesart_benchmarks.py                 # every table on built-in local data, no downloads
    python recipes/moesart_benchmarks.py --quick         # tiny sizes, 2 seeds, 2 trials per router (about a minute)
    python recipes/moesart_benchmarks.py --dataset multi_mnist --data_dir ...   # the paper's data sets

Default data: Multi-Digits (paper B's Multi-MNIST construction on scikit-learn's real handwritten digits) and a
recommender stand-in generated from a latent-factor model (hf_condroute/studies/moesart_bench/recsys.py).
The default run writes <output-dir>/moesart_benchmarks.{json,md} and PNGs; --quick writes moesart_benchmarks_quick.*
(into runs/, ignored by git, unless --output-dir is given),
--steps N moesart_benchmarks_steps<N>.*, any other run moesart_benchmarks_custom.*, so a partial run never replaces
the default run's results. Each finished run is logged in <stem>.runs.jsonl: run the same command again to resume
an interrupted study.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from hf_condroute.studies.cli import output_dir, run_recipe, usage_errors
from hf_condroute.studies.moesart_bench.benchmark import BENCHMARKS, DEFAULT_BENCHMARKS
from hf_condroute.studies.moesart_bench.experiments import TABLES
from hf_condroute.studies.moesart_bench.study import resumed_text, run_study

DEFAULT_SEEDS, DEFAULT_TRIALS = 20, 4
QUICK_SEEDS, QUICK_TRIALS = 2, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset",
        action="append",
        metavar="NAME",
        help=f"repeatable; one of {', '.join(BENCHMARKS)} (default: {', '.join(DEFAULT_BENCHMARKS)})",
    )
    p.add_argument(
        "--table", action="append", metavar="NAME", help=f"repeatable; one of {', '.join(TABLES)} (default: all)"
    )
    p.add_argument("--data_dir", "--data-dir", default=None, help="folder with a real data set's files")
    p.add_argument(
        "--seeds", type=int, default=None, help=f"seeds per row (default {DEFAULT_SEEDS}; quick {QUICK_SEEDS})"
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help=f"random-search trials per router (default {DEFAULT_TRIALS}; quick {QUICK_TRIALS})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per run on every data set instead of its own budget (the report is then "
        "moesart_benchmarks_steps<N>.*)",
    )
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--output-dir", default=None, help="where to write (default: results/; with --quick: runs/, ignored by git)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds, 2 trials per router")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with usage_errors():
        datasets = args.dataset or list(DEFAULT_BENCHMARKS)
        unknown = [d for d in datasets if d not in BENCHMARKS]
        if unknown:
            raise ValueError(f"Unknown data set(s) {unknown}: choose from {', '.join(BENCHMARKS)}.")
        if len(set(datasets)) != len(datasets):
            raise ValueError(f"Data sets repeat: {datasets}. Give each once.")
        if args.data_dir is not None and not os.path.isdir(args.data_dir):
            raise FileNotFoundError(
                f"--data_dir {args.data_dir} is not a folder. Give the folder holding the data set's files (see "
                "hf_condroute/studies/moesart_bench/images.py for the layouts read), or leave --data_dir out."
            )
        tables = tuple(args.table or TABLES)
        bad = [t for t in tables if t not in TABLES]
        if bad:
            raise ValueError(f"Unknown table(s) {bad}: choose from {', '.join(TABLES)}.")
        seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
        trials = args.trials if args.trials is not None else (QUICK_TRIALS if args.quick else DEFAULT_TRIALS)
        default = not args.quick and args.data_dir is None and datasets == list(DEFAULT_BENCHMARKS)
        default = default and (seeds, trials) == (DEFAULT_SEEDS, DEFAULT_TRIALS) and tables == tuple(TABLES)
        default = default and args.steps is None
        stem = "moesart_benchmarks" + ("" if default else ("_quick" if args.quick else "_custom"))
        if args.steps is not None:
            if args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}.")
            stem = f"{stem.removesuffix('_custom')}_steps{args.steps}"
        if args.workers < 1 or args.threads < 1:
            raise ValueError(f"--workers and --threads must be >= 1, got {args.workers} and {args.threads}.")
        if seeds < 1 or trials < 2:
            raise ValueError(
                f"Need --seeds >= 1 and --trials >= 2 (MOESART's search alternates lambda = 0 and lambda > 0), got "
                f"{seeds} and {trials}."
            )
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python recipes/moesart_benchmarks.py", *map(shlex.quote, argv)])
    results = run_study(
        datasets,
        args.data_dir,
        args.quick,
        seeds,
        trials,
        args.workers,
        args.threads,
        output_dir(args.output_dir, args.quick),
        stem,
        tables,
        steps=args.steps,
        command=command,
    )
    print(open(results["written"][1]).read())
    print(
        f"{resumed_text(results)}wall time {results['wall_time_s'] / 60:.1f} min; wrote {', '.join(results['written'])}"
    )
    return results


if __name__ == "__main__":
    run_recipe(main)
