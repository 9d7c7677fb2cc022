"""Where statistics live: on the model, per adapter and split, which is where the save hook finds them."""

from __future__ import annotations

from torch import nn

from ..block.api import _active_adapter, _state, block_name
from ..block.routed_block import RoutedBlock
from .records import RoutingStats

_STATS_ATTR = "_condroute_routing_stats"


def routed_blocks(model: nn.Module, adapter_name: str | None = None) -> dict[str, RoutedBlock]:
    """{block name: RoutedBlock} of the active (or named) adapter."""
    adapter = _active_adapter(model, adapter_name)
    out = {}
    for module in model.modules():
        if isinstance(module, RoutedBlock):
            name = block_name(module.record_key, adapter)
            if name is not None:
                out[name] = module
    return out


def block_info(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict]:
    return {
        name: {"router": b.router.name, "learned": b.router.learned, "granularity": b.granularity}
        for name, b in routed_blocks(model, adapter_name).items()
    }


def _home(model: nn.Module) -> dict:
    return _state(model).model.__dict__.setdefault(_STATS_ATTR, {})


def set_routing_stats(model: nn.Module, stats: RoutingStats, adapter_name: str | None = None) -> None:
    """Keep `stats` on the model for its adapter (one per split), so `save_pretrained` writes them."""
    adapter = _active_adapter(model, adapter_name) or "default"
    _home(model).setdefault(adapter, {})[stats.split] = stats


def get_routing_stats(model: nn.Module, adapter_name: str | None = None) -> dict[str, RoutingStats]:
    """{split: RoutingStats} kept on the model for the active (or named) adapter."""
    adapter = _active_adapter(model, adapter_name) or "default"
    return dict(_home(model).get(adapter, {}))
