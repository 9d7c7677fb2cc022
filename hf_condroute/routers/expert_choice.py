"""Expert Choice routing (Zhou et al. 2022): each expert picks its top k' rows of the batch, with
k' = ceil(capacity_factor * R * k / N). Rows get a varying number of experts (empty slots are -1), and the
decision of a row depends on the rest of the batch, in training and in evaluation alike."""

from __future__ import annotations

import torch

from .base import Router, RoutingDecision, ceil_div


class ExpertChoiceRouter(Router):
    name = "expert_choice"
    variable_width = True
    token_choice = False  # its own capacity: `expert_choice_capacity_factor`

    def select(self, logits: torch.Tensor, x: torch.Tensor) -> RoutingDecision:
        probs = logits.softmax(dim=-1)
        rows, n = probs.shape
        capacity = min(rows, max(1, ceil_div(self.config.expert_choice_capacity_factor * rows * self.top_k, n)))
        picked_rows = probs.t().topk(capacity, dim=-1).indices  # (N, capacity)
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen[picked_rows, torch.arange(n, device=probs.device).unsqueeze(-1)] = True
        # compact each row's chosen experts to the left; empty slots become -1 with weight 0
        # traced by torch.compile: every expert a slot (a width read from the data would break the graph)
        width = n if torch.compiler.is_compiling() else max(1, int(chosen.sum(dim=-1).max()))
        order = chosen.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :width]
        valid = chosen.gather(1, order)
        experts = torch.where(valid, order, torch.full_like(order, -1))
        weights = probs.gather(1, order) * valid
        return RoutingDecision(experts=experts, weights=weights, probs=probs, logits=logits)
