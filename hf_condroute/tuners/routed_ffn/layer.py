"""The tuner layers: the routed FFN that replaces the module an FFN's input enters, and, where the FFN's output
projection lies outside that module (BERT's `output.dense`), a pass-through in its place."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...block.routed_block import RoutedBlock
from ...moebert.bank import FFNSliceBank
from ...moebert.layout import FFNParts
from ...routers import build_router
from ..routed_base import RefusesMerge, RoutedTunerLayer
from .config import RoutedFFNConfig

MERGE_REFUSED = (
    "A routed FFN cannot be merged into the base weights: each token runs through the experts its router chose, "
    "which no single dense FFN computes. Keep the adapter; `disable_adapter()` gives the dense model (the teacher) "
    "for a while, and `unload()` gives it back for good (its FFN weights were never changed)."
)


class RoutedFFNLayer(RoutedTunerLayer):
    adapter_layer_names = ("routed_ffn_block",)
    merge_refused = MERGE_REFUSED

    def update_layer(
        self, adapter_name: str, config: RoutedFFNConfig, parts: FFNParts, neuron_index: torch.Tensor, router_in: int
    ) -> None:
        router = build_router(config, router_in, self.block_name)
        self._add_block(adapter_name, router, FFNSliceBank.from_ffn(parts, neuron_index), config.routing_granularity)

    def active_block(self) -> RoutedBlock | None:
        """The block of the active adapter, or None when adapters are disabled or none of this layer's is active."""
        if self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in self.blocks]
        if len(active) > 1:
            raise ValueError(
                f"Adapters {active} are all active on {self.block_name}, but a routed FFN replaces the FFN: only one "
                "can be active at a time. Call `set_adapter(name)` with one of them."
            )
        return self.blocks[active[0]] if active else None


class RoutedFFN(nn.Module, RoutedFFNLayer):
    """Replaces an FFN's entry module; its output is the whole routed FFN's output when an adapter is active."""

    def __init__(
        self, base_layer, adapter_name, config, parts, neuron_index, block_name, side, routing_state, router_in
    ):
        super().__init__()
        RoutedFFNLayer.__init__(self, base_layer, block_name, side, routing_state)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, parts, neuron_index, router_in)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        block = self.active_block()
        if block is None:
            return self.base_layer(x, *args, **kwargs)
        inputs = self.routing_state.inputs_for(self.side, block.granularity)
        return block(x.to(block.experts.dtype), inputs).to(x.dtype)

    def __repr__(self) -> str:
        return "routed_ffn." + super().__repr__()


class FFNOutputPassthrough(RefusesMerge, nn.Module, BaseTunerLayer):
    """In place of an FFN's output projection that lies outside the replaced module (BERT's `output.dense`): it
    passes the routed FFN's output on unchanged while that FFN routes, and is the dense projection otherwise."""

    adapter_layer_names = ()
    other_param_names = ()
    merge_refused = MERGE_REFUSED

    def __init__(self, base_layer: nn.Module, entry: RoutedFFN):
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["entry"] = entry  # a reference, not a submodule: its weights are saved under the entry
        self._active_adapter = entry.active_adapter
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def active_adapter(self):
        return self.entry.active_adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.entry.active_block() is not None:
            return x
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "routed_ffn_passthrough." + super().__repr__()
