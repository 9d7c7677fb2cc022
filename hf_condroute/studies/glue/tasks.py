"""The eight GLUE tasks (WNLI left out, as is conventional), as the Hub's `nyu-mll/glue` dataset lays them out.

Shared by every GLUE recipe: T5 text-to-text (`text_to_text.py`) and BERT classification use the same names,
columns, splits, label ids and metrics. A task's id (its position in `GLUE_TASKS`) is its routing tag.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    name: the Hub's config name (`load_dataset("nyu-mll/glue", name)`) and the folder name under `--data_dir`.
    text_columns: the input text columns, in the order a sentence-pair model reads them.
    label_names: class names of label ids 0, 1, ... (None: regression, a float `label` in [0, 5]).
    metrics: the official metrics, as keys of `task_metrics`' result.
    eval_splits: {evaluation set name: split}; MNLI has a matched and a mismatched one.
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    eval_splits: tuple[tuple[str, str], ...]
    train_split: str = "train"

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """1 for regression (one output, as transformers' sequence classifiers expect), else the class count."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns every split must have."""
        return (*self.text_columns, "label")

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits training and evaluation read."""
        return (self.train_split, *(split for _, split in self.eval_splits))

    @property
    def tag(self) -> int:
        """The task's routing tag: its position in GLUE_TASKS (stable whatever subset a run trains on)."""
        return GLUE_TASK_NAMES.index(self.name)


def _validation(name: str) -> tuple[tuple[str, str], ...]:
    return ((name, "validation"),)


GLUE_TASKS: tuple[GlueTask, ...] = (
    GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), _validation("cola")),
    GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), _validation("sst2")),
    GlueTask(
        "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), _validation("mrpc")
    ),
    GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), _validation("qqp")),
    GlueTask("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), _validation("stsb")),
    GlueTask(
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        (("mnli_matched", "validation_matched"), ("mnli_mismatched", "validation_mismatched")),
    ),
    GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), _validation("qnli")),
    GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), _validation("rte")),
)
GLUE_TASK_NAMES: tuple[str, ...] = tuple(t.name for t in GLUE_TASKS)
_BY_NAME = {t.name: t for t in GLUE_TASKS}


def get_task(name: str) -> GlueTask:
    """The task of a Hub config name, with a clear error for anything else (WNLI included)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    hint = " WNLI is left out of GLUE averages by convention." if name == "wnli" else ""
    raise ValueError(f"Unknown GLUE task {name!r}.{hint} Valid tasks: {', '.join(GLUE_TASK_NAMES)}.")


def get_tasks(names: list[str] | None = None) -> list[GlueTask]:
    """Tasks by name, in GLUE order; None: all eight. Duplicates and unknown names are errors."""
    if names is None:
        return list(GLUE_TASKS)
    if len(set(names)) != len(names):
        raise ValueError(f"Each GLUE task may be named once, got {names}.")
    tasks = [get_task(n) for n in names]
    if not tasks:
        raise ValueError(f"Name at least one GLUE task: {', '.join(GLUE_TASK_NAMES)}.")
    return sorted(tasks, key=lambda t: t.tag)
