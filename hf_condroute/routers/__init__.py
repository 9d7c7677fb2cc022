"""Every router of both papers behind one interface, in a registry by name.

`ROUTERS` lists the names; `register_router` adds one (e.g. from a user's package); `build_router` makes one
for a block.
"""

from __future__ import annotations

from .base import Router, RouterNetwork, RoutingDecision
from .comet import CometRouter
from .dselect_k import DSelectKRouter
from .expert_choice import ExpertChoiceRouter
from .gumbel import STGumbelRouter
from .heuristic import HashRouter, MonolithicRouter, TagRouter
from .moesart import MoesartRouter
from .registry import ROUTERS, build_router, register_router, router_class
from .reinforce import ReinforceRouter
from .smear import SmearRouter
from .softmax import SoftmaxRouter
from .top_k import SMoERouter, TopKRouter, VMoERouter, XMoERouter

for _cls in (
    TagRouter,
    HashRouter,
    MonolithicRouter,
    TopKRouter,
    STGumbelRouter,
    ReinforceRouter,
    SoftmaxRouter,
    VMoERouter,
    SMoERouter,
    ExpertChoiceRouter,
    XMoERouter,
    MoesartRouter,
    SmearRouter,
    DSelectKRouter,
    CometRouter,
):
    register_router(_cls)

__all__ = ["ROUTERS", "Router", "RouterNetwork", "RoutingDecision", "build_router", "register_router", "router_class"]
