"""The registry of routers by name. It imports nothing of the package, so `RoutingConfig` can check a router name
and read its capability flags without importing the routers (the routers package fills it on import). Entries are
`Router` subclasses; the annotations say `type` so that this module stays free of imports."""

from __future__ import annotations

_REGISTRY: dict[str, type] = {}


# a live view of the registry's names: routers registered later appear in it too
ROUTERS = _REGISTRY.keys()


def register_router(cls: type) -> type:
    """Register a Router subclass under `cls.name` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`; set the class attribute `name = '...'`.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A router named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
    _REGISTRY[cls.name] = cls
    return cls


def router_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown router {name!r}. Valid routers: {', '.join(_REGISTRY)}. Set `router=` to one of them."
        )
    return _REGISTRY[name]


def build_router(config, in_features: int, block_name: str = ""):
    """The router `config.router` for a block whose routing input has `in_features` features."""
    return router_class(config.router)(in_features, config.num_experts, config, block_name)
