"""`RoutedLoraConfig`: N LoRA experts in parallel to each targeted Linear, chosen per token (or example) by a router."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...routers.config import RoutingConfig
from ...routers.validation import Choice, ConfigError, Integer, Real, Text, check_fields
from ..peft_types import ROUTED_LORA

DEFAULT_NUM_EXPERTS = 8
LAYER_SHARING = "layer"


@dataclass
class RoutedLoraConfig(RoutingConfig, PeftConfig):
    """Configuration of a [`RoutedLoraModel`]: mixture-of-LoRA experts (MoLoRA, MixLoRA) as a PEFT method.

    Each targeted Linear's output becomes y = W x + (lora_alpha / r) * sum_k w_k B_{e_k} A_{e_k} dropout(x), the
    experts e_k and weights w_k chosen by the router from the Linear's input x (each token, or the mean over an
    example's non-padding tokens; see `RoutingConfig` for every routing field). LoRA's own field names and defaults.

    Args:
        r / lora_alpha / lora_dropout: as PEFT's `LoraConfig`, for every expert.
        init_lora_weights: True (A kaiming-uniform, B zeros: an untrained adapter changes nothing), "gaussian"
            (A normal with std 1/r, B zeros) or False (B random too), as PEFT's LoRA.
        target_modules: names (suffixes), a regex, or "all-linear" (every Linear but the output head); None: PEFT
            LoRA's default for the architecture (e.g. q_proj and v_proj for Llama).
        num_experts: None: len(lora_experts) when given, else 8.
        routing_granularity: None: "token" for causal language models, "example" otherwise (resolved when the
            adapter is injected; the saved config says which).
        router_sharing: None: each target has its own router. "layer": the targets of one layer (the same module
            path up to its last numeric component, e.g. `model.layers.3.`) share one router, or a regex whose match
            in a target's name is its group (e.g. r"layers\\.\\d+\\.mlp": the three projections of each MLP, as
            MixLoRA). A group routes once per forward, on the input of its first target (in a Llama MLP: gate_proj's
            input, the FFN's input); the others reuse that decision. The group must run inside one layer.
        lora_experts: paths or Hub ids of PEFT LoRA checkpoints of the same base model (same targets and rank):
            expert i starts from the i-th. Used once, when the adapter is built, and never written to
            adapter_config.json: the routed checkpoint holds the experts itself.
    """

    r: int = field(default=8, metadata={"check": Integer(1), "help": "LoRA rank of every expert."})
    lora_alpha: float = field(
        default=8, metadata={"check": Real(0, low_open=True), "help": "LoRA alpha: scaling alpha / r."}
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "check": Real(0, high=1, high_open=True),
            "help": "Dropout on the Linear's input before the experts.",
        },
    )
    init_lora_weights: bool | str = field(
        default=True,
        metadata={
            "check": Choice(values=(True, False, "gaussian")),
            "help": "True, 'gaussian' (B zeros) or False (B random).",
        },
    )
    num_experts: int | None = field(
        default=None,
        metadata={
            "check": Integer(1, optional=True),
            "help": "LoRA experts per target; None: len(lora_experts), else 8.",
        },
    )
    routing_granularity: Literal["example", "token"] | None = field(
        default=None,
        metadata={
            "check": Choice(values=("example", "token"), optional=True),
            "help": "`token`: one decision per token; `example`: one per example. None: token for causal LMs.",
        },
    )
    router_sharing: str | None = field(
        default=None,
        metadata={
            "check": Text(optional=True),
            "help": "'layer', or a regex whose match groups targets under one router.",
        },
    )
    lora_experts: list[str] | None = field(
        default=None,
        metadata={
            "check": Text(many=True, optional=True),
            "help": "PEFT LoRA checkpoints to start the experts from (not saved).",
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names (suffixes), a regex or 'all-linear' of the nn.Linear modules; None: LoRA's default."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave out."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. a classifier head."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ROUTED_LORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.lora_experts, str):
            self.lora_experts = [self.lora_experts]
        check_fields(self)
        if self.lora_experts is not None:
            if not self.lora_experts:
                raise ConfigError("RoutedLoraConfig.lora_experts is empty: give LoRA checkpoints, or leave it None.")
            if self.num_experts is None:
                self.num_experts = len(self.lora_experts)
            elif self.num_experts < len(self.lora_experts):
                raise ConfigError(
                    f"RoutedLoraConfig has num_experts={self.num_experts} but {len(self.lora_experts)} lora_experts: "
                    "each LoRA becomes one expert. Raise num_experts, or leave it None (one expert per LoRA)."
                )
        if self.num_experts is None:
            self.num_experts = DEFAULT_NUM_EXPERTS
        if self.router_sharing is not None and self.router_sharing != LAYER_SHARING:
            try:
                re.compile(self.router_sharing)
            except re.error as err:
                raise ConfigError(
                    f"RoutedLoraConfig.router_sharing must be 'layer' or a valid regular expression, got "
                    f"{self.router_sharing!r} ({err})."
                ) from None
        self.check_routing_rules()  # the fields' own rules ran above

    def to_dict(self) -> dict:
        """The JSON-able config, without `lora_experts`: the saved adapter holds the experts, so loading it needs
        none of the source LoRAs."""
        out = super().to_dict()
        out["lora_experts"] = None
        return out
