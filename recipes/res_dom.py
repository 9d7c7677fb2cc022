"""Paper A's Res-Dom study on a CPU: a frozen ResNet with routed conv adapters, every router, tag supervision and
subnet init, 3 seeds, one command, no downloads.

    python recipes/res_dom.py                               # the whole study on the built-in data (see README)
    python recipes/res_dom.py --quick                       # every row, 1 seed, 15 steps: a smoke test (~1.5 min)
    python recipes/res_dom.py --routing tag --routing top_k+sup10 --seeds 1 --steps 500
    python recipes/res_dom.py --model_name_or_path microsoft/resnet-18 --dataset <DomainNet> --image-size 224

Rows: tag, hash, monolithic, top_k, st_gumbel, reinforce, moesart, dselect_k, smear; ROUTER+sup1/sup10/sup100
(tag supervision on that percentage of the training images) and ROUTER+init (experts and classifier from the
same seed's tag run, fresh routers, as many steps again) for the six learned routers. The full default study
writes <output-dir>/res_dom.{json,md,png}; --quick writes res_dom_quick.* (into runs/, ignored by git, unless
--output-dir is given), any other run res_dom_custom.*, so a partial run never replaces the full study's results.

Choices (each one a flag or a default in hf_condroute/studies/res_dom/):

- Data: scikit-learn's 1,797 bundled digits (the only real images available offline), 10 classes, upsampled to
  32x32 and rendered in six domains playing DomainNet's roles (real, clipart, infograph, painting, quickdraw,
  sketch; `hf_condroute/studies/res_dom/data.py`). Every rendering is blended with the same digit in another random
  domain with a weight U(0, --overlap); the default 0.55 makes the domains overlap so that a ResNet reads the
  domain with roughly the 85% accuracy paper A measured on DomainNet (measured and reported on every run).
  A third of the digit images (599) are held out for pretraining; of the rest, 80% train and 20% test (split
  by digit image, so test digits are unseen), each rendered once in every domain: 5,748 training and 1,440 test
  images, 958 / 240 per domain.
- Backbone: ResNet-18's shape (transformers' `ResNetForImageClassification`, basic blocks, depths 2-2-2-2 = 8
  residual blocks), narrowed to widths 16-32-64-128 (embedding 16) for the CPU. Pretrained, all weights, for 400
  steps (batch 64, AdamW lr 3e-3) on the held-out third rendered in the real domain only, as ImageNet is a
  photo data set for DomainNet: a disjoint set of images, the same 10 digit classes. Cached with
  `save_pretrained` under --cache-dir (default ~/.cache/hf_condroute/studies/res_dom/<hash of settings and data>),
  then frozen. Its BatchNorm layers run in training mode while the adapters train (as with any adapter on a
  frozen ResNet through the stock Trainer), so their running statistics follow the six domains.
- Adapters: `RoutedAdapterConfig(target_modules=None)` - the architecture table's default for ResNet, the 8
  residual blocks' outputs - with one 1x1-conv bottleneck expert of size 8 per domain (6), routed per example
  on the spatial mean of the block's output by paper A's router (BatchNorm + Linear + softmax); the classifier
  head is trained (`modules_to_save`), the rest frozen. Each router picks its fewest allowed experts: 1, and 2
  for MOESART. ST-Gumbel's temperature reaches its floor at the same fraction of training as the paper code's.
- Training: the stock `transformers.Trainer` on pixel_values, labels, routing_tags (the domain; -100 where
  unknown) and routing_keys (a fixed id per image: hash routing's key); 300 steps of batch 64 (3.3 epochs),
  AdamW lr 3e-3, 10% warm-up then linear decay. Tag supervision: `tag_supervision_coef` 1.0 per block on a
  fixed random subset of the training images per seed. REINFORCE's reward is minus each image's loss (the
  tuner computes it from the labels). Only tag routing reads the test images' domains.
- Scores on the test split: accuracy per domain and averaged over domains, Focus/Cover against the 6 domains
  over the 8 x 6 experts, and per-block load; mean ± SEM over 3 seeds (seed = model init, data order, hash
  assignment and the supervised subset; the data and backbone are the same for every seed).
- CPU: one process, --threads torch threads (default 1: the machine this was written on has 2 shared cores);
  a launch with several processes is refused (each would run every row).
- Hub data: --dataset is an image folder laid out domain/class/*.jpg or a `datasets` id / save_to_disk folder
  with image, label and domain columns (its --test-split, else a random --test-fraction); --model_name_or_path
  is then required (a pretrained ResNet, e.g. microsoft/resnet-18); the experts number the domains.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers

from hf_condroute.studies.cli import at_least, from_the_hub, output_dir, run_recipe, usage_errors
from hf_condroute.studies.res_dom.data import DEFAULT_OVERLAP, make_splits
from hf_condroute.studies.res_dom.loaders import load_domain_dataset, load_image_folder, split_by_fraction
from hf_condroute.studies.res_dom.model import (
    DEFAULT_CACHE,
    AdapterSettings,
    BackboneSettings,
    load_or_pretrain_backbone,
)
from hf_condroute.studies.res_dom.probe import domain_accuracy
from hf_condroute.studies.res_dom.report import markdown_table, write_outputs
from hf_condroute.studies.res_dom.runner import run_study
from hf_condroute.studies.res_dom.study import Row, TrainSettings, default_rows, summarize

DEFAULTS = TrainSettings()
QUICK_STEPS = 15
QUICK_PROBE_STEPS = 60


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
    p.add_argument(
        "--lr", type=at_least(0.0, float), default=DEFAULTS.lr, help="AdamW learning rate (peak of the schedule)"
    )
    p.add_argument("--batch-size", type=at_least(1), default=DEFAULTS.batch_size)
    p.add_argument("--adapter-dim", type=at_least(1), default=DEFAULTS.adapters.adapter_dim)
    p.add_argument(
        "--tag-supervision-coef",
        type=at_least(0.0, float),
        default=DEFAULTS.tag_supervision_coef,
        help="weight of each block's tag cross-entropy in the +sup rows",
    )
    p.add_argument(
        "--detach-router-input",
        action="store_true",
        help="routers read a detached copy of the block output (router_detach_input): supervision trains the "
        "routers only, not the adapters below (paper A's code does not detach)",
    )
    p.add_argument("--image-size", type=at_least(1), default=32, help="side of the images (built-in data: at least 16)")
    p.add_argument(
        "--overlap",
        type=at_least(0.0, float),
        default=DEFAULT_OVERLAP,
        help="built-in data: largest blend weight of another domain's style",
    )
    p.add_argument(
        "--max-digits", type=at_least(1), default=None, help="built-in data: use only this many digit images (tests)"
    )
    p.add_argument(
        "--pretrain-steps",
        type=at_least(1),
        default=BackboneSettings.pretrain_steps,
        help="built-in backbone's pretraining steps",
    )
    p.add_argument(
        "--probe-steps",
        type=at_least(1),
        default=None,
        help=f"steps of the domain-reading ResNet (default {DEFAULTS.steps}; --quick: {QUICK_PROBE_STEPS})",
    )
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the pretrained built-in backbone is kept")
    p.add_argument(
        "--model_name_or_path", default=None, help="a pretrained ResNetForImageClassification (with --dataset)"
    )
    p.add_argument(
        "--dataset", default=None, help="image folder domain/class/*.jpg, or a datasets id / save_to_disk folder"
    )
    p.add_argument("--train-split", default="train")
    p.add_argument(
        "--test-split", default="test", help="--dataset's test split (a folder, or no such split: --test-fraction)"
    )
    p.add_argument("--test-fraction", type=at_least(0.0, float), default=0.2)
    p.add_argument("--image_column", default="image")
    p.add_argument("--label_column", default="label")
    p.add_argument("--domain_column", default="domain")
    p.add_argument(
        "--max-samples", type=at_least(1), default=None, help="--dataset: at most this many images per split"
    )
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads (default 1)")
    p.add_argument(
        "--output-dir", default=None, help="where to write (default: results/; with --quick: runs/, ignored by git)"
    )
    p.add_argument("--quick", action="store_true", help=f"every row, 1 seed, {QUICK_STEPS} steps: a smoke test")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("seeds", "steps", "probe_steps", "max_samples", "max_digits"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "recipes/res_dom.py trains its rows one after another in one process; launched with several processes, "
            "each would run every row. Use `python recipes/res_dom.py` or `accelerate launch --num_processes 1`."
        )
    if not 0 < args.test_fraction < 1 or args.overlap > 1:
        raise ValueError(
            f"--test-fraction must be in (0, 1) and --overlap in [0, 1], got {args.test_fraction} and {args.overlap}."
        )
    if args.dataset is not None and args.model_name_or_path is None:
        raise ValueError(
            "--dataset needs --model_name_or_path: a pretrained ResNet to freeze (e.g. microsoft/resnet-18, or a "
            "local save_pretrained folder). Without --dataset the recipe pretrains its own on the built-in data."
        )
    if args.dataset is not None:
        local = os.path.isabs(args.dataset) or args.dataset.startswith(".") or args.dataset.count("/") > 1
        if local and not os.path.exists(args.dataset):  # a Hub id is `owner/name`
            raise FileNotFoundError(
                f"--dataset {args.dataset} does not exist: give an image folder laid out <domain>/<class>/*.jpg, a "
                "`save_to_disk` folder, or a Hub id (owner/name)."
            )


def load_data(args: argparse.Namespace):
    """(train, test, pretraining split or None) for the built-in data or --dataset."""
    if args.dataset is None:
        splits = make_splits(args.image_size, args.overlap, max_digits=args.max_digits)
        return splits.train, splits.test, splits.pretrain
    if os.path.isdir(args.dataset) and not os.path.exists(os.path.join(args.dataset, "dataset_dict.json")) \
            and not os.path.exists(os.path.join(args.dataset, "dataset_info.json")):  # fmt: skip
        train, test = split_by_fraction(load_image_folder(args.dataset, args.image_size), args.test_fraction)
        return train, test, None
    columns = dict(image_column=args.image_column, label_column=args.label_column, domain_column=args.domain_column)
    kwargs = dict(image_size=args.image_size, max_samples=args.max_samples, **columns)
    with from_the_hub("the data set", args.dataset, "--dataset (an image folder or a `save_to_disk` folder)"):
        train = load_domain_dataset(args.dataset, args.train_split, **kwargs)
    try:
        test = load_domain_dataset(args.dataset, args.test_split, **kwargs)
    except (KeyError, ValueError):  # no such split
        train, test = split_by_fraction(train, args.test_fraction)
    return train, test, None


def main(argv=None) -> dict:
    args = parse_args(argv)
    with usage_errors():
        check_args(args)
        if args.model_name_or_path is not None:  # its config, before any data: a Hub id that cannot load stops here
            with from_the_hub("the ResNet", args.model_name_or_path, "--model_name_or_path (a save_pretrained folder)"):
                transformers.AutoConfig.from_pretrained(args.model_name_or_path)
        rows = [Row.parse(name) for name in args.routing] if args.routing else default_rows()
        train, test, pretrain = load_data(args)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the backbone's head-resize report, once per row
    transformers.logging.disable_progress_bar()  # and its weight-loading bar
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULTS.steps)
    probe_steps = (
        args.probe_steps if args.probe_steps is not None else (QUICK_PROBE_STEPS if args.quick else DEFAULTS.steps)
    )
    extra = {"router_detach_input": True} if args.detach_router_input else {}
    adapters = AdapterSettings(num_experts=len(train.domain_names), adapter_dim=args.adapter_dim, extra=extra)
    settings = TrainSettings(
        steps=steps, lr=args.lr, batch_size=args.batch_size, tag_supervision_coef=args.tag_supervision_coef,
        adapters=adapters,
    )  # fmt: skip
    backbone_settings = BackboneSettings(pretrain_steps=args.pretrain_steps)
    builtin_default = (args.dataset is None and args.image_size == 32 and args.overlap == DEFAULT_OVERLAP
                       and args.max_digits is None and backbone_settings == BackboneSettings())  # fmt: skip
    full = (builtin_default and not args.quick and settings == DEFAULTS and seeds == 3 and probe_steps == DEFAULTS.steps
            and [r.name for r in rows] == [r.name for r in default_rows()])  # fmt: skip
    stem = "res_dom" if full else ("res_dom_quick" if args.quick else "res_dom_custom")

    start = time.perf_counter()
    if pretrain is not None:
        backbone, trained = load_or_pretrain_backbone(pretrain, backbone_settings, args.cache_dir)
        print(f"backbone {'pretrained and cached' if trained else 'loaded from the cache'}: {backbone}")
    else:
        backbone = args.model_name_or_path
    reading = domain_accuracy(backbone, train, test, steps=probe_steps, batch_size=args.batch_size)
    print(f"a ResNet reads the domain with {reading:.1f}% test accuracy (chance {100 / len(train.domain_names):.1f}%)")
    per_seed = run_study(rows, seeds, train, test, backbone, settings, progress=not args.no_progress)
    wall = time.perf_counter() - start
    summary = {name: summarize(scores) for name, scores in per_seed.items()}
    meta = {
        "domain_accuracy": reading,
        "wall_seconds": wall,
        "backbone": backbone if pretrain is None else "built-in (pretrained on the held-out third, real domain)",
        "train_images": len(train),
        "test_images": len(test),
        "settings_text": (
            f"{len(train)} training / {len(test)} test images of {args.image_size}x{args.image_size}; {steps} steps of "
            f"batch {settings.batch_size}, AdamW lr {settings.lr:g} (10% warm-up, linear decay), "
            f"{adapters.num_experts} experts of size {adapters.adapter_dim} per block, tag supervision coefficient "
            f"{settings.tag_supervision_coef:g} per block{'; detached router inputs' if extra else ''}; "
            f"{seeds} seed(s); {args.threads} torch thread(s); "
            f"wall time {wall / 60:.1f} min."
        ),
    }
    written = write_outputs(summary, meta, output_dir(args.output_dir, args.quick), stem)
    print(markdown_table(summary))
    print(f"\nwall time {wall / 60:.1f} min; wrote {', '.join(written)}")
    return {"rows": summary, "meta": meta}


if __name__ == "__main__":
    run_recipe(main)
