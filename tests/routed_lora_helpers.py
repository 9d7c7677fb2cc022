"""Building routed LoRA models and random PEFT LoRAs for the routed LoRA tests."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from hf_condroute import RoutedLoraConfig
from hf_condroute.tuners.routed_lora import RoutedLoraLayer

# Routed LoRA against PEFT's LoRA on the same machine: our stacked-expert GEMMs and PEFT's per-LoRA GEMMs have other
# shapes, and a CPU's kernels may block (so sum) them in another order: equal on one Intel Xeon, 1.3e-7 apart on an
# AMD EPYC (logits of size ~0.3). A few fp32 ulps per layer; a wrong scale or expert would be off by ~1e-2.
PEFT_ROUNDING = dict(rtol=1e-6, atol=1e-6)


def routed(model, **kw):
    kw.setdefault("num_experts", 4)
    kw.setdefault("r", 4)
    return get_peft_model(model, RoutedLoraConfig(**kw))


def layers(model) -> dict[str, RoutedLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoraLayer)}


def peft_lora(base, seed: int = 0, **kw):
    """A PEFT LoRA with random A and B (init_lora_weights=False), so it changes the output."""
    torch.manual_seed(seed)
    kw.setdefault("r", 8)
    kw.setdefault("lora_alpha", 16)
    return get_peft_model(base, LoraConfig(init_lora_weights=False, **kw))
