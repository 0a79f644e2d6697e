"""Checks of the shared flags that need no model, so that bad input fails in a second, before anything loads."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

from ..config import SaRAConfig
from .arguments import DEFAULT_THRESHOLD
from .checkpoints import checkpoint_folders, parse_checkpoint_name, resolve_checkpoint_path
from .cli import UserInputError
from .pivotal import check_pivotal_prompts, new_tokens_by_abstraction

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}


def check_common_arguments(args: argparse.Namespace) -> None:
    """Refuse bad values of the shared flags; fill in `args.threshold` when neither θ nor a fraction was given."""
    if not args.pretrained_model_name_or_path:
        raise UserInputError("--pretrained_model_name_or_path is required (a Hub repo id or a local folder).")
    if args.resolution <= 0 or args.resolution % 8:
        raise UserInputError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}."
        )
    for flag in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "checkpointing_steps",
        "num_validation_images",
        "num_inference_steps",
        "validation_epochs",
        "lr_num_cycles",
    ):
        _at_least(flag, getattr(args, flag), 1)
    for flag in ("max_train_steps", "checkpoints_total_limit", "validation_steps", "progressive_step"):
        if getattr(args, flag) is not None:
            _at_least(flag, getattr(args, flag), 1)
    _at_least("lr_warmup_steps", args.lr_warmup_steps, 0)
    _at_least("dataloader_num_workers", args.dataloader_num_workers, 0)
    _check_numbers(args)
    _check_sara_flags(args)
    _check_output_dir_writable(args.output_dir)
    _check_resume(args.resume_from_checkpoint, args.output_dir)
    check_trackers(args.report_to)
    _check_installed(args.use_8bit_adam, "bitsandbytes", "--use_8bit_adam")
    _check_installed(
        args.enable_xformers_memory_efficient_attention, "xformers", "--enable_xformers_memory_efficient_attention"
    )
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise UserInputError(
            "Do not combine --report_to=wandb with --hub_token: the token would be logged. Use `hf auth login`."
        )


def _check_resume(resume_from: str | None, output_dir: str) -> None:
    """A named checkpoint must exist; a new run must not start in a folder holding another run's checkpoints, which
    a later `--resume_from_checkpoint latest` would take for its own."""
    if resume_from and resume_from != "latest":
        folder = resolve_checkpoint_path(resume_from, output_dir)
        if not folder.is_dir() or parse_checkpoint_name(folder.name) is None:
            raise UserInputError(
                f"--resume_from_checkpoint {resume_from}: no such checkpoint folder (expected checkpoint-<step>, in "
                f"--output_dir {output_dir} or as a path, or 'latest')."
            )
    elif not resume_from and Path(output_dir).is_dir() and (existing := checkpoint_folders(output_dir)):
        raise UserInputError(
            f"--output_dir {output_dir} holds the checkpoints of an earlier run ({existing[-1].name}): continue it "
            "with --resume_from_checkpoint latest, or start this run in another folder (or remove them)."
        )


def _at_least(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserInputError(f"--{flag} must be at least {minimum}, got {value}.")


def _check_numbers(args: argparse.Namespace) -> None:
    """Values the optimizer or the loss would accept and silently misuse (a negative clip norm is gradient ascent)."""
    positive = {"max_grad_norm": args.max_grad_norm, "adam_epsilon": args.adam_epsilon, "lr_power": args.lr_power}
    for flag in ("learning_rate", "text_encoder_lr"):
        if getattr(args, flag, None) is not None:
            positive[flag] = getattr(args, flag)
    if args.snr_gamma is not None:
        positive["snr_gamma"] = args.snr_gamma
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise UserInputError(f"--{flag} must be a positive number, got {value}.")
    for flag, value in {
        "adam_weight_decay": args.adam_weight_decay,
        "noise_offset": args.noise_offset,
        "prior_loss_weight": getattr(args, "prior_loss_weight", 0.0),
    }.items():
        if not (math.isfinite(value) and value >= 0):
            raise UserInputError(f"--{flag} must be zero or positive, got {value}.")
    for flag in ("adam_beta1", "adam_beta2"):
        value = getattr(args, flag)
        if not 0 <= value < 1:
            raise UserInputError(f"--{flag} must be in [0, 1), got {value}.")


def _check_sara_flags(args: argparse.Namespace) -> None:
    if args.threshold is not None and args.target_fraction is not None:
        # a preset's θ gives way to a fraction asked for on the command line, and the other way round
        if "target_fraction" in args.command_line and "threshold" not in args.command_line:
            args.threshold = None
        elif "threshold" in args.command_line and "target_fraction" not in args.command_line:
            args.target_fraction = None
    if args.threshold is not None and args.target_fraction is not None:
        raise UserInputError(
            "Give either --threshold (θ itself) or --target_fraction (the share of weights to train), not both."
        )
    if args.no_progressive and args.progressive_step is not None:
        raise UserInputError("Give either --progressive_step or --no_progressive, not both.")
    if args.threshold is None and args.target_fraction is None:
        args.threshold = DEFAULT_THRESHOLD
    try:
        SaRAConfig(
            threshold=args.threshold if args.threshold is not None else DEFAULT_THRESHOLD,
            target_fraction=args.target_fraction,
            lambda_rank=args.lambda_rank,
            progressive_step=args.progressive_step,
        )
    except ValueError as error:
        raise UserInputError(str(error)) from error
    if args.text_encoder_threshold is not None:
        try:
            SaRAConfig(threshold=args.text_encoder_threshold)
        except ValueError as error:
            raise UserInputError(f"--text_encoder_threshold: {error}") from error
    if args.text_encoder_lr is not None and not (args.train_text_encoder or getattr(args, "train_text_encoder_ti", 0)):
        raise UserInputError("--text_encoder_lr needs --train_text_encoder (or --train_text_encoder_ti).")
    if args.text_encoder_threshold is not None and not args.train_text_encoder:
        raise UserInputError("--text_encoder_threshold needs --train_text_encoder.")
    if args.include_bias and args.export_lora_rank is not None:
        raise UserInputError(
            "--export_lora_rank cannot go with --include_bias: a LoRA cannot express bias updates. Drop one of them "
            "(scripts/export_lora.py --allow_partial exports a trained adapter without its bias updates)."
        )


def check_pivotal_arguments(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """Refuse bad pivotal-tuning flags; the new tokens of each abstraction with --train_text_encoder_ti, else None.

    --train_text_encoder_ti and --train_text_encoder exclude each other, as in diffusers' advanced scripts: the text
    encoder trains either its new tokens' embeddings or its SaRA adapter.
    """
    for flag in ("train_text_encoder_ti_frac", "train_text_encoder_frac"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and 0 < value <= 1):
            raise UserInputError(f"--{flag} must be a share of the run in (0, 1], got {value}.")
    if "train_text_encoder_frac" in args.explicit and not args.train_text_encoder:
        raise UserInputError("--train_text_encoder_frac needs --train_text_encoder.")
    if not args.train_text_encoder_ti:
        ti_flags = args.explicit & {
            "token_abstraction",
            "num_new_tokens_per_abstraction",
            "train_text_encoder_ti_frac",
            "enable_t5_ti",
        }
        if ti_flags:
            raise UserInputError(f"--{sorted(ti_flags)[0]} needs --train_text_encoder_ti.")
        return None
    if args.train_text_encoder:
        raise UserInputError(
            "Give either --train_text_encoder (a SaRA adapter on the text encoder) or --train_text_encoder_ti (new "
            "tokens' embeddings), not both, as in diffusers' advanced DreamBooth scripts."
        )
    new_tokens = new_tokens_by_abstraction(args.token_abstraction, args.num_new_tokens_per_abstraction)
    class_prompt = args.class_prompt if args.with_prior_preservation else None  # else it samples nothing
    check_pivotal_prompts(new_tokens, args.instance_prompt or "", args.validation_prompt, class_prompt)
    return new_tokens


def _check_output_dir_writable(output_dir: str) -> None:
    existing = Path(output_dir).resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"--output_dir {output_dir} is not writable ({existing} does not accept new files).")


def check_trackers(report_to: str) -> None:
    """Refuse a tracker that is unknown or not installed: the run would otherwise train to the end logging nothing."""
    if report_to in ("none", "all"):
        return
    for name in report_to.split(","):
        if name not in TRACKER_PACKAGES:
            raise UserInputError(
                f"--report_to {name}: unknown tracker; use one of {sorted(TRACKER_PACKAGES)}, 'all' or 'none'."
            )
        if not any(importlib.util.find_spec(package) for package in TRACKER_PACKAGES[name]):
            raise UserInputError(
                f"--report_to {name} needs the {TRACKER_PACKAGES[name][0]} package: pip install "
                f"{TRACKER_PACKAGES[name][0]}, or pass --report_to none."
            )


def _check_installed(wanted: bool, package: str, flag: str) -> None:
    if wanted and importlib.util.find_spec(package) is None:
        raise UserInputError(f"{flag} needs {package}: pip install {package}")
