"""`RoutedAdapterConfig`: N bottleneck adapters per block, chosen per example (or token) by a router."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ...architectures import ROUTED_ADAPTER_TARGET_MODULES  # noqa: F401  (re-exported)
from ...experts import ACTIVATIONS
from ...routers.config import RoutingConfig
from ...routers.validation import Choice, Flag, Integer, check_fields
from ..peft_types import ROUTED_ADAPTER


@dataclass
class RoutedAdapterConfig(RoutingConfig, PeftConfig):
    """Configuration of a [`RoutedAdapterModel`]: routed bottleneck adapters after chosen `nn.Linear` layers, and
    conv adapters (1x1 convolutions, `hf_condroute.block.feature_maps`) after modules that output feature maps
    (batch, channels, height, width): an `nn.Conv2d`, a ResNet residual block, a block of your own.

    Each targeted layer's output y becomes y + sum_j w_j adapter_{e_j}(y), the experts e_j and weights w_j
    chosen by the router (see `RoutingConfig` for every routing field); on a feature map each example routes on
    its spatial mean. `target_modules=None` uses the architecture default: after self-attention and after the
    feed-forward of every layer (ResNet: after every residual block).

    Args:
        adapter_dim: bottleneck size of each adapter (paper A: d_model / 32 for T5).
        adapter_activation: nonlinearity between the down and up projections.
        init_weights: zero-initialise the up projections, so an untrained adapter changes nothing.
        feature_channels: channels of the feature maps that targets other than `nn.Conv2d` output, when the target
            neither has an `out_channels` attribute nor ends in an `nn.Conv2d` whose `out_channels` they are.
        target_modules / exclude_modules / modules_to_save: as in every PEFT config.
    """

    adapter_dim: int = field(default=64, metadata={"check": Integer(1), "help": "Bottleneck size of each adapter."})
    adapter_activation: str = field(
        default="relu",
        metadata={
            "check": Choice(values=tuple(ACTIVATIONS), label="activation"),
            "help": "relu, gelu, silu, tanh or identity.",
        },
    )
    init_weights: bool = field(default=True, metadata={"check": Flag(), "help": "Zero-initialise the up projections."})
    feature_channels: int | None = field(
        default=None,
        metadata={
            "check": Integer(1, optional=True),
            "help": "Channels of the feature maps output by targets that are not nn.Conv2d. None: the target's "
            "`out_channels`, else that of the last nn.Conv2d inside it.",
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (suffixes) or a regex of the modules whose outputs get routed adapters: nn.Linear "
            "layers, or modules that output (batch, channels, height, width) feature maps (conv adapters). None: "
            "the architecture default."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave out."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. a classifier head or layer norms."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ROUTED_ADAPTER
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        check_fields(self)
        self.check_routing_rules()  # the fields' own rules ran above
