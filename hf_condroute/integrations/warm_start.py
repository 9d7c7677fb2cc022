"""Starting a routed model from another run's experts with fresh routers (paper A section 4.3).

Paper A pre-trains the subnetworks with tag routing, then trains them further together with randomly
initialised routers. `load_experts_from` copies every adapter weight of a saved routed adapter (a
`save_pretrained` folder or a Trainer checkpoint) except its routers' (router networks, REINFORCE baselines,
BatchNorm statistics), so it also brings the trained `modules_to_save` (e.g. layer norms) along.
"""

from __future__ import annotations

import os

from peft import PeftConfig
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn

from ..block.routed_block import ROUTER_KEY


def check_expert_checkpoint(checkpoint: str) -> PeftConfig:
    """The checkpoint's PEFT config, or a clear error if the folder holds no routed adapter."""
    from ..tuners.peft_types import ROUTED_ADAPTER

    if not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        raise ValueError(
            f"{checkpoint} holds no adapter_config.json: point it at a folder written by `save_pretrained` (or a "
            "Trainer checkpoint-N folder) of a routed-adapter run."
        )
    config = PeftConfig.from_pretrained(checkpoint)
    if config.peft_type != ROUTED_ADAPTER:
        raise ValueError(f"{checkpoint} holds a {config.peft_type} adapter, not routed adapters.")
    return config


def load_experts_from(model: nn.Module, checkpoint: str, adapter_name: str = "default") -> list[str]:
    """Copy every weight of `checkpoint`'s adapter except its routers into `model`'s adapter `adapter_name`.

    The experts must have the same shapes (num_experts, adapter_dim, target modules); the routers may differ
    (any router name). Returns the names of the copied tensors.
    """
    saved = check_expert_checkpoint(checkpoint)
    config = model.peft_config[adapter_name]
    for name in ("num_experts", "adapter_dim"):
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(
                f"The experts in {checkpoint} have {name}={getattr(saved, name)} but this model has "
                f"{name}={getattr(config, name)}: use the same {name} as the run that saved them."
            )
    weights = {k: v for k, v in load_peft_weights(checkpoint).items() if ROUTER_KEY not in k}
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}.experts." in k]
    if missing:
        raise ValueError(
            f"{checkpoint} lacks the weights of {len(missing)} expert banks of this model (first: {missing[0]}): it "
            "was saved from a model with other target modules."
        )
    return sorted(weights)
