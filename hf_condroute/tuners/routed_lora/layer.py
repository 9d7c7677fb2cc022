"""The tuner layer: an `nn.Linear` whose output W x becomes W x + (alpha / r) * sum_k w_k B_k A_k x."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...experts import LoraBank
from ...routers import build_router
from ..routed_base import RoutedTunerLayer
from .config import RoutedLoraConfig
from .sharing import DecisionHolder, SharedRouter

MERGE_REFUSED = (
    "Routed LoRA experts cannot be merged into the base weights: each token's update (each example's, when routed "
    "per example) depends on which experts its router chose, which no single weight matrix can express. Keep the "
    "adapter, or call `unload()` to get the base model back without it."
)


class RoutedLoraLayer(RoutedTunerLayer):
    adapter_layer_names = ("routed_lora_block",)
    merge_refused = MERGE_REFUSED

    def __init__(self, base_layer: nn.Module, block_name: str, side: str, routing_state, **kwargs) -> None:
        super().__init__(base_layer, block_name, side, routing_state)
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"Routed LoRA experts wrap nn.Linear modules, but {block_name} is {type(base).__name__}. Choose "
                "`target_modules` that name nn.Linear layers (or 'all-linear')."
            )
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(
        self,
        adapter_name: str,
        config: RoutedLoraConfig,
        router_in_features: int,
        shares: DecisionHolder | None = None,
        owner: RoutedLoraLayer | None = None,
    ) -> None:
        """Add the adapter's block; with `shares`, its router is the one of `owner` (router_sharing)."""
        if owner is None:
            router = build_router(config, router_in_features, self.block_name)
        else:
            router = SharedRouter(shares, owner.blocks[adapter_name].router, self.block_name)
        bank = LoraBank(
            router.num_experts,
            self.in_features,
            self.out_features,
            config.r,
            config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
        )
        self._add_block(adapter_name, router, bank, config.routing_granularity)
        if shares is not None and owner is None:  # the group's owner: its decisions go to the holder
            self.blocks[adapter_name].router.register_forward_hook(shares.capture, with_kwargs=True)

    def bank(self, adapter_name: str) -> LoraBank:
        return self.blocks[adapter_name].experts


class Linear(nn.Module, RoutedLoraLayer):
    def __init__(self, base_layer, adapter_name, config, block_name, side, routing_state, router_in_features, **share):
        super().__init__()
        RoutedLoraLayer.__init__(self, base_layer, block_name, side, routing_state)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, router_in_features, **share)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.blocks:
                continue
            block = self.blocks[name]
            inputs = self.routing_state.inputs_for(self.side, block.granularity)
            # PEFT's LoRA adds in the adapter's dtype (lora_A's: `bank.dtype` would walk the parameters each call)
            result = result + block(x.to(block.experts.lora_A.dtype), inputs)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "routed_lora." + super().__repr__()
