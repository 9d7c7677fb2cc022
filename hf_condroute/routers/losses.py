"""Auxiliary routing losses. Each takes routing rows (R rows, N experts) and returns an unweighted scalar.

The formulas follow their sources: load balancing as transformers' `load_balancing_loss_func` (Switch/Mixtral),
z-loss as `router_z_loss_func` (ST-MoE), tag supervision as paper A section 4.4, trimmed lasso as paper B
section 3.2, and the REINFORCE terms as paper A eq. (1)-(2) with the usual signs.

`valid` (R,) bool, where given, marks the real rows: under torch.compile a padded batch keeps its padding tokens as
rows (fixed shapes), and every mean over rows is then taken over the real ones only, as eager (which drops them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_mean(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the rows (dim 0) of `values`, over the `valid` rows only where given (0 when there is none)."""
    if valid is None:
        return values.mean(dim=0)
    keep = valid.reshape(-1, *[1] * (values.dim() - 1))
    # where, not a product: a padding row's inf or NaN must not reach the sum (or its gradient)
    total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=0)
    return total / valid.sum().clamp(min=1).to(values.dtype)


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """N * sum_i f_i * P_i summed over the k choices: f_i the share of rows sent to expert i by each choice,
    P_i the mean router probability of expert i. Equal to k when routing is perfectly balanced."""
    chosen = experts >= 0
    one_hot = F.one_hot(experts.clamp(min=0), num_experts).to(probs.dtype) * chosen.unsqueeze(-1)
    tokens_per_expert = row_mean(one_hot, valid)  # (k, N)
    prob_per_expert = row_mean(probs, valid)  # (N,)
    return num_experts * (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum()


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of logsumexp(logits)^2."""
    return row_mean(torch.logsumexp(logits.float(), dim=-1).pow(2), valid)


def tag_supervision_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of router logits to target experts; rows whose target is -100 are skipped."""
    if valid is not None or torch.compiler.is_compiling():  # no host sync: the mean over known real rows, 0 if none
        known = targets != -100
        per_row = F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")
        return row_mean(per_row, known if valid is None else known & valid)
    if not bool((targets != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


def trimmed_lasso_loss(probs: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of the probability mass outside the k largest probabilities."""
    top = probs.topk(k, dim=-1).values.sum(dim=-1)
    return row_mean(probs.sum(dim=-1) - top, valid)


def huber_value_loss(
    reward: torch.Tensor, baseline: torch.Tensor, delta: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Paper A eq. (1): 0.5 (r-b)^2 if |r-b| <= delta else delta (|r-b| - 0.5 delta); mean over rows."""
    if valid is None:
        return F.huber_loss(baseline, reward, delta=delta, reduction="mean")
    return row_mean(F.huber_loss(baseline, reward, delta=delta, reduction="none"), valid)


def policy_loss(
    log_prob: torch.Tensor, reward: torch.Tensor, baseline: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE with a baseline: minimising -(r - b) log pi raises the probability of better-than-expected
    choices. The advantage carries no gradient."""
    advantage = (reward - baseline).detach()
    return -row_mean(advantage * log_prob, valid)


def entropy(
    probs: torch.Tensor, log_probs: torch.Tensor | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of the entropy of the routing distribution (in nats)."""
    if log_probs is None:
        log_probs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return row_mean(-(probs * log_probs).sum(dim=-1), valid)
