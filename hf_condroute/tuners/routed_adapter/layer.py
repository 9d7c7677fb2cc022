"""The tuner layer: a target whose output y becomes y + routed_block(y). `Linear` is the form for `nn.Linear`
targets; `conv.FeatureMap` the form for targets that output channels-first feature maps (conv experts)."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...experts import AdapterBank
from ...routers import build_router
from ..routed_base import RoutedTunerLayer
from .config import RoutedAdapterConfig

MERGE_REFUSED = (
    "Routed adapters cannot be merged into the base weights: each example's output depends on which experts its "
    "router chose, which no single weight matrix can express. Keep the adapter, or call `unload()` to get the "
    "base model back without it."
)


class RoutedAdapterLayer(RoutedTunerLayer):
    adapter_layer_names = ("routed_adapter_block",)
    merge_refused = MERGE_REFUSED

    def __init__(self, base_layer: nn.Module, block_name: str, side: str, routing_state, out_features: int, **kwargs):
        super().__init__(base_layer, block_name, side, routing_state)
        self.out_features = out_features  # the width the adapters read and add to (channels of a feature map)

    def adapter_output(self, block, result: torch.Tensor, inputs) -> torch.Tensor:
        """The block's contribution to the base output `result`, computed in the bank's dtype."""
        return block(result.to(block.experts.dtype), inputs).to(result.dtype)

    def _routed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.blocks:
                continue
            block = self.blocks[name]
            inputs = self.routing_state.inputs_for(self.side, block.granularity)
            result = result + self.adapter_output(block, result, inputs)
        return result

    def update_layer(self, adapter_name: str, config: RoutedAdapterConfig, router_in_features: int) -> None:
        router = build_router(config, router_in_features, self.block_name)
        bank = AdapterBank(
            router.num_experts,
            self.out_features,
            config.adapter_dim,
            activation=config.adapter_activation,
            init_weights=config.init_weights,
        )
        self._add_block(adapter_name, router, bank, config.routing_granularity)


class Linear(nn.Module, RoutedAdapterLayer):
    def __init__(self, base_layer, adapter_name, config, block_name, side, routing_state, router_in_features):
        super().__init__()
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        RoutedAdapterLayer.__init__(self, base_layer, block_name, side, routing_state, base.out_features)
        self.in_features = base.in_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, router_in_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._routed_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "routed_adapter." + super().__repr__()
