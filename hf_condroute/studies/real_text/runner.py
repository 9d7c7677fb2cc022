"""The real-text study, end to end: features once, learning rates on the validation split, then every row x seed
on the test split, in `workers` processes of one torch thread each.

Phase 1 trains each tuned row (`rows.TUNED_ROWS`: LoRA, and per-example top_k for the routed rows) with seed 0 at
every learning rate of the grid and keeps the one with the best validation accuracy; the test split is not read.
Phase 2 runs every row and seed with its family's learning rate; each X-LoRA row starts when its seed's tag row
has written its experts out as LoRAs. Worker processes load the model from a folder and the features from a file
(written once by this process), so nothing is computed twice.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from ..pool import InProcess
from .data import Splits, SplitSizes, verbalizer_ids
from .model import Backbone, load_pretrained
from .rows import TUNED_ROWS, Row, get_rows, peft_config
from .train import EXAMPLE_ROUTING_WARNING, TEST_KEY_OFFSET, Encoded, encode_split, evaluate, train
from .xlora import expert_adapters, xlora_model


@dataclass(frozen=True)
class Settings:
    adapted_layers: int = 4  # decoder layers, from the top, that carry adapters
    rank: int = 16  # LoRA's rank, and the routed rows' total over their experts
    steps: int = 120
    batch_size: int = 16
    eval_batch_size: int = 32
    max_review_tokens: int = 48
    lr_grid: tuple[float, ...] = (5e-4, 2e-3)
    tag_supervision_coef: float = 1.0  # per routed block, as in DAE-Syn and Res-Dom
    sizes: SplitSizes = field(default_factory=SplitSizes)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2 or not self.lr_grid:
            raise ValueError(
                f"Need steps >= 1, batch_size >= 2 (the routers' BatchNorm) and a learning-rate grid, got steps="
                f"{self.steps}, batch_size={self.batch_size}, lr_grid={self.lr_grid}."
            )


@dataclass
class Context:
    """What every run reads: the split model, the label words, the encoded splits."""

    backbone: Backbone
    label_ids: list[int]
    sources: tuple[str, ...]
    data: dict[str, Encoded]
    settings: Settings


def prepare(lm, tokenizer, splits: Splits, settings: Settings) -> Context:
    backbone = Backbone(lm, settings.adapted_layers)
    encode = dict(max_review_tokens=settings.max_review_tokens, batch_size=settings.eval_batch_size)
    data = {
        "train": encode_split(backbone, tokenizer, splits.train, **encode),
        "val": encode_split(backbone, tokenizer, splits.val, key_offset=TEST_KEY_OFFSET, **encode),
        "test": encode_split(backbone, tokenizer, splits.test, key_offset=2 * TEST_KEY_OFFSET, **encode),
    }
    return Context(backbone, verbalizer_ids(tokenizer), splits.sources, data, settings)


def run_one(ctx: Context, row: Row, seed: int, lr: float, split: str, experts: dict | None, save_to: str | None):
    """Train one row for one seed and score it on `split`. X-LoRA rows take the tag row's `experts` (paths); a tag
    row given `save_to` writes its experts there as LoRAs."""
    s = ctx.settings
    torch.manual_seed(seed)
    base = ctx.backbone.top_model()
    if row.method == "none":
        model, timing = base, {}
    else:
        if row.method == "xlora":
            if experts is None:
                raise ValueError(f"Row {row.name!r} mixes the tag row's LoRAs: run the tag row first.")
            model = xlora_model(base, experts, ctx.backbone.lm.config.hidden_size)
        else:
            model = get_peft_model(base, peft_config(row, s.rank, len(ctx.sources), seed, s.tag_supervision_coef))
        timing = train(model, ctx.data["train"], row, ctx.label_ids, s.steps, s.batch_size, lr, seed)
    scores = evaluate(model, ctx.data[split], row, ctx.label_ids, len(ctx.sources), s.eval_batch_size)
    scores.update(timing, lr=lr, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if save_to is not None:
        scores["experts"] = expert_adapters(model, save_to)
    return scores


_ctx: Context | None = None


def _init_worker(model_path: str, features_path: str, settings: Settings) -> None:
    global _ctx
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=EXAMPLE_ROUTING_WARNING)
    lm, _ = load_pretrained(model_path)
    saved = torch.load(features_path, weights_only=False)
    _ctx = Context(Backbone(lm, settings.adapted_layers), saved["label_ids"], saved["sources"], saved["data"], settings)


def _run(*args):
    return run_one(_ctx, *args)


def run_study(ctx: Context, row_names, seeds: int, workers: int, model_path: str | None, progress: bool = True):
    """{"lr": {family: chosen lr}, "tuning": {row: {lr: validation scores}}, "rows": {row: [scores per seed]}}.
    workers > 1 needs `model_path`, a folder the worker processes load the model from."""
    global _ctx
    rows = get_rows(row_names)
    if seeds < 1 or workers < 1:
        raise ValueError(f"Need seeds >= 1 and workers >= 1, got seeds={seeds}, workers={workers}.")
    if workers > 1 and model_path is None:
        raise ValueError("Worker processes load the model from a folder: pass model_path, or use workers=1.")
    s = ctx.settings
    tuned = [r for r in get_rows(list(TUNED_ROWS)) if any(r.family == x.family for x in rows if x.method != "none")]
    needs_tag = any(r.needs_tag_row for r in rows)
    plain = [r for r in rows if not r.needs_tag_row]
    if needs_tag and all(r.name != "tag" for r in plain):
        plain.insert(0, get_rows(["tag"])[0])  # trained for X-LoRA, not reported
    plain.sort(key=lambda r: r.name != "tag")  # tag rows first, so X-LoRA rows start early
    runs = (
        len(tuned) * len(s.lr_grid) * (len(s.lr_grid) > 1) + (len(plain) + sum(r.needs_tag_row for r in rows)) * seeds
    )
    bar = tqdm(total=runs, unit="run", desc="real text", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="real_text_") as tmp:
        if workers == 1:
            _ctx, executor = ctx, InProcess()
        else:
            features_path = os.path.join(tmp, "features.pt")
            torch.save({"label_ids": ctx.label_ids, "sources": ctx.sources, "data": ctx.data}, features_path)
            executor = ProcessPoolExecutor(
                workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                initargs=(model_path, features_path, s),
            )  # fmt: skip
        try:
            if len(s.lr_grid) == 1:
                tuned = []  # nothing to choose
            tuning = {r.name: {} for r in tuned}
            futures = {executor.submit(_run, r, 0, lr, "val", None, None): (r, lr) for r in tuned for lr in s.lr_grid}
            for future in futures:
                row, lr = futures[future]
                tuning[row.name][lr] = future.result()
                bar.update()
            lr = {r.family: max(s.lr_grid, key=lambda x: tuning[r.name][x]["accuracy"]) for r in tuned}
            lr = lr or {row.family: s.lr_grid[0] for row in rows if row.method != "none"}
            results: dict[str, dict[int, dict]] = {r.name: {} for r in rows}
            pending: dict[Future, tuple[Row, int]] = {}

            def submit(row: Row, seed: int, experts=None) -> None:
                save_to = os.path.join(tmp, f"tag_seed{seed}") if row.name == "tag" and needs_tag else None
                rate = lr.get(row.family, s.lr_grid[0])
                pending[executor.submit(_run, row, seed, rate, "test", experts, save_to)] = (row, seed)

            for seed in range(seeds):
                for row in plain:
                    submit(row, seed)
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    row, seed = pending.pop(future)
                    scores = future.result()
                    bar.update()
                    if row.name in results:
                        results[row.name][seed] = scores
                    for xrow in [r for r in rows if r.needs_tag_row] if "experts" in scores else []:
                        submit(xrow, seed, scores["experts"])
        finally:
            executor.shutdown(cancel_futures=True)
            _ctx = None
            bar.close()
    for per_seed in results.values():
        for scores in per_seed.values():
            scores.pop("experts", None)
    return {
        "lr": lr,
        "tuning": {name: {str(k): v for k, v in t.items()} for name, t in tuning.items()},
        "rows": {name: [results[name][i] for i in range(seeds)] for name in results},
    }
