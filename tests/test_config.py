"""SaRAConfig: defaults, validation and round trips through peft's config loading."""

from __future__ import annotations

import pytest
from peft import PeftConfig

from peft_sara import SARA, SaRAConfig


def test_defaults_are_the_papers():
    config = SaRAConfig()
    assert (config.threshold, config.lambda_rank, config.target_modules) == (2e-3, 5e-3, None)
    assert config.init_weights and config.peft_type == SARA and config.progressive_step is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=0), "threshold must be a positive finite"),
        (dict(threshold=-1e-3), "threshold must be a positive finite"),
        (dict(threshold=float("nan")), "threshold must be a positive finite"),
        (dict(threshold=float("inf")), "threshold must be a positive finite"),
        (dict(target_fraction=1.5), "target_fraction"),
        (dict(lambda_rank=-1.0), "lambda_rank"),
        (dict(progressive_step=-5), "progressive_step"),
        (dict(selection="smallest_first"), "selection must be one of smallest, largest, random"),
        (dict(selection="random", progressive_step=10), "cannot be combined with progressive_step"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SaRAConfig(**kwargs)


def test_peft_config_from_pretrained_needs_no_extra_step(tmp_path):
    SaRAConfig(threshold=3e-3, lambda_rank=0.0).save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SaRAConfig) and config.peft_type == SARA
    assert (config.threshold, config.lambda_rank) == (3e-3, 0.0)
    assert config.progressive_step is None


def test_list_targets_become_sets_as_in_peft():
    config = SaRAConfig(target_modules=["to_q", "to_k"], exclude_modules=["proj_out"])
    assert config.target_modules == {"to_q", "to_k"} and config.exclude_modules == {"proj_out"}
