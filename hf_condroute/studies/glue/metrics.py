"""GLUE's official metric of each task and the GLUE average, from label ids (or scores for STS-B).

Matthews correlation for CoLA, Pearson and Spearman for STS-B, F1 (of the positive class) and accuracy for
MRPC and QQP, accuracy elsewhere; values are fractions (0.82, not 82). The GLUE average is GLUE's: a task
with several metrics scores their mean, MNLI scores the mean of its matched and mismatched accuracies, and the
average is the unweighted mean over tasks.

Predictions that are no valid label (-1: text a text-to-text model made up) are scored as T5 scores them:
wrong for accuracy and F1, a class of their own for Matthews correlation (so garbage scores 0, not -1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .tasks import GLUE_TASKS, GlueTask, get_task

# each evaluation set's task, from the tasks' `eval_splits` (MNLI's two sets: mnli_matched, mnli_mismatched)
_TASK_OF_EVAL_SET = {eval_name: task for task in GLUE_TASKS for eval_name, _ in task.eval_splits}


def _as_wrong_where_invalid(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray:
    invalid = (predictions < 0) | (predictions >= num_labels)
    return np.where(invalid, (references + 1) % num_labels, predictions)


def _as_own_class_where_invalid(predictions: np.ndarray, num_labels: int) -> np.ndarray:
    return np.where((predictions < 0) | (predictions >= num_labels), -1, predictions)


def _correlation(fn, predictions: np.ndarray, references: np.ndarray) -> float:
    # a constant prediction (or reference) correlates with nothing: 0, as sklearn's Matthews does
    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0
    return float(fn(predictions, references)[0])


def task_metrics(task: GlueTask | str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """The task's official metrics. predictions/references: label ids (STS-B: similarity scores)."""
    task = get_task(task) if isinstance(task, str) else task
    preds, refs = np.asarray(predictions), np.asarray(references)
    if preds.shape != refs.shape or preds.ndim != 1:
        raise ValueError(
            f"{task.name}: predictions and references must be 1-D and of one length, got shapes {preds.shape} "
            f"and {refs.shape}."
        )
    if len(refs) == 0:
        raise ValueError(f"{task.name}: no examples to score.")
    if task.is_regression:
        preds, refs = preds.astype(np.float64), refs.astype(np.float64)
        return {
            "pearson": _correlation(pearsonr, preds, refs),
            "spearmanr": _correlation(spearmanr, preds, refs),
        }
    refs = refs.astype(np.int64)
    if ((refs < 0) | (refs >= task.num_labels)).any():
        raise ValueError(
            f"{task.name}: references must be label ids in 0..{task.num_labels - 1}; unlabelled splits (GLUE's "
            "test sets use -1) cannot be scored."
        )
    preds = preds.astype(np.int64)
    wrong_if_invalid = _as_wrong_where_invalid(preds, refs, task.num_labels)
    out = {}
    for metric in task.metrics:
        if metric == "accuracy":
            out[metric] = float(accuracy_score(refs, wrong_if_invalid))
        elif metric == "f1":
            out[metric] = float(f1_score(refs, wrong_if_invalid, pos_label=1, average="binary", zero_division=0.0))
        elif metric == "matthews_correlation":
            out[metric] = float(matthews_corrcoef(refs, _as_own_class_where_invalid(preds, task.num_labels)))
        else:  # pragma: no cover - GLUE_TASKS only names the metrics above
            raise ValueError(f"No implementation of metric {metric!r}.")
    return out


def task_score(metrics: dict[str, float]) -> float:
    """A task's single GLUE score: the mean of its official metrics."""
    return float(np.mean(list(metrics.values())))


def glue_average(results: dict[str, dict[str, float]]) -> float:
    """GLUE's average over tasks from {evaluation set name: metrics}, e.g. the output of `task_metrics` per set.

    Evaluation set names are task names, plus `mnli_matched`/`mnli_mismatched`, which together make MNLI's
    score. Only official metric keys count (other keys, e.g. a loss, are ignored).
    """
    by_task: dict[str, list[float]] = {}
    for eval_name, metrics in results.items():
        task = _TASK_OF_EVAL_SET.get(eval_name) or get_task(eval_name)
        official = {k: v for k, v in metrics.items() if k in task.metrics}
        if not official:
            raise ValueError(f"{eval_name}: none of {', '.join(task.metrics)} in {sorted(metrics)}.")
        by_task.setdefault(task.name, []).append(task_score(official))
    scores = [float(np.mean(v)) for v in by_task.values()]
    if not scores:
        raise ValueError("No GLUE results to average.")
    return float(np.mean(scores))
