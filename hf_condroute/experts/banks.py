"""Expert banks: N subnetworks of one shape whose parameters are stacked along a leading expert dimension.

The contract every bank keeps (the routed block relies on nothing else):
- `num_experts`, `in_features`, `out_features`, and `dtype` (the dtype its inputs are cast to);
- forward(x (R, ..., in_features), experts (R, k) with -1 for an empty slot, weights (R, k)) ->
  sum_j weights[:, j] * f_{experts[:, j]}(x), shaped (R, ..., out_features), computing only the chosen experts;
  with `merge=True` (SMEAR), the one expert whose parameters are the weighted average, or a clear refusal.

Two-matmul experts (bottleneck adapters, FFN slices; gated or not) subclass `MLPExpertBank`: set `act` (and
`post`, e.g. a dropout) and return their stacked weights from `mlp_weights()`; `expert_mlp` then owns the
dispatch. Stacked parameters keep one gradient tensor per bank whatever the routing, and every expert takes part
in the graph, so DDP never sees an unused parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .activations import activation_fn
from .dispatch import dispatch, expert_mlp
from .strategies import ExpertMLPWeights


class ExpertBank(nn.Module):
    """Base class of the banks (see the module docstring for the contract)."""

    num_experts: int
    in_features: int
    out_features: int
    can_merge: bool = False  # forward(..., merge=True) runs the parameter-averaged expert (the `smear` router)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the bank's weights, which its inputs are cast to."""
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, merge: bool = False
    ) -> torch.Tensor:
        raise NotImplementedError


class MLPExpertBank(ExpertBank):
    """A bank of two-matmul experts, plain or gated: subclasses set `act` (and `post`) and implement
    `mlp_weights()`; the dispatch is `expert_mlp`'s."""

    can_merge = True
    act: Callable[[torch.Tensor], torch.Tensor]
    post: Callable[[torch.Tensor], torch.Tensor] | None = None  # on the hidden units after `act` (dropout)

    def mlp_weights(self) -> ExpertMLPWeights:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, merge: bool = False
    ) -> torch.Tensor:
        return expert_mlp(x, experts, weights, self.mlp_weights(), self.act, post=self.post, merge=merge)


class AdapterBank(MLPExpertBank):
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

    def mlp_weights(self) -> ExpertMLPWeights:
        return ExpertMLPWeights(self.down_weight, self.down_bias, self.up_weight, self.up_bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, adapter_dim={self.adapter_dim}, "
            f"out_features={self.out_features}, activation={self.activation!r}"
        )


class EmbeddingBank(ExpertBank):
    """Experts that output a learned vector whatever their input (the DAE-Syn decoder's subnetworks)."""

    can_merge = True  # a constant expert is linear in its parameters: the merged vector is the mixture of vectors

    def __init__(self, num_experts: int, out_features: int, in_features: int = 0):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.embeddings = nn.Parameter(torch.randn(num_experts, out_features))

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, merge: bool = False
    ) -> torch.Tensor:
        valid = (experts >= 0).unsqueeze(-1)
        vectors = self.embeddings[experts.clamp(min=0)] * valid  # (R, k, D)
        out = (weights.unsqueeze(-1).to(vectors.dtype) * vectors).sum(dim=1)
        return out.view(x.shape[0], *([1] * (x.dim() - 2)), self.out_features).expand(*x.shape[:-1], -1)


class ModuleBank(ExpertBank):
    """N whole subnetworks of any kind (small CNNs, dense layers with dropout): each module maps rows
    (n, ..., in_features) to (n, ..., out_features), and each chosen expert runs once on the rows routed to it
    (`dispatch`). Its parameters are the modules' own, not stacked, so it cannot merge experts (`smear`)."""

    def __init__(self, modules: list[nn.Module], in_features: int, out_features: int):
        super().__init__()
        if not modules:
            raise ValueError("ModuleBank needs at least one expert module.")
        self.num_experts, self.in_features, self.out_features = len(modules), in_features, out_features
        self.nets = nn.ModuleList(modules)

    def run_expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        return self.nets[e](rows)

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, merge: bool = False
    ) -> torch.Tensor:
        if merge:
            raise ValueError(
                f"{type(self).__name__} runs whole subnetworks, whose parameters cannot be averaged: the `smear` "
                "router does not apply to it. Use a stacked bank (AdapterBank, LoraBank) for SMEAR."
            )
        return dispatch(x, experts, weights, self.num_experts, self.out_features, self.run_expert)
