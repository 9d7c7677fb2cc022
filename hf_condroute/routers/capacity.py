"""Expert capacity for token-choice routers (Switch, GShard, MixLoRA): `expert_capacity_factor`, off by default.

In one routed block call of R routing rows (examples, or non-padding tokens) choosing k experts each, every expert
takes at most capacity = ceil(factor * R * k / N) assignments (Switch's definition). Assignments are served in
token order, all rows' first choices before any second choice (GShard's priority: a row's first choice is never
dropped for another row's second); the ones over capacity become empty slots (expert -1, weight 0), so the bank
skips them and the block adds nothing for them: a row whose every slot is dropped passes through unchanged (the
base layer's output). The decision keeps what was dropped in `dropped`, so the auxiliary losses still see what
the router asked for and the statistics report the dropped fraction (`routing_dropped_fraction`).

It applies to learned token-choice routers; Expert Choice has its own capacity (`expert_choice_capacity_factor`)
and heuristic routers (tag, hash, monolithic) route by design, so a capacity there is refused at config time.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .base import RoutingDecision


def expert_capacity(factor: float, rows: int, k: int, num_experts: int) -> int:
    """ceil(factor * rows * k / num_experts), at least 1."""
    return max(1, math.ceil(factor * rows * k / num_experts))


def limit_capacity(
    decision: RoutingDecision, num_experts: int, factor: float, real_rows: torch.Tensor | None = None
) -> RoutingDecision:
    """`decision` with the assignments over each expert's capacity emptied (see the module docstring).
    `real_rows`: under torch.compile on a padded batch, the number of real rows (a tensor), from which the capacity
    is computed as eager does (its padding rows chose no expert, so they take no place)."""
    experts = decision.experts
    rows, k = experts.shape
    if real_rows is None:
        capacity = expert_capacity(factor, rows, k, num_experts)
    else:
        capacity = (factor * real_rows.double() * k / num_experts).ceil().clamp(min=1)
    valid = experts >= 0
    # priority order: slot-major (every row's first choice, then every row's second, ...), rows in token order
    order = torch.where(valid, experts, torch.full_like(experts, num_experts)).t().reshape(-1)
    sorted_experts, index = order.sort(stable=True)
    counts = torch.bincount(sorted_experts, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    position_sorted = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
    position = torch.empty_like(position_sorted).scatter_(0, index, position_sorted)
    over = (position >= capacity).view(k, rows).t() & valid
    return replace(
        decision,
        experts=experts.masked_fill(over, -1),
        weights=decision.weights.masked_fill(over, 0.0),
        dropped=experts.masked_fill(~over, -1),
    )
