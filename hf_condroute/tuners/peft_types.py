"""Our PEFT types, spliced into PEFT's closed `PeftType` enum so `register_peft_method` accepts them."""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def _add_member(name: str) -> PeftType:
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


ROUTED_ADAPTER = _add_member("ROUTED_ADAPTER")
ROUTED_FFN = _add_member("ROUTED_FFN")
