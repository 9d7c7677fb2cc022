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

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        return self.select(self.compute_logits(x, valid), x, valid)

    def select(self, logits: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None = None) -> RoutingDecision:
        probs = logits.softmax(dim=-1)
        n = probs.shape[1]
        chosen = self.chosen(probs) if valid is None else self.chosen_among(probs, valid)
        # compact each row's chosen experts to the left; empty slots become -1 with weight 0
        # traced by torch.compile: every expert a slot (a width read from the data would break the graph)
        width = n if torch.compiler.is_compiling() else max(1, int(chosen.sum(dim=-1).max()))
        order = chosen.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :width]
        taken = chosen.gather(1, order)
        experts = torch.where(taken, order, torch.full_like(order, -1))
        weights = probs.gather(1, order) * taken
        return RoutingDecision(experts=experts, weights=weights, probs=probs, logits=logits)

    def chosen(self, probs: torch.Tensor) -> torch.Tensor:
        """(R, N) bool: the rows each expert picks, its top k' of the batch."""
        rows, n = probs.shape
        capacity = min(rows, max(1, ceil_div(self.config.expert_choice_capacity_factor * rows * self.top_k, n)))
        picked_rows = probs.t().topk(capacity, dim=-1).indices  # (N, capacity)
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen[picked_rows, torch.arange(n, device=probs.device).unsqueeze(-1)] = True
        return chosen

    def chosen_among(self, probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`chosen` for a traced padded batch (`valid` its real rows): k' from the number of real rows, a tensor, and
        each expert's top k' among them, by rank (a top-k of a data-dependent size would break the graph)."""
        real = valid.sum()
        k = self.config.expert_choice_capacity_factor * real.double() * self.top_k / probs.shape[1]
        capacity = torch.minimum(real, k.ceil().clamp(min=1).long())
        scores = probs.masked_fill(~valid.unsqueeze(1), -1.0)  # probabilities are >= 0: padding ranks last
        rank = scores.argsort(dim=0, descending=True, stable=True).argsort(dim=0)  # (R, N) rank in its column
        return (rank < capacity) & valid.unsqueeze(1)
