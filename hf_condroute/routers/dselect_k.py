"""DSelect-k (Hazimeh et al., NeurIPS 2021): k selectors, each a product of smooth-steps over the binary code of
every expert, mixed by a softmax over the selectors.

With m = ceil(log2 N) bits and c_i the code of expert i (most significant bit first), selector l with logits
z in R^m gives r_i = prod_j (c_ij S(z_j) + (1 - c_ij)(1 - S(z_j))), and the gate is g = sum_l softmax(alpha)_l r^(l).
Per example (or per token): z and alpha are one Linear of the routing input. Every selector sums to one over all
2^m codes and is one-hot once its bits saturate. With N not a power of two the codes N..2^m-1 are unused; their mass
is lost (g sums to less than 1, as in the paper, which does not renormalise) and a reachability term,
sum_l 1 / sum_{i<N} r_i, pushes the selectors off them. The entropy term sum_l H(r^(l)) drives each selector to
one-hot, and so the gate to <= k experts.

Only experts with a non-zero weight are computed: such a weight is exactly zero only through a saturated bit,
whose gradient is exactly zero too, so the sparse computation is exact. Early in training the gate is dense.
"""

from __future__ import annotations

import math

import torch

from .losses import row_mean
from .smooth_step import ENTROPY_EPS, SmoothGateNetwork, SmoothStepGate, entropy_sum, smooth_step


def code_bits(num_experts: int) -> int:
    return math.ceil(math.log2(num_experts)) if num_experts > 1 else 0


def binary_codes(num_experts: int) -> torch.Tensor:
    """(N, m) bool: the binary expansion of 0..N-1, most significant bit first (the reference's order)."""
    m = code_bits(num_experts)
    shifts = torch.arange(m - 1, -1, -1)
    return (torch.arange(num_experts).unsqueeze(1) >> shifts) & 1 == 1


def selector_weights(z: torch.Tensor, codes: torch.Tensor, gamma: float) -> torch.Tensor:
    """r (..., k, N) from selector logits z (..., k, m): the mass each selector puts on each real expert."""
    s = smooth_step(z, gamma).unsqueeze(-2)  # (..., k, 1, m)
    return torch.where(codes, s, 1 - s).prod(dim=-1)


class DSelectKRouter(SmoothStepGate):
    name = "dselect_k"

    def __init__(self, in_features, num_experts, config, block_name=""):
        super().__init__(in_features, num_experts, config, block_name)
        self.gamma = config.dselect_gamma
        self.bits = code_bits(num_experts)
        self.has_unused_codes = 2**self.bits != num_experts
        # derived from N, so not saved
        self.register_buffer("codes", binary_codes(num_experts), persistent=False)

    def build_network(self, in_features, num_experts, config):
        # k*m selector logits, then k selector-mixing logits (the reference's init: mixing biases U(+-0.05))
        k, m = self.top_k, code_bits(num_experts)
        return SmoothGateNetwork(
            in_features,
            k * (m + 1),
            k * m,
            config.dselect_gamma,
            config.router_batchnorm,
            config.router_init_std,
            score_bias=0.05,
        )

    def selectors(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r (R, k, N) and the selector mixture softmax(alpha) (R, k) from the packed logits (R, k*m + k)."""
        k, m = self.top_k, self.bits
        z = logits[:, : k * m].reshape(logits.shape[0], k, m)
        return selector_weights(z, self.codes, self.gamma), logits[:, k * m :].softmax(dim=-1)

    def routing_probs(self, logits: torch.Tensor) -> torch.Tensor:
        r, mix = self.selectors(logits)
        return (mix.unsqueeze(-1) * r).sum(dim=1)

    def loss_coefficients(self) -> dict[str, float]:
        coefs = super().loss_coefficients()
        if self.num_experts > 1:  # one expert: the entropy is a constant
            coefs["dselect_entropy"] = self.config.dselect_entropy_coef
        if self.has_unused_codes:
            coefs["dselect_reach"] = self.config.dselect_reach_coef
        return {k: v for k, v in coefs.items() if v > 0}

    def loss_terms(self, logits, experts, baseline=None, targets=None, reward=None, valid=None):
        terms = super().loss_terms(logits, experts, baseline, targets, reward, valid)
        coefs = self.loss_coefficients()
        if "dselect_entropy" in coefs or "dselect_reach" in coefs:
            r, _ = self.selectors(logits)
            if "dselect_entropy" in coefs:
                terms["dselect_entropy"] = coefs["dselect_entropy"] * row_mean(entropy_sum(r).sum(dim=-1), valid)
            if "dselect_reach" in coefs:
                reach = row_mean((1.0 / (r.sum(dim=-1) + ENTROPY_EPS)).sum(dim=-1), valid)
                terms["dselect_reach"] = coefs["dselect_reach"] * reach
        return terms
