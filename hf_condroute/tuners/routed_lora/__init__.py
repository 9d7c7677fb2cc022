from .config import RoutedLoraConfig
from .layer import Linear, RoutedLoraLayer
from .model import RoutedLoraModel

__all__ = ["Linear", "RoutedLoraConfig", "RoutedLoraLayer", "RoutedLoraModel"]
