"""The models of a Stable Diffusion run: loading the base, freezing it in the run's precision, the SaRA adapters'
configurations, and the optimizer."""

from __future__ import annotations

from typing import Any

import torch

from ..config import SaRAConfig
from .cli import UserInputError


def load_base_models(
    pretrained_model_name_or_path: str,
    revision: str | None,
    variant: str | None,
    prediction_type: str | None,
    dtype: torch.dtype = torch.float32,
):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of a Stable Diffusion pipeline (Hub id or folder), the
    models loaded in `dtype` (the libraries then keep the modules that need fp32 in fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = {"pretrained_model_name_or_path": pretrained_model_name_or_path, "revision": revision}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(subfolder="tokenizer", **source)
        noise_scheduler = DDPMScheduler.from_pretrained(subfolder="scheduler", **source)
        text_encoder = CLIPTextModel.from_pretrained(subfolder="text_encoder", variant=variant, dtype=dtype, **source)
        vae = AutoencoderKL.from_pretrained(subfolder="vae", variant=variant, dtype=dtype, **source)
        unet = UNet2DConditionModel.from_pretrained(subfolder="unet", variant=variant, dtype=dtype, **source)
    except (OSError, ValueError) as error:
        raise UserInputError(f"Could not load the base pipeline {pretrained_model_name_or_path}: {error}") from error
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def load_sdxl_base_models(
    pretrained_model_name_or_path: str,
    revision: str | None,
    variant: str | None,
    prediction_type: str | None,
    dtype: torch.dtype = torch.float32,
    vae_path: str | None = None,
):
    """Both tokenizers and text encoders (the second with its projection, whose pooled output SDXL's UNet takes),
    the VAE (from `vae_path` when given, e.g. the fp16-safe one), UNet and noise scheduler of an SDXL pipeline. The
    VAE is loaded in fp32 whatever `dtype` is, as diffusers' SDXL DreamBooth script keeps it (SDXL's own VAE
    overflows in fp16)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = {"pretrained_model_name_or_path": pretrained_model_name_or_path, "revision": revision}
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(subfolder=name, **source) for name in ("tokenizer", "tokenizer_2")]
        noise_scheduler = DDPMScheduler.from_pretrained(subfolder="scheduler", **source)
        text_encoders = [
            CLIPTextModel.from_pretrained(subfolder="text_encoder", variant=variant, dtype=dtype, **source),
            CLIPTextModelWithProjection.from_pretrained(
                subfolder="text_encoder_2", variant=variant, dtype=dtype, **source
            ),
        ]
        unet = UNet2DConditionModel.from_pretrained(subfolder="unet", variant=variant, dtype=dtype, **source)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Could not load the SDXL base pipeline {pretrained_model_name_or_path}: {error}"
        ) from error
    vae = load_vae(pretrained_model_name_or_path, revision, variant, torch.float32, vae_path)
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    return tokenizers, text_encoders, vae, unet, noise_scheduler


def load_vae(
    pretrained_model_name_or_path: str,
    revision: str | None,
    variant: str | None,
    dtype: torch.dtype,
    vae_path: str | None = None,
):
    """The base's VAE, or the one at `vae_path` (a VAE repo or folder of its own: the base's revision and variant
    do not apply to it)."""
    from diffusers import AutoencoderKL

    try:
        if vae_path is None:
            return AutoencoderKL.from_pretrained(
                pretrained_model_name_or_path, subfolder="vae", revision=revision, variant=variant, dtype=dtype
            )
        return AutoencoderKL.from_pretrained(vae_path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserInputError(f"Could not load the VAE {vae_path or pretrained_model_name_or_path}: {error}") from error


# The pipeline class of each family of base models the scripts train.
PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
}


def load_pipeline(
    pretrained_model_name_or_path: str,
    revision: str | None,
    variant: str | None,
    dtype: torch.dtype = torch.float32,
    family: str = "sd",
    vae_path: str | None = None,
):
    """The base pipeline of a `family` (a key of PIPELINE_CLASSES) for sampling (class images, final validation):
    Stable Diffusion without its safety checker; SDXL with the VAE at `vae_path` when given."""
    import diffusers

    source = {"revision": revision, "variant": variant, "dtype": dtype}
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    if family == "sd":
        return pipeline_class.from_pretrained(
            pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False, **source
        )
    extra = {"vae": load_vae(pretrained_model_name_or_path, revision, variant, dtype, vae_path)} if vae_path else {}
    return pipeline_class.from_pretrained(pretrained_model_name_or_path, **source, **extra)


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen weights under the run's mixed precision (`accelerator.mixed_precision`)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def freeze(models: list[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """The base models train nothing and run in the run's precision (SaRA's values, added later, stay fp32)."""
    for model in models:
        model.requires_grad_(False)
        model.to(device)
        if model.dtype != dtype:  # diffusers warns about any cast, also to the dtype a model already has
            model.to(dtype=dtype)


def sara_configs(settings: dict[str, Any]) -> tuple[SaRAConfig, SaRAConfig]:
    """SaRA configurations of the UNet and the text encoder from a run's settings (see `checkpoints.run_settings`).

    The UNet's θ is the resolved one where the settings know it (a resumed run), else `threshold` or
    `target_fraction`. The text encoder's is `text_encoder_threshold`, else `threshold` (2e-3 by default): a share
    resolved on the UNet's weights says nothing about the text encoder's, whose scale differs.
    """
    shared = {
        "lambda_rank": settings["lambda_rank"],
        "progressive_step": settings["progressive_step"],
        "include_bias": settings["include_bias"],
        "rank_seed": settings["seed"] or 0,
    }
    threshold = settings["threshold"] if settings["threshold"] is not None else SaRAConfig().threshold
    resolved = settings.get("unet_threshold")
    unet_config = SaRAConfig(
        threshold=resolved if resolved is not None else threshold,
        target_fraction=None if resolved is not None else settings["target_fraction"],
        **shared,
    )
    text_threshold = settings["text_encoder_threshold"]
    text_config = SaRAConfig(threshold=text_threshold if text_threshold is not None else threshold, **shared)
    return unet_config, text_config


def add_sara_adapter(model: torch.nn.Module, config: SaRAConfig, what: str) -> None:
    """Add the adapter in place (the model keeps its class), refusing a threshold that selects nothing.

    A diffusers model takes it through its own `add_adapter`. Any other model (the text encoders) takes it through
    PEFT's `inject_adapter_in_model`, flagged as transformers' `add_adapter` flags it (diffusers' adapter functions and
    transformers' gradient checkpointing read the flag): that wrapper adds nothing else, and refuses to run unless a
    peft release of its choosing is installed (transformers 5.24 asks for a peft 0.22 that does not exist yet).
    """
    from diffusers import ModelMixin
    from peft import inject_adapter_in_model

    try:
        if isinstance(model, ModelMixin):
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model)
            model._hf_peft_config_loaded = True
    except ValueError as error:
        raise UserInputError(f"SaRA on the {what}: {error}") from error


def make_optimizer(
    params: list[torch.nn.Parameter] | list[dict[str, Any]],
    learning_rate: float,
    betas: tuple[float, float],
    weight_decay: float,
    epsilon: float,
    use_8bit_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (8-bit from bitsandbytes with `use_8bit_adam`) over the given parameters or parameter groups."""
    if use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=epsilon)
