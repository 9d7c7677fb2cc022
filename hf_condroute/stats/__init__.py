"""Routing statistics gathered over many batches: what `RoutingStatsCallback` logs and what `save_pretrained`
writes to `routing_stats.json`.

`RoutingStatsAccumulator` keeps only sums that add up exactly over batches and processes (expert counts, the
counts behind the tag/subnetwork F1 matrix), so memory does not grow with the data and `merge_processes()`
makes every rank hold the statistics of the whole (distributed) run. `compute()` turns them into a
`RoutingStats`. Statistics are kept on the model per adapter (`set_routing_stats` / `get_routing_stats`), which is
where the save hook finds them; `compute_routing_stats(model, dataloader)` does all of it for a custom loop.
"""

from .accumulator import RoutingStatsAccumulator
from .compute import compute_routing_stats
from .records import BlockStats, RoutingStats, tag_labels
from .store import block_info, get_routing_stats, routed_blocks, set_routing_stats

__all__ = [
    "BlockStats",
    "RoutingStats",
    "RoutingStatsAccumulator",
    "block_info",
    "compute_routing_stats",
    "get_routing_stats",
    "routed_blocks",
    "set_routing_stats",
    "tag_labels",
]
