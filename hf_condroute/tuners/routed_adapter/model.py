"""`RoutedAdapterModel`: the PEFT tuner that injects routed adapters."""

from __future__ import annotations

from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ..model_state import ModelRoutingState, warn_if_causal_example_routing
from ..shapes import check_adapter_shapes
from .config import ROUTED_ADAPTER_TARGET_MODULES, RoutedAdapterConfig
from .layer import MERGE_REFUSED, Linear, RoutedAdapterLayer


class RoutedAdapterModel(BaseTuner):
    """Injects routed adapters into a transformers model (see `RoutedAdapterConfig`)."""

    prefix: str = "routed_adapter_"
    tuner_layer_cls = RoutedAdapterLayer
    target_module_mapping = ROUTED_ADAPTER_TARGET_MODULES

    def _pre_injection_hook(self, model: nn.Module, config: RoutedAdapterConfig, adapter_name: str) -> None:
        self.routing_state = ModelRoutingState.of(model)
        warn_if_causal_example_routing(model, config)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        state = ModelRoutingState.of(self.model)
        side = state.side_of(current_key)
        if isinstance(target, RoutedAdapterLayer):
            target.update_layer(adapter_name, config, self._router_in_features(config, target.out_features, side))
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"Routed adapters wrap nn.Linear modules, but {current_key} is {type(base).__name__}. Choose "
                "`target_modules` that name nn.Linear layers."
            )
        router_in = self._router_in_features(config, base.out_features, side)
        new_module = Linear(target, adapter_name, config, current_key, side, state, router_in)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _router_in_features(self, config, out_features: int, side: str) -> int:
        if side == "decoder" and config.routing_granularity == "example":
            return ModelRoutingState.of(self.model).encoder_hidden_size or out_features
        return out_features

    def _check_merge_allowed(self):
        raise ValueError(MERGE_REFUSED)

    def unload(self) -> nn.Module:
        model = super().unload()
        state = ModelRoutingState.find(model)
        if state is not None:
            state.remove()
        return model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # our adapter name sits deeper than PEFT's default expects (block.<name>.router.network.proj.weight)
        marker = f".routed_adapter_block.{adapter_name}."
        return key.replace(marker, ".routed_adapter_block.", 1) if marker in key else key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_shapes(model, remapped, config)
        return remapped
