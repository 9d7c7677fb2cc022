"""Routers that keep the k most probable experts and scale them by their probabilities (unnormalised, or summing
to 1 with `norm_topk_prob`):
paper A's Top-k (Switch's k=1 form), V-MoE (additive logit noise), SMoE (multiplicative input noise) and
X-MoE (cosine routing on a low-dimensional hypersphere), as paper B section 3 defines them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, RoutingDecision, top_k_with_probs
from .norm import RouterBatchNorm1d, batchnorm_linear


class TopKRouter(Router):
    """Output = sum over the k most probable experts of p_i f_i(x): the router learns through p_i."""

    name = "top_k"

    def noisy_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def select(self, logits: torch.Tensor, x: torch.Tensor) -> RoutingDecision:
        probs = self.noisy_logits(logits).softmax(dim=-1)
        experts, weights = top_k_with_probs(probs, self.top_k)
        if self.config.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RoutingDecision(experts=experts, weights=weights, probs=probs, logits=logits)


class VMoERouter(TopKRouter):
    """V-MoE (Ruiz et al. 2021): TopK(Softmax(logits + eps)), eps ~ N(0, 1/N^2) in training."""

    name = "v_moe"

    def noisy_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return logits
        std = self.config.vmoe_noise_std
        std = 1.0 / self.num_experts if std is None else std
        return logits + torch.randn_like(logits) * std


class SMoERouter(TopKRouter):
    """Switch-style SMoE (Fedus et al. 2022): TopK(Softmax(A(x * eps) + b)), eps ~ U(0.98, 1.02) in training.
    The multiplicative noise is `router_jitter_noise` (default 0.02 for this router)."""

    name = "smoe"
    default_jitter = 0.02


class XMoENetwork(nn.Module):
    """X-MoE (Chi et al. 2022): logits = cos(A, P x) / tau with P a projection to a low dimension, A the expert
    embeddings and tau learnable."""

    def __init__(self, in_features: int, num_experts: int, dim: int, temperature: float, batchnorm: bool):
        super().__init__()
        self.norm = RouterBatchNorm1d(in_features) if batchnorm else nn.Identity()
        self.proj = nn.Linear(in_features, dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.orthogonal_(self.expert_embeddings)
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        z = F.normalize(batchnorm_linear(self.norm, self.proj, x, valid), dim=-1)
        a = F.normalize(self.expert_embeddings, dim=-1)
        return z @ a.t() / self.log_temperature.exp()


class XMoERouter(TopKRouter):
    name = "x_moe"

    def build_network(self, in_features, num_experts, config):
        dim = config.xmoe_dim or max(2, num_experts // 2)
        return XMoENetwork(in_features, num_experts, dim, config.xmoe_temperature, config.router_batchnorm)
