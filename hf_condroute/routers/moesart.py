"""MOESART (paper B section 3.1): k-sparse routing by sampling from the softmax router.

Training: draw k experts from g = softmax(o / tau) by inverse-CDF sampling, without replacement (each drawn
probability is zeroed and the rest renormalised) or with replacement; the selected set s has counts r. The
weights are the softmax over s of the adjusted logits of eq. (3): one uniformly chosen z in s keeps
o_z + log r_z, the others get o_i + log r_i - log((k - 1) g_i); logits outside s are -inf.
Evaluation: the top k of g with equal weights 1/k (strategy (iii) on the top-k set).
"""

from __future__ import annotations

import torch

from .base import Router, RoutingDecision, equal_weights


def inverse_cdf_sample(probs: torch.Tensor, k: int, replacement: bool) -> torch.Tensor:
    """k draws per row by inverse-CDF sampling (paper B Algorithm 1). Returns (R, k) expert indices."""
    g = probs.detach().float().clone()
    draws = []
    for _ in range(k):
        cdf = (g / g.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
        u = torch.rand(g.shape[0], 1, device=g.device, dtype=g.dtype)
        idx = torch.searchsorted(cdf, u).clamp(max=g.shape[-1] - 1)
        if not replacement:
            # never redraw an expert already taken, even where float rounding leaves it in the CDF
            idx = torch.where(g.gather(1, idx) > 0, idx, g.argmax(dim=-1, keepdim=True))
            g.scatter_(1, idx, 0.0)
        draws.append(idx)
    return torch.cat(draws, dim=1)


def unique_with_counts(draws: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse repeated draws: (R, k) draws -> experts (R, k) with repeats set to -1, and counts r (R, k)
    of each kept expert (0 in empty slots)."""
    counts_full = torch.zeros(draws.shape[0], num_experts, dtype=torch.long, device=draws.device)
    counts_full.scatter_add_(1, draws, torch.ones_like(draws))
    # keep the first occurrence of each expert in a row
    same = draws.unsqueeze(2) == draws.unsqueeze(1)
    first = ~torch.tril(same, diagonal=-1).any(dim=2)
    experts = torch.where(first, draws, torch.full_like(draws, -1))
    counts = torch.where(first, counts_full.gather(1, draws), torch.zeros_like(draws))
    return experts, counts


def adjusted_weights(
    logits: torch.Tensor,
    experts: torch.Tensor,
    counts: torch.Tensor,
    k: int,
    strategy: str = "moesart",
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """g_tilde on the selected experts: softmax over s of the adjusted logits.

    strategy: "i" (o_i), "ii" (o_i + log r_i), "iii" (o_i + log r_i - log(k g_i): unbiased, no router gradient),
    "moesart" (eq. (3): z keeps o_z + log r_z, the others o_i + log r_i - log((k-1) g_i)).
    z: (R,) slot index of the kept logit; drawn uniformly among the row's selected slots when None.
    """
    valid = experts >= 0
    safe = experts.clamp(min=0)
    o = logits.gather(1, safe)
    log_g = logits.log_softmax(dim=-1).gather(1, safe)
    log_r = torch.log(counts.clamp(min=1).to(o.dtype))
    if strategy == "i":
        adjusted = o
    elif strategy == "ii":
        adjusted = o + log_r
    elif strategy == "iii":
        adjusted = o + log_r - (torch.log(torch.tensor(float(k), dtype=o.dtype, device=o.device)) + log_g)
    elif strategy == "moesart":
        if z is None:
            scores = torch.rand(valid.shape, device=o.device).masked_fill(~valid, -1.0)
            z = scores.argmax(dim=1)
        keep = torch.zeros_like(valid).scatter_(1, z.unsqueeze(1), True)
        log_km1 = torch.log(torch.tensor(float(max(k - 1, 1)), dtype=o.dtype, device=o.device))
        adjusted = torch.where(keep, o + log_r, o + log_r - log_km1 - log_g)
    else:
        raise ValueError(f"Unknown MOESART adjustment strategy {strategy!r}: use 'i', 'ii', 'iii' or 'moesart'.")
    adjusted = adjusted.masked_fill(~valid, float("-inf"))
    return adjusted.softmax(dim=1) * valid


class MoesartRouter(Router):
    name = "moesart"
    stochastic = True
    min_top_k = 2
    min_top_k_reason = (
        "with k = 1 every adjustment of eq. (3) gives the single expert weight 1, so no gradient reaches the router "
        "(paper B section 3.1)."
    )

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        logits = self.compute_logits(x, valid)
        probs = logits.softmax(dim=-1)
        if not self.training:
            experts = probs.topk(self.top_k, dim=-1).indices
            return RoutingDecision(
                experts=experts, weights=equal_weights(experts, probs.dtype), probs=probs, logits=logits
            )
        draws = inverse_cdf_sample(probs, self.top_k, self.config.moesart_replacement)
        experts, counts = unique_with_counts(draws, self.num_experts)
        weights = adjusted_weights(logits, experts, counts, self.top_k, self.config.moesart_adjustment)
        return RoutingDecision(experts=experts, weights=weights, probs=probs, logits=logits)
