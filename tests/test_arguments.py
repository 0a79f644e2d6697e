"""peft_sara.script_utils.arguments: the shared flags and --config files read with the command line's types."""

from __future__ import annotations

import argparse

import pytest

from peft_sara.script_utils.arguments import (
    ArgumentParser,
    add_model_and_output_arguments,
    add_sara_arguments,
    add_training_arguments,
    add_validation_and_hub_arguments,
    parse_args_with_config,
    tracker_config,
)
from peft_sara.script_utils.cli import UserInputError


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="train.py")
    add_model_and_output_arguments(parser, default_output_dir="out")
    add_sara_arguments(parser)
    add_training_arguments(parser)
    add_validation_and_hub_arguments(parser)
    return parser


def parse(tmp_path, yaml_text: str, *argv: str) -> argparse.Namespace:
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    return parse_args_with_config(make_parser(), ["--config", str(config), *argv])


def test_config_values_take_the_flags_types_and_the_command_line_wins(tmp_path):
    args = parse(tmp_path, "learning_rate: 1e-4\nmax_train_steps: 10\nrandom_flip: true\nseed: 3\n", "--seed", "4")
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)  # YAML reads "1e-4" as a string
    assert args.max_train_steps == 10 and args.random_flip is True and args.seed == 4
    assert {"learning_rate", "max_train_steps", "random_flip", "seed"} <= args.explicit
    assert args.command_line == {"seed", "config"}


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ('random_flip: "false"\n', "--random_flip must be true or false"),
        ("max_train_steps: 2.5\n", "--max_train_steps takes an integer"),
        ("learning_rate: fast\n", "--learning_rate takes a number"),
        ("seed: true\n", "--seed takes an integer"),
        ("lr_scheduler: cosin\n", "--lr_scheduler must be one of"),
        ("mixed_precision: fp8\n", "--mixed_precision must be one of"),
        ("no_such_flag: 1\n", "unknown flag"),
        ("- a list\n", "must be a mapping"),
    ],
)
def test_config_values_of_the_wrong_kind_are_refused(tmp_path, yaml_text, message):
    with pytest.raises(UserInputError, match=message):
        parse(tmp_path, yaml_text)


def test_command_line_errors_are_one_line():
    with pytest.raises(UserInputError, match=r"argument --lr_scheduler: invalid choice: 'cosin' .*train.py --help"):
        parse_args_with_config(make_parser(), ["--lr_scheduler", "cosin"])
    with pytest.raises(UserInputError, match="argument --seed: invalid int value: 'x'"):
        parse_args_with_config(make_parser(), ["--seed", "x"])


def test_tracker_config_keeps_scalars_and_never_the_token():
    args = argparse.Namespace(seed=1, threshold=2e-3, hub_token="secret", seeds=[1, 2], name="x", flag=True)
    assert tracker_config(args) == {"seed": 1, "threshold": 2e-3, "name": "x", "flag": True}


def test_export_lora_rank_is_a_rank_or_a_share_of_energy(tmp_path):
    assert parse(tmp_path, "export_lora_rank: 16\n").export_lora_rank == 16
    assert parse(tmp_path, "export_lora_rank: 0.9\n").export_lora_rank == 0.9
    assert parse(tmp_path, "seed: 1\n", "--export_lora_rank", "1.0").export_lora_rank == 1.0  # all of the energy
    with pytest.raises(UserInputError, match="export_lora_rank takes a rank .* or a share of energy in"):
        parse(tmp_path, "export_lora_rank: 0\n")
    with pytest.raises(UserInputError, match="argument --export_lora_rank: rank must be an integer >= 1"):
        parse(tmp_path, "seed: 1\n", "--export_lora_rank", "-4")
