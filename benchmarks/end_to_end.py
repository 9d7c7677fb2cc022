"""End to end: one training step (forward, backward, fused AdamW step) of a T5-small-shaped model with adapters.

    python benchmarks/end_to_end.py                          # CPU fp32, batch 8 x 128 source / 32 target tokens
    python benchmarks/end_to_end.py --device cuda --dtype bfloat16 --batch 32

The model is built from a `T5Config` with T5-small's shape (d_model 512, d_ff 2048, 6+6 layers, 8 heads,
vocabulary 32128) and random weights: nothing is downloaded. Every variant puts its adapters on the same
24 linear layers (after self-attention and after the feed-forward of every encoder and decoder layer) of
the same frozen base model:

- `monolithic adapters` (the baseline): a plain Linear-ReLU-Linear adapter of size `--adapter-dim` added
  to each layer's output, written here without any routing code;
- routed adapters (`RoutedAdapterConfig`) with the `top_k`, `moesart`, `softmax` and `monolithic` routers;
- PEFT's Poly (`PolyConfig`, `n_skills` = N, rank = adapter size, one task id per example);
- PEFT's LoRA of rank `--adapter-dim` for reference.

Peak memory (see common.py) is reported whole, and as the activation peak above what was live when the step
started (parameters, buffers, AdamW state, the batch). The allowance of the memory target is 1.1 x the
baseline's peak plus 4 x the extra trainable parameters' bytes (parameter, gradient, AdamW's two moments).

Source sequences have random lengths (a quarter of the tokens are padding at most), so encoder blocks pool
over a real attention mask. Prints JSON and a markdown table; see common.py for the timing and memory method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

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
    summarize,
    synchronize,
    tensor_bytes,
    timing_cells,
    timing_headers,
)
from peft import LoraConfig, PolyConfig, get_peft_model  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402

import hf_condroute  # noqa: E402,F401  (registers the PEFT types)
from hf_condroute import RoutedAdapterConfig  # noqa: E402

BASELINE = "monolithic adapters"
TARGETS = ["SelfAttention.o", "DenseReluDense.wo"]


class AdaptedLinear(nn.Module):
    """y = base(x); y + up(relu(down(y))): the monolithic adapter, as the routed tuner places its blocks."""

    def __init__(self, base: nn.Linear, adapter_dim: int):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.out_features, adapter_dim)
        self.up = nn.Linear(adapter_dim, base.out_features)

    @property
    def weight(self):  # T5's feed-forward reads wo.weight.dtype
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        return y + self.up(torch.relu(self.down(y)))


def t5_small(seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=32128,
        d_model=512,
        d_ff=2048,
        d_kv=64,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def with_monolithic_adapters(model: nn.Module, adapter_dim: int) -> nn.Module:
    model.requires_grad_(False)
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(tuple(TARGETS))]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, AdaptedLinear(getattr(parent, child), adapter_dim))
    return model


def variants(args) -> dict[str, Callable[[], tuple[nn.Module, dict]]]:
    """name -> a builder of a fresh model for that variant and the extra forward kwargs it needs, in table order.
    A name given twice (`--num-experts 64 --with-n64`) is one variant."""
    n, h = args.num_experts, args.adapter_dim

    def monolithic():
        return with_monolithic_adapters(t5_small(args.seed), h), {}

    def routed(**routing):
        def build():
            base = t5_small(args.seed)
            config = RoutedAdapterConfig(adapter_dim=h, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM", **routing)
            return get_peft_model(base, config), {}

        return build

    def poly():
        base = t5_small(args.seed)
        config = PolyConfig(r=h, n_skills=n, n_tasks=n, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM")
        g = torch.Generator().manual_seed(args.seed)
        return get_peft_model(base, config), {"task_ids": torch.randint(0, n, (args.batch,), generator=g)}

    def lora():
        base = t5_small(args.seed)
        config = LoraConfig(r=h, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM")
        return get_peft_model(base, config), {}

    builders = {
        BASELINE: monolithic,
        f"routed top_k N={n} k=1": routed(router="top_k", num_experts=n, top_k=1),
        f"routed top_k N={n} k=2": routed(router="top_k", num_experts=n, top_k=2),
        f"routed moesart N={n} k=2": routed(router="moesart", num_experts=n, top_k=2),
        f"routed softmax N={n} (dense)": routed(router="softmax", num_experts=n),
        f"routed smear N={n}": routed(router="smear", num_experts=n),
        "routed monolithic router": routed(router="monolithic", num_experts=1),
        f"PEFT Poly, {n} skills": poly,
        f"PEFT LoRA r={h}": lora,
    }
    if args.with_n64:
        builders["routed top_k N=64 k=1"] = routed(router="top_k", num_experts=64, top_k=1)
    return builders


def make_batch(args, device) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(2, 32128, (args.batch, args.source_len), generator=g)
    lengths = torch.randint(args.source_len * 3 // 4, args.source_len + 1, (args.batch,), generator=g)
    attention_mask = (torch.arange(args.source_len) < lengths.unsqueeze(1)).long()
    input_ids = input_ids * attention_mask
    labels = torch.randint(2, 32128, (args.batch, args.target_len), generator=g)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=32)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument("--with-n64", action="store_true", help="also routed top_k with 64 experts per block")
    add_common_args(parser, reps=10, warmup=2)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    builders = variants(args)
    names = select_variants(builders, args.only, BASELINE)
    batch = make_batch(args, device)
    models, steps, optimizer_seconds = {}, {}, {}
    info = {name: {} for name in names}
    for name in names:
        model, extra = builders[name]()
        model.to(device=device, dtype=dtype).train()
        extra = {k: v.to(device) for k, v in extra.items()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW: transformers.Trainer's default (`adamw_torch_fused`); torch's default for-loop AdamW
        # would make the step's cost grow with the parameter count far more than the adapters themselves do
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)

        optimizer_seconds[name] = []

        def step(model=model, optimizer=optimizer, extra=extra, seconds=optimizer_seconds[name]):
            loss = model(**batch, **extra).loss
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
    stats, cpu_stats, wall = measure(steps, BASELINE, args.reps, args.warmup, device)
    # the same ratio without the optimizer step (forward + backward only), and the step's own median
    fwd_bwd_seconds = {}
    for name in names:
        timed = optimizer_seconds[name][-args.reps :]
        info[name]["optimizer_ms"] = statistics.median(timed) * 1e3
        fwd_bwd_seconds[name] = [w - o for w, o in zip(wall[name], timed)]
    fwd_bwd = summarize(fwd_bwd_seconds, BASELINE)
    for name in names:
        info[name]["forward_backward_ratio"] = fwd_bwd[name]["ratio"]
        info[name]["forward_backward_ratio_iqr"] = [fwd_bwd[name]["ratio_q1"], fwd_bwd[name]["ratio_q3"]]
    if not args.no_memory:
        for name in names:
            model, optimizer = models[name]
            live = tensor_bytes(
                [*model.parameters(), *model.buffers(), *optimizer_state_tensors(optimizer), *batch.values()]
            )
            info[name]["state_mb"] = live / 2**20
            info[name]["peak_mb"] = peak_memory_bytes(steps[name], device, live) / 2**20
            info[name]["activation_peak_mb"] = info[name]["peak_mb"] - info[name]["state_mb"]
    base = info[BASELINE]
    for name in names:
        # The memory target's allowance: 1.1 x the baseline's peak, plus what the extra trainable parameters
        # need in any case: the parameter, its gradient and AdamW's two moments (4 x its size).
        extra_params = info[name]["trainable_params"] - base["trainable_params"]
        info[name]["extra_param_state_mb"] = max(extra_params, 0) * 4 * torch.finfo(dtype).bits / 8 / 2**20
        if "peak_mb" in info[name]:
            allowance = 1.1 * base["peak_mb"] + info[name]["extra_param_state_mb"]
            info[name]["peak_vs_allowance"] = info[name]["peak_mb"] / allowance
            info[name]["activation_peak_ratio"] = info[name]["activation_peak_mb"] / base["activation_peak_mb"]
    payload = {
        "benchmark": "end_to_end",
        "shape": {
            "model": "T5-small shape (random init)",
            "batch": args.batch,
            "source_len": args.source_len,
            "target_len": args.target_len,
            "adapter_dim": args.adapter_dim,
            "num_experts": args.num_experts,
            "targets": TARGETS,
        },
        "environment": environment(device, dtype),
        "baseline": BASELINE,
        "results": {name: {**stats[name], "cpu_time": cpu_stats[name], **info[name]} for name in names},
    }
    headers = ["variant", *timing_headers(), "fwd+bwd ratio", "optimizer ms", "page faults", "trainable params"]
    if not args.no_memory:
        headers += ["peak MiB", "peak above state MiB (ratio)", "peak / allowance"]
    rows = []
    for name in names:
        s = stats[name]
        row = [
            name,
            *timing_cells(s, cpu_stats[name], ms=".0f", ratio=".3f"),
            f"{info[name]['forward_backward_ratio']:.3f}",
            f"{info[name]['optimizer_ms']:.0f}",
            f"{s['page_faults_per_step']:.0f}",
            f"{info[name]['trainable_params']:,}",
        ]
        if not args.no_memory:
            i = info[name]
            row += [
                f"{i['peak_mb']:.0f}",
                f"{i['activation_peak_mb']:.0f} ({i['activation_peak_ratio']:.2f})",
                f"{i['peak_vs_allowance']:.2f}",
            ]
        rows.append(row)
    report(payload, markdown_table(headers, rows), args.json)
    return payload


if __name__ == "__main__":
    main()
