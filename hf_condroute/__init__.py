"""hf_condroute: conditional computation for Hugging Face Transformers.

Importing it registers the PEFT types `ROUTED_ADAPTER`, `ROUTED_FFN` and `ROUTED_LORA`, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know them.
"""

from __future__ import annotations

from importlib.metadata import version

from . import _moved
from .block import RoutedBlock, RoutingInputs, RoutingStep
from .block.api import get_routing, get_routing_losses, last_step, routing_loss, set_reward
from .block.multigate import MultiGateBlock
from .experts import AdapterBank, EmbeddingBank, ExpertBank, LoraBank
from .export import ExportError, save_expert_loras, save_native, to_native
from .integrations.callbacks import RoutingStatsCallback
from .integrations.local_search import LocalSearchCallback, LocalSearchResult, local_search, relabel_experts
from .routers import ROUTERS, Router, RoutingDecision, build_router, register_router
from .routers.config import RoutingConfig
from .stats import RoutingStats, RoutingStatsAccumulator, compute_routing_stats, get_routing_stats, set_routing_stats
from .stats.hub import save_routing_stats
from .stats.metrics import active_subnetworks, focus_cover, routing_focus_cover, tag_presence
from .tuners.peft_patches import ROUTED_ADAPTER, ROUTED_FFN, ROUTED_LORA, apply_peft_patches
from .tuners.routed_adapter import RoutedAdapterConfig, RoutedAdapterModel
from .tuners.routed_ffn import RoutedFFNConfig, RoutedFFNModel
from .tuners.routed_lora import RoutedLoraConfig, RoutedLoraModel

apply_peft_patches()
_moved.install()  # 0.2.0 module paths (hf_condroute.block, .metrics, ...) still import

__version__ = version("hf-condroute")  # pyproject.toml's, as installed

__all__ = [
    "ROUTED_ADAPTER",
    "ROUTED_FFN",
    "ROUTED_LORA",
    "ROUTERS",
    "AdapterBank",
    "EmbeddingBank",
    "ExpertBank",
    "ExportError",
    "LoraBank",
    "active_subnetworks",
    "focus_cover",
    "LocalSearchCallback",
    "LocalSearchResult",
    "local_search",
    "relabel_experts",
    "routing_focus_cover",
    "tag_presence",
    "RoutedAdapterConfig",
    "RoutedAdapterModel",
    "RoutedFFNConfig",
    "RoutedFFNModel",
    "MultiGateBlock",
    "RoutedLoraConfig",
    "RoutedLoraModel",
    "RoutedBlock",
    "Router",
    "RoutingConfig",
    "RoutingDecision",
    "RoutingInputs",
    "RoutingStats",
    "RoutingStatsAccumulator",
    "RoutingStatsCallback",
    "RoutingStep",
    "build_router",
    "compute_routing_stats",
    "get_routing_stats",
    "get_routing",
    "get_routing_losses",
    "last_step",
    "register_router",
    "routing_loss",
    "save_expert_loras",
    "save_native",
    "save_routing_stats",
    "set_reward",
    "set_routing_stats",
    "to_native",
]
