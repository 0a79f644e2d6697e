"""The "SARA" member of peft's `PeftType` enum.

peft keys every method by a `PeftType` member and offers no way for an out-of-tree method to add one: the enum can
be neither subclassed nor assigned to. We add the member to the enum's internal tables, once, and use the one peft
ships if a future release has it.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def _sara_member() -> PeftType:
    if "SARA" in PeftType.__members__:
        return PeftType.SARA
    member = str.__new__(PeftType, "SARA")
    member._name_ = "SARA"
    member._value_ = "SARA"
    member.__objclass__ = PeftType
    member.__init__("SARA")
    PeftType._member_map_["SARA"] = member
    PeftType._member_names_.append("SARA")
    PeftType._value2member_map_["SARA"] = member
    hashable_values = getattr(PeftType, "_hashable_values_", None)  # Python >= 3.12
    if hashable_values is not None:
        hashable_values.append("SARA")
    type.__setattr__(PeftType, "SARA", member)
    return member


SARA: PeftType = _sara_member()
