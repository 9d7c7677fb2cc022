"""SQuAD's official scores: exact match and token F1 after SQuAD's answer normalisation, best over the gold
answers, in percent (0-100) as the official v1.1 / v2.0 evaluation scripts and `evaluate`'s `squad` /
`squad_v2` metrics report them.

Normalisation: lower case, punctuation removed, the articles a / an / the removed, whitespace collapsed.
SQuAD v2.0 adds unanswerable questions: their gold list is empty and only the empty prediction scores (1 for EM
and F1); an empty prediction for an answerable question scores 0. Scores are also given per part (`HasAns_*`,
`NoAns_*`), as the v2.0 script does.

`squad_scores` uses `evaluate.load("squad" | "squad_v2")` when that loads (it needs the Hugging Face Hub, or
its cache) and the same formulas here otherwise, with a log line saying which; the keys are the same either
way (v2.0's threshold sweep `best_*` is left out: predictions here come with the no-answer decision made).
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import string
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
V1_KEYS = ("exact_match", "f1")
V2_KEYS = (
    "exact",
    "f1",
    "total",
    "HasAns_exact",
    "HasAns_f1",
    "HasAns_total",
    "NoAns_exact",
    "NoAns_f1",
    "NoAns_total",
)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, version_2: bool = True) -> float:
    """F1 of the normalised tokens (a bag of words). Where either side is empty: v2.0 (no-answer) scores 1 when
    both are, else 0; v1.1's script scores 0 (no token in common), even for a gold "the" against "a"."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(version_2 and pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _best(fn, prediction: str, golds: Sequence[str]) -> float:
    return max(fn(prediction, g) for g in golds)


def _gold_texts(reference: Mapping, version_2: bool) -> list[str]:
    texts = list(reference["answers"]["text"])
    if version_2:
        # v2.0 drops gold answers that normalise to nothing; none left means unanswerable
        return [t for t in texts if normalize_answer(t)] or [""]
    if not texts:
        raise ValueError(
            f"Question {reference['id']!r} has no gold answer, which SQuAD v1.1 does not allow: score unanswerable "
            "questions with version_2=True (squad_v2)."
        )
    return texts


def _check(predictions: Sequence[Mapping], references: Sequence[Mapping]) -> dict[str, str]:
    by_id = {p["id"]: p["prediction_text"] for p in predictions}
    ids = [r["id"] for r in references]
    missing = [i for i in ids if i not in by_id]
    if missing or len(by_id) != len(ids):
        raise ValueError(
            f"Predictions and references must cover the same question ids: {len(missing)} reference id(s) without a "
            f"prediction (e.g. {missing[:3]}), {len(by_id)} prediction id(s) for {len(ids)} references."
        )
    if not ids:
        raise ValueError("No questions to score.")
    return by_id


def local_squad_scores(predictions: Sequence[Mapping], references: Sequence[Mapping], version_2: bool = False) -> dict:
    """The official scores, computed here. predictions: [{"id", "prediction_text"}]; references:
    [{"id", "answers": {"text": [...], "answer_start": [...]}}] (the datasets' format)."""
    by_id = _check(predictions, references)
    em, f1, has_answer = [], [], []
    for ref in references:
        golds = _gold_texts(ref, version_2)
        pred = by_id[ref["id"]]
        em.append(_best(exact_match, pred, golds))
        f1.append(max(token_f1(pred, g, version_2) for g in golds))
        has_answer.append(golds != [""])
    if not version_2:
        return {"exact_match": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(f1) / len(f1)}
    out = {"exact": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(f1) / len(f1), "total": len(em)}
    for name, wanted in (("HasAns", True), ("NoAns", False)):
        part = [i for i, h in enumerate(has_answer) if h == wanted]
        if part:  # the official script leaves out a part with no question
            out[f"{name}_exact"] = 100.0 * sum(em[i] for i in part) / len(part)
            out[f"{name}_f1"] = 100.0 * sum(f1[i] for i in part) / len(part)
            out[f"{name}_total"] = len(part)
    return out


@functools.cache
def _evaluate_metric(name: str):
    """`evaluate.load(name)`, or None where it does not load; tried once per process (the Hub look-up is slow)."""
    try:
        import evaluate

        return evaluate.load(name)
    except Exception as err:  # no Hub and no cache: FileNotFoundError, ConnectionError, OSError, ...
        logger.warning(
            "evaluate.load(%r) is not available (%s: %s); computing SQuAD's scores locally.",
            name,
            type(err).__name__,
            err,
        )
        return None


def squad_scores(
    predictions: Sequence[Mapping], references: Sequence[Mapping], version_2: bool = False, use_evaluate: bool = True
) -> dict:
    """The official scores through `evaluate`'s `squad` / `squad_v2` metric where it loads, else computed here
    (`local_squad_scores`, the same formulas). The keys are V1_KEYS, or V2_KEYS (parts without questions left out)."""
    name = "squad_v2" if version_2 else "squad"
    _check(predictions, references)
    metric = _evaluate_metric(name) if use_evaluate else None
    if metric is None:
        return local_squad_scores(predictions, references, version_2)
    preds = [
        {
            "id": p["id"],
            "prediction_text": p["prediction_text"],
            **({"no_answer_probability": 0.0} if version_2 else {}),
        }
        for p in predictions
    ]
    refs = [
        {
            "id": r["id"],
            "answers": {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])},
        }
        for r in references
    ]
    scores = metric.compute(predictions=preds, references=refs)
    keys = V2_KEYS if version_2 else V1_KEYS
    return {k: scores[k] for k in keys if k in scores}


def answer_agreement(predictions: Sequence[Mapping], teacher_predictions: Sequence[Mapping]) -> dict:
    """Exact match and F1 of `predictions` against another model's answers (e.g. the dense teacher's), each the
    only gold answer of its question, with v2.0's rules: a teacher's answer that normalises to nothing ("", "the",
    ".") is a no-answer, agreed with by any prediction that normalises to nothing (v1.1's rule would score such a
    pair EM 1 but F1 0)."""
    references = [
        {"id": p["id"], "answers": {"text": [p["prediction_text"]], "answer_start": [0]}} for p in teacher_predictions
    ]
    scores = local_squad_scores(predictions, references, version_2=True)
    return {"exact": scores["exact"], "f1": scores["f1"]}
