"""What a Flux run needs around SaRA: its base models, its prompts encoded as FluxPipeline encodes them, the
flow-matching loss on latents packed into the transformer's tokens, and a pipeline around the models in training."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cli import UserInputError
from .flow_matching import FlowMatching
from .loss import encode_latents
from .prompts import EncodedPrompts

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's limit of the T5 prompt length


def load_flux_base_models(
    pretrained_model_name_or_path: str, revision: str | None, variant: str | None, dtype: torch.dtype
):
    """The CLIP and T5 tokenizers and text encoders, VAE, transformer and flow-matching scheduler of a Flux
    pipeline (Hub id or folder), the models in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    source = {"pretrained_model_name_or_path": pretrained_model_name_or_path, "revision": revision}
    models = {"variant": variant, "dtype": dtype, **source}
    try:
        tokenizers = [
            CLIPTokenizer.from_pretrained(subfolder="tokenizer", **source),
            AutoTokenizer.from_pretrained(subfolder="tokenizer_2", **source),
        ]
        text_encoders = [
            CLIPTextModel.from_pretrained(subfolder="text_encoder", **models),
            T5EncoderModel.from_pretrained(subfolder="text_encoder_2", **models),
        ]
        vae = AutoencoderKL.from_pretrained(subfolder="vae", **models)
        transformer = FluxTransformer2DModel.from_pretrained(subfolder="transformer", **models)
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder="scheduler", **source)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Could not load the Flux base pipeline {pretrained_model_name_or_path}: {error}"
        ) from error
    return tokenizers, text_encoders, vae, transformer, noise_scheduler


def clip_pooled(text_encoders, input_ids) -> tuple[torch.Tensor]:
    """CLIP's part of FluxPipeline's prompt encoding: its pooled output, the transformer's `pooled_projections`."""
    (clip,), (ids,) = text_encoders, input_ids
    return (clip(ids.to(clip.device), output_hidden_states=False).pooler_output,)


def flux_prompts(
    tokenizers,
    text_encoders,
    prompts: dict[str, str | None],
    max_sequence_length: int,
    clip_trains: bool,
    t5_trains: bool = False,
) -> EncodedPrompts:
    """The run's prompts encoded once, as FluxPipeline.encode_prompt encodes them (CLIP's part unless it trains,
    T5's unless it trains)."""
    (clip_tokenizer, t5_tokenizer), (clip, t5) = tokenizers, text_encoders
    return EncodedPrompts(
        prompts, t5_tokenizer, t5, max_sequence_length, [clip_tokenizer], [clip], clip_pooled, clip_trains, t5_trains
    )


def flux_validation_inputs(prompts: EncodedPrompts, clip, t5=None) -> dict[str, torch.Tensor]:
    """FluxPipeline's prompt inputs of the validation prompt; where CLIP (or T5) trains, its part from `clip`
    (`t5`) as it is."""
    hidden_states, (pooled,) = prompts.of("validation", [clip], t5)
    return {"prompt_embeds": hidden_states, "pooled_prompt_embeds": pooled}


class FluxDenoisingLoss:
    """Per-sample flow-matching loss of a Flux transformer: latents (or cached distributions) shifted and scaled as
    the VAE's config says, noised, packed 2x2 into tokens with their position ids, and the predicted velocity
    (noise - latents) compared to the true one. With prior preservation the class half of a batch follows the
    instance half. `guidance_scale` feeds guidance-distilled transformers (Flux.1 [dev]) their guidance input. `t5`
    is the prepared T5 where it trains new tokens."""

    def __init__(
        self,
        vae,
        transformer,
        text_encoder,
        noise_scheduler,
        prompts: EncodedPrompts,
        flow_matching: FlowMatching,
        weight_dtype: torch.dtype,
        guidance_scale: float,
        with_prior_preservation: bool,
        cached_latents: bool = False,
        text_encoder_trains: Callable[[], bool] | None = None,
        t5=None,
    ) -> None:
        self.vae, self.transformer, self.text_encoder, self.t5 = vae, transformer, text_encoder, t5
        self.noise_scheduler = noise_scheduler
        self.prompts, self.flow_matching, self.weight_dtype = prompts, flow_matching, weight_dtype
        self.with_prior_preservation, self.cached_latents = with_prior_preservation, cached_latents
        self.text_encoder_trains = text_encoder_trains or (lambda: True)
        model = getattr(transformer, "module", transformer)  # DDP wraps it
        self.guidance_scale = guidance_scale if model.config.guidance_embeds else None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from diffusers import FluxPipeline

        latents = encode_latents(self.vae, batch["pixel_values"], self.cached_latents, self.weight_dtype)
        noisy, timesteps, sigmas, noise = self.flow_matching.noisy_latents(self.noise_scheduler, latents)
        size, channels, height, width = latents.shape
        kinds = ["instance"] * size
        if self.with_prior_preservation:
            kinds = ["instance"] * (size // 2) + ["class"] * (size // 2)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder_trains()):
            ids = [batch.get("input_ids")]
            hidden_states, (pooled,) = self.prompts.batch(kinds, [self.text_encoder], ids, self.t5)
        device = latents.device
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((size,), self.guidance_scale, device=device, dtype=torch.float32)
        prediction = self.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, size, channels, height, width),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled.to(self.weight_dtype),
            encoder_hidden_states=hidden_states.to(self.weight_dtype),
            txt_ids=torch.zeros(hidden_states.shape[1], 3, device=device, dtype=self.weight_dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, device, self.weight_dtype),
            return_dict=False,
        )[0]
        scale = self.vae_scale_factor
        prediction = FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)
        return self.flow_matching.per_sample_loss(prediction, noise - latents, sigmas)


def flux_validation_pipeline(vae, clip, clip_tokenizer, noise_scheduler):
    """`make_pipeline` of `validation.sampling_validator`: a FluxPipeline around the models in training (the trained
    CLIP where it trains) without T5, whose part of the prompt `flux_validation_inputs` gives."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    def make_pipeline(unwrapped: dict[str, torch.nn.Module]):
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config),  # sampling changes it
            vae=vae,
            text_encoder=unwrapped.get("text_encoder", clip),
            tokenizer=clip_tokenizer,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=unwrapped["transformer"],
        )

    return make_pipeline
