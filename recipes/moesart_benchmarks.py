"""Paper B's Table 1 (section 4.1) on Multi-Digits: softmax (dense), top_k, v_moe, smoe, expert_choice, x_moe and
moesart as the gates of a multi-gate MoE of 8 CNN experts, several seeds, mean +- standard error, and the one-sided
unpaired t-test of MOESART's test loss against the best other sparse router. No download.

    python recipes/moesart_benchmarks.py                  # every router, 20 seeds, 600 steps (the default run)
    python recipes/moesart_benchmarks.py --quick          # every router, 2 seeds, 60 steps, small splits (~1 min)
    python recipes/moesart_benchmarks.py --router top_k --router moesart --seeds 5 --k 4

The default run writes <output-dir>/moesart_benchmarks.{json,md}; --quick writes moesart_benchmarks_quick.*, any
other run moesart_benchmarks_custom.*, so a partial run never replaces the default run's results.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_condroute.cli import run_recipe, usage_errors
from hf_condroute.moesart_bench.data import make_multi_digits
from hf_condroute.moesart_bench.report import ROUTERS, markdown_table, summarize, ttest_moesart, write_outputs
from hf_condroute.moesart_bench.train import TrainSettings, run_router

DEFAULTS = TrainSettings()
DEFAULT_SEEDS = 20
DEFAULT_SIZES = (10_000, 2_000, 2_000)
QUICK = {"seeds": 2, "steps": 60, "sizes": (2_000, 500, 500)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--router", action="append", metavar="NAME", help=f"a row (repeatable); default: {', '.join(ROUTERS)}"
    )
    p.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS}; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULTS.steps}; --quick: 60)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate")
    p.add_argument("--num-experts", type=int, default=DEFAULTS.num_experts)
    p.add_argument("--k", type=int, default=DEFAULTS.k, help="experts per example and gate for the sparse routers")
    p.add_argument("--trimmed-lasso", type=float, default=DEFAULTS.trimmed_lasso_coef, help="MOESART's lambda")
    p.add_argument("--sizes", type=int, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"), help="pairs per split")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--output-dir", default="results")
    p.add_argument("--quick", action="store_true", help="every router, 2 seeds, 60 steps, small splits")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with usage_errors():
        routers = args.router or list(ROUTERS)
        unknown = [r for r in routers if r not in ROUTERS]
        if unknown:
            raise ValueError(f"Unknown Table 1 router(s) {unknown}: choose from {', '.join(ROUTERS)}.")
        if len(set(routers)) != len(routers):
            raise ValueError(f"Routers repeat: {routers}. Give each once.")
        seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if args.quick else DEFAULT_SEEDS)
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}.")
        sizes = tuple(args.sizes) if args.sizes else (QUICK["sizes"] if args.quick else DEFAULT_SIZES)
        settings = TrainSettings(
            steps=args.steps if args.steps is not None else (QUICK["steps"] if args.quick else DEFAULTS.steps),
            batch_size=args.batch_size,
            lr=args.lr,
            num_experts=args.num_experts,
            k=args.k,
            trimmed_lasso_coef=args.trimmed_lasso,
        )
        if "moesart" in routers and settings.k < 2:
            raise ValueError("MOESART needs k >= 2 (with k = 1 no gradient reaches its router): pass --k 2 or more.")
        splits = make_multi_digits(sizes)
    full = not args.quick and settings == DEFAULTS and seeds == DEFAULT_SEEDS and sizes == DEFAULT_SIZES
    full = full and routers == list(ROUTERS)
    stem = "moesart_benchmarks" if full else ("moesart_benchmarks_quick" if args.quick else "moesart_benchmarks_custom")

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        per_seed = {r: [] for r in routers}
        for seed in range(seeds):
            for r in routers:
                per_seed[r].append(run_router(r, seed, splits, settings))
                print(f"{r} seed {seed}: test loss {per_seed[r][-1]['loss']:.4f}", flush=True)
    finally:
        torch.set_num_threads(previous)
    wall = time.perf_counter() - start
    summary = {r: summarize(s) for r, s in per_seed.items()}
    test = ttest_moesart(summary)
    written = write_outputs(summary, test, settings, sizes, wall, args.output_dir, stem)
    print(markdown_table(summary, test))
    print(f"\nwall time {wall / 60:.1f} min; wrote {', '.join(written)}")
    return {"rows": summary, "ttest": test, "wall_time_s": wall, "written": written}


if __name__ == "__main__":
    run_recipe(main)
