#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion XL with SaRA: diffusers' train_dreambooth_lora_sdxl.py flags, SaRA for
LoRA.

    accelerate launch scripts/train_dreambooth_sara_sdxl.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --resolution 1024 --train_batch_size 1 --gradient_checkpointing --mixed_precision fp16 \\
      --max_train_steps 500 --target_fraction 0.058 \\
      --validation_prompt "a photo of sks dog in a bucket" --output_dir sks-dog-sdxl

The output folder holds `unet/` (and `text_encoder/`, `text_encoder_2/` with --train_text_encoder) as PEFT adapter
folders, with --train_text_encoder_ti (pivotal tuning: "a photo of TOK dog" trains new tokens <s0><s1> in both text
encoders) the new tokens' embeddings `<output folder name>_emb.safetensors` (`clip_l`, `clip_g`), a model card, and
the validation images; load it all into a StableDiffusionXLPipeline with `peft_sara.load_sara_weights(pipe,
output_dir)`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

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
from peft_sara.script_utils.cli import UserInputError, run_main
from peft_sara.script_utils.data import CachedLatents, ImageTransform, list_images, make_dataloader
from peft_sara.script_utils.dreambooth import (
    DreamBoothDataset,
    add_dreambooth_arguments,
    check_dreambooth_arguments,
    collate,
    generate_class_images,
    prior_preservation_loss,
)
from peft_sara.script_utils.loop import LoopSettings, train
from peft_sara.script_utils.loss import SDXLDenoisingLoss
from peft_sara.script_utils.models import (
    add_sara_adapter,
    freeze,
    load_sdxl_base_models,
    sara_configs,
    weight_dtype_of,
)
from peft_sara.script_utils.output import finish_output, lock_output_dir, save_final_adapters
from peft_sara.script_utils.pivotal import NewTokenEmbeddings, insert_new_tokens
from peft_sara.script_utils.setup import (
    check_deepspeed_run,
    enable_memory_savings,
    make_accelerator,
    prepare_optimization,
)
from peft_sara.script_utils.stopping import text_encoder_schedules
from peft_sara.script_utils.validation import ValidationSettings, in_training_validator

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="DreamBooth fine-tuning of Stable Diffusion XL with SaRA.")
    add_model_and_output_arguments(parser, default_output_dir="sara-dreambooth-sdxl-model")
    parser.add_argument_group("SDXL").add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the base's, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE overflows in "
        "fp16). It stays in fp32 during training.",
    )
    add_dreambooth_arguments(parser)
    add_sara_arguments(parser)
    add_training_arguments(parser)
    add_pivotal_arguments(parser)
    add_validation_and_hub_arguments(parser)
    parser.set_defaults(resolution=1024)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parse_args_with_config(make_parser(), argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, so that bad input fails in a second, not after loading."""
    check_common_arguments(args)
    base = args.pretrained_model_name_or_path
    if os.path.isdir(base) and not os.path.isdir(os.path.join(base, "text_encoder_2")):
        raise UserInputError(
            f"--pretrained_model_name_or_path {base} is not an SDXL pipeline (it has no text_encoder_2/): train "
            "Stable Diffusion 1.x/2.x with scripts/train_dreambooth_sara.py."
        )
    vae = args.pretrained_vae_model_name_or_path
    if vae and os.path.exists(vae) and not os.path.isfile(os.path.join(vae, "config.json")):
        raise UserInputError(
            f"--pretrained_vae_model_name_or_path {vae} is not a VAE folder (no config.json in it): pass a folder "
            "saved by AutoencoderKL.save_pretrained or a Hub repo id."
        )
    check_dreambooth_arguments(args)
    # New Code #
    # Pivotal tuning: TOK in the prompts stands for new tokens <s0><s1>... (a prompt without it is refused here).
    args.new_tokens = check_pivotal_arguments(args)
    if args.new_tokens:
        args.instance_prompt, args.class_prompt, args.validation_prompt = (
            insert_new_tokens(prompt, args.new_tokens)
            for prompt in (args.instance_prompt, args.class_prompt, args.validation_prompt)
        )
    # End of new code #


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
            # the first text encoder's last layer is not used
            find_unused_parameters=args.train_text_encoder,
        )
        check_deepspeed_run(
            accelerator, args.train_text_encoder or bool(args.new_tokens), args.max_grad_norm, args.layerwise_casting
        )
        weight_dtype = weight_dtype_of(accelerator.mixed_precision)
        vae_path = args.pretrained_vae_model_name_or_path

        # 1. Data: the subject's images, and class images for prior preservation (generated by the base if missing).
        if args.with_prior_preservation:
            generate_class_images(args, accelerator, family="sdxl", vae_path=vae_path)
        class_images = list_images(args.class_data_dir, "--class_data_dir") if args.with_prior_preservation else []

        # 2. Models: the frozen base in the run's precision, but the VAE in fp32, as in diffusers' SDXL script.
        tokenizers, text_encoders, vae, unet, noise_scheduler = load_sdxl_base_models(
            args.pretrained_model_name_or_path,
            args.revision,
            args.variant,
            args.prediction_type,
            weight_dtype,
            vae_path,
        )
        freeze([*text_encoders, unet], accelerator.device, weight_dtype)
        freeze([vae], accelerator.device, torch.float32)
        # New Code #
        # Pivotal tuning: the new tokens join both tokenizers before any prompt is tokenized; their embedding rows in
        # both text encoders train (saved as clip_l and clip_g).
        new_tokens = None
        if args.new_tokens:
            tokens = [token for tokens in args.new_tokens.values() for token in tokens]
            new_tokens = NewTokenEmbeddings(dict(zip(("clip_l", "clip_g"), zip(tokenizers, text_encoders))), tokens)
        # End of new code #
        transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
        dataset = DreamBoothDataset(
            args.instance_images,
            args.instance_prompt,
            class_images,
            args.class_prompt,
            tokenizers,
            transform,
            micro_conditioning=True,  # original size and crop corner of every image, for SDXL's time ids
        )
        if args.cache_latents:
            dataset = CachedLatents(dataset, vae, ("instance_pixels", "class_pixels"), accelerator.device, vae.dtype)
        dataloader = make_dataloader(dataset, args.train_batch_size, collate, args.dataloader_num_workers, args.seed)
        loop = LoopSettings.from_args(args, dataloader, accelerator.num_processes)
        # what decides the result, written into every checkpoint; a resumed run takes the checkpoint's θ and steps
        loop.run_settings = run_settings(args, accelerator, loop.max_train_steps, checkpoint)

        # New Code #
        # 3. SaRA: an adapter that trains the weights below θ of the UNet (and both text encoders); values stay fp32.
        unet_config, text_encoder_config = sara_configs(loop.run_settings)
        add_sara_adapter(unet, unet_config, "UNet")
        adapted = {"unet": unet}
        if args.train_text_encoder:
            for name, text_encoder in zip(TEXT_ENCODERS, text_encoders):
                add_sara_adapter(text_encoder, text_encoder_config, name.replace("_", " "))
                adapted[name] = text_encoder
        loop.run_settings["unet_threshold"] = unet.peft_config["default"].threshold  # resolved from --target_fraction
        if checkpoint is not None:  # the checkpoint's positions, before the optimizer holds the values
            load_checkpoint_adapters(adapted, checkpoint)
        models = dict(adapted)  # the models that train: with pivotal tuning, the text encoders' new rows too
        if new_tokens is not None:
            models.update(zip(TEXT_ENCODERS, text_encoders))
        learning_rate = args.learning_rate or peft_sara.paper_learning_rate(loop.run_settings["unet_threshold"])
        # End of new code #

        enable_memory_savings(
            unet,
            text_encoders,
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
        training = peft_sara.attach([models[name] for name in adapted], optimizer)
        # The text encoders' part trains for the first part of the run: --train_text_encoder_ti_frac (new tokens) or
        # --train_text_encoder_frac (their adapters); every step keeps what does not train bit-exact.
        text_encoder_states = text_encoder_schedules(
            optimizer,
            new_tokens,
            loop.run_settings.get("text_encoder_ti_steps"),
            [p for name in TEXT_ENCODERS if name in adapted for p in models[name].parameters() if p.requires_grad],
            loop.run_settings.get("text_encoder_steps"),
        )
        # checkpoints hold the adapters and the new tokens, not the models
        register_checkpointing(accelerator, {name: models[name] for name in adapted}, training, text_encoder_states)
        # End of new code #
        if accelerator.is_main_process:
            accelerator.init_trackers(args.tracker_project_name or "sara-dreambooth-sdxl", config=tracker_config(args))

        validation = ValidationSettings.from_args(args)
        text_encoders = [models.get(name, encoder) for name, encoder in zip(TEXT_ENCODERS, text_encoders)]
        validate = in_training_validator(
            accelerator,
            models,
            vae,
            text_encoders[0],
            tokenizers[0],
            noise_scheduler,
            validation,
            args.output_dir,
            text_encoder_2=text_encoders[1],
            tokenizer_2=tokenizers[1],
        )
        denoising_loss = SDXLDenoisingLoss(
            vae,
            text_encoders,
            models["unet"],
            noise_scheduler,
            weight_dtype,
            args.resolution,
            args.noise_offset,
            args.snr_gamma,
            args.cache_latents,
            text_encoder_trains=lambda: all(state.trains for state in text_encoder_states),  # re-encoded every step
        )

        def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return prior_preservation_loss(denoising_loss(batch), args.with_prior_preservation, args.prior_loss_weight)

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
        # New Code #
        # the adapters (and new tokens) as PEFT folders and <output name>_emb.safetensors (gathered under ZeRO-3)
        save_final_adapters(accelerator, args, {name: models[name] for name in adapted}, new_tokens)
        # End of new code #
        if accelerator.is_main_process:
            finish_output(
                accelerator,
                args,
                validation,
                global_step,
                instance_prompt=args.instance_prompt,
                new_tokens=args.new_tokens,
                embedding_keys=("clip_l", "clip_g"),
                family="sdxl",
                vae_path=vae_path,
            )
        accelerator.end_training()
        return Path(args.output_dir)


if __name__ == "__main__":
    run_main(main)
