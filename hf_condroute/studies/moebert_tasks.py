"""What differs between a GLUE task and SQuAD in the MoEBERT recipe (`recipes/moebert.py`): the teacher's class,
the data the Trainer sees (model inputs) and how a model is scored. `args` is the recipe's `MoEBERTArguments`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from .glue import get_task, glue_average, load_glue, take, task_metrics
from .squad import (
    eval_features,
    extract_answers,
    get_squad_version,
    load_squad,
    model_inputs,
    squad_scores,
    train_features,
)


def tokenize(task, rows, tokenizer, max_length: int):
    def encode(batch):
        encoded = tokenizer(*(batch[c] for c in task.text_columns), truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    return rows.map(encode, batched=True, remove_columns=rows.column_names)


def glue_metrics(task):
    def compute(eval_pred) -> dict:
        predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = predictions.squeeze(-1) if task.is_regression else predictions.argmax(-1)
        return task_metrics(task, predictions, eval_pred.label_ids)

    return compute


def evaluate_all(trainer, eval_sets: dict, prefix: str) -> tuple[dict, float]:
    """The trainer's metrics on every evaluation set (keys `<prefix>_<set>_<metric>`), and the GLUE score."""
    metrics = trainer.evaluate(eval_dataset=eval_sets, metric_key_prefix=prefix)
    per_set = {}
    for name in eval_sets:
        start = f"{prefix}_{name}_"
        per_set[name] = {k[len(start) :]: v for k, v in metrics.items() if k.startswith(start)}
    return metrics, glue_average(per_set)


@dataclass
class TaskRun:
    """What differs between a GLUE task and SQuAD: the teacher's class, the data the Trainer sees (model inputs)
    and how a model is scored: score(trainer, prefix) -> (metrics, summary results)."""

    model_class: Callable
    train_dataset: object
    eval_sets: dict
    score: Callable
    hub_dataset: str
    compute_metrics: Callable | None = None  # the Trainer's (GLUE)
    regression: bool = False  # distil the logits with MSE (STS-B)
    answers: dict = field(default_factory=dict)  # SQuAD: {prefix: predicted answers}, for the teacher comparison


def glue_run(args, training_args, tokenizer) -> TaskRun:
    task = get_task(args.task)
    with training_args.main_process_first(desc="loading GLUE"):
        raw = load_glue([task], args.data_dir)[task.name]
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset = tokenize(
            task, take(raw[task.train_split], args.max_train_samples), tokenizer, args.max_seq_length
        )
        eval_sets = {
            name: tokenize(task, take(raw[split], args.max_eval_samples), tokenizer, args.max_seq_length)
            for name, split in task.eval_splits
        }

    def score(trainer, prefix: str):
        metrics, glue_score = evaluate_all(trainer, eval_sets, prefix)
        return metrics, {f"{prefix}_glue_score": glue_score}

    def model_class(path):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)

    return TaskRun(
        model_class, train_dataset, eval_sets, score, "nyu-mll/glue", compute_metrics=glue_metrics(task),
        regression=task.is_regression,
    )  # fmt: skip


def squad_run(args, training_args, tokenizer) -> TaskRun:
    """SQuAD's windows for training and evaluation; a model is scored on its extracted answers with the official
    exact match and F1 (keys `<prefix>_<task>_exact_match` / `_f1`, v2.0: `_exact`, `_f1`, `_HasAns_*`, ...)."""
    version = get_squad_version(args.task)
    with training_args.main_process_first(desc="loading SQuAD"):
        raw = load_squad(version.name, args.data_dir)
    examples = take(raw[version.eval_split], args.max_eval_samples)
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset = train_features(
            take(raw[version.train_split], args.max_train_samples), tokenizer, args.max_seq_length, args.doc_stride
        )
        features = eval_features(examples, tokenizer, args.max_seq_length, args.doc_stride)
    inputs = model_inputs(features)
    windows = features.select_columns(["example_id", "offset_mapping"]).to_list()
    questions = examples.select_columns(["id", "context"]).to_list()
    references = examples.select_columns(["id", "answers"]).to_list()
    answers: dict = {}

    def score(trainer, prefix: str):
        output = trainer.predict(inputs, metric_key_prefix=prefix)
        start_logits, end_logits = output.predictions[:2]
        answers[prefix] = extract_answers(
            questions, windows, start_logits, end_logits, n_best=args.n_best_size,
            max_answer_length=args.max_answer_length, version_2=version.version_2,
            null_threshold=args.null_score_diff_threshold,
        )  # fmt: skip
        scores = squad_scores(answers[prefix], references, version.version_2, use_evaluate=args.use_evaluate)
        metrics = {**output.metrics, **{f"{prefix}_{version.name}_{k}": v for k, v in scores.items()}}
        trainer.log(metrics)
        return metrics, {}

    return TaskRun(
        AutoModelForQuestionAnswering.from_pretrained, train_dataset, {version.name: inputs}, score,
        version.hub_dataset, answers=answers,
    )  # fmt: skip
