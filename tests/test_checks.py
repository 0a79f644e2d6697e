"""peft_sara.script_utils.checks: bad values of the shared flags are refused before any model loads."""

from __future__ import annotations

import importlib.util
import math

import pytest
from test_arguments import make_parser

from peft_sara.script_utils.arguments import DEFAULT_THRESHOLD, parse_args_with_config
from peft_sara.script_utils.checks import _check_output_dir_writable, check_common_arguments
from peft_sara.script_utils.cli import UserInputError


def checked(tmp_path, *argv: str, config: str | None = None):
    base = [
        "--pretrained_model_name_or_path",
        "some/base",
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
    ]
    if config is not None:
        (tmp_path / "preset.yaml").write_text(config)
        base += ["--config", str(tmp_path / "preset.yaml")]
    args = parse_args_with_config(make_parser(), [*base, *argv])
    check_common_arguments(args)
    return args


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_grad_norm", "-1"], "--max_grad_norm must be a positive number"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a positive number"),
        (["--checkpoints_total_limit", "-2"], "--checkpoints_total_limit must be at least 1"),
        (["--learning_rate=-1e-4"], "--learning_rate must be a positive number"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
        (["--adam_beta1", "1.0"], r"--adam_beta1 must be in \[0, 1\)"),
        (["--adam_beta2", "-0.1"], r"--adam_beta2 must be in \[0, 1\)"),
        (["--adam_weight_decay", "-1"], "--adam_weight_decay must be zero or positive"),
        (["--progressive_step", "0"], "--progressive_step must be at least 1"),
        (["--progressive_step", "5", "--no_progressive"], "either --progressive_step or --no_progressive"),
        (["--threshold", "1e-3", "--target_fraction", "0.1"], "either --threshold .* or --target_fraction"),
        (
            ["--train_text_encoder", "--text_encoder_threshold", "-1"],
            "--text_encoder_threshold: threshold must be a positive",
        ),
        (["--text_encoder_threshold", "1e-3"], "--text_encoder_threshold needs --train_text_encoder"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be at least 0"),
        (["--resolution", "30"], "multiple of 8"),
        (["--resume_from_checkpoint", "nowhere"], "no such checkpoint folder"),
        (["--report_to", "mlflowx"], "unknown tracker"),
        (["--export_lora_rank", "8", "--include_bias"], "--export_lora_rank cannot go with --include_bias"),
    ],
)
def test_bad_values_are_refused(tmp_path, argv, message):
    with pytest.raises(UserInputError, match=message):
        checked(tmp_path, *argv)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="--report_to wandb needs the wandb package"):
        checked(tmp_path, "--report_to", "wandb")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_attention_without_xformers_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="needs xformers: pip install xformers"):
        checked(tmp_path, "--enable_xformers_memory_efficient_attention")


def test_threshold_defaults_and_gives_way_to_a_fraction_from_the_command_line(tmp_path):
    assert checked(tmp_path).threshold == DEFAULT_THRESHOLD
    args = checked(tmp_path, "--target_fraction", "0.1", config="threshold: 0.002\n")
    assert (args.threshold, args.target_fraction) == (None, 0.1)
    args = checked(tmp_path, "--threshold", "0.01", config="target_fraction: 0.1\n")
    assert (args.threshold, args.target_fraction) == (0.01, None)
    assert math.isclose(checked(tmp_path, "--learning_rate", "1e-4").learning_rate, 1e-4)


def test_output_dir_must_be_writable(tmp_path):
    _check_output_dir_writable(str(tmp_path / "new" / "deeper"))  # creatable: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="not writable"):
        _check_output_dir_writable(str(tmp_path / "file" / "out"))


def test_resume_names_a_checkpoint_in_the_output_dir_and_a_new_run_never_starts_among_old_checkpoints(tmp_path):
    (tmp_path / "out" / "checkpoint-6").mkdir(parents=True)
    checked(tmp_path, "--resume_from_checkpoint", "checkpoint-6")  # relative to --output_dir, as in diffusers
    checked(tmp_path, "--resume_from_checkpoint", "latest")
    with pytest.raises(UserInputError, match="holds the checkpoints of an earlier run \\(checkpoint-6\\)"):
        checked(tmp_path)
