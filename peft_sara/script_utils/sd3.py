"""What a Stable Diffusion 3 run needs around SaRA: its base models, its prompts encoded as StableDiffusion3Pipeline
encodes them, the flow-matching loss (optionally preconditioned), and a pipeline around the models in training."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cli import UserInputError
from .flow_matching import FlowMatching
from .loss import encode_latents
from .prompts import EncodedPrompts

# diffusers' train_dreambooth_lora_sd3.py default of the T5 prompt length (the pipeline's own is 256)
DEFAULT_MAX_SEQUENCE_LENGTH = 77
MAX_SEQUENCE_LENGTH = 512


def load_sd3_base_models(
    pretrained_model_name_or_path: str, revision: str | None, variant: str | None, dtype: torch.dtype
):
    """The two CLIP (with projection) and the T5 tokenizers and text encoders, VAE, transformer and flow-matching
    scheduler of an SD3 pipeline (Hub id or folder), the models in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    source = {"pretrained_model_name_or_path": pretrained_model_name_or_path, "revision": revision}
    models = {"variant": variant, "dtype": dtype, **source}
    try:
        tokenizers = [
            CLIPTokenizer.from_pretrained(subfolder="tokenizer", **source),
            CLIPTokenizer.from_pretrained(subfolder="tokenizer_2", **source),
            AutoTokenizer.from_pretrained(subfolder="tokenizer_3", **source),
        ]
        text_encoders = [
            CLIPTextModelWithProjection.from_pretrained(subfolder="text_encoder", **models),
            CLIPTextModelWithProjection.from_pretrained(subfolder="text_encoder_2", **models),
            T5EncoderModel.from_pretrained(subfolder="text_encoder_3", **models),
        ]
        vae = AutoencoderKL.from_pretrained(subfolder="vae", **models)
        transformer = SD3Transformer2DModel.from_pretrained(subfolder="transformer", **models)
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder="scheduler", **source)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Could not load the SD3 base pipeline {pretrained_model_name_or_path}: {error}"
        ) from error
    return tokenizers, text_encoders, vae, transformer, noise_scheduler


