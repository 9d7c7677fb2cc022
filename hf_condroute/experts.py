"""Expert banks: N subnetworks of one shape whose parameters are stacked along a leading expert dimension,
and the dispatch that runs only the chosen experts.

A bank maps rows x (R, T, D) (an example's T tokens, or T = 1 for a token or a vector) and a decision
(experts (R, k), -1 for an empty slot; weights (R, k)) to sum_j weights[:, j] * f_{experts[:, j]}(x).
Stacked parameters keep one gradient tensor per bank whatever the routing, and every expert takes part in
the graph, so DDP never sees an unused parameter.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def group_by_expert(experts: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Flatten (R, k) assignments, drop empty slots and sort by expert.

    Returns (rows, weights, counts): row index and weight of each assignment in expert order, and the number of
    assignments of each expert (a Python list: one host sync per call, none per row).
    """
    k = experts.shape[1]
    flat_experts = experts.reshape(-1)
    rows = torch.arange(experts.shape[0], device=experts.device).repeat_interleave(k)
    flat_weights = weights.reshape(-1)
    keep = flat_experts >= 0
    if not bool(keep.all()):
        flat_experts, rows, flat_weights = flat_experts[keep], rows[keep], flat_weights[keep]
    order = flat_experts.argsort(stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    return rows[order], flat_weights[order], counts


def dispatch(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    out_features: int,
    expert_forward: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run each expert once on the rows routed to it and sum the weighted outputs back per row."""
    rows, row_weights, counts = group_by_expert(experts, weights, num_experts)
    grouped = x.index_select(0, rows)
    outputs = [expert_forward(e, chunk) for e, chunk in enumerate(grouped.split(counts)) if counts[e] > 0]
    y = torch.cat(outputs) * row_weights.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    out = x.new_zeros(x.shape[0], *x.shape[1:-1], out_features)
    return out.index_add(0, rows, y)


class ExpertBank(nn.Module):
    """Base class: `num_experts`, `in_features`, `out_features` and forward(x, experts, weights)."""

    num_experts: int
    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AdapterBank(ExpertBank):
    """N bottleneck adapters (Houlsby et al. 2019): up(act(down(x))). The up projection starts at zero, so an
    untrained bank adds nothing to the model."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        adapter_dim: int,
        out_features: int | None = None,
        activation: str = "relu",
        init_weights: bool = True,
    ):
        super().__init__()
        self.num_experts, self.in_features = num_experts, in_features
        self.out_features = out_features or in_features
        self.adapter_dim = adapter_dim
        self.activation = activation
        self.act = activation_fn(activation)
        self.down_weight = nn.Parameter(torch.empty(num_experts, in_features, adapter_dim))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, adapter_dim))
        self.up_weight = nn.Parameter(torch.empty(num_experts, adapter_dim, self.out_features))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, self.out_features))
        self.reset_parameters(init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        # the same scale as nn.Linear's default init, per expert
        bound = 1.0 / self.in_features**0.5
        nn.init.uniform_(self.down_weight, -bound, bound)
        nn.init.zeros_(self.down_bias)
        if init_weights:
            nn.init.zeros_(self.up_weight)
        else:
            up_bound = 1.0 / self.adapter_dim**0.5
            nn.init.uniform_(self.up_weight, -up_bound, up_bound)
        nn.init.zeros_(self.up_bias)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # unbind once: one backward node that stacks the per-expert gradients, not one full-size zero tensor each
        down_w, down_b = self.down_weight.unbind(0), self.down_bias.unbind(0)
        up_w, up_b = self.up_weight.unbind(0), self.up_bias.unbind(0)

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            return self.act(rows @ down_w[e] + down_b[e]) @ up_w[e] + up_b[e]

        return dispatch(x, experts, weights, self.num_experts, self.out_features, expert)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, adapter_dim={self.adapter_dim}, "
            f"out_features={self.out_features}, activation={self.activation!r}"
        )


class EmbeddingBank(ExpertBank):
    """Experts that output a learned vector whatever their input (the DAE-Syn decoder's subnetworks)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int = 0):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.embeddings = nn.Parameter(torch.randn(num_experts, out_features))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        valid = (experts >= 0).unsqueeze(-1)
        vectors = self.embeddings[experts.clamp(min=0)] * valid  # (R, k, D)
        out = (weights.unsqueeze(-1).to(vectors.dtype) * vectors).sum(dim=1)
        return out.view(x.shape[0], *([1] * (x.dim() - 2)), self.out_features).expand(*x.shape[:-1], -1)
