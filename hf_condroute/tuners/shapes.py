"""A clear error when saved adapter weights do not fit the model their config builds."""

from __future__ import annotations

from dataclasses import fields

import torch

SHAPE_FIELDS = ("num_experts", "adapter_dim", "r", "expert_dim", "shared_neurons", "router", "top_k", "xmoe_dim")


def check_adapter_shapes(model: torch.nn.Module, state_dict: dict, config) -> None:
    expected = model.state_dict()
    mismatched = [
        (key, tuple(value.shape), tuple(expected[key].shape))
        for key, value in state_dict.items()
        if key in expected and hasattr(value, "shape") and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if not mismatched:
        return
    key, saved, built = mismatched[0]
    names = {f.name for f in fields(config)}
    settings = ", ".join(f"{n}={getattr(config, n)!r}" for n in SHAPE_FIELDS if n in names)
    config_sizes = {getattr(config, n) for n in SHAPE_FIELDS if n in names and isinstance(getattr(config, n), int)}
    differing = [b for s, b in zip(saved, built) if s != b] if len(saved) == len(built) else []
    if differing and not set(differing) & config_sizes:  # no size the config sets: the base's widths differ
        base = getattr(config, "base_model_name_or_path", None)
        trained_on = f" ({base})" if base else ""
        raise ValueError(
            f"The saved adapter weights do not fit this base model: {key} has shape {saved} in the checkpoint but "
            f"{built} here ({len(mismatched)} tensors differ), in a size that comes from the base model (its hidden "
            f"or feature size), not from the adapter's config ({settings}). Load it into the base model it was "
            f"trained on{trained_on}, or one of the same sizes."
        )
    raise ValueError(
        f"The saved adapter weights do not fit the model built from its config: {key} has shape {saved} in the "
        f"checkpoint but {built} in the model ({len(mismatched)} tensors differ). The config gives {settings}. "
        "Load the weights with the adapter_config.json they were saved with, or fix num_experts / adapter_dim / r "
        "there."
    )
