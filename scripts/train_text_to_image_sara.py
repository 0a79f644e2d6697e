#!/usr/bin/env python
"""Text-to-image fine-tuning of Stable Diffusion with SaRA: train_text_to_image_lora.py's flags, SaRA for LoRA.

    accelerate launch --multi_gpu --num_processes 8 scripts/train_text_to_image_sara.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --train_data_dir my-style --caption_column text --resolution 512 --random_flip \\
      --train_batch_size 4 --max_train_steps 5000 --lr_scheduler cosine --threshold 2e-3 \\
      --validation_prompt "<name> style, a castle" --output_dir my-style-sara

Data: --train_data_dir is a folder of images with a metadata.jsonl whose lines name a `file_name` and its caption
(the `imagefolder` layout of 🤗 Datasets), or --dataset_name a Hub dataset (needs `pip install datasets`). The
output folder holds `unet/` (and `text_encoder/` with --train_text_encoder) as PEFT adapter folders, a model card
and the validation images; load it with `peft_sara.load_sara_weights(pipe, output_dir)`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

import peft_sara
from peft_sara.script_utils.arguments import (
    ArgumentParser,
    add_model_and_output_arguments,
    add_sara_arguments,
    add_training_arguments,
    add_validation_and_hub_arguments,
    parse_args_with_config,
    tracker_config,
)
from peft_sara.script_utils.checkpoints import (
    find_resume_checkpoint,
    load_checkpoint_adapters,
    register_checkpointing,
    run_settings,
)
from peft_sara.script_utils.checks import check_common_arguments
from peft_sara.script_utils.cli import UserInputError, get_logger, run_main
from peft_sara.script_utils.data import (
    CachedLatents,
    ImageTransform,
    make_dataloader,
    open_image_problem,
    tokenize,
)
from peft_sara.script_utils.loop import LoopSettings, train
from peft_sara.script_utils.loss import DenoisingLoss
from peft_sara.script_utils.models import (
    add_sara_adapter,
    freeze,
    load_base_models,
    sara_configs,
    weight_dtype_of,
)
from peft_sara.script_utils.output import finish_output, lock_output_dir, save_final_adapters
from peft_sara.script_utils.setup import (
    check_deepspeed_run,
    enable_memory_savings,
    make_accelerator,
    prepare_optimization,
)
from peft_sara.script_utils.validation import ValidationSettings, in_training_validator

logger = get_logger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Text-to-image fine-tuning of Stable Diffusion with SaRA.")
    add_model_and_output_arguments(parser, default_output_dir="sara-text-to-image-model")
    group = parser.add_argument_group("data")
    group.add_argument(
        "--train_data_dir", type=str, default=None, help="Folder of images with a metadata.jsonl of captions."
    )
    group.add_argument(
        "--dataset_name", type=str, default=None, help="A 🤗 Datasets dataset on the Hub (needs `datasets`)."
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of --dataset_name.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    group.add_argument("--image_column", type=str, default="image", help="Column of the images (Hub datasets).")
    group.add_argument(
        "--caption_column", type=str, default="text", help="Column (or metadata.jsonl key) of the captions."
    )
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Train on this many examples only (seeded choice)."
    )
    add_sara_arguments(parser)
    add_training_arguments(parser)
    add_validation_and_hub_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parse_args_with_config(make_parser(), argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, so that bad input fails in a second, not after loading."""
    check_common_arguments(args)
    if bool(args.train_data_dir) == bool(args.dataset_name):
        raise UserInputError(
            "Give exactly one of --train_data_dir (a local folder) and --dataset_name (a Hub dataset)."
        )
    # verified once here, before any model loads, and used by main
    args.folder_examples = (
        read_captioned_folder(args.train_data_dir, args.caption_column) if args.train_data_dir else None
    )
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise UserInputError(f"--max_train_samples must be at least 1, got {args.max_train_samples}.")


def read_captioned_folder(folder: str, caption_column: str) -> list[tuple[Path, str | list[str]]]:
    """(image, caption) pairs from metadata.jsonl; lines whose image is missing or unreadable are skipped with a
    warning while others remain."""
    metadata = Path(folder) / "metadata.jsonl"
    if not Path(folder).is_dir():
        raise UserInputError(f"--train_data_dir {folder}: no such folder.")
    if not metadata.is_file():
        raise UserInputError(
            f"--train_data_dir {folder} has no metadata.jsonl: add one line per image, e.g. "
            f'{{"file_name": "0001.png", "{caption_column}": "a castle"}}.'
        )
    pairs, skipped = [], []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            path, caption = Path(folder) / record["file_name"], record[caption_column]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserInputError(
                f"{metadata}, line {number}: expected a JSON object with file_name and {caption_column!r} ({error})."
            ) from error
        if not path.is_file() or open_image_problem(path):
            skipped.append(record["file_name"])
        else:
            pairs.append((path, caption))
    if skipped:
        logger.warning(
            "Skipping %d unreadable or missing image(s) named in %s: %s", len(skipped), metadata, skipped[:5]
        )
    if not pairs:
        raise UserInputError(f"--train_data_dir {folder}: none of the images named in metadata.jsonl is readable.")
    return pairs


class CaptionedImages(Dataset):
    """Images with their captions (one chosen at random where an image has several), tokenized."""

    def __init__(self, examples: list[tuple[object, str | list[str]]], tokenizer, transform) -> None:
        self.examples, self.tokenizer, self.transform = examples, tokenizer, transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, caption = self.examples[index]
        if isinstance(caption, (list, tuple)):
            caption = random.choice(caption)
        if isinstance(image, Path):
            with Image.open(image) as opened:
                pixels = self.transform(opened)
        else:
            pixels = self.transform(image)
        return {"pixel_values": pixels, "input_ids": tokenize(self.tokenizer, caption)}


