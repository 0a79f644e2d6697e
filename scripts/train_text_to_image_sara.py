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
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.logging import get_logger
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from peft_sara import script_utils as su

logger = get_logger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Text-to-image fine-tuning of Stable Diffusion with SaRA.")
    su.add_model_and_output_arguments(parser, default_output_dir="sara-text-to-image-model")
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
    su.add_sara_arguments(parser)
    su.add_training_arguments(parser)
    su.add_validation_and_hub_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = su.parse_args_with_config(make_parser(), argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, so that bad input fails in a second, not after loading."""
    su.check_common_arguments(args)
    if bool(args.train_data_dir) == bool(args.dataset_name):
        raise su.UserInputError(
            "Give exactly one of --train_data_dir (a local folder) and --dataset_name (a Hub dataset)."
        )
    # verified once here, before any model loads, and used by main
    args.folder_examples = (
        read_captioned_folder(args.train_data_dir, args.caption_column) if args.train_data_dir else None
    )
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise su.UserInputError(f"--max_train_samples must be at least 1, got {args.max_train_samples}.")


def read_captioned_folder(folder: str, caption_column: str) -> list[tuple[Path, str | list[str]]]:
    """(image, caption) pairs from metadata.jsonl; lines whose image is missing or unreadable are skipped with a
    warning while others remain."""
    metadata = Path(folder) / "metadata.jsonl"
    if not Path(folder).is_dir():
        raise su.UserInputError(f"--train_data_dir {folder}: no such folder.")
    if not metadata.is_file():
        raise su.UserInputError(
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
            raise su.UserInputError(
                f"{metadata}, line {number}: expected a JSON object with file_name and {caption_column!r} ({error})."
            ) from error
        try:
            with Image.open(path) as image:
                image.verify()
            pairs.append((path, caption))
        except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError):
            skipped.append(record["file_name"])
    if skipped:
        logger.warning(
            "Skipping %d unreadable or missing image(s) named in %s: %s", len(skipped), metadata, skipped[:5]
        )
    if not pairs:
        raise su.UserInputError(f"--train_data_dir {folder}: none of the images named in metadata.jsonl is readable.")
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
        return {"pixel_values": pixels, "input_ids": su.tokenize(self.tokenizer, caption)}


def load_examples(args: argparse.Namespace) -> list[tuple[object, str | list[str]]]:
    if args.train_data_dir:
        examples = list(args.folder_examples)
    else:
        try:
            import datasets
        except ImportError as error:
            raise su.UserInputError("--dataset_name needs the datasets package: pip install datasets") from error
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)["train"]
        for column in (args.image_column, args.caption_column):
            if column not in dataset.column_names:
                raise su.UserInputError(
                    f"{args.dataset_name} has no column {column!r}: it has {dataset.column_names}."
                )
        examples = list(zip(dataset[args.image_column], dataset[args.caption_column]))
    if args.max_train_samples is not None:
        random.Random(args.seed).shuffle(examples)
        examples = examples[: args.max_train_samples]
    return examples


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([example[key] for example in examples]) for key in ("pixel_values", "input_ids")}


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = su.make_accelerator(args)
    os.makedirs(args.output_dir, exist_ok=True)

    # 1. Models and data: the frozen base in the run's precision with SaRA adapters in fp32, accelerate, attach().
    tokenizer, text_encoder, vae, unet, noise_scheduler = su.load_base_models(args)
    transform = su.ImageTransform(args.resolution, args.center_crop, args.random_flip)
    dataset = CaptionedImages(load_examples(args), tokenizer, transform)
    dataloader = su.make_dataloader(args, dataset, collate)
    run = su.setup_sara_training(args, accelerator, text_encoder, vae, unet, dataloader, "sara-text-to-image")

    def validate(step: int) -> None:
        su.validate(accelerator, args, run.trained, vae, run.text_encoder, tokenizer, noise_scheduler, step)

    def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return su.noise_prediction_loss(batch, vae, run, noise_scheduler, args).mean()

    # 2. Train, resuming from a checkpoint if asked.
    global_step = su.run_training_loop(args, accelerator, run, batch_loss, validate, len(dataset))

    # 3. Save the adapters as PEFT folders, sample them from a fresh pipeline, write the card, upload.
    su.save_final_output(args, accelerator, run, global_step)
    return Path(args.output_dir)


if __name__ == "__main__":
    su.run_main(main)
