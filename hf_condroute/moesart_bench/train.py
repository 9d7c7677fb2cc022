"""Training and scoring of one router for one seed: plain PyTorch, Adam, a fixed number of steps, equally weighted
task cross-entropies (paper B 4.1) plus the routers' auxiliary losses through the `RoutingStep`.

Scores: test loss (the mean of the two tasks' cross-entropies, in eval mode), each task's accuracy (%), and the
experts used per example in training: `k_per_gate` (what one gate computes per example, the paper's k/s) and
`experts_run` (distinct experts computed per example over both gates, since a shared expert runs once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..step import RoutingStep
from .data import MultiDigits
from .model import MultiGateMoE, routing_config_for


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    num_experts: int = 8
    k: int = 2
    trimmed_lasso_coef: float = 0.0  # MOESART's (paper B 3.2)
    eval_batch_size: int = 1000

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"Need steps >= 1 and batch_size >= 2 (the routers' BatchNorm), got {self.steps} and {self.batch_size}."
            )
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"Need 1 <= k <= num_experts, got k={self.k} of {self.num_experts} experts.")


def task_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean of the tasks' cross-entropies (B,)."""
    losses = [F.cross_entropy(out, labels[:, i], reduction="none") for i, out in enumerate(logits.values())]
    return torch.stack(losses).mean(dim=0)


def build_model(router: str, settings: TrainSettings, seed: int) -> MultiGateMoE:
    overrides = {"trimmed_lasso_coef": settings.trimmed_lasso_coef} if router == "moesart" else {}
    config = routing_config_for(router, settings.num_experts, settings.k, **overrides)
    torch.manual_seed(seed)
    return MultiGateMoE(config)


def experts_used(step: RoutingStep, num_experts: int) -> tuple[float, float]:
    """(mean over gates of experts per example, distinct experts per example over all gates) of one forward."""
    chosen = [record.decision.experts for record in step.records.values()]
    per_gate = sum(float((c >= 0).sum(dim=1).float().mean()) for c in chosen) / len(chosen)
    rows = chosen[0].shape[0]
    hit = torch.zeros(rows, num_experts + 1, dtype=torch.bool)
    for c in chosen:
        hit.scatter_(1, torch.where(c >= 0, c, num_experts), True)
    return per_gate, float(hit[:, :num_experts].sum(dim=1).float().mean())


def train(
    model: MultiGateMoE,
    data: MultiDigits,
    settings: TrainSettings,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Adam at a constant learning rate; batches drawn epoch by epoch without replacement. Returns the mean experts
    used per example over training."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(data), generator=order), 0
    per_gate = run = 0.0
    for _ in range(settings.steps):
        if pos + settings.batch_size > len(perm):
            perm, pos = torch.randperm(len(data), generator=order), 0
        idx = perm[pos : pos + settings.batch_size]
        pos += settings.batch_size
        step = RoutingStep()
        loss = step.add_to_loss(task_loss(model(data.images[idx], step), data.labels[idx]).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        g, r = experts_used(step, settings.num_experts)
        per_gate, run = per_gate + g, run + r
        if on_step is not None:
            on_step()
    return {"k_per_gate": per_gate / settings.steps, "experts_run": run / settings.steps}


@torch.no_grad()
def evaluate(model: MultiGateMoE, data: MultiDigits, batch_size: int = 1000) -> dict[str, float]:
    """Loss (mean of the tasks' cross-entropies) and each task's accuracy in %, in eval mode."""
    model.eval()
    loss, correct = 0.0, torch.zeros(data.labels.shape[1])
    for start in range(0, len(data), batch_size):
        images, labels = data.images[start : start + batch_size], data.labels[start : start + batch_size]
        logits = model(images)
        loss += float(task_loss(logits, labels).sum())
        correct += torch.stack([(out.argmax(-1) == labels[:, i]).sum() for i, out in enumerate(logits.values())])
    scores = {"loss": loss / len(data)}
    scores.update({f"task{i + 1}_accuracy": 100.0 * float(c) / len(data) for i, c in enumerate(correct)})
    return scores


def run_router(
    router: str,
    seed: int,
    splits: dict[str, MultiDigits],
    settings: TrainSettings,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train one router's model for one seed; its test scores, validation loss and experts used in training."""
    model = build_model(router, settings, seed)
    used = train(model, splits["train"], settings, seed, on_step)
    scores = evaluate(model, splits["test"], settings.eval_batch_size)
    scores["val_loss"] = evaluate(model, splits["val"], settings.eval_batch_size)["loss"]
    scores.update(used)
    return scores
