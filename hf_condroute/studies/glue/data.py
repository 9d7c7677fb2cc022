"""Loading GLUE tasks from a local folder or the Hub, and checking them before any training starts.

A local `data_dir` holds one `datasets.DatasetDict` per task, saved with `save_to_disk`, in a folder named by
the Hub's config name (`data_dir/cola`, `data_dir/mnli`, ...), with the Hub's split and column names. Every
problem of every task is reported at once, with what to do about it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..cli import from_the_hub
from .tasks import GLUE_TASK_NAMES, GlueTask

HUB_DATASET = "nyu-mll/glue"


class GlueDataError(ValueError):
    """The GLUE data cannot be used as it is; the message lists every problem found and how to fix it."""


def _load_one(task: GlueTask, data_dir: str | None) -> tuple[DatasetDict | None, str | None]:
    """(dataset, None) or (None, problem)."""
    if data_dir is None:
        with from_the_hub(f"GLUE's {task.name}", HUB_DATASET, "--data_dir (a folder of `save_to_disk` tasks)"):
            return load_dataset(HUB_DATASET, task.name), None
    path = os.path.join(data_dir, task.name)
    if not os.path.isdir(path):
        present = sorted(n for n in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, n)))
        return None, (
            f"{task.name}: no folder {path}. Save the task there with `load_dataset('{HUB_DATASET}', "
            f"'{task.name}').save_to_disk('{path}')` (task folders found: {', '.join(present) or 'none'}; folders "
            f"are named by the Hub's GLUE config names: {', '.join(GLUE_TASK_NAMES)})."
        )
    try:
        data = load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        return None, f"{task.name}: {path} is not a dataset saved with `save_to_disk` ({err})."
    if isinstance(data, Dataset):
        return None, (
            f"{task.name}: {path} holds a single Dataset, but a DatasetDict with splits "
            f"{', '.join(task.splits)} is needed. Save `DatasetDict({{'train': ..., ...}})` there instead."
        )
    return data, None


def check_task_data(task: GlueTask, data: DatasetDict, splits: Iterable[str]) -> list[str]:
    """Problems (missing splits, missing or mistyped columns) of one task's data, as messages; [] when usable."""
    problems = []
    for split in splits:
        if split not in data:
            problems.append(
                f"{task.name}: no split {split!r} (it has {', '.join(data) or 'none'}). GLUE's {task.name} needs "
                f"{', '.join(task.splits)}, named as on the Hub."
            )
            continue
        columns = data[split].column_names
        missing = [c for c in task.columns if c not in columns]
        if missing:
            problems.append(
                f"{task.name}/{split}: missing column(s) {', '.join(missing)} (it has {', '.join(columns)}). "
                f"{task.name} needs {', '.join(task.columns)}, named as on the Hub."
            )
            continue
        label_type = getattr(data[split].features["label"], "dtype", None)
        if task.is_regression and label_type is not None and not str(label_type).startswith("float"):
            problems.append(f"{task.name}/{split}: `label` must hold float similarity scores, got {label_type}.")
        if not task.is_regression and label_type is not None and not str(label_type).startswith("int"):
            problems.append(f"{task.name}/{split}: `label` must hold integer class ids, got {label_type}.")
    return problems


def load_glue(
    tasks: list[GlueTask], data_dir: str | None = None, splits: dict[str, Iterable[str]] | None = None
) -> dict[str, DatasetDict]:
    """{task name: DatasetDict} for `tasks`, from `data_dir` or the Hub, after checking all of them.

    splits: {task name: splits needed}; default every task's train and evaluation splits. Raises
    `GlueDataError` listing every problem of every task before returning anything.
    """
    if data_dir is not None and not os.path.isdir(data_dir):
        raise GlueDataError(
            f"--data_dir {data_dir} is not a folder. Point it at a folder with one `save_to_disk` DatasetDict per "
            f"task ({', '.join(t.name for t in tasks)}), or leave it out to load `{HUB_DATASET}` from the Hub."
        )
    loaded, problems = {}, []
    for task in tasks:
        data, problem = _load_one(task, data_dir)
        if problem is not None:
            problems.append(problem)
            continue
        needed = task.splits if splits is None else tuple(splits.get(task.name, ()))
        found = check_task_data(task, data, needed)
        problems.extend(found)
        if not found:
            loaded[task.name] = data
    if problems:
        where = data_dir or HUB_DATASET
        raise GlueDataError(f"The GLUE data in {where} cannot be used:\n- " + "\n- ".join(problems))
    return loaded


def take(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first `max_samples` rows (all of them when None or larger than the dataset)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 1:
        raise ValueError(f"A sample limit must be >= 1, got {max_samples}.")
    return dataset.select(range(max_samples))
