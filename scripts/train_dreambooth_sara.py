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
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import Dataset
from tqdm.auto import tqdm

import peft_sara
from peft_sara import script_utils as su

logger = get_logger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    args = su.parse_args_with_config(parser, argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, so that bad input fails in a second, not after loading."""
    su.check_common_arguments(args)
    if not args.instance_data_dir or not args.instance_prompt:
        raise su.UserInputError("--instance_data_dir and --instance_prompt are required.")
    su.list_images(args.instance_data_dir, "--instance_data_dir")
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
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # 1. Data: the subject's images, and class images for prior preservation (generated by the base if missing).
    if args.with_prior_preservation:
        generate_class_images(args, accelerator)
    instance_images = su.list_images(args.instance_data_dir, "--instance_data_dir")
    class_images = su.list_images(args.class_data_dir, "--class_data_dir") if args.with_prior_preservation else []
    os.makedirs(args.output_dir, exist_ok=True)

    # 2. Models: the frozen base in the run's precision, then SaRA adapters whose values stay in fp32.
    tokenizer, text_encoder, vae, unet, noise_scheduler = su.load_base_models(args)
    weight_dtype = su.weight_dtype_of(accelerator)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=weight_dtype)
    transform = su.ImageTransform(args.resolution, args.center_crop, args.random_flip)
    dataset = DreamBoothDataset(
        instance_images, args.instance_prompt, class_images, args.class_prompt, tokenizer, transform
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=su.data_generator(args.seed),
    )
    updates_per_epoch = su.updates_per_epoch(dataloader, accelerator.num_processes, args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    unet_config, text_encoder_config = su.sara_configs(args, max_train_steps)
    su.add_sara_adapter(unet, unet_config, "UNet")
    trained = {"unet": unet}
    if args.train_text_encoder:
        su.add_sara_adapter(text_encoder, text_encoder_config, "text encoder")
        trained["text_encoder"] = text_encoder
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    # 3. Optimizer over the sparse values only, with SaRA's regulariser and progressive step attached.
    params = [param for model in trained.values() for param in model.parameters() if param.requires_grad]
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = su.make_optimizer(args, params, learning_rate)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, dataloader, lr_scheduler)
    trained = dict(zip(trained, prepared[: len(trained)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trained) :]
    unet = trained["unet"]
    text_encoder = trained.get("text_encoder", text_encoder)
    training = peft_sara.attach(list(trained.values()), optimizer)
    su.register_adapter_checkpointing(accelerator, trained)
    accelerator.register_for_checkpointing(training)
    if accelerator.is_main_process:
        accelerator.init_trackers("sara-dreambooth", config=su.tracker_config(args))

    # 4. Train, resuming from a checkpoint if asked.
    logger.info("***** Running training *****")
    logger.info(
        f"  Num examples = {len(dataset)}, num epochs = {num_epochs}, total optimization steps = {max_train_steps}"
    )
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Num processes = {accelerator.num_processes}")
    logger.info(su.total_batch_line(args, accelerator.num_processes))
    global_step, first_epoch, batches_to_skip = su.resume(accelerator, args, updates_per_epoch)
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, num_epochs):
        for model in trained.values():
            model.train()
        batches = accelerator.skip_first_batches(dataloader, batches_to_skip) if epoch == first_epoch else dataloader
        batches.set_epoch(epoch)  # the same shuffle as an uninterrupted run, also after a resume
        for batch in batches:
            with accelerator.accumulate(*trained.values()):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noisy_latents, timesteps, target = su.diffusion_targets(noise_scheduler, latents, args.noise_offset)
                text_embeddings = text_encoder(batch["input_ids"])[0]
                prediction = unet(noisy_latents, timesteps, text_embeddings).sample
                loss = su.per_sample_loss(prediction, target, noise_scheduler, timesteps, args.snr_gamma)
                if args.with_prior_preservation:
                    instance_loss, prior_loss = loss.chunk(2)
                    loss = instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()
                else:
                    loss = loss.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "rank_loss": training.rank_loss}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                su.save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0:
                su.validate(accelerator, args, trained, vae, text_encoder, tokenizer, noise_scheduler, global_step)
            if global_step >= max_train_steps:
                break
        if args.validation_steps is None and (epoch + 1) % args.validation_epochs == 0:
            su.validate(accelerator, args, trained, vae, text_encoder, tokenizer, noise_scheduler, global_step)

    # 5. Save the adapters as PEFT folders, sample them from a fresh pipeline, write the card, upload.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
        su.save_adapters(args.output_dir, unwrapped, base_model=args.pretrained_model_name_or_path)
        su.finish_output(args, accelerator, instance_prompt=args.instance_prompt, step=global_step)
    accelerator.end_training()
    return Path(args.output_dir)


if __name__ == "__main__":
    su.run_main(main)
