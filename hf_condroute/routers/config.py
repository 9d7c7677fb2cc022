"""The routing settings shared by every place that routes (PEFT tuners, DAE-Syn, benchmarks).

`RoutingConfig` is a dataclass mixin: the PEFT configs inherit it, the recipes build it directly. Loss
coefficients use transformers' MoE names where one exists (`router_aux_loss_coef`, `router_z_loss_coef`,
`router_jitter_noise`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .registry import router_class
from .validation import Choice, ExpertList, Flag, Integer, PatternMap, Real, check_fields


@dataclass
class RoutingConfig:
    router: str = field(default="top_k", metadata={"help": "Router name, one of `hf_condroute.ROUTERS`."})
    num_experts: int = field(
        default=8, metadata={"check": Integer(1), "help": "Experts per routed block (`monolithic` uses one)."}
    )
    top_k: int = field(
        default=1, metadata={"check": Integer(1), "help": "Experts each example (or token) runs through."}
    )
    routing_granularity: Literal["example", "token"] = field(
        default="example",
        metadata={
            "check": Choice(values=("example", "token")),
            "help": "`example`: one decision per example, on the mean of the block input over non-padding tokens "
            "(decoder blocks of encoder-decoder models use the mean of the encoder output, so no target token "
            "leaks). `token`: one decision per token.",
        },
    )
    router_batchnorm: bool = field(
        default=True,
        metadata={
            "check": Flag(),
            "help": "Router network is BatchNorm, Linear, softmax (paper A); False drops the BatchNorm.",
        },
    )
    router_bias: bool = field(
        default=True,
        metadata={
            "check": Flag(),
            "help": "The router Linear has a bias (paper A). False: a bias-free Linear, as the routers of Mixtral and "
            "Qwen2-MoE, so that `hf_condroute.to_native` can export the model (with `router_batchnorm=False`).",
        },
    )
    router_detach_input: bool = field(
        default=False,
        metadata={
            "check": Flag(),
            "help": "Learned routers read a detached copy of their input: the routing losses (tag supervision, load "
            "balance) and the task gradient through the routing weights train the router only, never the layers "
            "below it. Paper A's code does not detach (only REINFORCE's baseline reads a detached input).",
        },
    )
    router_init_std: float | None = field(
        default=None,
        metadata={
            "check": Real(0, optional=True),
            "help": "Std of the router Linear's normal init (small values start near uniform); None: torch default.",
        },
    )
    router_temperature: float = field(
        default=1.0, metadata={"check": Real(0, low_open=True), "help": "Logits are divided by this (MOESART's tau)."}
    )
    norm_topk_prob: bool = field(
        default=False,
        metadata={
            "check": Flag(),
            "help": "Top-k family (`top_k`, `v_moe`, `smoe`, `x_moe`): renormalise the k chosen probabilities to sum "
            "to 1, i.e. softmax over the top-k logits (paper B's Top-k, Shazeer et al. 2017; transformers' name). "
            "False keeps them as they are (Switch, V-MoE). No effect with top_k=1, where the probability itself must "
            "scale the expert for the router to learn.",
        },
    )
    router_jitter_noise: float | None = field(
        default=None,
        metadata={
            "check": Real(0, high=1, high_open=True, optional=True),
            "help": "Multiplicative noise U(1-eps, 1+eps) on the router input in training (Switch/SMoE). "
            "None: 0.02 for `smoe`, 0 otherwise.",
        },
    )
    vmoe_noise_std: float | None = field(
        default=None,
        metadata={
            "check": Real(0, optional=True),
            "help": "Std of V-MoE's additive logit noise in training; None: 1/num_experts.",
        },
    )
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"check": Real(0), "help": "Load-balancing loss weight (Switch)."}
    )
    router_z_loss_coef: float = field(
        default=0.0, metadata={"check": Real(0), "help": "Router z-loss weight (ST-MoE)."}
    )
    tag_supervision_coef: float = field(
        default=0.0,
        metadata={
            "check": Real(0),
            "help": "Cross-entropy of router logits to tags where the tag is not -100 (paper A 4.4).",
        },
    )
    trimmed_lasso_coef: float = field(
        default=0.0,
        metadata={"check": Real(0), "help": "Weight of the probability mass outside the top k (paper B 3.2)."},
    )
    reinforce_policy_coef: float = field(
        default=0.01, metadata={"check": Real(0), "help": "REINFORCE policy-gradient weight (alpha)."}
    )
    reinforce_entropy_coef: float = field(
        default=5e-4, metadata={"check": Real(0), "help": "REINFORCE entropy-bonus weight (beta)."}
    )
    reinforce_value_coef: float = field(
        default=0.01, metadata={"check": Real(0), "help": "REINFORCE baseline (value) loss weight (gamma)."}
    )
    reinforce_huber_delta: float = field(
        default=1.0,
        metadata={"check": Real(0, low_open=True), "help": "Delta of the Huber value loss, paper A eq. (1)."},
    )
    reinforce_baseline_hidden: int = field(
        default=64, metadata={"check": Integer(1), "help": "Hidden units of the baseline MLP."}
    )
    gumbel_temperature_start: float = field(
        default=10.0, metadata={"check": Real(0, low_open=True), "help": "ST-Gumbel temperature at step 0."}
    )
    gumbel_temperature_min: float = field(
        default=0.5, metadata={"check": Real(0, low_open=True), "help": "ST-Gumbel temperature floor."}
    )
    gumbel_anneal_rate: float = field(
        default=1e-4,
        metadata={"check": Real(0), "help": "tau_t = max(min, start * exp(-rate * t)), t = training forwards so far."},
    )
    expert_choice_capacity_factor: float = field(
        default=1.0,
        metadata={
            "check": Real(0, low_open=True),
            "help": "Expert Choice: each expert takes ceil(factor * rows * top_k / num_experts) rows.",
        },
    )
    expert_capacity_factor: float | None = field(
        default=None,
        metadata={
            "check": Real(0, low_open=True, optional=True),
            "help": "Learned token-choice routers: each expert takes at most ceil(factor * rows * top_k / num_experts) "
            "assignments per block call (Switch), first choices first, in token order; the rest pass through "
            "unchanged. None: no limit.",
        },
    )
    xmoe_dim: int | None = field(
        default=None,
        metadata={"check": Integer(1, optional=True), "help": "X-MoE routing dimension; None: max(2, N // 2)."},
    )
    xmoe_temperature: float = field(
        default=0.3, metadata={"check": Real(0, low_open=True), "help": "X-MoE initial (learnable) temperature."}
    )
    smear_expert_dropout: float = field(
        default=0.0,
        metadata={
            "check": Real(0, high=1, high_open=True),
            "help": "SMEAR: probability of dropping each expert from a row's merge in training (its code: 0.1).",
        },
    )
    moesart_replacement: bool = field(
        default=False,
        metadata={"check": Flag(), "help": "MOESART samples with replacement (the paper's default is without)."},
    )
    moesart_adjustment: Literal["moesart", "i", "ii"] = field(
        default="moesart",
        metadata={
            "check": Choice(values=("moesart", "i", "ii")),
            "help": "MOESART: how the sampled logits are adjusted in training (paper B 3.1.1): 'moesart' is eq. (3); "
            "'i' keeps o_i, 'ii' adds log r_i (the same as 'i' without replacement); the ablation of its Table S1.",
        },
    )
    dselect_gamma: float = field(
        default=1.0,
        metadata={
            "check": Real(0, low_open=True),
            "help": "DSelect-k: width gamma of the smooth-step on each selector bit (Hazimeh et al. 2021; their "
            "default 1). A bit outside (-gamma/2, gamma/2) is saturated: exactly 0 or 1, with no gradient.",
        },
    )
    dselect_entropy_coef: float = field(
        default=0.1,
        metadata={
            "check": Real(0),
            "help": "DSelect-k: weight of the entropy regulariser, mean over rows of the sum over the k selectors of "
            "H(r) (H(q) = -sum q log(q + 1e-6)); it drives each selector to one expert, and so the gate to <= k "
            "computed experts. 0 turns it off (the reference's default); paper B's grids span 0.05..10.",
        },
    )
    dselect_reach_coef: float = field(
        default=1.0,
        metadata={
            "check": Real(0),
            "help": "DSelect-k with N not a power of two: weight of the mean over rows of sum over selectors of "
            "1 / (mass on real experts + 1e-6), which pushes selectors off the unused codes (reference weight 1).",
        },
    )
    comet_gamma: float = field(
        default=1.0,
        metadata={
            "check": Real(0, low_open=True),
            "help": "COMET: width gamma of the smooth-step at each tree split (Ibrahim et al. 2023).",
        },
    )
    comet_entropy_coef: float = field(
        default=0.1,
        metadata={
            "check": Real(0),
            "help": "COMET: weight of the mean over rows of the sum over the k trees of the entropy of each tree's "
            "leaf distribution; it drives every split to 0/1, and so the gate to <= k computed experts.",
        },
    )
    expert_permutation: bool = field(
        default=False,
        metadata={
            "check": Flag(),
            "help": "Every router gets a saved output-to-expert map (identity at first) that "
            "`hf_condroute.local_search` / `LocalSearchCallback` search by swaps (COMET's permutation local search; "
            "usable with any router).",
        },
    )
    tag_to_expert: list[int] | None = field(
        default=None,
        metadata={
            "check": ExpertList(optional=True),
            "help": "Tag i routes to expert tag_to_expert[i] (tag router and tag supervision).",
        },
    )
    tag_to_expert_pattern: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "check": PatternMap(optional=True),
            "help": "Per-block override of `tag_to_expert`: {regex on the block name: mapping}, like PEFT's "
            "`rank_pattern` (paper A's Tag+ maps RTE to MNLI's expert in encoder blocks only).",
        },
    )
    tag_group: int = field(
        default=0, metadata={"check": Integer(0), "help": "Column of (batch, groups) routing tags that blocks use."}
    )
    hash_seed: int = field(
        default=0, metadata={"check": Integer(), "help": "Seed mixed into the hash router's per-block salt."}
    )

    def validate_routing(self) -> None:
        """Raise a ValueError naming the problem and the fix for every bad or inconsistent routing setting."""
        check_fields(self)
        self.check_routing_rules()

    def check_routing_rules(self) -> None:
        """The rules across fields (each field's own rule is `check_fields`'): a config whose __post_init__ has run
        `check_fields` already calls this alone."""
        cls = router_class(self.router)  # an unknown name raises with the list of valid ones
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
        if cls.per_example_only and self.routing_granularity == "token":
            raise ValueError(
                f"Router {self.router!r} routes per example only: {cls.per_example_only_reason} Set "
                "routing_granularity='example' (or use `softmax` for a dense per-token mixture)."
            )
        if not cls.softmax_logits:
            for name, value, default in (
                ("router_z_loss_coef", self.router_z_loss_coef, 0.0),
                ("router_temperature", self.router_temperature, 1.0),
            ):
                if value != default:
                    raise ValueError(
                        f"Router {self.router!r} is a gate without softmax logits (its weights come from "
                        f"smooth-steps), so {name}={value} has nothing to act on. Set {name}={default}; its sparsity "
                        "is steered by its gamma and entropy coefficient."
                    )
        if self.expert_capacity_factor is not None and not cls.capacity_applies():
            raise ValueError(
                f"expert_capacity_factor limits learned token-choice routers, but router {self.router!r} "
                + (
                    "lets experts choose their rows, with a capacity of its own (Expert Choice: "
                    "expert_choice_capacity_factor)."
                    if cls.learned
                    else "routes by design (it has no router network)."
                )
                + " Leave expert_capacity_factor=None, or pick a router such as 'top_k'."
            )
        if self.gumbel_temperature_start < self.gumbel_temperature_min:
            raise ValueError(
                "ST-Gumbel anneals its temperature down: gumbel_temperature_min must be <= gumbel_temperature_start, "
                f"got {self.gumbel_temperature_min} and {self.gumbel_temperature_start}."
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

    def tag_mapping_for(self, block_name: str) -> list[int] | None:
        """The tag-to-expert mapping of one block: the first matching pattern, else `tag_to_expert`."""
        for pattern, mapping in (self.tag_to_expert_pattern or {}).items():
            if re.search(pattern, block_name):
                return list(mapping)
        return list(self.tag_to_expert) if self.tag_to_expert is not None else None

    def routing_kwargs(self) -> dict:
        """Only the routing fields, e.g. to build a `RoutingConfig` from a PEFT config."""
        from dataclasses import fields

        return {f.name: getattr(self, f.name) for f in fields(RoutingConfig)}
