#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion with SaRA: diffusers' train_dreambooth_lora.py flags, SaRA for LoRA.

    accelerate launch scripts/train_dreambooth_sara.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --with_prior_preservation --class_prompt "a photo of dog" --class_data_dir dog-class \\
      --resolution 512 --train_batch_size 1 --max_train_steps 800 --threshold 2e-3 \\
      --validation_prompt "a photo of sks dog in a bucket" --output_dir sks-dog

The output folder holds `unet/` (and `text_encoder/` with --train_text_encoder) as PEFT adapter folders, a model
card, and the validation images; load it with `peft_sara.load_sara_weights(pipe, output_dir)`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import Dataset

from peft_sara import script_utils as su

logger = get_logger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DreamBooth fine-tuning of Stable Diffusion with SaRA.")
    su.add_model_and_output_arguments(parser, default_output_dir="sara-dreambooth-model")
    group = parser.add_argument_group("DreamBooth data")
    group.add_argument("--instance_data_dir", type=str, default=None, help="Folder of images of the subject.")
    group.add_argument(
        "--instance_prompt", type=str, default=None, help='Prompt naming the subject, e.g. "a photo of sks dog".'
    )
    group.add_argument(
        "--with_prior_preservation", action="store_true", help="Add the prior-preservation loss on class images."
    )
    group.add_argument(
        "--class_data_dir", type=str, default=None, help="Folder of class images; missing ones are generated into it."
    )
    group.add_argument(
        "--class_prompt", type=str, default=None, help='Prompt of the subject\'s class, e.g. "a photo of dog".'
    )
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    group.add_argument(
        "--num_class_images", type=int, default=100, help="Class images wanted; the missing ones are generated."
    )
    group.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    group.add_argument(
        "--prior_generation_precision",
        type=str,
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="dtype of class-image generation (default: fp16 on a GPU, else fp32).",
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
    if not args.instance_data_dir or not args.instance_prompt:
        raise su.UserInputError("--instance_data_dir and --instance_prompt are required.")
    args.instance_images = su.list_images(args.instance_data_dir, "--instance_data_dir")  # verified once, used by main
    if args.with_prior_preservation:
        if not args.class_data_dir or not args.class_prompt:
            raise su.UserInputError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
        if args.num_class_images < 1:
            raise su.UserInputError(f"--num_class_images must be at least 1, got {args.num_class_images}.")
        if os.path.exists(args.class_data_dir) and not os.path.isdir(args.class_data_dir):
            raise su.UserInputError(f"--class_data_dir {args.class_data_dir} is a file, not a folder.")
    elif args.class_data_dir or args.class_prompt:
        logger.warning("--class_data_dir and --class_prompt are ignored without --with_prior_preservation.")


class DreamBoothDataset(Dataset):
    """Instance images with the instance prompt and, for prior preservation, class images with the class prompt."""

    def __init__(self, instance_images, instance_prompt, class_images, class_prompt, tokenizer, transform) -> None:
        self.instance_images, self.class_images, self.transform = instance_images, class_images, transform
        self.instance_ids = su.tokenize(tokenizer, instance_prompt)
        self.class_ids = su.tokenize(tokenizer, class_prompt) if class_images else None

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = {
            "instance_pixels": self._load(self.instance_images[index % len(self.instance_images)]),
            "instance_ids": self.instance_ids,
        }
        if self.class_images:
            example["class_pixels"] = self._load(self.class_images[index % len(self.class_images)])
            example["class_ids"] = self.class_ids
        return example

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as image:
            return self.transform(image)


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch; with prior preservation the class half follows the instance half, so the loss can split it."""
    pixels = [example["instance_pixels"] for example in examples]
    ids = [example["instance_ids"] for example in examples]
    if "class_pixels" in examples[0]:
        pixels += [example["class_pixels"] for example in examples]
        ids += [example["class_ids"] for example in examples]
    return {"pixel_values": torch.stack(pixels), "input_ids": torch.stack(ids)}


def generate_class_images(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Fill --class_data_dir up to --num_class_images with the base model's images of --class_prompt, the work
    split over all processes."""
    from diffusers import StableDiffusionPipeline

    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = len([path for path in class_dir.iterdir() if path.suffix.lower() in su.IMAGE_SUFFIXES])
    if existing >= args.num_class_images:
        return
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    ).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    logger.info("Generating %d class images of %r", args.num_class_images - existing, args.class_prompt)
    with accelerator.split_between_processes(list(range(existing, args.num_class_images))) as indices:
        for start in range(0, len(indices), args.sample_batch_size):
            batch = indices[start : start + args.sample_batch_size]
            generator = torch.Generator().manual_seed((args.seed or 0) + batch[0])
            images = pipeline(
                [args.class_prompt] * len(batch), generator=generator, height=args.resolution, width=args.resolution
            ).images
            for index, image in zip(batch, images):
                image.save(class_dir / f"class-{index:05d}.png")
    del pipeline
    accelerator.wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = su.make_accelerator(args)

    # 1. Data: the subject's images, and class images for prior preservation (generated by the base if missing).
    if args.with_prior_preservation:
        generate_class_images(args, accelerator)
    class_images = su.list_images(args.class_data_dir, "--class_data_dir") if args.with_prior_preservation else []
    os.makedirs(args.output_dir, exist_ok=True)

    # 2. Models: the frozen base in the run's precision with SaRA adapters in fp32, optimizer, accelerate, attach().
    tokenizer, text_encoder, vae, unet, noise_scheduler = su.load_base_models(args)
    transform = su.ImageTransform(args.resolution, args.center_crop, args.random_flip)
    dataset = DreamBoothDataset(
        args.instance_images, args.instance_prompt, class_images, args.class_prompt, tokenizer, transform
    )
    dataloader = su.make_dataloader(args, dataset, collate)
    run = su.setup_sara_training(args, accelerator, text_encoder, vae, unet, dataloader, "sara-dreambooth")

    def validate(step: int) -> None:
        su.validate(accelerator, args, run.trained, vae, run.text_encoder, tokenizer, noise_scheduler, step)

    def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = su.noise_prediction_loss(batch, vae, run, noise_scheduler, args)
        if not args.with_prior_preservation:
            return loss.mean()
        instance_loss, prior_loss = loss.chunk(2)  # the class half of the batch follows the instance half
        return instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()

    # 3. Train, resuming from a checkpoint if asked.
    global_step = su.run_training_loop(args, accelerator, run, batch_loss, validate, len(dataset))

    # 4. Save the adapters as PEFT folders, sample them from a fresh pipeline, write the card, upload.
    su.save_final_output(args, accelerator, run, global_step, instance_prompt=args.instance_prompt)
    return Path(args.output_dir)


if __name__ == "__main__":
    su.run_main(main)
