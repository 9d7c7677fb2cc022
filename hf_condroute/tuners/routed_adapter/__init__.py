from .config import ROUTED_ADAPTER_TARGET_MODULES, RoutedAdapterConfig
from .layer import Linear, RoutedAdapterLayer
from .model import RoutedAdapterModel

__all__ = ["ROUTED_ADAPTER_TARGET_MODULES", "Linear", "RoutedAdapterConfig", "RoutedAdapterLayer", "RoutedAdapterModel"]
