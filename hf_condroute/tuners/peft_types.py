"""Our PEFT types, spliced into PEFT's closed `PeftType` enum (`register_peft_method` accepts no other names), for
the PEFT versions this package was checked against: importing with another version is refused here, before any
config or patch exists. The configs import their type from here; `peft_patches` registers the tuners."""

from __future__ import annotations

import peft
from packaging.version import Version
from peft.utils.peft_types import PeftType

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


def check_peft_version() -> None:
    version = Version(peft.__version__)
    if not SUPPORTED_PEFT[0] <= version < SUPPORTED_PEFT[1]:
        raise ImportError(
            f"hf_condroute supports peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]} (its tuner registry), but peft "
            f"{version} is installed. Install a supported version: pip install 'peft>=0.21,<0.22'."
        )


def add_peft_type(name: str) -> PeftType:
    """PeftType[name], added to the enum's member maps if it is not there."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    try:
        type.__setattr__(PeftType, name, member)
    except AttributeError:
        pass
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


check_peft_version()
ROUTED_ADAPTER = add_peft_type("ROUTED_ADAPTER")
ROUTED_FFN = add_peft_type("ROUTED_FFN")
ROUTED_LORA = add_peft_type("ROUTED_LORA")
