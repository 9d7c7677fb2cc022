"""GLUE cast as text-to-text the way T5 does it (Raffel et al. 2020, `t5.data.preprocessors.glue`/`stsb`).

Input: the task name, then each text column as `column: text`, columns in sorted order
("mnli hypothesis: ... premise: ..."). Target: the class name ("entailment"), or for STS-B the score rounded
to the nearest 0.2 and written with one decimal ("3.8"). Generated text maps back to a label id (-1 when it
is no class name) or a score (-1.0 when it is no number, as T5's `string_to_float`).
"""

from __future__ import annotations

from datasets import Dataset

from .tasks import GlueTask

INVALID_LABEL = -1
INVALID_SCORE = -1.0


def source_text(task: GlueTask, example: dict) -> str:
    fields = " ".join(f"{column}: {example[column]}" for column in sorted(task.text_columns))
    return f"{task.name} {fields}"


def target_text(task: GlueTask, label) -> str:
    if task.is_regression:
        return f"{round(float(label) * 5) / 5:.1f}"
    label = int(label)
    if not 0 <= label < task.num_labels:
        raise ValueError(
            f"{task.name}: label {label} is not a class id in 0..{task.num_labels - 1}; unlabelled rows (GLUE's test "
            "splits use -1) cannot be trained or evaluated on."
        )
    return task.label_names[label]


def target_vocabulary(task: GlueTask) -> list[str]:
    """Every target text the task can have (STS-B: 0.0, 0.2, ..., 5.0)."""
    if task.is_regression:
        return [f"{i / 5:.1f}" for i in range(26)]
    return list(task.label_names)


def parse_prediction(task: GlueTask, text: str):
    """A generated text as a label id (INVALID_LABEL if no class name) or, for STS-B, a score."""
    text = text.strip()
    if task.is_regression:
        try:
            return float(text)
        except ValueError:
            return INVALID_SCORE
    return task.label_names.index(text) if text in task.label_names else INVALID_LABEL


def tokenize_for_t5(task: GlueTask, dataset: Dataset, tokenizer, max_source_length: int) -> Dataset:
    """input_ids, attention_mask, labels and `routing_tags` (the task's tag) for each row; the dataset's own
    columns are dropped (keep `dataset["label"]` for references)."""

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        features = tokenizer([source_text(task, row) for row in rows], max_length=max_source_length, truncation=True)
        features["labels"] = tokenizer(text_target=[target_text(task, row["label"]) for row in rows])["input_ids"]
        features["routing_tags"] = [task.tag] * len(rows)
        return features

    return dataset.map(
        encode, batched=True, remove_columns=dataset.column_names, desc=f"Casting {task.name} as text-to-text"
    )