def sd3_clip_encoding(text_encoders, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Both CLIP encoders' part of SD3's prompt encoding: their penultimate hidden states side by side, and their
    projected pooled outputs side by side."""
    hidden_states, pooled = [], []
    for text_encoder, ids in zip(text_encoders, input_ids):
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        pooled.append(output[0])
    return torch.cat(hidden_states, dim=-1), torch.cat(pooled, dim=-1)


def joint_prompt_embeds(t5: torch.Tensor, clip_hidden_states: torch.Tensor) -> torch.Tensor:
    """SD3's prompt embeddings: the CLIP hidden states, zero-padded to T5's width, followed by T5's tokens."""
    padded = torch.nn.functional.pad(clip_hidden_states, (0, t5.shape[-1] - clip_hidden_states.shape[-1]))
    return torch.cat([padded, t5.to(padded.dtype)], dim=-2)


def sd3_prompts(
    tokenizers,
    text_encoders,
    prompts: dict[str, str | None],
    max_sequence_length: int,
    clip_trains: bool,
    t5_trains: bool = False,
) -> EncodedPrompts:
    """The run's prompts encoded once, as StableDiffusion3Pipeline.encode_prompt encodes them (the CLIP part unless
    the CLIP encoders train, T5's unless it trains). The validation's negative prompt is the pipeline's default,
    empty one."""
    *clip_tokenizers, t5_tokenizer = tokenizers
    *clip_encoders, t5 = text_encoders
    if prompts.get("validation") is not None:
        prompts = {**prompts, "negative": ""}
    encoding = (clip_tokenizers, clip_encoders, sd3_clip_encoding, clip_trains, t5_trains)
    return EncodedPrompts(prompts, t5_tokenizer, t5, max_sequence_length, *encoding)


def sd3_validation_inputs(prompts: EncodedPrompts, clip_encoders, t5=None) -> dict[str, torch.Tensor]:
    """StableDiffusion3Pipeline's prompt inputs of the validation prompt and its negative prompt; where the CLIP
    encoders (or T5) train, their part from them as they are."""
    inputs = {}
    for kind, prefix in (("validation", ""), ("negative", "negative_")):
        t5_states, (clip_hidden_states, pooled) = prompts.of(kind, clip_encoders, t5)
        inputs[f"{prefix}prompt_embeds"] = joint_prompt_embeds(t5_states, clip_hidden_states)
        inputs[f"{prefix}pooled_prompt_embeds"] = pooled
    return inputs


class SD3DenoisingLoss:
    """Per-sample flow-matching loss of an SD3 transformer: latents (or cached distributions) shifted and scaled as
    the VAE's config says and noised; with `precondition_outputs` (diffusers' default) the prediction is turned into
    an estimate of the latents (prediction·(-σ) + noisy) and compared to them, else the predicted velocity to
    noise - latents. With prior preservation the class half of a batch follows the instance half. `t5` is the
    prepared T5 where it trains new tokens."""

    def __init__(
        self,
        vae,
        transformer,
        text_encoders: list,
        noise_scheduler,
        prompts: EncodedPrompts,
        flow_matching: FlowMatching,
        weight_dtype: torch.dtype,
        precondition_outputs: bool,
        with_prior_preservation: bool,
        cached_latents: bool = False,
        text_encoder_trains: Callable[[], bool] | None = None,
        t5=None,
    ) -> None:
        self.vae, self.transformer, self.text_encoders, self.t5 = vae, transformer, text_encoders, t5
        self.noise_scheduler, self.prompts, self.flow_matching = noise_scheduler, prompts, flow_matching
        self.weight_dtype, self.precondition_outputs = weight_dtype, precondition_outputs
        self.with_prior_preservation, self.cached_latents = with_prior_preservation, cached_latents
        self.text_encoder_trains = text_encoder_trains or (lambda: True)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        latents = encode_latents(self.vae, batch["pixel_values"], self.cached_latents, self.weight_dtype)
        noisy, timesteps, sigmas, noise = self.flow_matching.noisy_latents(self.noise_scheduler, latents)
        size = len(latents)
        kinds = ["instance"] * size
        if self.with_prior_preservation:
            kinds = ["instance"] * (size // 2) + ["class"] * (size // 2)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder_trains()):
            ids = [batch.get("input_ids"), batch.get("input_ids_2")]
            t5_states, (clip_hidden_states, pooled) = self.prompts.batch(kinds, self.text_encoders, ids, self.t5)
        prediction = self.transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=joint_prompt_embeds(t5_states, clip_hidden_states).to(self.weight_dtype),
            pooled_projections=pooled.to(self.weight_dtype),
            return_dict=False,
        )[0]
        if self.precondition_outputs:
            return self.flow_matching.per_sample_loss(prediction.float() * -sigmas + noisy.float(), latents, sigmas)
        return self.flow_matching.per_sample_loss(prediction, noise - latents, sigmas)


def sd3_validation_pipeline(vae, text_encoders, tokenizers, noise_scheduler):
    """`make_pipeline` of `validation.sampling_validator`: a StableDiffusion3Pipeline around the models in training
    (the trained CLIP encoders where they train) without T5, whose part of the prompts `sd3_validation_inputs`
    gives."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    def make_pipeline(unwrapped: dict[str, torch.nn.Module]):
        return StableDiffusion3Pipeline(
            transformer=unwrapped["transformer"],
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config),  # sampling changes it
            vae=vae,
            text_encoder=unwrapped.get("text_encoder", text_encoders[0]),
            tokenizer=tokenizers[0],
            text_encoder_2=unwrapped.get("text_encoder_2", text_encoders[1]),
            tokenizer_2=tokenizers[1],
            text_encoder_3=None,
            tokenizer_3=None,
        )

    return make_pipeline
