"""`RoutedAdapterModel`: the PEFT tuner that injects routed adapters."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...architectures import ROUTED_ADAPTER_TARGET_MODULES
from ...block.context import ModelRoutingState
from ..routed_base import RoutedTunerModel
from .conv import FeatureMap, check_conv_granularity, output_channels
from .layer import Linear, RoutedAdapterLayer


class RoutedAdapterModel(RoutedTunerModel):
    """Injects routed adapters into a transformers model (see `RoutedAdapterConfig`)."""

    prefix: str = "routed_adapter_"
    tuner_layer_cls = RoutedAdapterLayer
    target_module_mapping = ROUTED_ADAPTER_TARGET_MODULES

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        state = ModelRoutingState.of(self.model)
        side = state.side_of(current_key)
        if isinstance(target, RoutedAdapterLayer):
            target.update_layer(adapter_name, config, self._router_in_features(config, target.out_features, side))
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear):
            router_in = self._router_in_features(config, base.out_features, side)
            new_module = Linear(target, adapter_name, config, current_key, side, state, router_in)
        else:  # a module that outputs a feature map: conv experts
            check_conv_granularity(config, current_key)
            channels = output_channels(base, config, current_key)
            router_in = self._router_in_features(config, channels, side)
            new_module = FeatureMap(target, adapter_name, config, current_key, side, state, router_in, channels)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
