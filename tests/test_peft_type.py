"""The SARA member of peft's PeftType enum and the registration that `import peft_sara` performs."""

from __future__ import annotations

import importlib

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import peft_sara
from peft_sara import SARA, SaRAConfig, SaRAModel


def test_sara_is_a_real_member_of_the_enum():
    assert PeftType.SARA is SARA
    assert PeftType("SARA") is SARA and PeftType["SARA"] is SARA
    assert SARA in list(PeftType) and SARA == "SARA" and SARA.name == "SARA"
    assert isinstance(SARA, PeftType) and hash(SARA) == hash("SARA")


def test_registration_maps_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[SARA] is SaRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[SARA] is SaRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[SARA] == "sara_"


def test_importing_again_registers_nothing_twice():
    members = list(PeftType)
    importlib.reload(importlib.import_module("peft_sara.peft_type"))
    importlib.reload(peft_sara)
    assert list(PeftType) == members
