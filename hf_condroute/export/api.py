"""`to_native`: a routed PEFT model as a plain transformers model that routes as it does at evaluation, the way
PEFT's `merge_and_unload()` returns a plain model."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..tuners.routed_adapter import RoutedAdapterConfig
from ..tuners.routed_ffn import RoutedFFNConfig
from ..tuners.routed_lora import RoutedLoraConfig
from .checks import EXPORT_READY, refusal
from .mixtral import build_causal_moe
from .sources import read_causal


def to_native(
    peft_model: nn.Module, target: str | None = None, dtype: torch.dtype | None = None, shared_expert: bool = True
):
    """A plain transformers `PreTrainedModel` (no hf_condroute needed to load it) routing each token as
    `peft_model` does in evaluation mode; an `ExportError` naming the blocker when no native form is exact.

    Args:
        peft_model: a `PeftModel` with an active routed FFN or routed LoRA adapter.
        target: causal LMs: "mixtral" or "qwen2_moe" (None: Mixtral where it holds the model exactly, else
            Qwen2-MoE); T5: "switch_transformers".
        dtype: of the returned model; None: the base model's.
        shared_expert: MoEBERT's shared neurons, while every expert holds the same copy, become Qwen2-MoE's shared
            expert (computed once per token, scaled by sigmoid(0) = 0.5). False keeps them inside each expert, also
            exact: for llama.cpp, which computes sigmoid(z) as silu(z) / z and so gets NaN from that gate.
    """
    config = peft_model.peft_config[peft_model.active_adapter]
    base = peft_model.get_base_model()
    if dtype is None:
        dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
    if isinstance(config, RoutedAdapterConfig):
        raise refusal(
            "routed adapters (bottleneck or conv adapter experts)",
            "native MoE layers have SwiGLU (or T5 FFN) experts in place of the MLP, and no form for adapters beside it",
            "RoutedFFNConfig (MoEBERT experts from the MLP) or RoutedLoraConfig with "
            rf"router_sharing=r'layers\.\d+\.mlp' ({EXPORT_READY})",
        )
    if not isinstance(config, (RoutedFFNConfig, RoutedLoraConfig)):
        raise TypeError(
            f"to_native exports hf_condroute's routed FFN and routed LoRA adapters; the active adapter is "
            f"{type(config).__name__}. For a plain LoRA use PEFT's merge_and_unload()."
        )
    if getattr(base.config, "is_encoder_decoder", False):
        from .switch import build_switch

        if isinstance(config, RoutedLoraConfig):
            raise refusal(
                "a routed LoRA on an encoder-decoder",
                "Switch Transformers' experts replace the FFN, and have no form for LoRA experts beside its weights",
                "RoutedFFNConfig with router='top_k' and top_k=1 on a T5",
            )

        native = build_switch(peft_model, target)
    else:
        native = build_causal_moe(read_causal(peft_model, shared_expert), target)
    native = native.to(dtype)
    _warn_if_misaligned(native, dtype)
    return native


def _warn_if_misaligned(native, dtype: torch.dtype) -> None:
    """transformers' default experts kernel (`grouped_mm`) fails on the CPU when an expert's rows are not a multiple
    of 16 bytes ("strides should be multiple of 16 bytes"); real models' widths always are, tiny ones may not be."""
    widths = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size"}  # Switch's experts are Linears
    if native.config.model_type not in widths:
        return
    width = getattr(native.config, widths[native.config.model_type])
    row = width * torch.finfo(dtype).bits // 8
    if row % 16:
        warnings.warn(
            f"The exported experts are {width} neurons wide: rows of {row} bytes, not "
            "a multiple of 16, which transformers' default experts kernel (grouped_mm) refuses on the CPU. Load the "
            'model with `experts_implementation="eager"`, or choose an expert width that is a multiple of 8.',
            stacklevel=3,
        )
