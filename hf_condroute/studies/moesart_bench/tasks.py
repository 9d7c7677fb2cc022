"""What every data set of paper B's multi-task benchmarks hands the training loop: its tasks (each with a loss, a
metric and a weight in the total loss) and its splits (inputs, one label column per task, and which labels exist).

Losses (paper B 4.1): cross-entropy for the image tasks, binary cross-entropy for "watched / read", squared error
for the rating. The total loss is the task weights' convex combination of each task's mean loss over the rows where
that task has a label (a rating exists only for a watched pair). Metrics: accuracy (%), ROC AUC (%, as the paper
reports it) and mean squared error, from scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("multiclass", "binary", "regression")
METRIC_OF_KIND = {"multiclass": "accuracy", "binary": "auc", "regression": "mse"}
HIGHER_IS_BETTER = {"accuracy": True, "auc": True, "mse": False}


@dataclass(frozen=True)
class Task:
    """One output of a multi-task model. kind: "multiclass" (logits (B, C), integer labels), "binary" (one logit
    (B,), 0/1 labels) or "regression" ((B,) predictions). weight: its share of the total loss."""

    name: str
    kind: Literal["multiclass", "binary", "regression"]
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")
        if not self.weight >= 0:
            raise ValueError(f"Task {self.name!r}: weight must be >= 0, got {self.weight}.")

    @property
    def metric(self) -> str:
        return METRIC_OF_KIND[self.kind]

    def losses(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row loss (B,)."""
        if self.kind == "multiclass":
            return F.cross_entropy(out, target.long(), reduction="none")
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(out.reshape(-1), target.float(), reduction="none")
        return (out.reshape(-1) - target.float()) ** 2

    def score(self, outs: torch.Tensor, targets: torch.Tensor) -> float:
        """The task's metric over all rows given (accuracy and AUC in %)."""
        from sklearn.metrics import mean_squared_error, roc_auc_score

        if self.kind == "multiclass":
            return 100.0 * float((outs.argmax(-1) == targets.long()).float().mean())
        y = targets.float().numpy()
        if self.kind == "binary":
            if len(np.unique(y)) < 2:
                return float("nan")  # AUC needs both classes
            return 100.0 * float(roc_auc_score(y, outs.reshape(-1).float().numpy()))
        return float(mean_squared_error(y, outs.reshape(-1).float().numpy()))


@dataclass
class Split:
    """inputs: a tensor (n, ...) or a dict of tensors (n, ...); labels (n, T) float32, column t for task t;
    mask (n, T) bool, True where task t has a label for row n (None: every label exists)."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self):
        n = self.labels.shape[0]
        tensors = self.inputs.values() if isinstance(self.inputs, dict) else [self.inputs]
        if self.labels.dim() != 2 or any(t.shape[0] != n for t in tensors):
            raise ValueError("Split needs labels (n, tasks) and inputs with the same n rows.")
        if self.mask is not None and self.mask.shape != self.labels.shape:
            raise ValueError(f"Split mask {tuple(self.mask.shape)} must match labels {tuple(self.labels.shape)}.")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, idx) -> Split:
        inputs = {k: v[idx] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[idx]
        return Split(inputs, self.labels[idx], None if self.mask is None else self.mask[idx])


def total_loss(tasks: tuple[Task, ...], outs: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
    """The weights' combination of each task's mean loss over its labelled rows (a task without any labelled row in
    the batch adds 0)."""
    total = 0.0
    for t, task in enumerate(tasks):
        losses = task.losses(outs[task.name], batch.labels[:, t])
        if batch.mask is None:
            mean = losses.mean()
        else:
            m = batch.mask[:, t].to(losses.dtype)
            mean = (losses * m).sum() / m.sum().clamp(min=1.0)
        total = total + task.weight * mean
    return total
