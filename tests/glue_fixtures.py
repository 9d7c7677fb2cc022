"""Tiny GLUE-shaped data, a tiny random T5 and a tokenizer trained on the fixture text: nothing downloaded.

The datasets have the Hub's config names, splits, columns and label features (`nyu-mll/glue`), a few rows
each, with labels that follow a simple rule of the text so a model can learn something.
"""

from __future__ import annotations

import os
import random

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from hf_condroute.studies.glue import GLUE_TASKS, GlueTask
from hf_condroute.studies.glue.text_to_text import source_text, target_vocabulary

WORDS = "the a cat dog bird sat ran flew on under mat tree house red blue green small big".split()
POSITIVE, NEGATIVE = "good great fine".split(), "bad awful poor".split()


def _sentence(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _row(task: GlueTask, rng: random.Random, labelled: bool = True) -> dict:
    label = rng.randrange(task.num_labels) if not task.is_regression else round(rng.uniform(0, 5), 3)
    first = _sentence(rng)
    if task.name == "sst2":
        first += " " + rng.choice(POSITIVE if label == 1 else NEGATIVE)
    if task.name == "cola" and label == 0:
        first = first.replace(" ", " the ", 1)
    row = {task.text_columns[0]: first}
    if len(task.text_columns) > 1:
        # pairs: the more the label says "same", the more the second text repeats the first
        same = (
            (label / 5) if task.is_regression else float(label == 0 if task.name in ("mnli", "qnli", "rte") else label)
        )
        words = first.split()
        row[task.text_columns[1]] = " ".join(w if rng.random() < same else rng.choice(WORDS) for w in words)
    row["label"] = label if labelled else -1
    return row


def tiny_glue(train_rows: int = 16, eval_rows: int = 6, seed: int = 0) -> dict[str, DatasetDict]:
    """{task name: DatasetDict} shaped like `load_dataset('nyu-mll/glue', name)` (test splits unlabelled)."""
    rng = random.Random(seed)
    out = {}
    for task in GLUE_TASKS:
        label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
        features = Features({**{c: Value("string") for c in task.text_columns}, "label": label, "idx": Value("int32")})
        splits = {task.train_split: train_rows, **{split: eval_rows for _, split in task.eval_splits}}
        data = {}
        for split, n in splits.items():
            rows = [_row(task, rng) for _ in range(n)]
            data[split] = Dataset.from_list([{**r, "idx": i} for i, r in enumerate(rows)], features=features)
        test_split = "test_matched" if task.name == "mnli" else "test"
        rows = [_row(task, rng, labelled=task.is_regression) for _ in range(2)]
        data[test_split] = Dataset.from_list([{**r, "idx": i} for i, r in enumerate(rows)], features=features)
        out[task.name] = DatasetDict(data)
    return out


def save_tiny_glue(data_dir: str, **kwargs) -> str:
    for name, data in tiny_glue(**kwargs).items():
        data.save_to_disk(os.path.join(data_dir, name))
    return data_dir


def fixture_texts() -> list[str]:
    """Every input and target text of the fixture data, for training the tokenizer."""
    texts, data = [], tiny_glue()
    for task in GLUE_TASKS:
        for split in data[task.name].values():
            texts += [source_text(task, row) for row in split]
        texts += target_vocabulary(task)
    return texts


def save_tiny_t5(model_dir: str, d_model: int = 64, seed: int = 0) -> str:
    """A randomly initialised 2+2-layer T5 (from `seed`, whatever tests ran before in this process) and a word-level
    tokenizer trained on the fixture text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(fixture_texts(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=64
    )
    wrapped.save_pretrained(model_dir)
    config = T5Config(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=16,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    model.save_pretrained(model_dir)
    return model_dir
