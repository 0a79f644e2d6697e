"""What the DreamBooth scripts (SD and SDXL) share: their data flags and checks, the instance/class dataset for any
number of tokenizers, class-image generation by the base pipeline, and the prior-preservation loss."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .cli import UserInputError, get_logger
from .data import ImageTransform, list_images, readable_images, tokenize

logger = get_logger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_dreambooth_arguments(parser: argparse.ArgumentParser) -> None:
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


def check_dreambooth_arguments(args: argparse.Namespace) -> None:
    """Refuse missing or contradictory DreamBooth data flags; list the instance images once, into
    `args.instance_images`."""
    if not args.instance_data_dir or not args.instance_prompt:
        raise UserInputError("--instance_data_dir and --instance_prompt are required.")
    args.instance_images = list_images(args.instance_data_dir, "--instance_data_dir")  # verified once, used by main
    if args.with_prior_preservation:
        if not args.class_data_dir or not args.class_prompt:
            raise UserInputError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
        if args.num_class_images < 1:
            raise UserInputError(f"--num_class_images must be at least 1, got {args.num_class_images}.")
        if os.path.exists(args.class_data_dir) and not os.path.isdir(args.class_data_dir):
            raise UserInputError(f"--class_data_dir {args.class_data_dir} is a file, not a folder.")
    elif args.class_data_dir or args.class_prompt:
        logger.warning("--class_data_dir and --class_prompt are ignored without --with_prior_preservation.")


def ids_key(index: int) -> str:
    """Batch key of the token ids of the `index`-th tokenizer, named like its text encoder: input_ids, input_ids_2."""
    return "input_ids" if index == 0 else f"input_ids_{index + 1}"


class DreamBoothDataset(Dataset):
    """Instance images with the instance prompt and, for prior preservation, class images with the class prompt,
    the prompts tokenized by every tokenizer. With `micro_conditioning` (SDXL) each image also carries its original
    size and the crop's top-left corner."""

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt: str,
        class_images: list[Path],
        class_prompt: str | None,
        tokenizers: Sequence,
        transform: ImageTransform,
        micro_conditioning: bool = False,
    ) -> None:
        self.instance_images, self.class_images, self.transform = instance_images, class_images, transform
        self.micro_conditioning = micro_conditioning
        self.instance_ids = [tokenize(tokenizer, instance_prompt) for tokenizer in tokenizers]
        self.class_ids = [tokenize(tokenizer, class_prompt) for tokenizer in tokenizers] if class_images else None

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self._example("instance", self.instance_images[index % len(self.instance_images)], self.instance_ids)
        if self.class_images:
            example.update(self._example("class", self.class_images[index % len(self.class_images)], self.class_ids))
        return example

    def _example(self, kind: str, path: Path, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        from PIL import Image

        with Image.open(path) as image:
            pixels, original_size, crop_top_left = self.transform.with_coordinates(image)
        example = {f"{kind}_pixels": pixels}
        example.update({f"{kind}_{ids_key(index)}": token_ids for index, token_ids in enumerate(ids)})
        if self.micro_conditioning:
            example[f"{kind}_original_size"] = torch.tensor(original_size)
            example[f"{kind}_crop_top_left"] = torch.tensor(crop_top_left)
        return example


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch; with prior preservation the class half follows the instance half, so the loss can split it."""
    kinds = ["instance", "class"] if "class_pixels" in examples[0] else ["instance"]
    keys = [key.removeprefix("instance_") for key in examples[0] if key.startswith("instance_")]
    batch = {key: torch.stack([example[f"{kind}_{key}"] for kind in kinds for example in examples]) for key in keys}
    batch["pixel_values"] = batch.pop("pixels")
    return batch


def prior_preservation_loss(per_sample_loss: torch.Tensor, with_prior: bool, prior_loss_weight: float) -> torch.Tensor:
    """The batch's loss: the mean, or with prior preservation the instance half's mean plus the weighted class half's
    (the class half of the batch follows the instance half)."""
    if not with_prior:
        return per_sample_loss.mean()
    instance_loss, prior_loss = per_sample_loss.chunk(2)
    return instance_loss.mean() + prior_loss_weight * prior_loss.mean()


def generate_class_images(
    args: argparse.Namespace, accelerator, family: str = "sd", vae_path: str | None = None
) -> None:
    """Fill --class_data_dir up to --num_class_images readable images with the base model's images of
    --class_prompt, the work split over all processes. `family` says which pipeline the base is, with the VAE at
    `vae_path` when given (the fp16-safe one the run trains with)."""
    from .models import load_pipeline

    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = len(readable_images(class_dir)[0])
    if existing >= args.num_class_images:
        return
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    pipeline = load_pipeline(
        args.pretrained_model_name_or_path, args.revision, args.variant, PRECISIONS[precision], family, vae_path
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
