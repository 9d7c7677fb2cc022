"""`RoutedLoraModel`: the PEFT tuner that puts routed LoRA experts beside nn.Linear layers."""

from __future__ import annotations

import copy

from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...architectures import is_causal_lm, reads_encoder_output
from ...block.context import ModelRoutingState
from ...routers import router_class
from ...routers.heuristic import MonolithicRouter
from ..routed_base import RoutedTunerModel
from .layer import Linear, RoutedLoraLayer
from .sharing import DecisionHolder, sharing_group
from .sources import SourceLora, plan_sources


class RoutedLoraModel(RoutedTunerModel):
    """Injects routed LoRA experts into a transformers model (see `RoutedLoraConfig`)."""

    prefix: str = "routed_lora_"
    tuner_layer_cls = RoutedLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # LoRA's defaults

    def _prepare_adapter_config(self, peft_config, model_config):
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if peft_config.routing_granularity is None:  # saved explicitly from here on
            # per token for causal LMs, unless the router routes per example only (smear)
            per_token = is_causal_lm(self.model) and not router_class(peft_config.router).per_example_only
            peft_config.routing_granularity = "token" if per_token else "example"
        return peft_config

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        # every source LoRA is read and checked before the first module is replaced
        self._groups: dict[str, tuple[DecisionHolder, RoutedLoraLayer]] = {}
        self._sources: list[SourceLora] | None = None
        if peft_config.lora_experts:
            if issubclass(router_class(peft_config.router), MonolithicRouter) and len(peft_config.lora_experts) > 1:
                raise ValueError(
                    f"router='monolithic' has one expert per target, but lora_experts gives "
                    f"{len(peft_config.lora_experts)} LoRAs. Use a router that chooses among them "
                    "(e.g. 'tag', 'top_k')."
                )
            self._sources = plan_sources(peft_config, self._target_shapes(peft_config, model))

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._sources = None  # the experts hold their copies now

    def _target_shapes(self, peft_config, model: nn.Module) -> dict[str, tuple[int, int]]:
        """{name: (in_features, out_features)} of the Linear modules the config will target."""
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == "all-linear":
            peft_config = _maybe_include_all_linear_layers(copy.copy(peft_config), model)
        tuner_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        shapes = {}
        for name, module in model.named_modules():
            if not name or any(name.startswith(p) for p in tuner_prefixes):
                continue
            match = self._check_target_module_exists(peft_config, name)
            if not match or isinstance(match, _ExcludedModule):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, nn.Linear):
                shapes[name] = (base.in_features, base.out_features)
        return shapes

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        state = ModelRoutingState.of(self.model)
        side = state.side_of(current_key)
        if side == "decoder" and reads_encoder_output(self.model, current_key):
            side = "encoder"  # the router sees this Linear's input: the encoder's tokens
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"Routed LoRA experts wrap nn.Linear modules, but {current_key} is {type(base).__name__}. Choose "
                "`target_modules` that name nn.Linear layers (or 'all-linear')."
            )
        router_in = self._router_in_features(config, base.in_features, side)
        group = sharing_group(current_key, config.router_sharing)
        share: dict = {}
        if group is not None:
            holder, owner = self._groups.get(group, (DecisionHolder(current_key), None))
            share = {"shares": holder, "owner": owner}
        if isinstance(target, RoutedLoraLayer):
            target.update_layer(adapter_name, config, router_in, **share)
            layer = target
        else:
            layer = Linear(target, adapter_name, config, current_key, side, state, router_in, **share)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
        if group is not None and share["owner"] is None:
            self._groups[group] = (share["shares"], layer)
        for source in self._sources or ():
            bank = layer.bank(adapter_name)
            lora_a, lora_b = source.weights[current_key]
            bank.load_expert(source.index, lora_a, lora_b, scale=source.scaling / bank.scaling)
