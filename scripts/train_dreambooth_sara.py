#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion with SaRA: diffusers' train_dreambooth_lora.py flags, SaRA for LoRA.

    accelerate launch scripts/train_dreambooth_sara.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --with_prior_preservation --class_prompt "a photo of dog" --class_data_dir dog-class \\
      --resolution 512 --train_batch_size 1 --max_train_steps 800 --threshold 2e-3 \\
      --validation_prompt "a photo of sks dog in a bucket" --output_dir sks-dog

The output folder holds `unet/` (and `text_encoder/` with --train_text_encoder) as PEFT adapter folders, with
--train_text_encoder_ti (pivotal tuning: "a photo of TOK dog" trains new tokens <s0><s1>) the new tokens'
embeddings `<output folder name>_emb.safetensors`, a model card, and the validation images; load it all with
`peft_sara.load_sara_weights(pipe, output_dir)`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

import peft_sara
from peft_sara.script_utils.arguments import (
    ArgumentParser,
    add_model_and_output_arguments,
    add_pivotal_arguments,
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
from peft_sara.script_utils.checks import check_common_arguments, check_pivotal_arguments
from peft_sara.script_utils.cli import UserInputError, get_logger, run_main
from peft_sara.script_utils.data import (
    CachedLatents,
    ImageTransform,
    list_images,
    make_dataloader,
    readable_images,
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
from peft_sara.script_utils.output import SAVE_DTYPES, finish_output, lock_output_dir, save_adapters
from peft_sara.script_utils.pivotal import NewTokenEmbeddings, insert_new_tokens
from peft_sara.script_utils.setup import enable_memory_savings, make_accelerator, prepare_optimization
from peft_sara.script_utils.stopping import TrainsFor
from peft_sara.script_utils.validation import ValidationSettings, in_training_validator

logger = get_logger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="DreamBooth fine-tuning of Stable Diffusion with SaRA.")
    add_model_and_output_arguments(parser, default_output_dir="sara-dreambooth-model")
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
    add_sara_arguments(parser)
    add_training_arguments(parser)
    add_pivotal_arguments(parser)
    add_validation_and_hub_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parse_args_with_config(make_parser(), argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, so that bad input fails in a second, not after loading."""
    check_common_arguments(args)
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
    # New Code #
    # Pivotal tuning: TOK in the prompts stands for new tokens <s0><s1>... (a prompt without it is refused here).
    args.new_tokens = check_pivotal_arguments(args)
    if args.new_tokens:
        args.instance_prompt, args.class_prompt, args.validation_prompt = (
            insert_new_tokens(prompt, args.new_tokens)
            for prompt in (args.instance_prompt, args.class_prompt, args.validation_prompt)
        )
    # End of new code #


class DreamBoothDataset(Dataset):
    """Instance images with the instance prompt and, for prior preservation, class images with the class prompt."""

    def __init__(self, instance_images, instance_prompt, class_images, class_prompt, tokenizer, transform) -> None:
        self.instance_images, self.class_images, self.transform = instance_images, class_images, transform
        self.instance_ids = tokenize(tokenizer, instance_prompt)
        self.class_ids = tokenize(tokenizer, class_prompt) if class_images else None

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


def generate_class_images(args: argparse.Namespace, accelerator) -> None:
    """Fill --class_data_dir up to --num_class_images readable images with the base model's images of
    --class_prompt, the work split over all processes."""
    from diffusers import StableDiffusionPipeline

    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = len(readable_images(class_dir)[0])
    if existing >= args.num_class_images:
        return
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        dtype=dtype,
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
        weight_dtype = weight_dtype_of(accelerator.mixed_precision)

        # 1. Data: the subject's images, and class images for prior preservation (generated by the base if missing).
        if args.with_prior_preservation:
            generate_class_images(args, accelerator)
        class_images = list_images(args.class_data_dir, "--class_data_dir") if args.with_prior_preservation else []

        # 2. Models: the frozen base, in the run's precision.
        tokenizer, text_encoder, vae, unet, noise_scheduler = load_base_models(
            args.pretrained_model_name_or_path, args.revision, args.variant, args.prediction_type, weight_dtype
        )
        freeze([vae, text_encoder, unet], accelerator.device, weight_dtype)
        # New Code #
        # Pivotal tuning: the new tokens join the tokenizer before any prompt is tokenized; their embedding rows train.
        new_tokens = None
        if args.new_tokens:
            tokens = [token for tokens in args.new_tokens.values() for token in tokens]
            new_tokens = NewTokenEmbeddings([(tokenizer, text_encoder)], tokens)
        # End of new code #
        transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
        dataset = DreamBoothDataset(
            args.instance_images, args.instance_prompt, class_images, args.class_prompt, tokenizer, transform
        )
        if args.cache_latents:
            dataset = CachedLatents(
                dataset, vae, ("instance_pixels", "class_pixels"), accelerator.device, weight_dtype
            )
        dataloader = make_dataloader(dataset, args.train_batch_size, collate, args.dataloader_num_workers, args.seed)
        loop = LoopSettings.from_args(args, dataloader, accelerator.num_processes)
        # what decides the result, written into every checkpoint; a resumed run takes the checkpoint's θ and steps
        loop.run_settings = run_settings(args, accelerator, loop.max_train_steps, checkpoint)

        # New Code #
        # 3. SaRA: an adapter that trains the weights below θ of the UNet (and text encoder); its values stay fp32.
        unet_config, text_encoder_config = sara_configs(loop.run_settings)
        add_sara_adapter(unet, unet_config, "UNet")
        adapted = {"unet": unet}
        if args.train_text_encoder:
            add_sara_adapter(text_encoder, text_encoder_config, "text encoder")
            adapted["text_encoder"] = text_encoder
        loop.run_settings["unet_threshold"] = unet.peft_config["default"].threshold  # resolved from --target_fraction
        if checkpoint is not None:  # the checkpoint's positions, before the optimizer holds the values
            load_checkpoint_adapters(adapted, checkpoint)
        models = dict(adapted)  # the models that train: with pivotal tuning, the text encoder's new rows too
        if new_tokens is not None:
            models["text_encoder"] = text_encoder
        learning_rate = args.learning_rate or peft_sara.paper_learning_rate(loop.run_settings["unet_threshold"])
        # End of new code #

        enable_memory_savings(
            unet,
            text_encoder,
            args.gradient_checkpointing,
            args.enable_xformers_memory_efficient_attention,
            args.train_text_encoder,
        )
        models, params, optimizer, dataloader, lr_scheduler = prepare_optimization(
            accelerator, models, dataloader, learning_rate, args, loop.max_train_steps
        )
        # New Code #
        # The one extra line of SaRA training: optimizer.step() now applies the regulariser and the progressive step.
        training = peft_sara.attach([models[name] for name in adapted], optimizer)
        # The text encoder's part trains for the first part of the run: --train_text_encoder_ti_frac (new tokens) or
        # --train_text_encoder_frac (its adapter); every step keeps what does not train bit-exact.
        text_encoder_states = []
        if new_tokens is not None:
            new_tokens.attach(optimizer, loop.run_settings["text_encoder_ti_steps"])
            text_encoder_states.append(new_tokens)
        if loop.run_settings.get("text_encoder_steps") is not None:
            text_encoder_params = [p for p in models["text_encoder"].parameters() if p.requires_grad]
            steps = loop.run_settings["text_encoder_steps"]
            text_encoder_states.append(TrainsFor("text_encoder", text_encoder_params, steps, optimizer))
        # checkpoints hold the adapters and the new tokens, not the models
        register_checkpointing(accelerator, {name: models[name] for name in adapted}, training, text_encoder_states)
        # End of new code #
        if accelerator.is_main_process:
            accelerator.init_trackers(args.tracker_project_name or "sara-dreambooth", config=tracker_config(args))

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
            text_encoder_trains=lambda: all(state.trains for state in text_encoder_states),
        )

        def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            loss = denoising_loss(batch)
            if not args.with_prior_preservation:
                return loss.mean()
            instance_loss, prior_loss = loss.chunk(2)  # the class half of the batch follows the instance half
            return instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()

        # 4. Train, resuming from a checkpoint if asked.
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

        # 5. Save the adapters as PEFT folders, sample them from a fresh pipeline, write the card, upload.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # New Code #
            unwrapped = {name: accelerator.unwrap_model(models[name]) for name in adapted}
            save_adapters(
                args.output_dir,
                unwrapped,
                base_model=args.pretrained_model_name_or_path,
                dtype=SAVE_DTYPES[args.save_precision],
                token_embeddings=new_tokens.embeddings() if new_tokens else None,  # <output name>_emb.safetensors
                tokens=new_tokens.tokens if new_tokens else (),
            )
            # End of new code #
            finish_output(accelerator, args, validation, global_step, args.instance_prompt, args.new_tokens)
        accelerator.end_training()
        return Path(args.output_dir)


if __name__ == "__main__":
    run_main(main)
