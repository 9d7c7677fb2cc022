"""Paper B's image models (supplement S6.2): a bank of N CNN experts shared by one gate per task (`MultiGateBlock`,
multi-gate MoE; one gate for SVHN), then a task head per task. The gates route on the flattened image.

Expert: conv 5x5 (10 filters, ReLU) + 2x2 max pool, conv 5x5 (20 filters, ReLU) + 2x2 max pool, two ReLU dense
layers of 50 units. Task head: dense 50, ReLU, dense 50, ReLU, dense 10 (logits; the softmax is in the loss).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_condroute import MultiGateBlock, RoutingConfig, RoutingInputs, RoutingStep, build_router
from hf_condroute.experts import ModuleBank

from .data import CANVAS

TASKS = ("task1", "task2")
HIDDEN = 50
CLASSES = 10
# routers whose chosen probabilities are renormalised over the k chosen (paper B's Top-k, Shazeer et al. 2017)
TOP_K_FAMILY = ("top_k", "v_moe", "smoe", "x_moe")


def cnn_expert(side: int = CANVAS, channels: int = 1, hidden: int = HIDDEN) -> nn.Sequential:
    """One expert on (n, channels, side, side) images."""
    flat = 20 * (((side - 4) // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(channels, 10, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(10, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
    )


class CNNExpertBank(ModuleBank):
    """N whole small CNNs on flattened images: rows (R, channels * side * side) -> (R, hidden)."""

    def __init__(self, num_experts: int, side: int = CANVAS, channels: int = 1, hidden: int = HIDDEN):
        if (side - 4) // 2 - 4 < 2:
            raise ValueError(f"The CNN experts need images of side >= 16 (two 5x5 convolutions and pools), got {side}.")
        super().__init__([cnn_expert(side, channels, hidden) for _ in range(num_experts)], channels * side**2, hidden)
        self.side, self.channels = side, channels

    def run_expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        out = self.nets[e](rows.reshape(-1, self.channels, self.side, self.side))
        return out.reshape(*rows.shape[:-1], self.out_features)


def head(hidden: int = HIDDEN, classes: int = CLASSES) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def routing_config_for(router: str, num_experts: int = 8, k: int = 2, **overrides) -> RoutingConfig:
    """The gates' settings for a row of the tables: k of num_experts for the sparse routers (all for softmax)."""
    kw = dict(router=router, num_experts=num_experts, top_k=k, norm_topk_prob=router in TOP_K_FAMILY)
    kw.update(overrides)
    cfg = RoutingConfig(**kw)
    cfg.validate_routing()
    return cfg


class MultiGateMoE(nn.Module):
    """forward(images (B, channels, side, side), step) -> {task: logits (B, 10)}."""

    def __init__(self, config: RoutingConfig, side: int = CANVAS, tasks: tuple[str, ...] = TASKS, channels: int = 1):
        super().__init__()
        bank = CNNExpertBank(config.num_experts, side, channels)
        gates = {t: build_router(config, bank.in_features, f"moe[{t}]") for t in tasks}
        self.moe = MultiGateBlock(gates, bank, name="moe")
        self.heads = nn.ModuleDict({t: head() for t in tasks})

    def forward(self, images: torch.Tensor, step: RoutingStep | None = None) -> dict[str, torch.Tensor]:
        mixed = self.moe(images.flatten(1), RoutingInputs(step=step))
        return {t: self.heads[t](mixed[t]) for t in self.heads}
