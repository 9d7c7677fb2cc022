"""The routing settings shared by every place that routes (PEFT tuners, DAE-Syn, benchmarks).

`RoutingConfig` is a dataclass mixin: the PEFT configs inherit it, the recipes build it directly. Loss
coefficients use transformers' MoE names where one exists (`router_aux_loss_coef`, `router_z_loss_coef`,
`router_jitter_noise`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class RoutingConfig:
    router: str = field(default="top_k", metadata={"help": "Router name, one of `hf_condroute.ROUTERS`."})
    num_experts: int = field(default=8, metadata={"help": "Experts per routed block (`monolithic` uses one)."})
    top_k: int = field(default=1, metadata={"help": "Experts each example (or token) runs through."})
    routing_granularity: Literal["example", "token"] = field(
        default="example",
        metadata={
            "help": "`example`: one decision per example, on the mean of the block input over non-padding tokens "
            "(decoder blocks of encoder-decoder models use the mean of the encoder output, so no target token "
            "leaks). `token`: one decision per token."
        },
    )
    router_batchnorm: bool = field(
        default=True, metadata={"help": "Router network is BatchNorm, Linear, softmax (paper A); False drops the BatchNorm."}
    )
    router_init_std: Optional[float] = field(
        default=None,
        metadata={"help": "Std of the router Linear's normal init (small values start near uniform); None: torch default."},
    )
    router_temperature: float = field(default=1.0, metadata={"help": "Logits are divided by this (MOESART's tau)."})
    norm_topk_prob: bool = field(
        default=False,
        metadata={
            "help": "Top-k family (`top_k`, `v_moe`, `smoe`, `x_moe`): renormalise the k chosen probabilities to sum to "
            "1, i.e. softmax over the top-k logits (paper B's Top-k, Shazeer et al. 2017; transformers' name). False "
            "keeps them as they are (Switch, V-MoE). No effect with top_k=1, where the probability itself must scale "
            "the expert for the router to learn."
        },
    )
    router_jitter_noise: Optional[float] = field(
        default=None,
        metadata={
            "help": "Multiplicative noise U(1-eps, 1+eps) on the router input in training (Switch/SMoE). "
            "None: 0.02 for `smoe`, 0 otherwise."
        },
    )
    vmoe_noise_std: Optional[float] = field(
        default=None, metadata={"help": "Std of V-MoE's additive logit noise in training; None: 1/num_experts."}
    )
    router_aux_loss_coef: float = field(default=0.0, metadata={"help": "Load-balancing loss weight (Switch)."})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Router z-loss weight (ST-MoE)."})
    tag_supervision_coef: float = field(
        default=0.0, metadata={"help": "Cross-entropy of router logits to tags where the tag is not -100 (paper A 4.4)."}
    )
    trimmed_lasso_coef: float = field(
        default=0.0, metadata={"help": "Weight of the probability mass outside the top k (paper B 3.2)."}
    )
    reinforce_policy_coef: float = field(default=0.01, metadata={"help": "REINFORCE policy-gradient weight (alpha)."})
    reinforce_entropy_coef: float = field(default=5e-4, metadata={"help": "REINFORCE entropy-bonus weight (beta)."})
    reinforce_value_coef: float = field(default=0.01, metadata={"help": "REINFORCE baseline (value) loss weight (gamma)."})
    reinforce_huber_delta: float = field(default=1.0, metadata={"help": "Delta of the Huber value loss, paper A eq. (1)."})
    reinforce_baseline_hidden: int = field(default=64, metadata={"help": "Hidden units of the baseline MLP."})
    gumbel_temperature_start: float = field(default=10.0, metadata={"help": "ST-Gumbel temperature at step 0."})
    gumbel_temperature_min: float = field(default=0.5, metadata={"help": "ST-Gumbel temperature floor."})
    gumbel_anneal_rate: float = field(
        default=1e-4, metadata={"help": "tau_t = max(min, start * exp(-rate * t)), t = training forwards so far."}
    )
    expert_choice_capacity_factor: float = field(
        default=1.0, metadata={"help": "Expert Choice: each expert takes ceil(factor * rows * top_k / num_experts) rows."}
    )
    xmoe_dim: Optional[int] = field(default=None, metadata={"help": "X-MoE routing dimension; None: max(2, N // 2)."})
    xmoe_temperature: float = field(default=0.3, metadata={"help": "X-MoE initial (learnable) temperature."})
    moesart_replacement: bool = field(
        default=False, metadata={"help": "MOESART samples with replacement (the paper's default is without)."}
    )
    tag_to_expert: Optional[list[int]] = field(
        default=None, metadata={"help": "Tag i routes to expert tag_to_expert[i] (tag router and tag supervision)."}
    )
    tag_to_expert_pattern: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={
            "help": "Per-block override of `tag_to_expert`: {regex on the block name: mapping}, like PEFT's "
            "`rank_pattern` (paper A's Tag+ maps RTE to MNLI's expert in encoder blocks only)."
        },
    )
    tag_group: int = field(default=0, metadata={"help": "Column of (batch, groups) routing tags that blocks use."})
    hash_seed: int = field(default=0, metadata={"help": "Seed mixed into the hash router's per-block salt."})

    def validate_routing(self) -> None:
        """Raise a ValueError naming the problem and the fix for every inconsistent routing setting."""
        from .routers import ROUTERS, router_class

        if self.router not in ROUTERS:
            raise ValueError(
                f"Unknown router {self.router!r}. Valid routers: {', '.join(ROUTERS)}. "
                "Set `router=` to one of them."
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        cls = router_class(self.router)
        if cls.uses_top_k and self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} is larger than num_experts={self.num_experts}: a router cannot choose more "
                "experts than the block has. Lower top_k or raise num_experts."
            )
        if self.top_k < cls.min_top_k:
            raise ValueError(
                f"Router {self.router!r} needs top_k >= {cls.min_top_k} (got {self.top_k}): "
                f"{cls.min_top_k_reason} Set top_k={cls.min_top_k} or more."
            )
        if self.routing_granularity not in ("example", "token"):
            raise ValueError(
                f"routing_granularity must be 'example' or 'token', got {self.routing_granularity!r}."
            )
        if self.router_temperature <= 0:
            raise ValueError(f"router_temperature must be > 0, got {self.router_temperature}.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "tag_supervision_coef", "trimmed_lasso_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.gumbel_temperature_min <= 0 or self.gumbel_temperature_start < self.gumbel_temperature_min:
            raise ValueError(
                "ST-Gumbel needs 0 < gumbel_temperature_min <= gumbel_temperature_start, got "
                f"{self.gumbel_temperature_min} and {self.gumbel_temperature_start}."
            )
        mappings = [self.tag_to_expert] + list((self.tag_to_expert_pattern or {}).values())
        for mapping in mappings:
            if mapping is None:
                continue
            bad = [e for e in mapping if not 0 <= int(e) < self.num_experts]
            if bad:
                raise ValueError(
                    f"tag_to_expert maps tags to experts {bad}, outside 0..{self.num_experts - 1}. "
                    "Every mapped expert must be below num_experts."
                )
        for pattern in self.tag_to_expert_pattern or {}:
            re.compile(pattern)

    def tag_mapping_for(self, block_name: str) -> Optional[list[int]]:
        """The tag-to-expert mapping of one block: the first matching pattern, else `tag_to_expert`."""
        for pattern, mapping in (self.tag_to_expert_pattern or {}).items():
            if re.search(pattern, block_name):
                return list(mapping)
        return list(self.tag_to_expert) if self.tag_to_expert is not None else None

    def routing_kwargs(self) -> dict:
        """Only the routing fields, e.g. to build a `RoutingConfig` from a PEFT config."""
        from dataclasses import fields

        return {f.name: getattr(self, f.name) for f in fields(RoutingConfig)}
