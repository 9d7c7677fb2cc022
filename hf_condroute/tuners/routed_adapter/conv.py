"""The conv form of the routed adapter layer: a target whose output is a feature map (batch, C, height, width) - an
`nn.Conv2d`, a ResNet residual block, a user's block - gets conv experts (`hf_condroute.block.feature_maps`), routed per
example on the spatial mean of its output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...block.feature_maps import check_feature_map, route_feature_map
from .config import RoutedAdapterConfig
from .layer import RoutedAdapterLayer


def output_channels(module: nn.Module, config: RoutedAdapterConfig, name: str) -> int:
    """The channels a feature-map target outputs: an `nn.Conv2d`'s `out_channels`, else `config.feature_channels`,
    else the module's own `out_channels` attribute, else that of the last `nn.Conv2d` inside it (a residual block
    ends in one). The first forward checks it; a clear error when none of them says."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if config.feature_channels is not None:
        return config.feature_channels
    if isinstance(getattr(module, "out_channels", None), int):
        return module.out_channels
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1].out_channels
    raise TypeError(
        f"Routed adapters wrap nn.Linear layers and modules that output feature maps (batch, channels, height, "
        f"width), but {name} is a {type(module).__name__} with no nn.Conv2d inside and no `out_channels`, so the "
        "channels of its output are unknown. Set `feature_channels=` to them if it outputs a feature map; otherwise "
        "choose `target_modules` that name nn.Linear layers or conv blocks."
    )


def check_conv_granularity(config: RoutedAdapterConfig, name: str) -> None:
    if config.routing_granularity != "example":
        raise ValueError(
            f"{name} outputs a feature map, whose conv experts route per example on the spatial mean; "
            "routing_granularity='token' would route every pixel and is not supported there. Use "
            "routing_granularity='example', or target nn.Linear layers only."
        )


class FeatureMap(nn.Module, RoutedAdapterLayer):
    """A target with a (batch, C, height, width) output y: y + routed conv experts(y)."""

    def __init__(self, base_layer, adapter_name, config, block_name, side, routing_state, router_in_features, channels):
        super().__init__()
        RoutedAdapterLayer.__init__(self, base_layer, block_name, side, routing_state, channels)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, router_in_features)

    def update_layer(self, adapter_name: str, config: RoutedAdapterConfig, router_in_features: int) -> None:
        check_conv_granularity(config, self.block_name)
        super().update_layer(adapter_name, config, router_in_features)

    def adapter_output(self, block, result: torch.Tensor, inputs) -> torch.Tensor:
        check_feature_map(result, self.out_features, self.block_name)
        return route_feature_map(block, result.to(block.experts.dtype), inputs).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._routed_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "routed_adapter." + super().__repr__()
