"""The training scripts' shared flags, and `--config FILE.yaml` read with the same types and choices as the command
line. The checks that need no model live in `checks`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from ..config import SaRAConfig
from .cli import UserInputError

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
INTERPOLATION_MODES = ("bilinear", "bicubic", "lanczos", "nearest", "box", "hamming")
DEFAULT_THRESHOLD = SaRAConfig().threshold


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown choice, a missing value) are one `error: ...` line, like every other
    bad input of the scripts, instead of the usage text followed by the error."""

    def error(self, message: str):
        raise UserInputError(f"{message} (see {self.prog} --help)")


# storage dtypes of --layerwise_casting: torch dtype names
LAYERWISE_CASTING_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv`, with defaults taken from the YAML file named by `--config` (the command line wins).

    `args.explicit` holds the flags the user set, in the file or on the command line, and `args.command_line` those set
    on the command line, so that a default can be told from a chosen value (a resumed run keeps its checkpoint's
    progressive step unless one is asked for) and a file's value from the command line's.
    """
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file of flag values (e.g. configs/presets/dreambooth.yaml); the command line overrides it.",
    )
    known, _ = parser.parse_known_args(argv)
    from_file = read_config_file(parser, known.config) if known.config else {}
    parser.set_defaults(**from_file)
    args = parser.parse_args(argv)
    defaults = {action.dest: action.default for action in parser._actions}
    args.command_line = {dest for dest, value in vars(args).items() if value != defaults.get(dest)}
    args.explicit = set(from_file) | args.command_line
    return args


def read_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The flag values of a YAML file, converted and checked as the command line would convert and check them."""
    import yaml

    if not os.path.isfile(path):
        raise UserInputError(f"--config {path}: no such file.")
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise UserInputError(f"--config {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise UserInputError(f"--config {path} must be a mapping of flag names to values.")
    actions = {action.dest: action for action in parser._actions}
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserInputError(f"--config {path} sets unknown flag(s) {unknown}; see --help for the flags.")
    return {key: _config_value(path, actions[key], value) for key, value in values.items()}


def _config_value(path: str, action: argparse.Action, value: Any) -> Any:
    flag = action.option_strings[0] if action.option_strings else action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserInputError(f"--config {path}: {flag} must be true or false, got {value!r}.")
        return value
    if value is None:
        return None
    if action.nargs not in (None, "?"):
        value = value if isinstance(value, list) else [value]
        return [_typed(path, flag, action, item) for item in value]
    return _typed(path, flag, action, value)


KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _typed(path: str, flag: str, action: argparse.Action, value: Any) -> Any:
    kind = action.type or str
    wrong = f"--config {path}: {flag} takes {KIND_NAMES.get(kind, kind.__name__)}, got {value!r}."
    if isinstance(value, (bool, list, dict)) or (kind is int and isinstance(value, float)):
        raise UserInputError(wrong)
    try:
        converted = kind(value)
    except (TypeError, ValueError) as error:
        raise UserInputError(wrong) from error
    if action.choices is not None and converted not in action.choices:
        raise UserInputError(f"--config {path}: {flag} must be one of {list(action.choices)}, got {value!r}.")
    return converted


def lora_rank(value: str | int | float) -> int | float:
    """A LoRA export rank from the command line or a config file: '16' is a rank, '0.9' a share of energy."""
    from ..export import check_rank, parse_rank

    try:
        return parse_rank(value) if isinstance(value, str) else check_rank(value)
    except ValueError as error:
        raise _RankError(str(error)) from error


class _RankError(argparse.ArgumentTypeError, ValueError):
    """argparse prints its message as it is; a config file's value is named by `_typed` as any wrong value."""


KIND_NAMES[lora_rank] = "a rank (an integer >= 1) or a share of energy in (0, 1]"


def add_model_and_output_arguments(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    group = parser.add_argument_group("model and output")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Base pipeline: a Hub repo id or a local folder saved by diffusers.",
    )
    group.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the base model's files, e.g. fp16.")
    group.add_argument(
        "--output_dir",
        type=str,
        default=default_output_dir,
        help="Where the adapters, checkpoints, images and model card are written.",
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    group.add_argument(
        "--save_precision",
        type=str,
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="Precision of the saved adapter values (bf16: half the file; checkpoints keep fp32).",
    )
    group.add_argument(
        "--export_lora_rank",
        type=lora_rank,
        default=None,
        help="At the end of training, also export the adapters as a LoRA into output_dir/lora/ (diffusers format, "
        "for pipe.load_lora_weights): a rank (e.g. 64) or a share of each layer's energy to keep (e.g. 0.9).",
    )
    group.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")


def add_sara_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SaRA")
    group.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"θ: train the UNet weights with |w| < θ (default {DEFAULT_THRESHOLD:g}, the paper's: about 5.8%% of "
        "SD 1.5's UNet). Give this or --target_fraction.",
    )
    group.add_argument(
        "--target_fraction",
        type=float,
        default=None,
        help="Instead of --threshold, train this share of the UNet's weights (e.g. 0.058); θ is resolved from it.",
    )
    group.add_argument(
        "--lambda_rank",
        type=float,
        default=SaRAConfig().lambda_rank,
        help="Weight of the nuclear-norm low-rank regulariser (paper: 5e-3; 0 disables it).",
    )
    group.add_argument(
        "--progressive_step",
        type=int,
        default=None,
        help="Optimizer step of the progressive re-selection (default: half of the run, as in the paper; a resumed "
        "run keeps its checkpoint's).",
    )
    group.add_argument("--no_progressive", action="store_true", help="Disable the progressive re-selection.")
    group.add_argument("--include_bias", action="store_true", help="Also train the bias entries below θ.")
    group.add_argument(
        "--text_encoder_threshold",
        type=float,
        default=None,
        help="θ for the text encoder with --train_text_encoder (default: --threshold; 2e-3 with --target_fraction).",
    )


def add_pivotal_arguments(parser: argparse.ArgumentParser, t5: bool = False) -> None:
    """Pivotal tuning and the text encoder's share of the run: the flags of diffusers' advanced DreamBooth scripts
    (with `t5`, for a base with a T5 encoder, --enable_t5_ti of diffusers' advanced Flux script)."""
    group = parser.add_argument_group("pivotal tuning (new tokens)")
    group.add_argument(
        "--train_text_encoder_ti",
        action="store_true",
        help="Pivotal tuning: --token_abstraction in the prompts becomes new tokens <s0><s1>... whose embeddings "
        "train with the adapters (textual inversion); not with --train_text_encoder, as in diffusers.",
    )
    if t5:
        group.add_argument(
            "--enable_t5_ti",
            action="store_true",
            help="With --train_text_encoder_ti: the new tokens train in T5 too (saved as t5), not only in CLIP; T5 "
            "then stays in the run and encodes the prompts at every step.",
        )
    group.add_argument(
        "--token_abstraction",
        type=str,
        default="TOK",
        help='Identifier of the subject in the prompts, e.g. "a photo of TOK dog"; several: "TOK,STYLE".',
    )
    group.add_argument(
        "--num_new_tokens_per_abstraction",
        type=int,
        default=2,
        help="New tokens per identifier: TOK becomes <s0><s1> with 2.",
    )
    group.add_argument(
        "--train_text_encoder_ti_frac",
        type=float,
        default=0.5,
        help="Share of the run's optimizer steps during which the new tokens train (then they stay as they are).",
    )
    group.add_argument(
        "--train_text_encoder_frac",
        type=float,
        default=1.0,
        help="With --train_text_encoder: share of the run's optimizer steps during which the text encoder's adapter "
        "trains.",
    )


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--resolution", type=int, default=512, help="Training resolution; images are resized and cropped to it."
    )
    group.add_argument("--center_crop", action="store_true", help="Crop at the centre instead of at random.")
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    group.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="bilinear",
        choices=INTERPOLATION_MODES,
        help="Resampling filter used to resize the training images.",
    )
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every training image with the VAE once, before training (faster steps; the crop and flip of "
        "each image are then drawn once).",
    )
    group.add_argument("--train_text_encoder", action="store_true", help="Train SaRA on the text encoder too.")
    group.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, unless --max_train_steps is given.")
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs."
    )
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step."
    )
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Trade compute for memory in the UNet (and text encoder).",
    )
    group.add_argument(
        "--layerwise_casting",
        choices=LAYERWISE_CASTING_DTYPES,
        default=None,
        help="Store the frozen UNet's weights in this fp8 dtype and cast each layer to the run's precision only while "
        "it computes (diffusers' enable_layerwise_casting): its Linear and Conv weights take half of bf16's memory. "
        "SaRA's values, gradients and optimizer state stay fp32.",
    )
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers' memory-efficient attention in the UNet (xformers must be installed).",
    )
    group.add_argument(
        "--learning_rate", type=float, default=None, help="Learning rate; default: the paper's 1e-3·exp(-350·θ)."
    )
    group.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="Learning rate of what trains in the text encoders (their adapters, or new tokens); default: "
        "--learning_rate.",
    )
    group.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by processes × accumulation × batch size."
    )
    group.add_argument(
        "--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule."
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning-rate schedule.")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument(
        "--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes (must be installed)."
    )
    group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (paper: 1e-2).")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (paper: 1.0).")
    group.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is common); off by default."
    )
    group.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (0.1 is common); off by default.")
    group.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Override the scheduler's prediction type.",
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides the accelerate config; SaRA values always stay fp32.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs and newer.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes.")
    group.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Trackers: "tensorboard" (default), "wandb", "comet_ml", "all" or "none".',
    )
    group.add_argument(
        "--tracker_project_name",
        type=str,
        default=None,
        help="Project name the trackers log under (default: the script's, e.g. sara-dreambooth).",
    )
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps."
    )
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder, or "latest" for the newest complete one in --output_dir.',
    )


def add_validation_and_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--validation_prompt", type=str, default=None, help="Prompt sampled during training and at the end."
    )
    group.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    group.add_argument("--validation_epochs", type=int, default=50, help="Validate every N epochs.")
    group.add_argument("--validation_steps", type=int, default=None, help="Validate every N optimizer steps instead.")
    group.add_argument("--num_inference_steps", type=int, default=25, help="Denoising steps of validation images.")
    group = parser.add_argument_group("Hub")
    group.add_argument(
        "--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints) to the Hub."
    )
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repo id; default: the output folder's name."
    )
    group.add_argument("--hub_token", type=str, default=None, help="Hub token; default: the logged-in user's.")


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags for the trackers: scalars only (TensorBoard's hparams take no lists), never the token."""
    return {
        key: value
        for key, value in vars(args).items()
        if isinstance(value, (int, float, str, bool)) and key != "hub_token"
    }
