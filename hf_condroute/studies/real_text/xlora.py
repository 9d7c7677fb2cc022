"""The X-LoRA row: PEFT's `XLoraConfig` over the tag row's experts, each written out as an ordinary PEFT LoRA.

X-LoRA loads its LoRAs by path, so the tag row's experts (one per source, each a LoRA of the same rank on the same
targets) are saved as PEFT LoRA checkpoints of the top model. X-LoRA then trains only its scaling classifier
(`use_trainable_adapters=False`): it mixes every LoRA densely per token and runs the base model twice per forward
(a scaling pass, then the real one).
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, XLoraConfig, get_peft_model

from .rows import MLP_TARGETS


def routed_lora_banks(model) -> dict[str, torch.nn.Module]:
    """{target module path without PEFT's prefix: its LoraBank} of a routed LoRA PEFT model."""
    banks = {}
    for name, module in model.named_modules():
        blocks = getattr(module, "routed_lora_block", None)
        if blocks is not None and "default" in blocks:
            banks[name.removeprefix("base_model.model.")] = blocks["default"].experts
    return banks


@torch.no_grad()
def save_expert_loras(routed, make_base, folder: str) -> dict[str, str]:
    """Expert i of every target of `routed` as a PEFT LoRA checkpoint under folder/expert_i, on a fresh base from
    `make_base()`; returns {"i": path of expert i}."""
    banks = routed_lora_banks(routed)
    if not banks:
        raise ValueError("The model has no routed LoRA experts to write out.")
    config = routed.peft_config["default"]
    first = next(iter(banks.values()))
    paths = {}
    for expert in range(first.num_experts):
        lora = get_peft_model(
            make_base(), LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(MLP_TARGETS))
        )
        for name, module in lora.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in banks and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(banks[key].lora_A[expert].t())
                module.lora_B["default"].weight.copy_(banks[key].lora_B[expert].t())
        path = os.path.join(folder, f"expert_{expert}")
        lora.save_pretrained(path)
        paths[str(expert)] = path  # X-LoRA loads its i-th adapter under the name "i"; other names break it
    return paths


def xlora_model(base, adapters: dict[str, str], hidden_size: int):
    """X-LoRA over `adapters` (name: path), its LoRAs frozen, its classifier (one hidden layer) trainable."""
    config = XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=hidden_size, adapters=adapters, xlora_depth=1,
        use_trainable_adapters=False,
    )  # fmt: skip
    base.config.use_cache = False  # X-LoRA refuses a model that caches
    return get_peft_model(base, config)
