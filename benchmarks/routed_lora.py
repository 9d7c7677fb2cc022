"""Routed LoRA end to end: one training step of a Llama-shaped model with routed LoRA experts on every linear layer,
against PEFT's LoRA of the same rank (the baseline) and PEFT's X-LoRA; and (`--generate`) greedy decoding with the
KV cache, routed LoRA against LoRA, time per generated token.

    python benchmarks/routed_lora.py --threads 1                     # training step, CPU fp32
    python benchmarks/routed_lora.py --threads 1 --generate          # greedy decoding, batch 1 and 8
    python benchmarks/routed_lora.py --device cuda --dtype bfloat16 --batch 16

The model is built from a `LlamaConfig` with random weights (nothing is downloaded), sized for a CPU: hidden 512,
4 layers, 8 heads (8 key/value heads), intermediate 1376, vocabulary 8000; batch 4 x 128 tokens, no padding.
Every variant adapts the same 28 linear layers (q, k, v, o, gate, up, down of every layer: "all-linear") of the
same frozen base:

- `PEFT LoRA r=R` (the baseline): `LoraConfig(r=R, target_modules="all-linear")`;
- `routed LoRA N=8 k=2`: `RoutedLoraConfig` with N LoRA experts of rank R per layer, `top_k` router, k of them per
  token (per-token routing, the default for causal LMs); also with `router_sharing="layer"` (one router per
  decoder layer, on the input of its first target);
- `PEFT X-LoRA, 8 LoRAs`: `XLoraConfig` over N LoRAs of rank R saved to local folders first (X-LoRA loads its
  adapters by path; nothing is fetched from the Hub), `use_trainable_adapters=True` so it trains the same expert
  parameters as routed LoRA (plus its classifier). X-LoRA mixes every LoRA densely and runs the base model twice
  per forward (a no-grad scaling pass, then the real one); it needs `use_cache=False`.

A training step is forward, backward, a fused AdamW step and `zero_grad(set_to_none=True)`. Peak memory (see
common.py) is reported whole; the memory target's allowance is 1.1 x the baseline's peak plus 4 x the extra
trainable parameters' bytes (the parameter, its gradient, AdamW's two moments).

`--generate`: `model.generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)` from a 32-token prompt,
eval mode, the KV cache on, batch 1 and batch 8 (`--gen-batches`), each batch size paired with its own LoRA
baseline. Prints JSON and a markdown table; see common.py for the timing and memory method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    add_common_args,
    environment,
    markdown_table,
    measure,
    optimizer_state_tensors,
    peak_memory_bytes,
    report,
    select_variants,
    setup,
    synchronize,
    tensor_bytes,
    timing_cells,
    timing_headers,
)
from peft import LoraConfig, XLoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_condroute  # noqa: E402,F401  (registers the PEFT types)
from hf_condroute import RoutedLoraConfig  # noqa: E402

TARGETS = "all-linear"


def llama(args, use_cache: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=use_cache,
    )
    return LlamaForCausalLM(config)


def lora_name(args) -> str:
    return f"PEFT LoRA r={args.r}"


def lora(args, use_cache: bool = True, seed: int | None = None, init=True):
    base = llama(args, use_cache)
    if seed is not None:
        torch.manual_seed(seed)
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, task_type="CAUSAL_LM")
    config.init_lora_weights = init
    return get_peft_model(base, config)


def routed(args, **routing) -> Callable[[], nn.Module]:
    def build(use_cache: bool = True):
        config = RoutedLoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            num_experts=args.num_experts,
            router="top_k",
            top_k=args.top_k,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
            **routing,
        )
        return get_peft_model(llama(args, use_cache), config)

    return build


def xlora(args, folder: str) -> Callable[[], nn.Module]:
    """X-LoRA over `num_experts` LoRAs saved under `folder` (random A and B, so the mixture is not zero)."""

    def build(use_cache: bool = False):
        paths = {}
        for i in range(args.num_experts):
            path = os.path.join(folder, f"lora_{i}")
            if not os.path.exists(os.path.join(path, "adapter_config.json")):
                lora(args, use_cache=False, seed=args.seed + 100 + i, init=False).save_pretrained(path)
            paths[str(i)] = path
        config = XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=args.hidden,
            adapters=paths,
            xlora_depth=1,
            use_trainable_adapters=True,
        )
        model = get_peft_model(llama(args, use_cache=False), config)
        return model.train()

    return build


def training_variants(args, folder: str) -> dict[str, Callable[[], nn.Module]]:
    n, k = args.num_experts, args.top_k
    return {
        lora_name(args): lambda: lora(args),
        f"routed LoRA top_k N={n} k={k}": routed(args),
        f"routed LoRA top_k N={n} k={k}, router per layer": routed(args, router_sharing="layer"),
        f"PEFT X-LoRA, {n} LoRAs": xlora(args, folder),
    }


def make_batch(args, device, batch: int, length: int) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(3, args.vocab, (batch, length), generator=g)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return {k: v.to(device) for k, v in out.items()}


def train(args, device, dtype) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        builders = training_variants(args, folder)
        baseline = lora_name(args)
        names = select_variants(builders, args.only, baseline)
        batch = make_batch(args, device, args.batch, args.seq)
        batch["labels"] = batch["input_ids"]
        models, steps, optimizer_seconds, info = {}, {}, {}, {name: {} for name in names}
        for name in names:
            model = builders[name]()
            model.to(device=device, dtype=dtype).train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)  # Trainer's default, adamw_torch_fused
            optimizer_seconds[name] = []

            def step(model=model, optimizer=optimizer, seconds=optimizer_seconds[name]):
                loss = model(**batch).loss
                loss.backward()
                synchronize(device)
                start = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(device)
                seconds.append(time.perf_counter() - start)

            models[name] = (model, optimizer)
            steps[name] = step
            info[name]["trainable_params"] = sum(p.numel() for p in trainable)
        stats, cpu_stats, _ = measure(steps, baseline, args.reps, args.warmup, device)
        for name in names:
            info[name]["optimizer_ms"] = statistics.median(optimizer_seconds[name][-args.reps :]) * 1e3
        if not args.no_memory:
            for name in names:
                model, optimizer = models[name]
                live = tensor_bytes(
                    [*model.parameters(), *model.buffers(), *optimizer_state_tensors(optimizer), *batch.values()]
                )
                info[name]["state_mb"] = live / 2**20
                info[name]["peak_mb"] = peak_memory_bytes(steps[name], device, live) / 2**20
        base = info[baseline]
        for name in names:
            extra = max(info[name]["trainable_params"] - base["trainable_params"], 0)
            info[name]["extra_param_state_mb"] = extra * 4 * torch.finfo(dtype).bits / 8 / 2**20
            if "peak_mb" in info[name]:
                allowance = 1.1 * base["peak_mb"] + info[name]["extra_param_state_mb"]
                info[name]["peak_allowance_mb"] = allowance
                info[name]["peak_vs_allowance"] = info[name]["peak_mb"] / allowance
    payload = {
        "benchmark": "routed_lora",
        "mode": "training step",
        "shape": shape(args) | {"batch": args.batch, "seq": args.seq},
        "environment": environment(device, dtype),
        "baseline": baseline,
        "results": {name: {**stats[name], "cpu_time": cpu_stats[name], **info[name]} for name in names},
    }
    headers = ["variant", *timing_headers(), "optimizer ms", "trainable params"]
    if not args.no_memory:
        headers += ["peak MiB", "allowance MiB", "peak / allowance"]
    rows = []
    for name in names:
        i = info[name]
        row = [
            name,
            *timing_cells(stats[name], cpu_stats[name], ms=".0f", ratio=".3f"),
            f"{i['optimizer_ms']:.0f}",
            f"{i['trainable_params']:,}",
        ]
        if not args.no_memory:
            row += [f"{i['peak_mb']:.0f}", f"{i['peak_allowance_mb']:.0f}", f"{i['peak_vs_allowance']:.2f}"]
        rows.append(row)
    report(payload, markdown_table(headers, rows), args.json)
    return payload


def generate(args, device, dtype) -> dict:
    n, k = args.num_experts, args.top_k
    builders = {
        lora_name(args): lambda: lora(args),
        f"routed LoRA top_k N={n} k={k}": routed(args),
        f"routed LoRA top_k N={n} k={k}, router per layer": routed(args, router_sharing="layer"),
    }
    baseline_of = lora_name(args)
    names = select_variants(builders, args.only, baseline_of)
    models = {}
    for name in names:
        model = builders[name]()
        model.to(device=device, dtype=dtype).eval()
        models[name] = model
    steps, baselines = {}, {}
    for b in args.gen_batches:
        prompt = make_batch(args, device, b, args.prompt_len)
        for name in names:

            def step(model=models[name], prompt=prompt):
                with torch.no_grad():
                    out = model.generate(
                        **prompt,
                        do_sample=False,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        pad_token_id=0,
                    )
                assert out.shape[1] == args.prompt_len + args.new_tokens

            steps[f"{name}, batch {b}"] = step
        baselines[b] = f"{baseline_of}, batch {b}"
    results, rows = {}, []
    for b in args.gen_batches:
        group = {key: fn for key, fn in steps.items() if key.endswith(f", batch {b}")}
        stats, cpu_stats, _ = measure(group, baselines[b], args.reps, args.warmup, device)
        for key in group:
            per_token = stats[key]["median_ms"] / args.new_tokens
            results[key] = {**stats[key], "cpu_time": cpu_stats[key], "ms_per_token": per_token, "batch": b}
            rows.append([key, f"{per_token:.2f}", *timing_cells(stats[key], cpu_stats[key], ms=".0f", ratio=".3f")])
    payload = {
        "benchmark": "routed_lora",
        "mode": "greedy generation with the KV cache",
        "shape": shape(args) | {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens},
        "environment": environment(device, dtype),
        "baseline": baselines,
        "results": results,
    }
    report(payload, markdown_table(["variant", "ms / token", *timing_headers()], rows), args.json)
    return payload


def shape(args) -> dict:
    return {
        "model": "Llama shape (random init)",
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "r": args.r,
        "num_experts": args.num_experts,
        "top_k": args.top_k,
        "targets": TARGETS,
    }


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The model and batch shape (shared with benchmarks/compile.py)."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (of every expert)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate", action="store_true", help="greedy decoding instead of a training step")
    add_shape_args(parser)
    parser.add_argument("--new-tokens", type=int, default=128)
    add_common_args(parser, reps=10, warmup=2)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    device, dtype = setup(args)
    return generate(args, device, dtype) if args.generate else train(args, device, dtype)


if __name__ == "__main__":
    main()
