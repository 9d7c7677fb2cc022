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
from .reinforce import ReinforceRouter
from .smear import SmearRouter
from .softmax import SoftmaxRouter
from .top_k import SMoERouter, TopKRouter, VMoERouter, XMoERouter

_REGISTRY: dict[str, type[Router]] = {}


# a live view of the registry's names: routers registered later appear in it too
ROUTERS = _REGISTRY.keys()


def register_router(cls: type[Router]) -> type[Router]:
    """Register a Router subclass under `cls.name` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`; set the class attribute `name = '...'`.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A router named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
    _REGISTRY[cls.name] = cls
    return cls


def router_class(name: str) -> type[Router]:
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown router {name!r}. Valid routers: {', '.join(_REGISTRY)}. Set `router=` to one of them."
        )
    return _REGISTRY[name]


def build_router(config, in_features: int, block_name: str = "") -> Router:
    """The router `config.router` for a block whose routing input has `in_features` features."""
    return router_class(config.router)(in_features, config.num_experts, config, block_name)


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
