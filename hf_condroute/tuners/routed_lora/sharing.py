"""One router shared by several targets (`router_sharing`): the group's first target owns a real router; the others
get a `SharedRouter` that hands them the decision the owner made in the same forward.

The owner's router network runs once per forward (and again in a gradient-checkpointing recomputation, which the
others then follow); the auxiliary losses are attached once, through the owner's block. Every target still
records the decision under its own name, so `get_routing` lists each of them."""

from __future__ import annotations

import re

from ...routers import Router
from ...routers.base import RoutingDecision
from .config import LAYER_SHARING

_LAST_INDEX = re.compile(r"^(.*\.\d+)\.")


def sharing_group(module_name: str, sharing: str | None) -> str | None:
    """The group of a target under `router_sharing`, or None when it keeps a router of its own."""
    if sharing is None:
        return None
    if sharing == LAYER_SHARING:
        match = _LAST_INDEX.match(module_name)
        return match.group(1) if match else None
    match = re.search(sharing, module_name)
    return match.group(0) if match else None


class DecisionHolder:
    """The latest decision of a group's router, with the forward (RoutingStep id) it was made in; filled by a forward
    hook on the owner's router."""

    def __init__(self, owner: str):
        self.owner = owner
        self.step: int | None = None
        self.decision: RoutingDecision | None = None

    def capture(self, module, args, kwargs, output: RoutingDecision) -> None:
        self.step = kwargs.get("step")
        self.decision = output


class SharedRouter(Router):
    """Routes as the group's owner did in this forward. Not registered: it is never named in a config."""

    name = "shared"
    learned = False
    uses_top_k = False

    def __init__(self, holder: DecisionHolder, owner: Router, block_name: str = ""):
        super().__init__(owner.in_features, owner.num_experts, owner.config, block_name)
        self.__dict__["holder"] = holder  # plain reference: nothing of the owner is saved twice

    def forward(self, x, tags=None, keys=None, step: int | None = None, valid=None) -> RoutingDecision:
        holder = self.holder
        decision = holder.decision
        if decision is None or holder.step != step:
            raise RuntimeError(
                f"{self.block_name} shares the router of {holder.owner} (router_sharing), which has not routed in this "
                "forward: a shared router routes on the input of its group's first target, so that target must run "
                "first. Choose a router_sharing whose groups lie inside one layer, in forward order."
            )
        if decision.experts.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"{self.block_name} routes {x.shape[0]} rows but shares the decision of {holder.owner}, made for "
                f"{decision.experts.shape[0]}: the targets of a router_sharing group must see the same tokens. "
                "Group targets that process the same sequence (not cross-attention keys and values)."
            )
        return decision

    def extra_repr(self) -> str:
        return f"shares={self.holder.owner!r}"
