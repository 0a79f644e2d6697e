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


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lambda_rank", "x", "lambda_rank must be a number >= 0.*got 'x'"),
        ("lambda_rank", [1], r"lambda_rank must be a number >= 0.*got \[1\]"),
        ("threshold", "2e-3", "threshold must be a positive number, got '2e-3'"),
        ("target_fraction", "0.05", "target_fraction must be a number strictly between 0 and 1.*got '0.05'"),
        ("rank_min_dim", 6.5, "rank_min_dim must be an integer >= 0, got 6.5"),
        ("rank_seed", "0", "rank_seed must be an integer, got '0'"),
        ("include_bias", "yes", "include_bias must be true or false, got 'yes'"),
        ("init_weights", 1, "init_weights must be true or false, got 1"),
        ("target_modules", 5, "target_modules must be a module name, a list of names or a regex.*got 5"),
        ("exclude_modules", ["a", 1], r"exclude_modules must be a module name.*got \['a', 1\]"),
    ],
)
def test_a_field_of_the_wrong_kind_gets_one_clear_error(tmp_path, field, value, message):
    import json

    with pytest.raises(ValueError, match=message):
        SaRAConfig(**{field: value})
    SaRAConfig().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(tmp_path)
