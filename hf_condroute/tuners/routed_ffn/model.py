"""`RoutedFFNModel`: the PEFT tuner that replaces feed-forward networks by routed mixtures of their slices."""

from __future__ import annotations

from torch import nn

from ...architectures import ROUTED_FFN_TARGET_MODULES
from ...block.context import ModelRoutingState
from ...moebert.convert import FFNConversion, plan_conversion
from ..routed_base import RoutedTunerModel
from .layer import FFNOutputPassthrough, RoutedFFN, RoutedFFNLayer


class RoutedFFNModel(RoutedTunerModel):
    """Replaces FFNs by routed experts built from them (see `RoutedFFNConfig`)."""

    prefix: str = "routed_ffn_"
    tuner_layer_cls = RoutedFFNLayer
    target_module_mapping = ROUTED_FFN_TARGET_MODULES

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        # every FFN is found and split, and every error raised, before the first module is replaced
        self._conversions: dict[str, FFNConversion] = plan_conversion(model, peft_config)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        conversion = self._conversions.get(current_key)
        if conversion is None:
            raise ValueError(
                f"{current_key} was matched but not planned as a routed FFN; this happens when the model changes "
                "between planning and injection. Call get_peft_model again on the dense model."
            )
        parts = conversion.parts
        state = ModelRoutingState.of(self.model)
        side = state.side_of(current_key)
        router_in = self._router_in_features(config, parts.in_features, side)
        if isinstance(target, RoutedFFNLayer):
            target.update_layer(adapter_name, config, parts, conversion.neuron_index, router_in)
            return
        new_module = RoutedFFN(
            target, adapter_name, config, parts, conversion.neuron_index, current_key, side, state, router_in
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
        if parts.out_proj_outside_entry:
            holder_path, _, out_name = parts.layout.out_proj.rpartition(".")
            holder = parent.get_submodule(holder_path) if holder_path else parent
            existing = getattr(holder, out_name)
            if not isinstance(existing, FFNOutputPassthrough):
                self._replace_module(holder, out_name, FFNOutputPassthrough(existing, new_module), existing)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if not hasattr(new_module, "base_layer"):
            # unloading: the original module goes back as it was (PEFT's version copies a `.weight` that entry
            # modules such as BERT's `intermediate` do not have)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)
