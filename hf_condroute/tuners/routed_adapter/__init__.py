from .config import ROUTED_ADAPTER_TARGET_MODULES, RoutedAdapterConfig
from .conv import FeatureMap
from .layer import Linear, RoutedAdapterLayer
from .model import RoutedAdapterModel

__all__ = [
    "ROUTED_ADAPTER_TARGET_MODULES",
    "FeatureMap",
    "Linear",
    "RoutedAdapterConfig",
    "RoutedAdapterLayer",
    "RoutedAdapterModel",
]
