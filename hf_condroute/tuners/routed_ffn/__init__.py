from ...architectures import ROUTED_FFN_TARGET_MODULES
from .config import RoutedFFNConfig
from .layer import FFNOutputPassthrough, RoutedFFN, RoutedFFNLayer
from .model import RoutedFFNModel

__all__ = [
    "ROUTED_FFN_TARGET_MODULES",
    "FFNOutputPassthrough",
    "RoutedFFN",
    "RoutedFFNConfig",
    "RoutedFFNLayer",
    "RoutedFFNModel",
]
