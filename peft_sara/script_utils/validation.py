"""Validation images: sampled with the models in training (no copy, no dtype change) or from the saved adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class ValidationSettings:
    """What to sample: `num_images` images of `prompt` (None: no validation) with a fixed seed."""

    prompt: str | None
    num_images: int
    num_inference_steps: int
    resolution: int
    seed: int | None

    @classmethod
    def from_args(cls, args) -> ValidationSettings:
        return cls(
            args.validation_prompt, args.num_validation_images, args.num_inference_steps, args.resolution, args.seed
        )


def generate_validation_images(
    pipeline, settings: ValidationSettings, dtype: torch.dtype = torch.float32, prompt_inputs: dict | None = None
) -> list[Image.Image]:
    """The validation images of `settings`. The components keep their dtypes (the training UNet is shared); under
    mixed precision the sampling runs under autocast, as training does. `prompt_inputs` (e.g. the prompt's
    embeddings, where a text encoder is no longer loaded) replace the prompt."""
    prompt_inputs = prompt_inputs or {"prompt": settings.prompt}
    generator = torch.Generator(device="cpu").manual_seed(settings.seed if settings.seed is not None else 0)
    pipeline.set_progress_bar_config(disable=True)
    autocast = torch.autocast(pipeline.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        return [
            pipeline(
                **prompt_inputs,
                num_inference_steps=settings.num_inference_steps,
                generator=generator,
                height=settings.resolution,
                width=settings.resolution,
            ).images[0]
            for _ in range(settings.num_images)
        ]


def validation_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler, text_encoder_2=None, tokenizer_2=None):
    """A pipeline around the models in training: nothing is loaded again and no component changes dtype. With a
    second text encoder and tokenizer it is an SDXL pipeline."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        )
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


def log_validation(trackers, images: list[Image.Image], output_dir: str, tag: str, step: int) -> list[Path]:
    """Save the images as PNGs under output_dir/validation and send them to the trackers."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{tag}-{index}.png"
        image.save(path)
        paths.append(path)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
    return paths


def in_training_validator(
    accelerator,
    models: dict[str, torch.nn.Module],
    vae,
    text_encoder,
    tokenizer,
    noise_scheduler,
    settings: ValidationSettings,
    output_dir: str,
    text_encoder_2=None,
    tokenizer_2=None,
) -> Callable[[int], None]:
    """`sampling_validator` of a Stable Diffusion run: a text encoder found in `models` is the trained one. SDXL
    passes its second text encoder and tokenizer."""

    def make_pipeline(unwrapped: dict[str, torch.nn.Module]):
        return validation_pipeline(
            vae,
            unwrapped.get("text_encoder", text_encoder),
            tokenizer,
            unwrapped["unet"],
            noise_scheduler,
            unwrapped.get("text_encoder_2", text_encoder_2),
            tokenizer_2,
        )

    return sampling_validator(accelerator, models, make_pipeline, settings, output_dir)


def sampling_validator(
    accelerator,
    models: dict[str, torch.nn.Module],
    make_pipeline: Callable[[dict[str, torch.nn.Module]], Any],
    settings: ValidationSettings,
    output_dir: str,
    prompt_inputs: Callable[[], dict] | None = None,
) -> Callable[[int], None]:
    """`validate(step)` for the loop: samples the validation prompt with the models in training (main process), then
    puts them back in training mode. `models` are the prepared ones; `make_pipeline` builds a pipeline around them,
    unwrapped, and `prompt_inputs()` gives what replaces the prompt in its call. Models that ZeRO-3 partitions gather
    their weights in every forward, a collective: then every process samples the same images, and the main one saves
    and logs them."""
    from ..sharding import forward_needs_every_process
    from .models import weight_dtype_of

    def validate(step: int) -> None:
        if not settings.prompt:
            return
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
        if not accelerator.is_main_process and not any(map(forward_needs_every_process, unwrapped.values())):
            return
        for model in unwrapped.values():
            model.eval()
        pipeline = make_pipeline(unwrapped).to(accelerator.device)
        dtype = weight_dtype_of(accelerator.mixed_precision)
        inputs = prompt_inputs() if prompt_inputs is not None else None
        images = generate_validation_images(pipeline, settings, dtype, inputs)
        if accelerator.is_main_process:
            log_validation(accelerator.trackers, images, output_dir, f"step-{step}", step)
        for model in unwrapped.values():
            model.train()

    return validate


def final_validation(
    accelerator,
    base_model: str,
    revision: str | None,
    variant: str | None,
    output_dir: str,
    settings: ValidationSettings,
    step: int,
    family: str = "sd",
    vae_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Images of the saved adapters, loaded as a user loads them into a fresh pipeline in `dtype` (none without a
    prompt)."""
    from ..loading import load_sara_weights
    from .models import load_pipeline

    if not settings.prompt:
        return []
    pipeline = load_pipeline(base_model, revision, variant, dtype, family, vae_path)
    load_sara_weights(pipeline, output_dir)
    pipeline.to(accelerator.device)
    return log_validation(
        accelerator.trackers, generate_validation_images(pipeline, settings, dtype), output_dir, "final", step
    )
