"""hf_condroute: conditional computation for Hugging Face Transformers.

Importing it registers the PEFT types `ROUTED_ADAPTER` (and `ROUTED_FFN`), so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know them.
"""

from __future__ import annotations

from .api import get_routing, get_routing_losses, last_step, routing_loss, set_reward
from .block import RoutedBlock, RoutingInputs
from .experts import AdapterBank, EmbeddingBank, ExpertBank
from .routers import ROUTERS, Router, RoutingDecision, build_router, register_router
from .routing_config import RoutingConfig
from .step import RoutingStep
from .tuners.peft_types import ROUTED_ADAPTER
from .tuners.peft_types import ROUTED_FFN
from .tuners.registration import register_peft_types
from .tuners.routed_adapter import RoutedAdapterConfig, RoutedAdapterModel
from .tuners.routed_ffn import RoutedFFNConfig, RoutedFFNModel

register_peft_types()

__version__ = "0.1.0"

__all__ = [
    "ROUTED_ADAPTER",
    "ROUTED_FFN",
    "ROUTERS",
    "AdapterBank",
    "EmbeddingBank",
    "ExpertBank",
    "RoutedAdapterConfig",
    "RoutedAdapterModel",
    "RoutedFFNConfig",
    "RoutedFFNModel",
    "RoutedBlock",
    "Router",
    "RoutingConfig",
    "RoutingDecision",
    "RoutingInputs",
    "RoutingStep",
    "build_router",
    "get_routing",
    "get_routing_losses",
    "last_step",
    "register_router",
    "routing_loss",
    "set_reward",
]
