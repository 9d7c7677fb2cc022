"""Heuristic routers of paper A section 2.3: tag, hash and monolithic. They have no parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Router, RoutingDecision
from .hashing import block_salt, mix


def _one_hot_decision(experts: torch.Tensor, num_experts: int) -> RoutingDecision:
    # float32 whatever the model's dtype, like every router's decision (statistics read it)
    experts = experts.unsqueeze(-1)
    weights = torch.ones(experts.shape, dtype=torch.float32, device=experts.device)
    probs = F.one_hot(experts.squeeze(-1), num_experts).float()
    return RoutingDecision(experts=experts, weights=weights, probs=probs)


class TagRouter(Router):
    """Expert = the example's tag, or `tag_to_expert[tag]` (paper A's Tag and Tag+)."""

    name = "tag"
    learned = False
    uses_top_k = False
    needs_tags = True

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        if tags is None:
            raise ValueError(
                f"The tag router of block {self.block_name or '<unnamed>'} needs `routing_tags`: pass "
                "`routing_tags=` (LongTensor (batch,) or (batch, groups)) to the model's forward or generate, or "
                "add a `routing_tags` column to your dataset."
            )
        targets = self.tag_targets(tags)
        message = (
            f"The tag router of block {self.block_name or '<unnamed>'} got tag -100 (unknown): tag routing needs "
            "a known tag for every example. Give every example a tag, or use a learned router with "
            "`tag_supervision_coef` to learn from partial tags."
        )
        if torch.compiler.is_compiling():  # traced: checked on the device (no host sync)
            torch._assert_async(~(targets == -100).any(), message)
        elif bool((targets == -100).any()):
            raise ValueError(message)
        return _one_hot_decision(targets, self.num_experts)


class HashRouter(Router):
    """A fixed pseudo-random expert per key and per block (Roller et al. 2021). The key is the example's
    input-id content, the token id for per-token routing, or whatever the caller passes as `routing_keys`."""

    name = "hash"
    learned = False
    uses_top_k = False
    needs_keys = True

    def __init__(self, in_features, num_experts, config, block_name=""):
        super().__init__(in_features, num_experts, config, block_name)
        self.salt = block_salt(block_name, config.hash_seed)

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        if keys is None:
            raise ValueError(
                f"The hash router of block {self.block_name or '<unnamed>'} has no key to hash: pass `input_ids`, or, "
                "when the model is fed `inputs_embeds`, `routing_keys=`: a LongTensor (batch,) for per-example "
                "routing, (batch, tokens) for per-token routing."
            )
        experts = mix(keys, self.salt) % self.num_experts
        return _one_hot_decision(experts, self.num_experts)


class MonolithicRouter(Router):
    """Every row goes to the block's single expert (paper A's monolithic baseline)."""

    name = "monolithic"
    learned = False
    uses_top_k = False

    def __init__(self, in_features, num_experts, config, block_name=""):
        super().__init__(in_features, 1, config, block_name)

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        experts = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return _one_hot_decision(experts, 1)
