"""SMEAR (Muqeeth, Liu, Raffel 2023): soft merging of experts with adaptive routing, the follow-up of paper A by
its authors. Per example, the router's probabilities average the experts' *parameters*, and the one merged expert
runs: theta(x) = sum_i p_i(x) theta_i, y = f(x; theta(x)). No sampling, argmax or straight-through surrogate, so
the gradient is exact; the cost is about one expert's forward plus the merge (N/T of it for T tokens per row)."""

from __future__ import annotations

import torch

from .base import Router, RoutingDecision


class SmearRouter(Router):
    """Every expert takes part with weight p_i, in the parameters (the bank merges them) rather than the outputs.

    `smear_expert_dropout` (training only) drops each expert from a row's merge with that probability and
    renormalises what is left (the released code's aid to specialisation; a row that loses every expert merges
    them uniformly)."""

    name = "smear"
    uses_top_k = False
    merges_experts = True
    token_choice = False  # every expert is in every row's merge: no capacity to limit
    per_example_only = True
    per_example_only_reason = (
        "it merges the experts' parameters once per routed row, and per-token merging costs as much as running "
        "every expert."
    )

    def select(self, logits: torch.Tensor, x: torch.Tensor) -> RoutingDecision:
        probs = logits.softmax(dim=-1)
        weights = probs
        p_drop = self.config.smear_expert_dropout
        if self.training and p_drop > 0:
            keep = torch.rand_like(probs) >= p_drop
            kept = probs * keep + 1e-10
            weights = kept / kept.sum(dim=-1, keepdim=True)
        experts = torch.arange(self.num_experts, device=logits.device).expand(logits.shape[0], -1)
        return RoutingDecision(experts=experts, weights=weights, probs=probs, logits=logits)
