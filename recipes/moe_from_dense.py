"""Dense causal LM -> mixture of experts -> a plain transformers MoE model (LLaMA-MoE / MoEBERT on a causal LM).

    python recipes/moe_from_dense.py --output_dir runs/moe_from_dense            # tiny local model, local text
    python recipes/moe_from_dense.py --model_name_or_path Qwen/Qwen2.5-0.5B --text_file my.txt --output_dir runs/q

1. the dense model: a Hub id or folder (`--model_name_or_path`), or by default a tiny Llama trained here for
   `--dense_steps` on local text (this checkout's Markdown documents, or `--text_file`) with a byte-level BPE
   tokenizer trained on the same text: nothing is downloaded;
2. the importance of every MLP neuron on that text (`hf_condroute.moebert.importance_scores`);
3. each MLP split into `--num_experts` experts (`RoutedFFNConfig`, the most important `--shared_neurons` in all),
   routed per token by a bias-free top-k router: the settings that export exactly;
4. distillation from the dense model (`DistillationTrainer`: LM loss + hidden-state MSE + logit KL) for
   `--distill_steps`;
5. `hf_condroute.save_native`: a `MixtralForCausalLM` (each expert keeps its copy of the shared neurons, which
   distillation trains apart), loaded back with `AutoModelForCausalLM` and used with plain `generate`.

`<output_dir>/results.json` has the evaluation loss of the dense, converted and distilled models, the largest logit
difference between the routed model and its native export, and the generated text.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_condroute
from hf_condroute import RoutedFFNConfig
from hf_condroute.moebert import DistillationTrainer, importance_scores
from hf_condroute.studies.cli import at_least, output_dir, run_recipe, usage_errors
from hf_condroute.studies.tiny_lm import lm_blocks, local_texts, tiny_llama, train_bpe_tokenizer


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model_name_or_path", help="a dense Llama, Mistral or Qwen2 model (default: a tiny one, trained here)"
    )
    p.add_argument("--text_file", nargs="*", help="text to train and distil on (default: this checkout's documents)")
    p.add_argument("--output_dir", help="default: runs/moe_from_dense")
    p.add_argument("--num_experts", type=at_least(1), default=4)
    p.add_argument("--top_k", type=at_least(1), default=2)
    p.add_argument(
        "--shared_neurons", type=at_least(0), default=0, help="MoEBERT's most important neurons, in every expert"
    )
    p.add_argument("--hidden_size", type=at_least(1), default=64, help="the tiny model's width")
    p.add_argument("--layers", type=at_least(1), default=2, help="the tiny model's depth")
    p.add_argument("--vocab_size", type=at_least(1), default=512, help="the tiny model's BPE vocabulary")
    p.add_argument("--block_size", type=at_least(2), default=64)
    p.add_argument("--dense_steps", type=at_least(0), default=300, help="training steps of the tiny dense model")
    p.add_argument("--distill_steps", type=at_least(1), default=150)
    p.add_argument("--batch_size", type=at_least(1), default=16)
    p.add_argument("--learning_rate", type=at_least(0.0, float), default=2e-3)
    p.add_argument("--router_aux_loss_coef", type=at_least(0.0, float), default=0.01)
    p.add_argument("--prompt", default="The router")
    p.add_argument("--quick", action="store_true", help="a smoke run: a tiny model and a few steps")
    p.add_argument("--seed", type=at_least(0), default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden_size, args.layers, args.vocab_size = 32, 2, 300
        args.dense_steps, args.distill_steps, args.batch_size = 4, 4, 4
    args.output_dir = args.output_dir or os.path.join(output_dir(None, True), "moe_from_dense")
    with usage_errors():
        if args.top_k > args.num_experts:
            raise ValueError(f"--top_k {args.top_k} is larger than --num_experts {args.num_experts}.")
        for path in args.text_file or []:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--text_file {path} does not exist.")
    return args


def train(model, rows, args, steps: int, trainer_cls=Trainer, **kwargs):
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(50, steps // 10),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = trainer_cls(model=model, args=training_args, train_dataset=Dataset.from_list(rows), **kwargs)
    trainer.train()
    return model.eval()


@torch.no_grad()
def eval_loss(model, rows) -> float:
    batch = torch.tensor([r["input_ids"] for r in rows])
    return float(model(input_ids=batch, labels=batch).loss)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    set_seed(args.seed)
    start = time.perf_counter()
    with usage_errors():
        texts = local_texts(args.text_file)
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        dense = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    else:
        tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
        dense = tiny_llama(tokenizer, args.hidden_size, args.layers, args.seed)
    rows = lm_blocks(tokenizer, texts, args.block_size)
    eval_rows, train_rows = rows[: max(1, len(rows) // 10)][:32], rows[max(1, len(rows) // 10) :]
    if not args.model_name_or_path:
        dense = train(dense, train_rows, args, args.dense_steps)
    results = {"dense_eval_loss": eval_loss(dense, eval_rows)}

    # 2-3: importance scores, then the routed FFN with the settings that export exactly
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    loader = DataLoader(train_rows, batch_size=args.batch_size, collate_fn=collate)
    scores = importance_scores(dense, loader, max_batches=8)
    config = RoutedFFNConfig(
        importance=scores,
        num_experts=args.num_experts,
        top_k=args.top_k,
        shared_neurons=args.shared_neurons,
        router="top_k",
        routing_granularity="token",
        norm_topk_prob=True,
        router_batchnorm=False,
        router_bias=False,
        router_aux_loss_coef=args.router_aux_loss_coef,
    )
    model = get_peft_model(dense, config).eval()
    results["converted_eval_loss"] = eval_loss(model, eval_rows)

    # 4: distillation from the dense model (the same PEFT model with its adapter disabled)
    model = train(model.train(), train_rows, args, args.distill_steps, DistillationTrainer, data_collator=collate)
    results["distilled_eval_loss"] = eval_loss(model, eval_rows)

    # 5: the native model, loaded as any transformers model
    native_dir = os.path.join(args.output_dir, "native")
    hf_condroute.save_native(model, native_dir, tokenizer=tokenizer)
    native = AutoModelForCausalLM.from_pretrained(native_dir).eval()
    tok = AutoTokenizer.from_pretrained(native_dir)
    batch = torch.tensor([r["input_ids"] for r in eval_rows])
    with torch.no_grad():
        gap = (native(input_ids=batch).logits - model(input_ids=batch).logits).abs().max()
        prompt = tok(args.prompt, return_tensors="pt")
        generated = native.generate(**prompt, max_new_tokens=30, do_sample=False)
    results.update(
        native_class=type(native).__name__,
        native_max_logit_difference=float(gap),
        native_eval_loss=eval_loss(native, eval_rows),
        generated=tok.decode(generated[0], skip_special_tokens=True),
        wall_time_s=round(time.perf_counter() - start, 1),
    )
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_recipe(main)
