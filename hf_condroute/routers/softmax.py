"""The dense softmax router (classical MoE, paper B eq. (1)): every expert runs, weighted by its probability."""

from __future__ import annotations

import torch

from .base import Router, RoutingDecision


class SoftmaxRouter(Router):
    name = "softmax"
    uses_top_k = False

    def select(self, logits: torch.Tensor, x: torch.Tensor) -> RoutingDecision:
        probs = logits.softmax(dim=-1)
        experts = torch.arange(self.num_experts, device=logits.device).expand(logits.shape[0], -1)
        return RoutingDecision(experts=experts, weights=probs, probs=probs, logits=logits)
