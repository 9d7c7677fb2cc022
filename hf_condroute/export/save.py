"""`save_native`: `to_native`, `save_pretrained`, and a model card with the routed configuration and statistics."""

from __future__ import annotations

import torch
from torch import nn

from ..stats.hub import save_routing_stats, template_path, update_model_card
from .api import to_native

NATIVE_TEMPLATE = "native_model_card.md"
_SOURCE_NAMES = {"ROUTED_FFN": "FFN (MoEBERT experts)", "ROUTED_LORA": "LoRA"}


def save_native(
    peft_model: nn.Module,
    save_directory: str,
    target: str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    shared_expert: bool = True,
    **save_kwargs,
):
    """Export `peft_model` with `to_native` and save it to `save_directory` (weights, config, generation config, the
    tokenizer if given), with `routing_stats.json` and a README.md model card saying what it was made from.
    Returns the native model."""
    native = to_native(peft_model, target=target, dtype=dtype, shared_expert=shared_expert)
    native.save_pretrained(save_directory, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    adapter = peft_model.active_adapter
    peft_type = getattr(peft_model.peft_config[adapter].peft_type, "value", "")
    save_routing_stats(peft_model, save_directory, [adapter], model_card=False)  # beside the weights
    update_model_card(
        save_directory,
        template=str(template_path(NATIVE_TEMPLATE)),
        library_name="transformers",
        target=type(native).__name__,
        source_type=_SOURCE_NAMES.get(peft_type, peft_type),
        auto_class_native=(
            "AutoModelForSeq2SeqLM" if getattr(native.config, "is_encoder_decoder", False) else "AutoModelForCausalLM"
        ),
        exact_note="in evaluation mode it chooses the same experts for every token and gives the same outputs (up "
        "to float rounding) as the routed model.",
    )
    return native
