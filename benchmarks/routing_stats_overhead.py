"""What `RoutingStatsCallback` costs per training step, and what `save_pretrained` costs with the routing files.

Trains a small random T5 with routed adapters through the stock Trainer, with and without the callback, and
times a save with statistics (routing_stats.json, two heatmaps, the model card) against PEFT's save alone.
Prints JSON and a markdown table.

    python benchmarks/routing_stats_overhead.py                       # CPU, example routing
    python benchmarks/routing_stats_overhead.py --granularity token --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import types

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import (
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import hf_condroute
from hf_condroute import RoutedAdapterConfig, RoutingStatsCallback

PAD, EOS = 0, 1


def data(n: int, vocab: int, length: int, tags: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": ids.flip(1).tolist(), "routing_tags": [i % tags for i in range(n)]}
    )


def collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([r["labels"] for r in rows]),
        "routing_tags": torch.tensor([r["routing_tags"] for r in rows]),
    }


def build(args) -> PeftModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=args.vocab,
        d_model=args.d_model,
        d_ff=2 * args.d_model,
        d_kv=args.d_model // 4,
        num_heads=4,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    cfg = RoutedAdapterConfig(
        num_experts=args.experts,
        adapter_dim=args.d_model // 8,
        router="top_k",
        router_aux_loss_coef=0.01,
        routing_granularity=args.granularity,
        task_type="SEQ_2_SEQ_LM",
    )
    return get_peft_model(T5ForConditionalGeneration(config), cfg)


def train_seconds(args, with_callback: bool) -> float:
    model = build(args)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=data(args.batch * args.steps, args.vocab, 16, args.experts),
            data_collator=collate,
        )
        if with_callback:
            RoutingStatsCallback().attach(trainer)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def callback_hook_ms(args, repeats: int = 200) -> dict:
    """The callback's own work, timed directly: collecting one training step, and one logging step."""
    model = build(args)
    batch = collate([data(args.batch, args.vocab, 16, args.experts)[i] for i in range(args.batch)])
    model(**batch).loss.backward()
    callback = RoutingStatsCallback()
    targs = types.SimpleNamespace(report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(targs, state, control, model=model)
    start = time.perf_counter()
    for _ in range(repeats):
        callback._seen_step = None  # count the same forward again
        callback.on_step_end(targs, state, control, model=model)
    collect = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    callback.on_log(targs, state, control, logs={"loss": 1.0, "learning_rate": 1e-3}, model=model)
    return {"callback_collect_ms_per_step": 1000 * collect, "callback_log_ms": 1000 * (time.perf_counter() - start)}


def save_seconds(args) -> dict:
    model = build(args)
    model.eval()
    loader = torch.utils.data.DataLoader(data(64, args.vocab, 16, args.experts), batch_size=16, collate_fn=collate)
    hf_condroute.compute_routing_stats(model, loader, tags_per_group=args.experts)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder + "/warm-up")  # matplotlib's first import is not the save's cost
        start = time.perf_counter()
        model.save_pretrained(folder)
        out["save_with_routing_files_s"] = time.perf_counter() - start
        start = time.perf_counter()
        PeftModel.save_pretrained.__wrapped__(model, folder + "/plain")  # PEFT's own save, no routing files
        out["peft_save_alone_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--granularity", choices=["example", "token"], default="example")
    parser.add_argument("--repeats", type=int, default=3, help="alternate runs; the best of each is reported")
    parser.add_argument("--hooks-only", action="store_true", help="skip the end-to-end Trainer runs")
    args = parser.parse_args()
    result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "granularity": args.granularity}
    if not args.hooks_only:
        train_seconds(args, False)  # warm-up
        without, with_cb = [], []
        for _ in range(args.repeats):
            without.append(train_seconds(args, False))
            with_cb.append(train_seconds(args, True))
        result.update(
            steps=args.steps,
            train_s_without_callback=min(without),
            train_s_with_callback=min(with_cb),
            callback_overhead_ms_per_step=1000 * (min(with_cb) - min(without)) / args.steps,
        )
    result.update(
        {
            **callback_hook_ms(args),
            **save_seconds(args),
        }
    )
    print(json.dumps(result, indent=2))
    print("\n| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
