"""No empty adapter on save: the adapter's tensors that DeepSpeed ZeRO-3 partitioned across processes.

ZeRO-3 keeps on each process only a slice of every parameter (`param.ds_tensor`); the parameter itself holds an
empty placeholder between forwards. PEFT's `save_pretrained` reads the model's state dict, so outside a gathering
block it would write every partitioned tensor with 0 elements, without an error. Before a routed adapter is saved,
`check_adapter_tensors` looks at what would be written:

- everything complete (no ZeRO-3, parameters gathered by the caller, or a full `state_dict=` such as
  `Trainer.save_model` passes, gathered): the save goes ahead;
- partitioned parameters, or a `state_dict=` that lacks some of the adapter's tensors or holds empty ones: the save
  is refused, with an error that says how to save. The save does not gather the parameters itself: gathering is a
  collective that every process must enter at once, and a save called on rank 0 only would then wait forever.
"""

from __future__ import annotations

import torch
from torch import nn

from ..stats.adapter_files import ZERO3_SAVE_HINT


def zero3_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 manages the model's parameters (each carries its partition's metadata)."""
    return any(hasattr(p, "ds_numel") for p in model.parameters())


def _saved_keys(model: nn.Module, adapter_name: str, live: dict[str, torch.Tensor]) -> list[str]:
    """The model's state-dict keys whose tensors PEFT saves for the adapter: PEFT's own selection, traced back by
    identity (it passes the tensors through and renames the keys)."""
    from peft import get_peft_model_state_dict

    picked = get_peft_model_state_dict(model, state_dict=live, adapter_name=adapter_name, save_embedding_layers=False)
    ids = {id(t) for t in picked.values()}
    return [key for key, t in live.items() if id(t) in ids]


def check_adapter_tensors(model: nn.Module, adapter_names, state_dict: dict | None) -> None:
    """Raise if a save would write an adapter with missing or 0-element tensors (see the module docstring); nothing
    is checked for a model that ZeRO-3 does not manage."""
    if not zero3_partitioned(model):
        return
    live = model.state_dict()
    source = live if state_dict is None else state_dict
    for name in adapter_names:
        keys = _saved_keys(model, name, live)
        missing = [k for k in keys if k not in source]
        empty = [k for k in keys if k in source and source[k].numel() == 0]
        if not (missing or empty):
            continue
        if state_dict is None:
            problem = (
                f"{len(empty)} of its {len(keys)} tensors (e.g. {empty[0]}) are partitioned by DeepSpeed ZeRO-3 "
                "across the processes and would be written with 0 elements; gathering them needs every "
                "process at once."
            )
        else:
            shown = (missing or empty)[0]
            problem = (
                f"the `state_dict` passed lacks {len(missing)} and holds {len(empty)} empty of its {len(keys)} "
                f"tensors (e.g. {shown}), as the Trainer passes when DeepSpeed could not gather the weights."
            )
        raise ValueError(f"Not saving routed adapter {name!r}, which would be incomplete: {problem} {ZERO3_SAVE_HINT}")
