"""Straight-through Gumbel-softmax (paper A section 2.2, Jang et al. 2016).

Training: p_hat = softmax((log p + g) / tau), g ~ Gumbel(0, 1); the argmax experts run with multiplier
1 - sg(p_hat_i) + p_hat_i, which is exactly 1 forward and passes d p_hat_i backward. tau is annealed
exponentially from `gumbel_temperature_start` to the floor `gumbel_temperature_min`. Evaluation: argmax of p.
"""

from __future__ import annotations

import math

import torch

from .base import Router, RoutingDecision


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """1 in the forward pass, the gradient of `soft` in the backward pass."""
    return soft - soft.detach() + 1.0


class STGumbelRouter(Router):
    name = "st_gumbel"
    stochastic = True

    def __init__(self, in_features, num_experts, config, block_name=""):
        super().__init__(in_features, num_experts, config, block_name)
        # training forwards seen so far: saved with the adapter, so a resumed run continues the schedule
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._last_step: int | None = None

    def temperature(self) -> float:
        c = self.config
        t = int(self.num_updates)
        return max(c.gumbel_temperature_min, c.gumbel_temperature_start * math.exp(-c.gumbel_anneal_rate * t))

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        logits = self.compute_logits(x, valid)
        probs = logits.softmax(dim=-1)
        if not self.training:
            weights, experts = probs.topk(self.top_k, dim=-1)
            return RoutingDecision(experts=experts, weights=torch.ones_like(weights), probs=probs, logits=logits)
        # a recomputation under gradient checkpointing repeats the step: count each step once, so the
        # recomputed temperature equals the original one
        if torch.compiler.is_compiling():  # traced: the temperature a tensor (no step id: count every forward)
            self.num_updates += 1
            c = self.config
            decay = c.gumbel_temperature_start * torch.exp(-c.gumbel_anneal_rate * self.num_updates.float())
            tau = decay.clamp(min=c.gumbel_temperature_min)
        else:
            if step is None or step != self._last_step:
                self.num_updates += 1
                self._last_step = step
            tau = self.temperature()
        gumbel = -torch.empty_like(logits).exponential_().log()
        relaxed = ((logits.log_softmax(dim=-1) + gumbel) / tau).softmax(dim=-1)
        experts = relaxed.topk(self.top_k, dim=-1).indices
        weights = straight_through(relaxed.gather(1, experts))
        return RoutingDecision(experts=experts, weights=weights, probs=probs, logits=logits)
