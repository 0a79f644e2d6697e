#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion 3 (3.0, 3.5) with SaRA: diffusers' train_dreambooth_lora_sd3.py flags,
SaRA for LoRA.

    accelerate launch scripts/train_dreambooth_sara_sd3.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --resolution 1024 --train_batch_size 1 --gradient_checkpointing --mixed_precision bf16 \\
      --max_train_steps 500 --target_fraction 0.02 \\
      --validation_prompt "a photo of sks dog in a bucket" --output_dir sks-dog-sd3

The base runs in the run's precision, SaRA's values, gradients and optimizer state stay fp32. The prompts' T5
embeddings are computed once before training, after which T5 leaves the run (its weights never train, as in
diffusers' script); with --train_text_encoder both CLIP encoders' adapters train. Pivotal tuning
(--train_text_encoder_ti) trains new tokens in both CLIP encoders, saved as `clip_l` and `clip_g` in
`<output folder name>_emb.safetensors`, and with --enable_t5_ti in T5 too, saved as `t5` (T5 then stays in the run).
The output folder holds `transformer/` (and `text_encoder/`, `text_encoder_2/`) as PEFT adapter folders, a model card
and the validation images; load it all into a StableDiffusion3Pipeline with
`peft_sara.load_sara_weights(pipe, output_dir)`.
"""

from __future__ import annotations

import argparse
import gc
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
from peft_sara.script_utils.flow_matching import (
    FlowMatching,
    add_flow_matching_arguments,
    check_flow_matching_arguments,
)
from peft_sara.script_utils.loop import LoopSettings, train
from peft_sara.script_utils.models import add_sara_adapter, freeze, sara_configs, weight_dtype_of
from peft_sara.script_utils.output import finish_output, lock_output_dir, save_final_adapters
from peft_sara.script_utils.pivotal import NewTokenEmbeddings, insert_new_tokens
from peft_sara.script_utils.sd3 import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    MAX_SEQUENCE_LENGTH,
    SD3DenoisingLoss,
    load_sd3_base_models,
    sd3_prompts,
    sd3_validation_inputs,
    sd3_validation_pipeline,
)
from peft_sara.script_utils.setup import (
    check_deepspeed_run,
    enable_memory_savings,
    make_accelerator,
    prepare_optimization,
)
from peft_sara.script_utils.stopping import text_encoder_schedules
from peft_sara.script_utils.validation import ValidationSettings, sampling_validator

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the CLIP encoders; T5 (text_encoder_3) never trains


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="DreamBooth fine-tuning of Stable Diffusion 3 with SaRA.")
    add_model_and_output_arguments(parser, default_output_dir="sara-dreambooth-sd3-model")
    group = parser.add_argument_group("SD3")
    group.add_argument(
        "--max_sequence_length",
        type=int,
        default=DEFAULT_MAX_SEQUENCE_LENGTH,
        help=f"Tokens of the T5 prompt encoding (at most {MAX_SEQUENCE_LENGTH}; diffusers' SD3 script's default).",
    )
    group.add_argument(
        "--precondition_outputs",
        type=int,
        default=1,
        choices=[0, 1],
        help="1: turn the prediction into an estimate of the latents (prediction·(-σ) + noisy latents) and regress "
        "those, as in diffusers' SD3 script; 0: regress the velocity (noise - latents).",
    )
    add_flow_matching_arguments(parser)
    add_dreambooth_arguments(parser)
    add_sara_arguments(parser)
    add_training_arguments(parser)
    add_pivotal_arguments(parser, t5=True)
    add_validation_and_hub_arguments(parser)
    parser.set_defaults(resolution=512)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parse_args_with_config(make_parser(), argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, so that bad input fails in a second, not after loading."""
    check_common_arguments(args)
    base = args.pretrained_model_name_or_path
    if os.path.isdir(base) and not os.path.isdir(os.path.join(base, "text_encoder_3")):
        raise UserInputError(
            f"--pretrained_model_name_or_path {base} is not an SD3 pipeline (it has no text_encoder_3/): train Flux "
            "with scripts/train_dreambooth_sara_flux.py, Stable Diffusion with scripts/train_dreambooth_sara.py, "
            "SDXL with scripts/train_dreambooth_sara_sdxl.py."
        )
    check_flow_matching_arguments(args, "SD3", MAX_SEQUENCE_LENGTH)
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
        )
        check_deepspeed_run(
            accelerator, args.train_text_encoder or bool(args.new_tokens), args.max_grad_norm, args.layerwise_casting
        )
        weight_dtype = weight_dtype_of(accelerator.mixed_precision)

        # 1. Data: the subject's images, and class images for prior preservation (generated by the base if missing).
        if args.with_prior_preservation:
            generate_class_images(args, accelerator, family="sd3")
        class_images = list_images(args.class_data_dir, "--class_data_dir") if args.with_prior_preservation else []

        # 2. Models: the frozen base in the run's precision.
        tokenizers, text_encoders, vae, transformer, noise_scheduler = load_sd3_base_models(
            args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype
        )
        # the transformer waits on the CPU while T5 encodes the prompts on the accelerator: the two never share it
        freeze([*text_encoders, vae], accelerator.device, weight_dtype)
        freeze([transformer], torch.device("cpu"), weight_dtype)
        clips, clip_tokenizers = text_encoders[:2], tokenizers[:2]
        # New Code #
        # Pivotal tuning: the new tokens join both CLIP tokenizers before any prompt is tokenized; their embedding
        # rows in both CLIP encoders train (saved as clip_l and clip_g). T5 reads the prompt as it is written, at
        # training as at inference, unless --enable_t5_ti gives it the tokens too (saved as t5).
        new_tokens, t5 = None, None
        if args.new_tokens:
            tokens = [token for tokens in args.new_tokens.values() for token in tokens]
            encoders = dict(zip(("clip_l", "clip_g"), zip(clip_tokenizers, clips)))
            if args.enable_t5_ti:
                t5 = text_encoders[2]
                encoders["t5"] = (tokenizers[2], t5)
            new_tokens = NewTokenEmbeddings(encoders, tokens)
        # End of new code #
        # T5's embeddings of the run's prompts, once; T5 then leaves the run, freeing its memory (unless it trains).
        clip_trains = args.train_text_encoder or new_tokens is not None
        prompts = sd3_prompts(
            tokenizers,
            text_encoders,
            {"instance": args.instance_prompt, "class": args.class_prompt, "validation": args.validation_prompt},
            args.max_sequence_length,
            clip_trains,
            t5_trains=t5 is not None,
        )
        del text_encoders
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not args.layerwise_casting:  # else it moves once stored in fp8, below
            transformer.to(accelerator.device)

        transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
        dataset = DreamBoothDataset(
            args.instance_images, args.instance_prompt, class_images, args.class_prompt, clip_tokenizers, transform
        )
        if args.cache_latents:
            dataset = CachedLatents(dataset, vae, ("instance_pixels", "class_pixels"), accelerator.device, vae.dtype)
        dataloader = make_dataloader(dataset, args.train_batch_size, collate, args.dataloader_num_workers, args.seed)
        loop = LoopSettings.from_args(args, dataloader, accelerator.num_processes)
        # what decides the result, written into every checkpoint; a resumed run takes the checkpoint's θ and steps
        loop.run_settings = run_settings(args, accelerator, loop.max_train_steps, checkpoint)

        # New Code #
        # 3. SaRA: an adapter that trains the weights below θ of the transformer (and both CLIP encoders); values
        # stay fp32.
        transformer_config, text_encoder_config = sara_configs(loop.run_settings)
        add_sara_adapter(transformer, transformer_config, "transformer")
        adapted = {"transformer": transformer}
        if args.train_text_encoder:
            for name, text_encoder in zip(TEXT_ENCODERS, clips):
                add_sara_adapter(text_encoder, text_encoder_config, name.replace("_", " "))
                adapted[name] = text_encoder
        # the denoiser's θ as resolved from --target_fraction (named after the UNet in every script's checkpoints)
        loop.run_settings["unet_threshold"] = transformer.peft_config["default"].threshold
        if checkpoint is not None:  # the checkpoint's positions, before the optimizer holds the values
            load_checkpoint_adapters(adapted, checkpoint)
        models = dict(adapted)  # the models that train: with pivotal tuning, the CLIP encoders' new rows too
        if new_tokens is not None:
            models.update(zip(TEXT_ENCODERS, clips))
        if t5 is not None:
            models["text_encoder_3"] = t5
        learning_rate = args.learning_rate or peft_sara.paper_learning_rate(loop.run_settings["unet_threshold"])
        # End of new code #

        enable_memory_savings(
            transformer,
            clips,
            args.gradient_checkpointing,
            args.enable_xformers_memory_efficient_attention,
            args.train_text_encoder,
            args.layerwise_casting,
            weight_dtype,
        )
        transformer.to(accelerator.device)  # with --layerwise_casting its bf16 weights never reach the accelerator
        models, params, optimizer, dataloader, lr_scheduler = prepare_optimization(
            accelerator, models, dataloader, learning_rate, args, loop.max_train_steps
        )
        # New Code #
        # The one extra line of SaRA training: optimizer.step() now applies the regulariser and the progressive step.
        training = peft_sara.attach([models[name] for name in adapted], optimizer)
        # The CLIP encoders' part trains for the first part of the run: --train_text_encoder_ti_frac (new tokens) or
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
            accelerator.init_trackers(args.tracker_project_name or "sara-dreambooth-sd3", config=tracker_config(args))

        validation = ValidationSettings.from_args(args)
        validate = sampling_validator(
            accelerator,
            models,
            sd3_validation_pipeline(vae, clips, clip_tokenizers, noise_scheduler),
            validation,
            args.output_dir,
            prompt_inputs=lambda: sd3_validation_inputs(prompts, clips, t5),
        )
        denoising_loss = SD3DenoisingLoss(
            vae,
            models["transformer"],
            [models.get(name, encoder) for name, encoder in zip(TEXT_ENCODERS, clips)],
            noise_scheduler,
            prompts,
            FlowMatching.from_args(args),
            weight_dtype,
            bool(args.precondition_outputs),
            args.with_prior_preservation,
            args.cache_latents,
            text_encoder_trains=lambda: all(state.trains for state in text_encoder_states),  # re-encoded every step
            t5=models.get("text_encoder_3"),
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
                embedding_keys=new_tokens.keys if new_tokens is not None else ("clip_l", "clip_g"),
                family="sd3",
                dtype=weight_dtype,
            )
        accelerator.end_training()
        return Path(args.output_dir)


if __name__ == "__main__":
    run_main(main)
