"""`save_expert_loras`: a routed LoRA's experts as N ordinary PEFT LoRA adapters, plus `experts.json` (the tag ->
adapter map of `tag` routing), for multi-LoRA servers and `PeftModel.from_pretrained` without hf_condroute."""

from __future__ import annotations

import json
import os

import torch
from peft import LoraConfig
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn

from ..tuners.routed_lora import RoutedLoraConfig
from ..tuners.routed_lora.layer import RoutedLoraLayer
from ..tuners.routed_lora.sharing import SharedRouter
from .checks import ExportError
from .router import expert_order

EXPERTS_JSON = "experts.json"


def save_expert_loras(peft_model: nn.Module, save_directory: str, adapter_name: str | None = None) -> list[str]:
    """Write expert i of every routed LoRA layer as the PEFT LoRA adapter `save_directory/expert_{i}`, and
    `save_directory/experts.json`. Expert i of a layer is its router's output i (after `expert_permutation`'s map),
    with the same rank, alpha and dropout, so `PeftModel.from_pretrained(base, dir/expert_i)` computes
    W x + (alpha / r) B_i A_i x on each target: the routed model with every token sent to expert i, weight 1.
    Returns the adapter folders."""
    adapter_name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, RoutedLoraConfig):
        raise ExportError(
            f"save_expert_loras writes the experts of a routed LoRA (RoutedLoraConfig); adapter {adapter_name!r} is "
            f"{type(config).__name__}. For a routed FFN, use hf_condroute.to_native."
        )
    base = peft_model.get_base_model()
    layers = {
        name: m for name, m in base.named_modules() if isinstance(m, RoutedLoraLayer) and adapter_name in m.blocks
    }
    if config.tag_to_expert_pattern:
        raise ExportError(
            "Cannot write experts.json's tag -> adapter map: tag_to_expert_pattern sends a tag to different experts in "
            "different blocks, so no single expert adapter serves a tag. Use one tag_to_expert for every block."
        )
    num_experts = next(iter(layers.values())).blocks[adapter_name].router.num_experts
    saved_extra = _modules_to_save_state(base, adapter_name)
    folders = []
    for i in range(num_experts):
        state = dict(saved_extra)
        for name, layer in layers.items():
            block = layer.blocks[adapter_name]
            router = block.router
            owner = router.holder.owner if isinstance(router, SharedRouter) else None
            order = expert_order(layers[owner].blocks[adapter_name].router if owner else router)
            e = int(order[i])
            bank = block.experts
            # PEFT's LoRA stores lora_A (r, in) and lora_B (out, r); the bank keeps A (N, in, r), B (N, r, out)
            state[f"base_model.model.{name}.lora_A.weight"] = bank.lora_A[e].detach().t().contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = bank.lora_B[e].detach().t().contiguous()
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=sorted(layers),
            modules_to_save=config.modules_to_save,
            task_type=config.task_type,
            base_model_name_or_path=config.base_model_name_or_path,
            inference_mode=True,
        )
        folder = os.path.join(save_directory, f"expert_{i}")
        os.makedirs(folder, exist_ok=True)
        lora.save_pretrained(folder)
        save_file({k: v.cpu() for k, v in state.items()}, os.path.join(folder, "adapter_model.safetensors"))
        folders.append(folder)
    mapping = config.tag_to_expert if config.tag_to_expert is not None else list(range(num_experts))
    record = {
        "format": "hf_condroute/expert_loras",
        "format_version": 1,
        "base_model": config.base_model_name_or_path,
        "router": config.router,
        "num_experts": num_experts,
        "adapters": [f"expert_{i}" for i in range(num_experts)],
        "tag_to_adapter": {str(tag): f"expert_{e}" for tag, e in enumerate(mapping)},
        "routing_config": config.routing_kwargs(),
    }
    with open(os.path.join(save_directory, EXPERTS_JSON), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return folders


@torch.no_grad()
def _modules_to_save_state(base: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The trained copies of `modules_to_save` (a classifier head), under the keys PEFT saves them with."""
    out = {}
    for name, module in base.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                out[f"base_model.model.{name}.{key}"] = value.detach().contiguous()
    return out
