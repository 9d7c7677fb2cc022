"""Auxiliary routing losses. Each takes routing rows (R rows, N experts) and returns an unweighted scalar.

The formulas follow their sources: load balancing as transformers' `load_balancing_loss_func` (Switch/Mixtral),
z-loss as `router_z_loss_func` (ST-MoE), tag supervision as paper A section 4.4, trimmed lasso as paper B
section 3.2, and the REINFORCE terms as paper A eq. (1)-(2) with the usual signs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """N * sum_i f_i * P_i summed over the k choices: f_i the share of rows sent to expert i by each choice,
    P_i the mean router probability of expert i. Equal to k when routing is perfectly balanced."""
    valid = experts >= 0
    one_hot = F.one_hot(experts.clamp(min=0), num_experts).to(probs.dtype) * valid.unsqueeze(-1)
    tokens_per_expert = one_hot.mean(dim=0)  # (k, N)
    prob_per_expert = probs.mean(dim=0)  # (N,)
    return num_experts * (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def tag_supervision_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of router logits to target experts; rows whose target is -100 are skipped."""
    if not bool((targets != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


def trimmed_lasso_loss(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over rows of the probability mass outside the k largest probabilities."""
    top = probs.topk(k, dim=-1).values.sum(dim=-1)
    return (probs.sum(dim=-1) - top).mean()


def huber_value_loss(reward: torch.Tensor, baseline: torch.Tensor, delta: float) -> torch.Tensor:
    """Paper A eq. (1): 0.5 (r-b)^2 if |r-b| <= delta else delta (|r-b| - 0.5 delta); mean over rows."""
    return F.huber_loss(baseline, reward, delta=delta, reduction="mean")


def policy_loss(log_prob: torch.Tensor, reward: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: minimising -(r - b) log pi raises the probability of better-than-expected
    choices. The advantage carries no gradient."""
    advantage = (reward - baseline).detach()
    return -(advantage * log_prob).mean()


def entropy(probs: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of the entropy of the routing distribution (in nats)."""
    if log_probs is None:
        log_probs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return -(probs * log_probs).sum(dim=-1).mean()
