"""torch.compile: routed LoRA against PEFT's LoRA, eager and compiled, on routed_lora.py's Llama shape (hidden 512,
4 layers, all-linear targets, N=8 experts, top_k k=2, rank 8): a training step (forward, backward, AdamW, batch 4 x 128
tokens) and greedy decoding with the static cache (a 32-token prompt, batch 1 and 8), plus the compile times.

    python benchmarks/compile.py --threads 1                  # CPU fp32, inductor
    python benchmarks/compile.py --device cuda --dtype bfloat16

Compiled means `torch.compile(model, fullgraph=True)` for the training step (the routing hooks, auxiliary losses
included) and `model.compile(fullgraph=True)` of the base model under `generate(cache_implementation="static")`
for decoding. Compile time: the wall time of the first compiled call(s) minus one eager call (training: the first
step; decoding: the first generate, which compiles prefill and decoding). Ratios are against PEFT LoRA under the
same mode and batch, in the same run. Targets (issue 27): compiled routed LoRA decoding <= 1.3x compiled LoRA per
token, compiled training step <= 1.2x compiled LoRA, compile time <= 2x LoRA's. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import add_common_args, environment, markdown_table, report, select_variants, setup, synchronize  # noqa: E402
from routed_lora import add_shape_args, lora, lora_name, make_batch, routed, shape  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_ms(fn, reps: int, device) -> float:
    return statistics.median(timed(fn, device) for _ in range(reps)) * 1e3


def train_step(model, device, batch):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)

    def step(forward=model):
        loss = forward(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_train(args, builders, device, dtype) -> dict:
    batch = make_batch(args, device, args.batch, args.seq)
    out = {}
    for name, build in builders.items():
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            model = build().to(device=device, dtype=dtype).train()
            step = train_step(model, device, batch)
            first = 0.0
            if mode == "compiled":
                compiled = torch.compile(model, fullgraph=True)
                step = train_step(compiled, device, batch)
                first = timed(step, device)
            for _ in range(args.warmup):
                step()
            ms = median_ms(step, args.reps, device)
            out[(name, mode)] = {"step_ms": ms, "compile_s": max(first - ms / 1e3, 0.0) if first else None}
            print(name, mode, out[(name, mode)], flush=True)
    return out


def run_decode(args, builders, device, dtype) -> dict:
    out = {}
    for name, build in builders.items():
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            model = build().to(device=device, dtype=dtype).eval()
            if mode == "compiled":
                model.get_base_model().compile(fullgraph=True)
            for b in args.gen_batches:
                prompt = make_batch(args, device, b, args.prompt_len)

                def gen(model=model, prompt=prompt):
                    with torch.no_grad():
                        model.generate(
                            **prompt,
                            do_sample=False,
                            max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens,
                            pad_token_id=0,
                            cache_implementation="static",
                        )

                first = timed(gen, device)
                ms = median_ms(gen, args.reps, device)
                compile_s = max(first - ms / 1e3, 0.0) if mode == "compiled" else None
                out[(name, mode, b)] = {"ms_per_token": ms / args.new_tokens, "compile_s": compile_s}
                print(name, mode, b, out[(name, mode, b)], flush=True)
    return out


def ratio(value, base):
    return None if value is None or not base else value / base


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "decode"])
    add_common_args(parser, reps=5, warmup=1, memory=False)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    device, dtype = setup(args)
    base = lora_name(args)
    routed_name = f"routed LoRA top_k N={args.num_experts} k={args.top_k}"
    builders = {base: lambda: lora(args), routed_name: routed(args)}
    builders = {name: builders[name] for name in select_variants(builders, args.only, base)}
    rows, results = [], {}
    if "train" not in args.skip:
        t = run_train(args, builders, device, dtype)
        for (name, mode), v in t.items():
            b = t[(base, mode)]
            v["vs_lora"] = ratio(v["step_ms"], b["step_ms"])
            v["compile_vs_lora"] = ratio(v["compile_s"], b["compile_s"])
            results[f"train, {name}, {mode}"] = v
            rows.append(["train step", name, mode, "-", f"{v['step_ms']:.1f} ms", f"{v['vs_lora']:.2f}",
                         "-" if v["compile_s"] is None else f"{v['compile_s']:.1f}",
                         "-" if v["compile_vs_lora"] is None else f"{v['compile_vs_lora']:.2f}"])  # fmt: skip
    if "decode" not in args.skip:
        d = run_decode(args, builders, device, dtype)
        for (name, mode, b), v in d.items():
            base_v = d[(base, mode, b)]
            v["vs_lora"] = ratio(v["ms_per_token"], base_v["ms_per_token"])
            v["compile_vs_lora"] = ratio(v["compile_s"], base_v["compile_s"])
            results[f"decode, {name}, {mode}, batch {b}"] = v
            rows.append(["decode (static cache)", name, mode, str(b), f"{v['ms_per_token']:.2f} ms/token",
                         f"{v['vs_lora']:.2f}", "-" if v["compile_s"] is None else f"{v['compile_s']:.1f}",
                         "-" if v["compile_vs_lora"] is None else f"{v['compile_vs_lora']:.2f}"])  # fmt: skip
    payload = {
        "benchmark": "compile",
        "shape": shape(args) | {"batch": args.batch, "seq": args.seq, "prompt_len": args.prompt_len},
        "environment": environment(device, dtype),
        "results": results,
    }
    headers = ["what", "variant", "mode", "batch", "time", "vs LoRA (same mode)", "compile s", "compile vs LoRA"]
    report(payload, markdown_table(headers, rows), args.json)
    return payload


if __name__ == "__main__":
    main()
