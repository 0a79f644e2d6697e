"""What the training scripts in `scripts/` share: arguments, input checks, data, checkpoints, validation, model card.

The scripts themselves keep the training story (models, loop, loss) in their `main()`; this module holds the parts
that would otherwise be copied between them, written once and tested once.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import SaRAConfig
from .training import paper_learning_rate

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CHECKPOINT_PREFIX = "checkpoint-"
UNFINISHED_SUFFIX = ".unfinished"


class UserInputError(ValueError):
    """A problem with the command line or the data: reported as one line, without a traceback."""


def run_main(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Run a script's main(), turning a user error into one line on stderr and exit status 2."""
    try:
        main(None)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------- arguments


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv`, with defaults taken from the YAML file named by `--config` (the command line wins)."""
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file of flag values (e.g. configs/presets/dreambooth.yaml); the command line overrides it.",
    )
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_read_config_file(parser, known.config))
    return parser.parse_args(argv)


def _read_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
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
    known_flags = {action.dest for action in parser._actions}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - known_flags)
    if unknown:
        raise UserInputError(f"--config {path} sets unknown flag(s) {unknown}; see --help for the flags.")
    return values


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
    group.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")


def add_sara_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SaRA")
    defaults = SaRAConfig()
    group.add_argument(
        "--threshold",
        type=float,
        default=defaults.threshold,
        help="θ: train the UNet weights with |w| < θ (paper: 2e-3 ≈ 5.8%% of SD 1.5's UNet).",
    )
    group.add_argument(
        "--target_fraction",
        type=float,
        default=None,
        help="Instead of --threshold, train this share of the UNet's weights (e.g. 0.058).",
    )
    group.add_argument(
        "--lambda_rank",
        type=float,
        default=defaults.lambda_rank,
        help="Weight of the nuclear-norm low-rank regulariser (paper: 5e-3; 0 disables it).",
    )
    group.add_argument(
        "--progressive_step",
        type=int,
        default=None,
        help="Optimizer step of the progressive re-selection (default: half of the run, as in the paper).",
    )
    group.add_argument("--no_progressive", action="store_true", help="Disable the progressive re-selection.")
    group.add_argument("--include_bias", action="store_true", help="Also train the bias entries below θ.")
    group.add_argument(
        "--text_encoder_threshold",
        type=float,
        default=None,
        help="θ for the text encoder with --train_text_encoder (default: --threshold).",
    )


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--resolution", type=int, default=512, help="Training resolution; images are resized and cropped to it."
    )
    group.add_argument("--center_crop", action="store_true", help="Crop at the centre instead of at random.")
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
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
        "--learning_rate", type=float, default=None, help="Learning rate; default: the paper's 1e-3·exp(-350·θ)."
    )
    group.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by processes × accumulation × batch size."
    )
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".',
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
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps."
    )
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder, or "latest" for the newest one in --output_dir.',
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


def check_common_arguments(args: argparse.Namespace) -> None:
    """Refuse bad input that needs no model, before anything is loaded."""
    if not args.pretrained_model_name_or_path:
        raise UserInputError("--pretrained_model_name_or_path is required (a Hub repo id or a local folder).")
    if args.resolution <= 0 or args.resolution % 8:
        raise UserInputError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}."
        )
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UserInputError(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    try:
        SaRAConfig(
            threshold=args.threshold,
            target_fraction=args.target_fraction,
            lambda_rank=args.lambda_rank,
            progressive_step=args.progressive_step,
        )
    except ValueError as error:
        raise UserInputError(str(error)) from error
    if args.learning_rate is None:
        args.learning_rate = paper_learning_rate(args.threshold)
    _check_output_dir_writable(args.output_dir)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        resume_from = Path(args.resume_from_checkpoint)
        if not resume_from.is_dir() or not resume_from.name[len(CHECKPOINT_PREFIX) :].isdigit():
            raise UserInputError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder (expected "
                f"{CHECKPOINT_PREFIX}<step> under the output folder, or 'latest')."
            )
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise UserInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
    if args.push_to_hub and args.hub_token is not None and args.report_to == "wandb":
        raise UserInputError(
            "Do not combine --report_to=wandb with --hub_token: the token would be logged. Use `hf auth login`."
        )


def _check_output_dir_writable(output_dir: str) -> None:
    existing = Path(output_dir).resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"--output_dir {output_dir} is not writable ({existing} does not accept new files).")


# ------------------------------------------------------------------------------------------------------------ data


def list_images(folder: str, flag: str) -> list[Path]:
    """The readable images of a folder, sorted; unreadable files are skipped with a warning while others remain."""
    path = Path(folder)
    if not path.is_dir():
        raise UserInputError(f"{flag} {folder}: no such folder.")
    candidates = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images, skipped = [], []
    for candidate in candidates:
        try:
            with Image.open(candidate) as image:
                image.verify()
            images.append(candidate)
        except (UnidentifiedImageError, OSError, SyntaxError):
            skipped.append(candidate.name)
    if skipped:
        logger.warning("Skipping %d file(s) in %s that are not readable images: %s", len(skipped), folder, skipped[:5])
    if not images:
        raise UserInputError(f"{flag} {folder} has no readable image (found {len(candidates)} file(s)).")
    return images


class ImageTransform:
    """Resize the short side to `resolution`, crop a square (centre or random), optionally flip; to [-1, 1] CHW."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool) -> None:
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = ImageOps.exif_transpose(image).convert("RGB")
        scale = self.resolution / min(image.size)
        width, height = (
            max(self.resolution, round(image.width * scale)),
            max(self.resolution, round(image.height * scale)),
        )
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = random.randint(0, width - self.resolution), random.randint(0, height - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and random.random() < 0.5:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def data_generator(seed: int | None) -> torch.Generator:
    """The data loader's own generator. Without one, starting an epoch draws from the global RNG, so a run resumed
    mid-epoch (which starts its epoch after restoring the RNG) would see other noise than the uninterrupted run."""
    return torch.Generator().manual_seed(seed if seed is not None else torch.initial_seed())


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids[0]


# ---------------------------------------------------------------------------------------------------------- the models


def load_base_models(args: argparse.Namespace):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of a Stable Diffusion pipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "revision": args.revision}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(subfolder="tokenizer", **source)
        noise_scheduler = DDPMScheduler.from_pretrained(subfolder="scheduler", **source)
        text_encoder = CLIPTextModel.from_pretrained(subfolder="text_encoder", variant=args.variant, **source)
        vae = AutoencoderKL.from_pretrained(subfolder="vae", variant=args.variant, **source)
        unet = UNet2DConditionModel.from_pretrained(subfolder="unet", variant=args.variant, **source)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Could not load the base pipeline {args.pretrained_model_name_or_path}: {error}"
        ) from error
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def sara_configs(args: argparse.Namespace, max_train_steps: int) -> tuple[SaRAConfig, SaRAConfig]:
    """SaRA configs of the UNet and the text encoder; the progressive step defaults to half of the run (paper)."""
    progressive_step = None if args.no_progressive else (args.progressive_step or max(1, max_train_steps // 2))
    shared = {
        "lambda_rank": args.lambda_rank,
        "progressive_step": progressive_step,
        "include_bias": args.include_bias,
        "rank_seed": args.seed or 0,
    }
    unet_config = SaRAConfig(threshold=args.threshold, target_fraction=args.target_fraction, **shared)
    text_config = SaRAConfig(threshold=args.text_encoder_threshold or args.threshold, **shared)
    return unet_config, text_config


def add_sara_adapter(model: torch.nn.Module, config: SaRAConfig, what: str) -> None:
    """Add the adapter in place (the model keeps its class), refusing a threshold that selects nothing."""
    try:
        model.add_adapter(config)
    except ValueError as error:
        raise UserInputError(f"SaRA on the {what}: {error}") from error


def weight_dtype_of(accelerator) -> torch.dtype:
    """dtype of the frozen weights under the run's mixed precision, chosen by flag or by accelerate config."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter], learning_rate: float):
    """AdamW (8-bit from bitsandbytes with --use_8bit_adam) over the given parameters."""
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags for the trackers: scalars only (TensorBoard's hparams take no lists), never the token."""
    return {
        key: value
        for key, value in vars(args).items()
        if isinstance(value, (int, float, str, bool)) and key != "hub_token"
    }


def diffusion_targets(noise_scheduler, latents: torch.Tensor, noise_offset: float):
    """Noisy latents, timesteps and the regression target of one noise-prediction step."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserInputError(f"Unsupported prediction type {noise_scheduler.config.prediction_type}.")
    return noisy_latents, timesteps, target


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, noise_scheduler, timesteps, snr_gamma: float | None
) -> torch.Tensor:
    """MSE per sample, with min-SNR-γ weighting when `snr_gamma` is set (Hang et al., 2023)."""
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return loss
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
    return loss * weights


# --------------------------------------------------------------------------------------------------------- checkpoints


def register_adapter_checkpointing(accelerator, models: dict[str, torch.nn.Module]) -> None:
    """Make accelerate's save_state/load_state store only the SaRA adapters (PEFT folders), not the whole models.

    `models` maps a subfolder name to the (prepared) model whose adapter goes there.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    def unwrapped() -> dict[str, torch.nn.Module]:
        return {name: accelerator.unwrap_model(model) for name, model in models.items()}

    def save_hook(hook_models, weights, output_dir):
        if accelerator.is_main_process:
            save_adapters(output_dir, unwrapped())
        weights.clear()  # the adapters are saved above; accelerate must not write the full models

    def load_hook(hook_models, input_dir):
        for name, model in unwrapped().items():
            set_peft_model_state_dict(model, load_peft_weights(os.path.join(input_dir, name)))
        hook_models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_folders(output_dir: str) -> list[Path]:
    """Finished checkpoints, oldest first (an unfinished one, left by a killed run, never counts)."""
    folders = [
        path
        for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if path.is_dir()
        and not path.name.endswith(UNFINISHED_SUFFIX)
        and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(folders, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> Path:
    """Save a resumable checkpoint atomically: every rank writes into an unfinished folder, which the main process
    renames once all are done. Older checkpoints beyond `total_limit` are removed afterwards."""
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    unfinished = final.with_name(final.name + UNFINISHED_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(unfinished, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(unfinished))  # on every rank: DeepSpeed needs all of them
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(unfinished, final)
        if total_limit is not None:
            for old in checkpoint_folders(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume_checkpoint(resume_from: str | None, output_dir: str) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "latest":
        folders = checkpoint_folders(output_dir)
        if not folders:
            logger.warning("No checkpoint in %s to resume from: starting a new run.", output_dir)
            return None
        return folders[-1]
    return Path(resume_from)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX) :])


def resume(accelerator, args: argparse.Namespace, updates_per_epoch: int) -> tuple[int, int, int]:
    """Load the checkpoint asked for (adapters, optimizer, scheduler, RNG states, SaRA's training state).

    Returns the step reached, the epoch to continue in, and how many batches of that epoch were already seen.
    """
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None:
        return 0, 0, 0
    accelerator.print(f"Resuming from checkpoint {checkpoint}")
    accelerator.load_state(str(checkpoint))
    global_step = checkpoint_step(checkpoint)
    epoch, updates_into_epoch = divmod(global_step, updates_per_epoch)
    return global_step, epoch, updates_into_epoch * args.gradient_accumulation_steps


# ---------------------------------------------------------------------------------------------- validation and output


def generate_validation_images(
    pipeline, args: argparse.Namespace, dtype: torch.dtype = torch.float32
) -> list[Image.Image]:
    """--num_validation_images images of --validation_prompt with a fixed seed. The components keep their dtypes (the
    training UNet is shared); under mixed precision the sampling runs under autocast, as training does."""
    generator = torch.Generator(device="cpu").manual_seed(args.seed if args.seed is not None else 0)
    pipeline.set_progress_bar_config(disable=True)
    autocast = torch.autocast(pipeline.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        return [
            pipeline(
                args.validation_prompt,
                num_inference_steps=args.num_inference_steps,
                generator=generator,
                height=args.resolution,
                width=args.resolution,
            ).images[0]
            for _ in range(args.num_validation_images)
        ]


def validation_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler):
    """A pipeline around the models in training: nothing is loaded again and no component changes dtype."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def validate(accelerator, args, trained: dict, vae, text_encoder, tokenizer, noise_scheduler, step: int) -> None:
    """Sample --validation_prompt with the models in training (main process), then put them back in training mode."""
    if not args.validation_prompt or not accelerator.is_main_process:
        return
    models = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
    for model in models.values():
        model.eval()
    pipeline = validation_pipeline(
        vae, models.get("text_encoder", text_encoder), tokenizer, models["unet"], noise_scheduler
    ).to(accelerator.device)
    images = generate_validation_images(pipeline, args, weight_dtype_of(accelerator))
    log_validation(accelerator, images, args.output_dir, f"step-{step}", step)
    for model in models.values():
        model.train()


def finish_output(args: argparse.Namespace, accelerator, step: int, instance_prompt: str | None = None) -> None:
    """After the adapters are saved: final images from a fresh pipeline loaded with them, model card, Hub upload."""
    from diffusers import StableDiffusionPipeline

    from .loading import load_sara_weights

    images: list[Path] = []
    if args.validation_prompt:
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            revision=args.revision,
            variant=args.variant,
            safety_checker=None,
            requires_safety_checker=False,
        )
        load_sara_weights(pipeline, args.output_dir)
        pipeline.to(accelerator.device)
        images = log_validation(
            accelerator, generate_validation_images(pipeline, args), args.output_dir, "final", step
        )
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    write_model_card(
        args.output_dir,
        repo_id,
        args.pretrained_model_name_or_path,
        images,
        args.train_text_encoder,
        instance_prompt=instance_prompt,
        validation_prompt=args.validation_prompt,
    )
    if args.push_to_hub:
        push_output_to_hub(args.output_dir, repo_id, args.hub_token)


def log_validation(accelerator, images: list[Image.Image], output_dir: str, tag: str, step: int) -> list[Path]:
    """Save the images as PNGs under output_dir/validation and send them to the trackers."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{tag}-{index}.png"
        image.save(path)
        paths.append(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
    return paths


def save_adapters(output_dir: str, components: dict[str, torch.nn.Module], base_model: str | None = None) -> None:
    """Write each component's SaRA adapter as a standard PEFT adapter folder output_dir/<component>/.

    The keys carry PEFT's `base_model.model.` prefix, as `PeftModel.save_pretrained` writes them, so the folder
    loads with `PeftModel.from_pretrained` as well as into a plain diffusers or transformers model.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    for name, model in components.items():
        folder = os.path.join(output_dir, name)
        os.makedirs(folder, exist_ok=True)
        state_dict = {
            f"base_model.model.{key}": tensor.detach().contiguous().cpu()
            for key, tensor in get_peft_model_state_dict(model).items()
        }
        save_file(state_dict, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.copy(model.peft_config["default"])
        config.inference_mode, config.base_model_name_or_path = True, base_model
        config.save_pretrained(folder)


def write_model_card(
    output_dir: str,
    repo_id: str,
    base_model: str,
    images: list[Path],
    train_text_encoder: bool,
    instance_prompt: str | None = None,
    validation_prompt: str | None = None,
) -> Path:
    """README.md with the Hub's metadata (library, base model, tags), how to load the adapter, and the images."""
    tags = ["sara", "peft", "diffusers", "text-to-image"] + (["dreambooth"] if instance_prompt else [])
    front_matter = ["---", "library_name: peft", f"base_model: {base_model}", "tags:"] + [f"- {tag}" for tag in tags]
    if instance_prompt:
        front_matter.append(f"instance_prompt: {json.dumps(instance_prompt)}")
    front_matter.append("---")
    components = "UNet and text encoder" if train_text_encoder else "UNet"
    what = f"DreamBooth on `{instance_prompt}`" if instance_prompt else "text-to-image fine-tuning"
    base_link = (
        f"`{base_model}`" if os.path.isdir(base_model) else f"[{base_model}](https://huggingface.co/{base_model})"
    )
    gallery = "\n".join(f"![{path.stem}]({path.relative_to(output_dir).as_posix()})" for path in images)
    body = f"""
# SaRA {what} - {repo_id}

SaRA adapter weights ({components}) for {base_link}, trained with
[peft-sara](https://arxiv.org/abs/2409.06633): only the base weights with |w| below the threshold were fine-tuned.

## How to use

```python
import torch
import peft_sara  # registers the SaRA adapter type with PEFT
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
peft_sara.load_sara_weights(pipe, "{repo_id}")
image = pipe({json.dumps(instance_prompt or validation_prompt or "a photo")}).images[0]
```

The folders `unet/`{" and `text_encoder/`" if train_text_encoder else ""} are standard PEFT adapters:
`PeftModel.from_pretrained(unet, "{repo_id}", subfolder="unet")` works too, after `import peft_sara`.
{
        ""
        if not validation_prompt
        else f'''
## Validation images

Prompt: `{validation_prompt}`

{gallery}
'''
    }"""
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(front_matter) + "\n" + body, encoding="utf-8")
    return path


def push_output_to_hub(output_dir: str, repo_id: str, token: str | None) -> str:
    """Upload the output folder without checkpoints or logs."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="SaRA adapter",
        ignore_patterns=[f"{CHECKPOINT_PREFIX}*", "logs/*", "*.tmp"],
        token=token,
    )
    return repo_id


def total_batch_line(args: argparse.Namespace, num_processes: int) -> str:
    total = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    return f"  Total train batch size (w. parallel, distributed & accumulation) = {total}"


def updates_per_epoch(dataloader, num_processes: int, accumulation: int) -> int:
    """Optimizer steps per epoch once the data loader is sharded over the processes (each gets an even share)."""
    return math.ceil(math.ceil(len(dataloader) / num_processes) / accumulation)


# ------------------------------------------------------------------------------------------------ the training run


def make_accelerator(args: argparse.Namespace):
    """The Accelerator of a run (precision, accumulation, trackers, logging folder), with logging and seeds set."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # reproducible shuffles, also on resume
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def make_dataloader(args: argparse.Namespace, dataset, collate_fn) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        generator=data_generator(args.seed),
    )


@dataclass
class SaRARun:
    """What a training loop needs, prepared by `setup_sara_training`."""

    trained: dict[str, torch.nn.Module]
    text_encoder: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: Any
    dataloader: Any
    lr_scheduler: Any
    training: Any
    max_train_steps: int
    num_epochs: int
    updates_per_epoch: int
    weight_dtype: torch.dtype

    @property
    def unet(self) -> torch.nn.Module:
        return self.trained["unet"]


def setup_sara_training(args, accelerator, text_encoder, vae, unet, dataloader, tracker_name: str) -> SaRARun:
    """Frozen base in the run's precision, SaRA adapters in fp32, optimizer and schedule, accelerate, attach()."""
    from diffusers.optimization import get_scheduler

    from .training import attach

    weight_dtype = weight_dtype_of(accelerator)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=weight_dtype)
    per_epoch = updates_per_epoch(dataloader, accelerator.num_processes, args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * per_epoch
    unet_config, text_encoder_config = sara_configs(args, max_train_steps)
    add_sara_adapter(unet, unet_config, "UNet")
    trained = {"unet": unet}
    if args.train_text_encoder:
        add_sara_adapter(text_encoder, text_encoder_config, "text encoder")
        trained["text_encoder"] = text_encoder
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    params = [param for model in trained.values() for param in model.parameters() if param.requires_grad]
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, params, learning_rate)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,  # the prepared scheduler steps per process
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, dataloader, lr_scheduler)
    trained = dict(zip(trained, prepared[: len(trained)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trained) :]
    training = attach(list(trained.values()), optimizer)
    register_adapter_checkpointing(accelerator, trained)
    accelerator.register_for_checkpointing(training)
    if accelerator.is_main_process:
        accelerator.init_trackers(tracker_name, config=tracker_config(args))
    return SaRARun(
        trained=trained,
        text_encoder=trained.get("text_encoder", text_encoder),
        params=params,
        optimizer=optimizer,
        dataloader=dataloader,
        lr_scheduler=lr_scheduler,
        training=training,
        max_train_steps=max_train_steps,
        num_epochs=math.ceil(max_train_steps / per_epoch),
        updates_per_epoch=per_epoch,
        weight_dtype=weight_dtype,
    )


def log_run_start(args: argparse.Namespace, accelerator, run: SaRARun, num_examples: int) -> None:
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples}, num epochs = {run.num_epochs}")
    logger.info(f"  Num processes = {accelerator.num_processes}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(total_batch_line(args, accelerator.num_processes))
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {run.max_train_steps}")
    logger.info(f"  Trainable SaRA values = {sum(param.numel() for param in run.params):,}")


def noise_prediction_loss(batch, vae, run: SaRARun, noise_scheduler, args: argparse.Namespace) -> torch.Tensor:
    """Per-sample loss of one batch: encode, add noise, predict it (or the velocity) with the UNet."""
    latents = vae.encode(batch["pixel_values"].to(run.weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
    noisy_latents, timesteps, target = diffusion_targets(noise_scheduler, latents, args.noise_offset)
    text_embeddings = run.text_encoder(batch["input_ids"])[0]
    prediction = run.unet(noisy_latents, timesteps, text_embeddings).sample
    return per_sample_loss(prediction, target, noise_scheduler, timesteps, args.snr_gamma)


def end_of_step(args, accelerator, run: SaRARun, progress, loss: torch.Tensor, step: int, validate_now) -> None:
    """After an optimizer step: progress bar and trackers (loss, lr, regulariser), checkpoint, validation."""
    logs = {"loss": loss.detach().item(), "lr": run.lr_scheduler.get_last_lr()[0], "rank_loss": run.training.rank_loss}
    progress.update(1)
    progress.set_postfix(**logs)
    accelerator.log(logs, step=step)
    if step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
    if args.validation_steps and step % args.validation_steps == 0:
        validate_now(step)


def save_final_output(args, accelerator, run: SaRARun, step: int, instance_prompt: str | None = None) -> None:
    """Adapters as PEFT folders, final images from a fresh pipeline loaded with them, model card, Hub upload."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in run.trained.items()}
        save_adapters(args.output_dir, unwrapped, base_model=args.pretrained_model_name_or_path)
        finish_output(args, accelerator, step=step, instance_prompt=instance_prompt)
    accelerator.end_training()


def run_training_loop(args, accelerator, run: SaRARun, batch_loss, validate, num_examples: int) -> int:
    """The optimization loop both scripts share: resume, skip the batches a resumed run has seen, reshuffle each
    epoch as an uninterrupted run would, accumulate, clip, step, log, checkpoint and validate.

    `batch_loss(batch)` returns the scalar loss of a batch; `validate(step)` samples the validation prompt.
    Returns the optimizer step reached.
    """
    from tqdm.auto import tqdm

    log_run_start(args, accelerator, run, num_examples)
    global_step, first_epoch, batches_to_skip = resume(accelerator, args, run.updates_per_epoch)
    progress = tqdm(
        range(run.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, run.num_epochs):
        for model in run.trained.values():
            model.train()
        batches = run.dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(run.dataloader, batches_to_skip)
        batches.set_epoch(epoch)  # the same shuffle as an uninterrupted run, also after a resume
        for batch in batches:
            with accelerator.accumulate(*run.trained.values()):
                loss = batch_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                global_step += 1
                end_of_step(args, accelerator, run, progress, loss, global_step, validate)
                if global_step >= run.max_train_steps:
                    break
        if args.validation_steps is None and (epoch + 1) % args.validation_epochs == 0:
            validate(global_step)
    return global_step
