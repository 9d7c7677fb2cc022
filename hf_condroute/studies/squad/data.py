"""SQuAD v1.1 and v2.0 from the Hub (`rajpurkar/squad`, `rajpurkar/squad_v2`) or a local `save_to_disk` copy,
checked before any training starts.

A local copy is a DatasetDict with the Hub's splits (`train`, `validation`) and columns (`id`, `context`,
`question`, `answers` = {`text`: [...], `answer_start`: [...]}); `data_dir` is that folder itself, or a folder
holding it under the task's name (`data_dir/squad`, `data_dir/squad_v2`, as GLUE's `data_dir/<task>`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..cli import from_the_hub


@dataclass(frozen=True)
class SquadVersion:
    name: str  # the task name of the recipes
    hub_dataset: str
    version_2: bool  # unanswerable questions: empty gold answers and the no-answer prediction
    train_split: str = "train"
    eval_split: str = "validation"


SQUAD_VERSIONS = {
    "squad": SquadVersion("squad", "rajpurkar/squad", version_2=False),
    "squad_v2": SquadVersion("squad_v2", "rajpurkar/squad_v2", version_2=True),
}
COLUMNS = ("id", "context", "question", "answers")


class SquadDataError(ValueError):
    """The SQuAD data cannot be used as it is; the message says every problem and how to fix it."""


def get_squad_version(name: str) -> SquadVersion:
    if name not in SQUAD_VERSIONS:
        raise ValueError(f"Unknown SQuAD task {name!r}; choose one of {', '.join(SQUAD_VERSIONS)}.")
    return SQUAD_VERSIONS[name]


def check_squad_data(version: SquadVersion, data: DatasetDict, where: str) -> None:
    """Raise SquadDataError listing every missing split or column, or a mistyped `answers`."""
    problems = []
    for split in (version.train_split, version.eval_split):
        if split not in data:
            problems.append(
                f"no split {split!r} (it has {', '.join(data) or 'none'}); {version.name} needs train and validation."
            )
            continue
        features = data[split].features
        missing = [c for c in COLUMNS if c not in features]
        if missing:
            problems.append(
                f"{split}: missing column(s) {', '.join(missing)} (it has {', '.join(features)}); SQuAD's columns are "
                f"{', '.join(COLUMNS)}, named as on the Hub."
            )
            continue
        answers = features["answers"]
        inner = answers if isinstance(answers, dict) else getattr(answers, "feature", None)  # dict, or Sequence(dict)
        fields = set(inner) if isinstance(inner, dict) else set()
        if not {"text", "answer_start"} <= fields:
            problems.append(
                f"{split}: `answers` must be {{'text': [str], 'answer_start': [int]}} per row, as on the Hub; "
                f"got {answers}."
            )
    if problems:
        raise SquadDataError(f"The {version.name} data in {where} cannot be used:\n- " + "\n- ".join(problems))


def _local(version: SquadVersion, data_dir: str) -> DatasetDict:
    if not os.path.isdir(data_dir):
        raise SquadDataError(
            f"--data_dir {data_dir} is not a folder. Save the data with `load_dataset('{version.hub_dataset}')"
            f".save_to_disk(...)` and point --data_dir there, or leave it out to load {version.hub_dataset} "
            "from the Hub."
        )
    path = (
        data_dir
        if os.path.exists(os.path.join(data_dir, "dataset_dict.json"))
        else os.path.join(data_dir, version.name)
    )
    if not os.path.isdir(path):
        raise SquadDataError(
            f"Neither {data_dir} nor {path} is a `save_to_disk` DatasetDict. Save {version.name} with "
            f"`load_dataset('{version.hub_dataset}').save_to_disk('{path}')`."
        )
    try:
        data = load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise SquadDataError(f"{path} is not a dataset saved with `save_to_disk` ({err}).") from err
    if isinstance(data, Dataset):
        raise SquadDataError(
            f"{path} holds a single Dataset, but a DatasetDict with splits train and validation is needed: save "
            "`DatasetDict({'train': ..., 'validation': ...})` there instead."
        )
    return data


def load_squad(name: str, data_dir: str | None = None) -> DatasetDict:
    """SQuAD v1.1 (`squad`) or v2.0 (`squad_v2`), from `data_dir` or the Hub, checked."""
    version = get_squad_version(name)
    if data_dir is not None:
        data = _local(version, data_dir)
    else:
        with from_the_hub(version.name, version.hub_dataset, "--data_dir (a `save_to_disk` folder)"):
            data = load_dataset(version.hub_dataset)
    check_squad_data(version, data, data_dir or version.hub_dataset)
    return data
