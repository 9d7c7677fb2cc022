"""Layer level: forward + backward of one routed adapter block against one monolithic adapter of the same size.

    python benchmarks/layer.py                       # (batch 32, seq 128, d 512), adapter_dim 64, CPU fp32
    python benchmarks/layer.py --device cuda --dtype bfloat16

Every step computes the gradients of the input and of every parameter (router included) for a fixed
output gradient, and frees the parameter gradients after it, as `optimizer.zero_grad()` does. Routed
variants are full `RoutedBlock`s (router + bank) recording into a `RoutingStep`, as in the PEFT tuner.
The baseline is a plain `Linear -> ReLU -> Linear` adapter. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    add_common_args,
    environment,
    markdown_table,
    measure,
    peak_memory_bytes,
    report,
    select_variants,
    setup,
    tensor_bytes,
    timing_cells,
    timing_headers,
)

from hf_condroute.block.routed_block import RoutedBlock, RoutingInputs  # noqa: E402
from hf_condroute.block.step import RoutingStep  # noqa: E402
from hf_condroute.experts import AdapterBank, LoraBank, dispatch, expert_mlp  # noqa: E402
from hf_condroute.moebert.bank import FFNSliceBank  # noqa: E402
from hf_condroute.routers import build_router  # noqa: E402
from hf_condroute.routers.config import RoutingConfig  # noqa: E402

BASELINE = "monolithic adapter"


class LoopAdapterBank(AdapterBank):
    """The same bank through the generic per-expert `dispatch` (sort, one call per expert, combine): what
    a bank without a grouped kernel gets."""

    def forward(self, x, experts, weights, merge=False):
        down_w, down_b = self.down_weight.unbind(0), self.down_bias.unbind(0)
        up_w, up_b = self.up_weight.unbind(0), self.up_bias.unbind(0)

        def expert(e, rows):
            return self.act(rows @ down_w[e] + down_b[e]) @ up_w[e] + up_b[e]

        return dispatch(x, experts, weights, self.num_experts, self.out_features, expert)


class ForcedStrategyBank(AdapterBank):
    """The bank with one dispatch strategy forced, to show what the cost model's choice saves."""

    def __init__(self, *args, strategy: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.strategy = strategy

    def forward(self, x, experts, weights, merge=False):
        return expert_mlp(x, experts, weights, self.mlp_weights(), self.act, strategy=self.strategy)


class FixedDecisionBank(nn.Module):
    """The bank alone, called with one fixed random decision (k=1): the dispatch's cost without the router."""

    def __init__(self, d: int, adapter_dim: int, n: int, batch: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.bank = AdapterBank(n, d, adapter_dim, init_weights=False)
        self.register_buffer("experts", torch.randint(0, n, (batch, 1), generator=g))
        self.register_buffer("weights", torch.rand(batch, 1, generator=g))

    def forward(self, x):
        return self.bank(x, self.experts, self.weights)


def routed(d: int, adapter_dim: int, router: str, n: int, k: int, granularity="example", bank_cls=AdapterBank, **kw):
    config = RoutingConfig(
        router=router, num_experts=n, top_k=k, routing_granularity=granularity, **kw.pop("routing", {})
    )
    config.validate_routing()
    r = build_router(config, d, "bench")
    make = kw.pop("make_bank", None)
    bank = make(r.num_experts) if make else bank_cls(r.num_experts, d, adapter_dim, init_weights=False, **kw)
    return RoutedBlock(r, bank, granularity, name="bench")


def lora_bank(d: int, rank: int):
    """LoRA experts of rank `rank` on a (d -> d) Linear's input (the bank alone: the Linear is the same for all)."""
    return lambda n: LoraBank(n, d, d, r=rank, lora_alpha=2 * rank, init_lora_weights=False)


def gated_bank(d: int, h: int):
    """Gated (GLU, SiLU) FFN experts of width h, as a Llama MLP split into experts."""
    return lambda n: FFNSliceBank(n, d, h, d, F.silu, gated=True, in_bias=False, out_bias=False)


def variants(d: int, h: int, batch: int) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, what it is)."""
    return {
        BASELINE: (nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)), "plain Linear-ReLU-Linear"),
        "routed monolithic N=1": (routed(d, h, "monolithic", 1, 1), "RoutedBlock, one expert"),
        "top_k N=8 k=1": (routed(d, h, "top_k", 8, 1), "per example"),
        "top_k N=64 k=1": (routed(d, h, "top_k", 64, 1), "per example"),
        "top_k N=8 k=2": (routed(d, h, "top_k", 8, 2), "per example"),
        "moesart N=8 k=2": (routed(d, h, "moesart", 8, 2), "per example"),
        "top_k N=64 k=2": (routed(d, h, "top_k", 64, 2), "per example"),
        "expert_choice N=8 k=1": (routed(d, h, "expert_choice", 8, 1), "per example, rows get 0..N experts"),
        "softmax N=8 (dense)": (routed(d, h, "softmax", 8, 1), "every expert runs"),
        "smear N=8": (routed(d, h, "smear", 8, 1), "per example, one merged expert"),
        "dselect_k N=8 k=2": (routed(d, h, "dselect_k", 8, 2), "per example, experts with weight > 0 (dense early)"),
        "comet N=8 k=2": (routed(d, h, "comet", 8, 2), "per example, experts with weight > 0 (dense early)"),
        "top_k N=8 k=1 per token": (routed(d, h, "top_k", 8, 1, "token"), "each token routed"),
        "LoRA r=h N=8 k=2 per token": (routed(d, h, "top_k", 8, 2, "token", make_bank=lora_bank(d, h)), "LoraBank"),
        "gated FFN N=8 k=1 per token": (
            routed(d, h, "top_k", 8, 1, "token", make_bank=gated_bank(d, h)),
            "FFNSliceBank, gated: act(x Wg) * (x Wi) -> Wo",
        ),
        "top_k N=64 k=1 per token": (routed(d, h, "top_k", 64, 1, "token"), "each token routed"),
        "top_k N=256 k=1 per token": (routed(d, h, "top_k", 256, 1, "token"), "each token routed, ~16 per expert"),
        "top_k N=8 k=1, grouped forced": (
            routed(d, h, "top_k", 8, 1, bank_cls=ForcedStrategyBank, strategy="grouped"),
            "sorted rows + grouped GEMM instead of per-row weights",
        ),
        "top_k N=8 k=1, per-expert loop": (routed(d, h, "top_k", 8, 1, bank_cls=LoopAdapterBank), "generic dispatch"),
        "top_k N=64 k=1, per-expert loop": (routed(d, h, "top_k", 64, 1, bank_cls=LoopAdapterBank), "generic dispatch"),
        "bank only N=1": (FixedDecisionBank(d, h, 1, batch), "no router; the single-expert shortcut"),
        "bank only N=8": (FixedDecisionBank(d, h, 8, batch), "no router; fixed random decision"),
        "bank only N=64": (FixedDecisionBank(d, h, 64, batch), "no router; fixed random decision"),
    }


def make_step(module: nn.Module, x0: torch.Tensor, grad: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]
    is_block = isinstance(module, RoutedBlock)

    def step():
        x = x0.detach().requires_grad_()
        out = module(x, RoutingInputs(step=RoutingStep())) if is_block else module(x)
        out.backward(grad)
        for p in params:
            p.grad = None

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--adapter-dim", type=int, default=64)
    add_common_args(parser, reps=30, warmup=3)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    specs = variants(args.d_model, args.adapter_dim, args.batch)
    specs = {name: specs[name] for name in select_variants(specs, args.only, BASELINE)}
    x0 = torch.randn(args.batch, args.seq, args.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x0)
    steps, params = {}, {}
    for name, (module, _) in specs.items():
        module.to(device=device, dtype=dtype).train()
        steps[name] = make_step(module, x0, grad)
        params[name] = sum(p.numel() for p in module.parameters())
    stats, cpu_stats, _ = measure(steps, BASELINE, args.reps, args.warmup, device)
    if not args.no_memory:
        for name, (module, _) in specs.items():
            live = tensor_bytes([x0, grad, *module.parameters(), *module.buffers()])
            stats[name]["peak_mb"] = peak_memory_bytes(steps[name], device, live) / 2**20
    payload = {
        "benchmark": "layer",
        "shape": {"batch": args.batch, "seq": args.seq, "d_model": args.d_model, "adapter_dim": args.adapter_dim},
        "environment": environment(device, dtype),
        "baseline": BASELINE,
        "results": {
            name: {**stats[name], "cpu_time": cpu_stats[name], "params": params[name], "what": specs[name][1]}
            for name in specs
        },
    }
    headers = ["variant", *timing_headers(cpu_ratio_iqr=True), "page faults", "params"]
    if not args.no_memory:
        headers.append("peak MiB")
    rows = []
    for name in specs:
        s = stats[name]
        row = [
            name,
            *timing_cells(s, cpu_stats[name], ms=".1f", ratio=".2f", cpu_ratio_iqr=True),
            f"{s['page_faults_per_step']:.0f}",
            f"{params[name]:,}",
        ]
        if not args.no_memory:
            row.append(f"{s['peak_mb']:.0f}")
        rows.append(row)
    report(payload, markdown_table(headers, rows), args.json)
    return payload


if __name__ == "__main__":
    main()
