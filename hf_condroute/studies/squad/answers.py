"""From start/end logits of every window back to one answer text per question, as SQuAD's standard
postprocessing does: the `n_best` highest start and end logits of each window, every pair with start <= end,
both inside the context and at most `max_answer_length` tokens long, scored by start + end logit; the best pair
over all windows of a question wins. For SQuAD v2.0 the question gets no answer ("") when the null score (the
[CLS] position's start + end logit, the smallest over the question's windows) beats the best span by more than
`null_threshold`.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

# the null answer is scored at the first position: [CLS] for BERT-like models, where the training windows
# without an answer point (hf_condroute.studies.squad.features)
NULL_POSITION = 0


def _spans(start: np.ndarray, end: np.ndarray, offsets, n_best: int, max_answer_length: int):
    """(score, first char, last char) of every allowed span of one window."""
    length = len(offsets)
    start, end = start[:length], end[:length]  # logits past the window are batch padding
    starts = np.argsort(start)[::-1][:n_best]
    ends = np.argsort(end)[::-1][:n_best]
    for s in starts:
        for e in ends:
            if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            yield float(start[s] + end[e]), offsets[s][0], offsets[e][1]


def extract_answers(
    examples: Sequence[dict],
    features: Sequence[dict],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> list[dict]:
    """[{"id", "prediction_text"}] in the order of `examples` (rows with `id` and `context`).

    features: the evaluation windows (`example_id`, `offset_mapping`), in the order of the logits' rows;
    start_logits / end_logits: (windows, length), e.g. `Trainer.predict(...)`'s predictions (padding past a
    window's length is ignored).
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2 or len(start_logits) != len(features):
        raise ValueError(
            f"start and end logits must both be (windows, length) with one row per window: got {start_logits.shape} "
            f"and {end_logits.shape} for {len(features)} windows. Pass the logits of exactly these features."
        )
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best ({n_best}) and max_answer_length ({max_answer_length}) must be >= 1.")
    windows = collections.defaultdict(list)
    for i, feature in enumerate(features):
        windows[feature["example_id"]].append(i)
    predictions = []
    for example in examples:
        best: tuple[float, int, int] | None = None
        null_score = None
        for i in windows.get(example["id"], ()):
            offsets = features[i]["offset_mapping"]
            score = float(start_logits[i, NULL_POSITION] + end_logits[i, NULL_POSITION])
            null_score = score if null_score is None else min(null_score, score)
            for span in _spans(start_logits[i], end_logits[i], offsets, n_best, max_answer_length):
                if best is None or span[0] > best[0]:
                    best = span
        if null_score is None:
            raise ValueError(f"Question {example['id']!r} has no window among the features: tokenize all examples.")
        text = "" if best is None else example["context"][best[1] : best[2]]
        if version_2 and (best is None or null_score - best[0] > null_threshold):
            text = ""
        predictions.append({"id": example["id"], "prediction_text": text})
    return predictions
