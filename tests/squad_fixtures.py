"""Tiny SQuAD-shaped data (the Hub's `rajpurkar/squad` / `squad_v2` splits, columns and features) from the
fixture words, with contexts longer than a window so the stride matters: nothing downloaded."""

from __future__ import annotations

import os
import random

from datasets import Dataset, DatasetDict, Features, Sequence, Value

from .glue_fixtures import WORDS

FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")}),
    }
)


def _row(rng: random.Random, index: int, unanswerable: bool) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(14, 30))]
    first = rng.randrange(3, len(words) - 3)
    length = rng.randint(1, 3)
    # the question repeats the three words before the answer, so a model can learn where answers are
    question = "what " + " ".join(words[first - 3 : first])
    context = " ".join(words)
    start = len(" ".join(words[:first])) + 1
    text = " ".join(words[first : first + length])
    assert context[start : start + len(text)] == text
    answers = {"text": [], "answer_start": []} if unanswerable else {"text": [text], "answer_start": [start]}
    return {"id": f"q{index}", "title": "fixture", "context": context, "question": question, "answers": answers}


def tiny_squad(version_2: bool = False, train_rows: int = 16, eval_rows: int = 6, seed: int = 0) -> DatasetDict:
    """A DatasetDict shaped like `load_dataset('rajpurkar/squad')` (version_2: every third row unanswerable)."""
    rng = random.Random(seed)
    splits, index = {}, 0
    for split, n in (("train", train_rows), ("validation", eval_rows)):
        rows = []
        for i in range(n):
            rows.append(_row(rng, index, unanswerable=version_2 and i % 3 == 2))
            index += 1
        splits[split] = Dataset.from_list(rows, features=FEATURES)
    return DatasetDict(splits)


def save_tiny_squad(data_dir: str, **kwargs) -> str:
    """`data_dir/squad` and `data_dir/squad_v2`, as `save_to_disk` writes them."""
    for name, version_2 in (("squad", False), ("squad_v2", True)):
        tiny_squad(version_2=version_2, **kwargs).save_to_disk(os.path.join(data_dir, name))
    return data_dir
