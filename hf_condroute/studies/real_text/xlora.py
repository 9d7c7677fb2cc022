"""The X-LoRA row: PEFT's `XLoraConfig` over the tag row's experts, each written out as an ordinary PEFT LoRA.

X-LoRA loads its LoRAs by path, so the tag row's experts (one per source, each a LoRA of the same rank on the same
targets) are saved as PEFT LoRA checkpoints by the library's `save_expert_loras`. X-LoRA then trains only its
scaling classifier (`use_trainable_adapters=False`): it mixes every LoRA densely per token and runs the base model
twice per forward (a scaling pass, then the real one).
"""

from __future__ import annotations

from peft import XLoraConfig, get_peft_model

from hf_condroute import save_expert_loras


def expert_adapters(routed, folder: str) -> dict[str, str]:
    """The tag row's experts as ordinary PEFT LoRAs (`hf_condroute.save_expert_loras`), named as X-LoRA needs them:
    {"i": path of expert i} (X-LoRA loads its i-th adapter under the name "i"; other names break it)."""
    return {str(i): path for i, path in enumerate(save_expert_loras(routed, folder))}


def xlora_model(base, adapters: dict[str, str], hidden_size: int):
    """X-LoRA over `adapters` (name: path), its LoRAs frozen, its classifier (one hidden layer) trainable."""
    config = XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=hidden_size, adapters=adapters, xlora_depth=1,
        use_trainable_adapters=False,
    )  # fmt: skip
    base.config.use_cache = False  # X-LoRA refuses a model that caches
    return get_peft_model(base, config)
