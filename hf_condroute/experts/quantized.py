"""Quantized base layers (bitsandbytes `Linear4bit` / `Linear8bitLt`, QLoRA-style bases): recognising them, and the
float weight of one when the routed FFN must slice it.

Both bitsandbytes layers subclass `nn.Linear` and keep `in_features`/`out_features`, so routed adapters wrap them
as they are (an adapter reads only the layer's output). Their `.weight` is packed (uint8 / int8): nothing may
index it, cast it or ask it for gradients, which is what this module is for.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_quantized(module: nn.Module) -> bool:
    """True when the module's weight is not a plain floating-point tensor (bitsandbytes 4-/8-bit, and other
    integer-packed schemes: HQQ, GPTQ's `qweight`)."""
    if hasattr(module, "W_q") or hasattr(module, "qweight"):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not (weight.dtype.is_floating_point or weight.dtype.is_complex)


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) floating-point weight a linear layer computes with; its own weight when it
    is not quantized. The module is left exactly as it was."""
    if not is_quantized(module):
        return module.weight
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as F

        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # repacked for bitsandbytes' CPU inference kernel (after an eval forward on a CPU with AVX512-BF16):
            # read the weight through that kernel, since unpacking would re-quantize (and change) its scales
            dtype = getattr(module, "compute_dtype", None) or torch.float32
            eye = torch.eye(module.in_features, dtype=dtype, device=weight.device)
            out = F.gemv_4bit(eye, weight.data, state=state).t()
        else:
            out = F.dequantize_4bit(weight.data, state)
    elif kind == "Int8Params":
        import bitsandbytes.functional as F

        # after a forward the row scales live on the layer's state, before it on the weight; PEFT's
        # dequantize_module_weight re-creates the weight on the CPU and so loses them there: not used here
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(module.state, "SCB", None)
        if scales is None:
            raise TypeError(f"The 8-bit weight of a {type(module).__name__} has no scales (SCB): it is not quantized.")
        out = F.int8_vectorwise_dequant(weight.data, scales.to(weight.device))
    else:
        from peft.utils.integrations import dequantize_module_weight

        out = dequantize_module_weight(module)
    if not out.dtype.is_floating_point or tuple(out.shape) != (module.out_features, module.in_features):
        raise TypeError(
            f"Could not dequantize the weight of a {type(module).__name__} (got {tuple(out.shape)}, {out.dtype}). The "
            "routed FFN can slice bitsandbytes 4-bit and 8-bit layers; load the base model without this quantization."
        )
    return out.detach()


def check_quantized_modules_to_save(model: nn.Module, names: Iterable[str] | None) -> None:
    """A module to train and save (`modules_to_save`, which PEFT fills with `classifier`/`score` for sequence
    classification) cannot be a quantized layer: it has no floating-point weight to train. Raise a clear error
    before PEFT fails on `requires_grad_` of an integer tensor."""
    if not names:
        return
    names = [names] if isinstance(names, str) else list(names)
    for module_name, module in model.named_modules():
        last = module_name.rpartition(".")[2]
        if not any(module_name == n or last == n or module_name.endswith("." + n) for n in names):
            continue
        if any(is_quantized(m) for m in module.modules()):
            raise ValueError(
                f"modules_to_save includes {module_name!r}, but it is quantized ({type(module).__name__}): its "
                "integer weights cannot be trained. Load the base model with the head left unquantized, e.g. "
                f"BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=[{last!r}]) (the option applies to "
                "4-bit and 8-bit), or drop it from modules_to_save."
            )
