"""The adapter weights that routing statistics and a card are saved beside: refused when empty."""

from __future__ import annotations

import math
import os

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's file name
# how to save an adapter whose parameters DeepSpeed ZeRO-3 partitioned (the save hook's refusal says it too)
ZERO3_SAVE_HINT = (
    'With the Trainer, set `"stage3_gather_16bit_weights_on_model_save": true` in the DeepSpeed config and save '
    "with `trainer.save_model()`. In a loop of your own, on every process: `state_dict = "
    "accelerator.get_state_dict(model)` (or `with deepspeed.zero.GatheredParameters(list(model.parameters())):` "
    "around the save), then `model.save_pretrained(folder, state_dict=state_dict, is_main_process=rank == 0)`."
)


def check_adapter_weights(folder: str) -> None:
    """Statistics and a card describe the adapter saved beside them: refuse beside an empty one, as PEFT's
    `save_pretrained` writes from parameters that DeepSpeed ZeRO-3 partitioned (0-element tensors)."""
    path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        sizes = {key: math.prod(f.get_slice(key).get_shape()) for key in f.keys()}
    empty = [key for key, size in sizes.items() if size == 0]
    if not sizes or empty:
        raise ValueError(
            f"{path} holds {len(empty)} tensors with 0 elements of {len(sizes)} (e.g. {(empty or ['none'])[0]}): "
            "an adapter saved from parameters that DeepSpeed ZeRO-3 partitioned, so routing statistics and a card "
            f"would describe an adapter that is not there. Save the adapter again first. {ZERO3_SAVE_HINT}"
        )
