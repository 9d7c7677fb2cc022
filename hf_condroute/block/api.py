"""Reading a routed model's routing: decisions and auxiliary losses of the last forward."""

from __future__ import annotations

import torch
from torch import nn

from ..routers.base import RoutingDecision
from .context import ModelRoutingState
from .step import RoutingStep


def _state(model: nn.Module) -> ModelRoutingState:
    state = ModelRoutingState.find(model)
    if state is None:
        raise ValueError(
            "This model has no routed layers: build it with `peft.get_peft_model(model, RoutedAdapterConfig(...))` "
            "(or RoutedFFNConfig) after `import hf_condroute`."
        )
    return state


def _active_adapter(model: nn.Module, adapter_name: str | None) -> str | None:
    if adapter_name is not None:
        return adapter_name
    active = getattr(model, "active_adapters", None)
    if callable(active):
        active = active()
    if isinstance(active, (list, tuple)) and active:
        return active[0]
    return getattr(model, "active_adapter", None)


def last_step(model: nn.Module) -> RoutingStep:
    """The `RoutingStep` of the model's last forward."""
    step = _state(model).step
    if step is None:
        raise ValueError("The model has not run a forward yet: there is no routing to read.")
    return step


def get_routing(model: nn.Module, adapter_name: str | None = None) -> dict[str, RoutingDecision]:
    """{block name: decision of the last forward} for the active (or named) adapter.

    A decision has `experts` (batch, k) or (batch, tokens, k) (-1: no expert, e.g. padding), `weights` (same
    shape) and `probs` (batch, N) or (batch, tokens, N).
    """
    adapter = _active_adapter(model, adapter_name)
    out = {}
    for key, record in last_step(model).records.items():
        name = block_name(key, adapter)
        if name is not None:
            out[name] = record.user_decision()
    return out


def block_name(record_key, adapter: str | None) -> str | None:
    """The block name in a record key (`name`, or `(adapter, name)` in PEFT layers); None when the key belongs to
    another adapter than `adapter` (None: any adapter)."""
    if isinstance(record_key, tuple):
        owner, name = record_key
        return None if adapter is not None and owner != adapter else name
    return record_key


def get_routing_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weighted auxiliary routing losses of the last training forward, summed over blocks, one by one."""
    step = last_step(model)
    return dict(step.loss_values) if step.loss_values else step.compute_loss_values()


def routing_loss(model: nn.Module) -> torch.Tensor:
    """The last forward's auxiliary routing losses as one scalar, for a loss you compute yourself (e.g. with label
    smoothing). Use it in place of `outputs.loss`'s routing part: backward() through it scales their gradients
    like your loss."""
    step = last_step(model)
    device = next((p.device for p in model.parameters()), None)
    return step.loss(device)


def set_reward(model: nn.Module, per_example_loss: torch.Tensor) -> None:
    """Give REINFORCE routers their reward (minus each example's loss) when the forward had no `labels`."""
    last_step(model).set_reward(per_example_loss)
