"""What combines a router and an expert bank: the routed block, the per-forward context that the model's pre-hook
builds (`context.py`, `step.py`) and the reading API over it (`api.py`). Knows routers and experts, not PEFT."""

from .routed_block import (
    ROUTER_KEY,
    RoutedBlock,
    RoutedRows,
    RoutingInputs,
    check_router_fits,
    masked_mean,
    match_rows,
    select_tags,
)
from .step import RoutingRecord, RoutingStep

__all__ = [
    "ROUTER_KEY",
    "RoutedBlock",
    "RoutedRows",
    "RoutingInputs",
    "RoutingRecord",
    "RoutingStep",
    "check_router_fits",
    "masked_mean",
    "match_rows",
    "select_tags",
]
