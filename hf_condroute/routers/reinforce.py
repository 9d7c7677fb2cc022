"""REINFORCE with a learned baseline (paper A section 2.2, eq. (1)-(2), after Clark et al. 2022).

Training: sample k experts from the router's distribution (without replacement); each runs with weight 1/k,
so no task gradient reaches the router. The router learns from
    policy  = -alpha * (r - b) * log pi(chosen)      (r = minus the example's own task loss; no grad through r - b)
    entropy = -beta * H(P)                            (a bonus)
    value   = gamma * Huber_delta(r - b)              (trains the baseline b)
where b is an MLP with one hidden layer on the detached router input, its last layer zero-initialised.
Evaluation: the k most probable experts.
"""

from __future__ import annotations

import torch
from torch import nn

from . import losses
from .base import Router, RoutingDecision, equal_weights, run_in_float32


def plackett_luce_log_prob(log_probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """log P(experts drawn in this order without replacement); for k = 1 this is log p(expert)."""
    chosen = log_probs.gather(1, experts)
    if experts.shape[1] == 1:
        return chosen.squeeze(1)
    probs = chosen.exp()
    used = torch.cumsum(probs, dim=1) - probs  # mass removed before each draw
    return (chosen - torch.log1p(-used.clamp(max=1 - 1e-6))).sum(dim=1)


class Baseline(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class ReinforceRouter(Router):
    name = "reinforce"
    stochastic = True
    needs_reward = True

    def __init__(self, in_features, num_experts, config, block_name=""):
        super().__init__(in_features, num_experts, config, block_name)
        self.baseline = Baseline(in_features, config.reinforce_baseline_hidden)

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        logits = self.compute_logits(x, valid)
        probs = logits.softmax(dim=-1)
        if self.training:
            experts = torch.multinomial(probs.detach(), self.top_k, replacement=False)
        else:
            experts = probs.topk(self.top_k, dim=-1).indices
        baseline = run_in_float32(self.baseline, x.detach())
        weights = equal_weights(experts, probs.dtype)
        return RoutingDecision(experts=experts, weights=weights, probs=probs, logits=logits, baseline=baseline)

    def loss_coefficients(self) -> dict[str, float]:
        coefs = super().loss_coefficients()
        c = self.config
        coefs.update(
            reinforce_policy=c.reinforce_policy_coef,
            reinforce_entropy=c.reinforce_entropy_coef,
            reinforce_value=c.reinforce_value_coef,
        )
        return {k: v for k, v in coefs.items() if v > 0}

    def loss_terms(self, logits, experts, baseline=None, targets=None, reward=None, valid=None):
        terms = super().loss_terms(logits, experts, baseline, targets, reward, valid)
        coefs = self.loss_coefficients()
        log_probs = logits.log_softmax(dim=-1)
        if "reinforce_entropy" in coefs:
            terms["reinforce_entropy"] = -coefs["reinforce_entropy"] * losses.entropy(log_probs.exp(), log_probs, valid)
        if reward is not None:
            if "reinforce_policy" in coefs:
                log_pi = plackett_luce_log_prob(log_probs, experts.clamp(min=0))  # -1: traced padding rows
                terms["reinforce_policy"] = coefs["reinforce_policy"] * losses.policy_loss(
                    log_pi, reward, baseline, valid
                )
            if "reinforce_value" in coefs:
                delta = self.config.reinforce_huber_delta
                terms["reinforce_value"] = coefs["reinforce_value"] * losses.huber_value_loss(
                    reward, baseline, delta, valid
                )
        return terms
