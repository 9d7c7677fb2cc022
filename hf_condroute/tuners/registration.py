"""Registration of our tuners with PEFT (guarded by PEFT's version: it relies on PEFT's registries)."""

from __future__ import annotations

import peft
from packaging.version import Version

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


def register_peft_types() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .peft_types import ROUTED_ADAPTER, ROUTED_FFN
    from .routed_adapter import RoutedAdapterConfig, RoutedAdapterModel
    from .routed_ffn import RoutedFFNConfig, RoutedFFNModel

    version = Version(peft.__version__)
    if not SUPPORTED_PEFT[0] <= version < SUPPORTED_PEFT[1]:
        raise ImportError(
            f"hf_condroute supports peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]} (its tuner registry), but peft "
            f"{version} is installed. Install a supported version: pip install 'peft>=0.21,<0.22'."
        )
    if ROUTED_ADAPTER not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="routed_adapter", config_cls=RoutedAdapterConfig, model_cls=RoutedAdapterModel)
    if ROUTED_FFN not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="routed_ffn", config_cls=RoutedFFNConfig, model_cls=RoutedFFNModel)
