"""The smooth-step of the Tree Ensemble Layer (Hazimeh et al. 2020), the activation of DSelect-k's selector bits and
of COMET's tree splits, and the entropy both gates regularise with.

    S(t) = 0                                   t <= -gamma/2
           -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2  |t| < gamma/2
           1                                   t >= gamma/2

It is C^1, reaches exact 0 and 1, and has exactly zero gradient outside (-gamma/2, gamma/2): a saturated bit or
split gives its expert an exact zero weight and an exact zero gradient, so that expert need not be computed.
"""

from __future__ import annotations

import torch

from .base import Router, RouterNetwork, RoutingDecision

ENTROPY_EPS = 1e-6  # the authors' code: H(q) = -sum q log(q + eps)


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    half = gamma / 2
    # the cubic on the clamped t: finite with a finite gradient even where the branch is not taken (t = +-inf)
    c = t.clamp(-half, half)
    inner = -2.0 / gamma**3 * c.pow(3) + 1.5 / gamma * c + 0.5
    # exact 0 and 1 outside (the cubic's rounding would leave 1e-8 there, and an expert computed for nothing)
    return torch.where(t >= half, torch.ones_like(t), torch.where(t <= -half, torch.zeros_like(t), inner))


def entropy_sum(q: torch.Tensor) -> torch.Tensor:
    """-sum over the last dimension of q log(q + eps): the entropy of each distribution, finite with a finite
    gradient at q = 0."""
    return -(q * torch.log(q + ENTROPY_EPS)).sum(dim=-1)


def nonzero_experts(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of each row with a non-zero gate weight, largest first: experts (R, w) with -1 in empty slots
    and their weights (R, w) (0 in empty slots), w = the largest count of non-zero weights in a row (at least 1).
    Every expert appears once per row, so the bank computes it once with its whole weight."""
    width = max(1, int((gates > 0).sum(dim=-1).max())) if gates.numel() else 1
    values, experts = gates.topk(width, dim=-1)
    chosen = values > 0
    return torch.where(chosen, experts, torch.full_like(experts, -1)), values * chosen


class SmoothGateNetwork(RouterNetwork):
    """Paper A's router network (BatchNorm, Linear) with the smooth-step gates' init from the authors' code: the
    first `smooth` outputs feed smooth-steps and start inside their cubic region (weights and biases
    U(+-gamma/100)), the rest are scores with weights U(+-0.05) and biases U(+-score_bias). `init_std` replaces
    it with the other routers' N(0, std^2) weights and zero biases."""

    def __init__(
        self,
        in_features,
        out_features,
        smooth: int,
        gamma: float,
        batchnorm: bool,
        init_std=None,
        score_bias: float = 0.0,
    ):
        super().__init__(in_features, out_features, batchnorm, init_std)
        if init_std is None:
            with torch.no_grad():
                self.proj.weight[:smooth].uniform_(-gamma / 100, gamma / 100)
                self.proj.bias[:smooth].uniform_(-gamma / 100, gamma / 100)
                self.proj.weight[smooth:].uniform_(-0.05, 0.05)
                self.proj.bias[smooth:].uniform_(-score_bias, score_bias)


class SmoothStepGate(Router):
    """Base of the smooth-step gates (DSelect-k, COMET): `decision.logits` are the gate's packed pre-activations,
    `routing_probs` turns them into the gate weights g (R, N), and only experts with g > 0 run (each once per row,
    -1 in the unused slots)."""

    softmax_logits = False
    variable_width = True

    def select(self, logits: torch.Tensor, x: torch.Tensor) -> RoutingDecision:
        gates = self.routing_probs(logits)
        experts, weights = nonzero_experts(gates)
        return RoutingDecision(experts=experts, weights=weights, probs=gates, logits=logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"
