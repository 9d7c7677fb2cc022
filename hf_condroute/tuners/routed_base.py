"""What every routed PEFT tuner shares: the model's routing hooks, the routers' input size, the refusal to merge,
`unload()` taking the hooks off, checkpoint keys without the adapter name, and a clear error when saved weights
do not fit the config; and, for their layers, one `RoutedBlock` per adapter."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ..block.context import ModelRoutingState, warn_if_causal_example_routing
from ..block.routed_block import RoutedBlock
from ..experts import ExpertBank
from ..experts.quantized import check_quantized_modules_to_save
from ..routers import Router
from .shapes import check_adapter_shapes


class RefusesMerge:
    """Routed layers cannot be merged into base weights: `merge`/`unmerge` raise `merge_refused` (which says why)."""

    merge_refused: str = "Routed layers cannot be merged into the base weights."

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(self.merge_refused)

    def unmerge(self) -> None:
        raise ValueError(self.merge_refused)


def module_names_hint(model: nn.Module) -> str:
    """The last parts of the model's module names, which `target_modules` entries match."""
    names = [n for n, _ in model.named_modules() if n]
    ends = sorted({n.rsplit(".", 1)[-1] for n in names} - {str(i) for i in range(len(names))})
    example = max(names, key=lambda n: n.count("."), default="")
    return (
        f"This model's module names end in: {', '.join(ends)} (a target_modules entry matches such an ending, or "
        f"give a regex over full names such as {example!r})."
    )


class RoutedTunerModel(BaseTuner):
    """Base of `RoutedAdapterModel`, `RoutedFFNModel` and `RoutedLoraModel`: subclasses implement
    `_create_and_replace`; merging is refused with their layer class's `merge_refused`."""

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        check_quantized_modules_to_save(model, getattr(config, "modules_to_save", None))
        self.routing_state = ModelRoutingState.of(model)
        warn_if_causal_example_routing(model, config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:  # PEFT names the targets, not what the model has
            raise NoMatchingPeftModuleError(f"{err} {module_names_hint(model)}") from err

    def _router_in_features(self, config, features: int, side: str) -> int:
        """Decoder blocks that route per example see the mean of the encoder's output, whose size may differ."""
        if side == "decoder" and config.routing_granularity == "example":
            return ModelRoutingState.of(self.model).encoder_hidden_size or features
        return features

    def _check_merge_allowed(self):
        raise ValueError(self.tuner_layer_cls.merge_refused)

    def unload(self) -> nn.Module:
        model = super().unload()
        state = ModelRoutingState.find(model)
        if state is not None:
            state.remove()
        return model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # our adapter name sits deeper than PEFT's default expects (<layer>_block.<name>.router.network.proj.weight)
        for layer_name in cls.tuner_layer_cls.adapter_layer_names:
            marker = f".{layer_name}.{adapter_name}."
            if marker in key:
                return key.replace(marker, f".{layer_name}.", 1)
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_shapes(model, remapped, config)
        return remapped


class RoutedTunerLayer(RefusesMerge, BaseTunerLayer):
    """Base of the routed tuner layers: one `RoutedBlock` per adapter, in the `nn.ModuleDict` named by
    `adapter_layer_names[0]`, fed by the model's routing state. Subclasses set `adapter_layer_names` and
    `merge_refused`."""

    other_param_names = ()

    def __init__(self, base_layer: nn.Module, block_name: str, side: str, routing_state, **kwargs) -> None:
        self.base_layer = base_layer
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        self.block_name = block_name
        self.side = side  # "self", "encoder" or "decoder": where its routing information comes from
        self.routing_state = routing_state
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def blocks(self) -> nn.ModuleDict:
        """adapter name -> its RoutedBlock in this layer."""
        return getattr(self, self.adapter_layer_names[0])

    def _get_base_layer_device_and_dtype(self, base_layer):
        # PEFT reads `.weight`; a routed FFN's base is a whole FFN module (BertIntermediate, LlamaMLP), whose device
        # and dtype are those of its first floating parameter. The router keeps float32 through the move.
        device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
        if device is None:
            param = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
            if param is not None:
                device, dtype = param.device, param.dtype
        return device, dtype

    def _add_block(self, adapter_name: str, router: Router, bank: ExpertBank, granularity: str) -> None:
        block = RoutedBlock(router, bank, granularity, name=self.block_name)
        block.record_key = (adapter_name, self.block_name)
        self.blocks[adapter_name] = block
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)