def load_examples(args: argparse.Namespace) -> list[tuple[object, str | list[str]]]:
    if args.train_data_dir:
        examples = list(args.folder_examples)
    else:
        try:
            import datasets
        except ImportError as error:
            raise UserInputError("--dataset_name needs the datasets package: pip install datasets") from error
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)["train"]
        for column in (args.image_column, args.caption_column):
            if column not in dataset.column_names:
                raise UserInputError(f"{args.dataset_name} has no column {column!r}: it has {dataset.column_names}.")
        examples = list(zip(dataset[args.image_column], dataset[args.caption_column]))
    if args.max_train_samples is not None:
        random.Random(args.seed).shuffle(examples)
        examples = examples[: args.max_train_samples]
    return examples


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([example[key] for example in examples]) for key in ("pixel_values", "input_ids")}


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    with lock_output_dir(args.output_dir):  # a second run on the same folder is refused, not crashed into
        checkpoint = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
        accelerator = make_accelerator(
            args.output_dir,
            args.logging_dir,
            args.gradient_accumulation_steps,
            args.mixed_precision,
            args.report_to,
            args.seed,
            args.allow_tf32,
        )
        check_deepspeed_run(accelerator, args.train_text_encoder, args.max_grad_norm, args.layerwise_casting)
        weight_dtype = weight_dtype_of(accelerator.mixed_precision)

        # 1. Models: the frozen base, in the run's precision; the captioned images.
        tokenizer, text_encoder, vae, unet, noise_scheduler = load_base_models(
            args.pretrained_model_name_or_path, args.revision, args.variant, args.prediction_type, weight_dtype
        )
        freeze([vae, text_encoder, unet], accelerator.device, weight_dtype)
        transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
        dataset = CaptionedImages(load_examples(args), tokenizer, transform)
        if args.cache_latents:
            dataset = CachedLatents(dataset, vae, ("pixel_values",), accelerator.device, weight_dtype)
        dataloader = make_dataloader(dataset, args.train_batch_size, collate, args.dataloader_num_workers, args.seed)
        loop = LoopSettings.from_args(args, dataloader, accelerator.num_processes)
        # what decides the result, written into every checkpoint; a resumed run takes the checkpoint's θ and steps
        loop.run_settings = run_settings(args, accelerator, loop.max_train_steps, checkpoint)

        # New Code #
        # 2. SaRA: an adapter that trains the weights below θ of the UNet (and text encoder); its values stay fp32.
        unet_config, text_encoder_config = sara_configs(loop.run_settings)
        add_sara_adapter(unet, unet_config, "UNet")
        models = {"unet": unet}
        if args.train_text_encoder:
            add_sara_adapter(text_encoder, text_encoder_config, "text encoder")
            models["text_encoder"] = text_encoder
        loop.run_settings["unet_threshold"] = unet.peft_config["default"].threshold  # resolved from --target_fraction
        if checkpoint is not None:  # the checkpoint's positions, before the optimizer holds the values
            load_checkpoint_adapters(models, checkpoint)
        learning_rate = args.learning_rate or peft_sara.paper_learning_rate(loop.run_settings["unet_threshold"])
        # End of new code #

        enable_memory_savings(
            unet,
            text_encoder,
            args.gradient_checkpointing,
            args.enable_xformers_memory_efficient_attention,
            args.train_text_encoder,
            args.layerwise_casting,
            weight_dtype,
        )
        models, params, optimizer, dataloader, lr_scheduler = prepare_optimization(
            accelerator, models, dataloader, learning_rate, args, loop.max_train_steps
        )
        # New Code #
        # The one extra line of SaRA training: optimizer.step() now applies the regulariser and the progressive step.
        training = peft_sara.attach(list(models.values()), optimizer)
        register_checkpointing(accelerator, models, training)  # checkpoints hold the adapters, not the models
        # End of new code #
        if accelerator.is_main_process:
            accelerator.init_trackers(args.tracker_project_name or "sara-text-to-image", config=tracker_config(args))

        validation = ValidationSettings.from_args(args)
        text_encoder = models.get("text_encoder", text_encoder)
        validate = in_training_validator(
            accelerator, models, vae, text_encoder, tokenizer, noise_scheduler, validation, args.output_dir
        )
        denoising_loss = DenoisingLoss(
            vae,
            text_encoder,
            models["unet"],
            noise_scheduler,
            weight_dtype,
            args.noise_offset,
            args.snr_gamma,
            args.cache_latents,
        )

        def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return denoising_loss(batch).mean()

        # 3. Train, resuming from a checkpoint if asked.
        global_step = train(
            accelerator,
            models,
            params,
            optimizer,
            lr_scheduler,
            dataloader,
            batch_loss,
            validate,
            training,
            loop,
            checkpoint,
        )

        # 4. Save the adapters as PEFT folders, sample them from a fresh pipeline, write the card, upload.
        accelerator.wait_for_everyone()
        # New Code #
        save_final_adapters(accelerator, args, models)  # the adapters as PEFT folders (gathered under ZeRO-3)
        # End of new code #
        if accelerator.is_main_process:
            finish_output(accelerator, args, validation, global_step)
        accelerator.end_training()
        return Path(args.output_dir)


if __name__ == "__main__":
    run_main(main)
