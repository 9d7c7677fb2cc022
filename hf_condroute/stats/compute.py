"""`compute_routing_stats(model, dataloader)`: the statistics of an evaluation pass, for a custom loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..block.api import _active_adapter, get_routing
from .accumulator import RoutingStatsAccumulator
from .records import RoutingStats
from .store import set_routing_stats


@torch.no_grad()
def compute_routing_stats(
    model: nn.Module,
    dataloader,
    tags_per_group: int | Sequence[int] | None = None,
    tag_names: Sequence[str] | None = None,
    adapter_name: str | None = None,
    split: str = "eval",
    max_batches: int | None = None,
    store: bool = True,
) -> RoutingStats:
    """Run the model in eval mode over `dataloader` (batches of model kwargs, with `routing_tags` for
    Focus/Cover) and return its routing statistics; `store=True` keeps them on the model for `save_pretrained`.
    Under torch.distributed call it on every rank with that rank's shard: the result covers all of them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    acc = RoutingStatsAccumulator(tags_per_group, tag_names)
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"compute_routing_stats needs batches that map input names to tensors, got {type(batch).__name__}: "
                    "use a collator that returns a dict or a BatchEncoding (as the Trainer does)."
                )
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            model(**batch)
            routing = get_routing(model, adapter_name)
            if not routing:
                raise ValueError(
                    f"The forward recorded no routing for adapter {_active_adapter(model, adapter_name)!r}: make it "
                    "the active adapter with `model.set_adapter(...)`."
                )
            acc.update(routing, batch.get("routing_tags"))
    finally:
        model.train(was_training)
    acc.merge_processes()
    if acc.empty:
        raise ValueError("The dataloader gave no batches: there is nothing to compute statistics on.")
    stats = acc.compute(split, model=model, adapter_name=adapter_name)
    if store:
        set_routing_stats(model, stats, adapter_name)
    return stats
