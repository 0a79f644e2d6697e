"""The denoising loss: noisy latents and their targets, the per-sample MSE with optional min-SNR weighting."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cli import UserInputError
from .data import sample_cached_latents


def encode_latents(vae, images: torch.Tensor, cached: bool, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents of a batch of images in `dtype`, or drawn from their cached distributions (`--cache_latents`).
    The images are encoded in the VAE's own dtype (SDXL's stays fp32 under mixed precision); a VAE with latent
    statistics or a shift factor (Flux's, SD3's) in its config has them taken out, as its pipeline expects."""
    if cached:
        latents = sample_cached_latents(images.to(vae.device)).to(dtype)
    else:
        latents = vae.encode(images.to(vae.dtype)).latent_dist.sample()
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        latents = (latents - mean) / std
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return (latents * vae.config.scaling_factor).to(dtype)


def diffusion_targets(noise_scheduler, latents: torch.Tensor, noise_offset: float):
    """Noisy latents, timesteps and the regression target of one noise-prediction step."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserInputError(f"Unsupported prediction type {noise_scheduler.config.prediction_type}.")
    return noisy_latents, timesteps, target


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, noise_scheduler, timesteps, snr_gamma: float | None
) -> torch.Tensor:
    """MSE per sample, with min-SNR-γ weighting when `snr_gamma` is set (Hang et al., 2023)."""
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return loss
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
    return loss * weights


class DenoisingLoss:
    """Per-sample loss of a batch: encode (or draw cached latents), add noise, predict it (or the velocity)."""

    def __init__(
        self,
        vae,
        text_encoder,
        unet,
        noise_scheduler,
        weight_dtype: torch.dtype,
        noise_offset: float = 0.0,
        snr_gamma: float | None = None,
        cached_latents: bool = False,
        text_encoder_trains: Callable[[], bool] | None = None,
    ) -> None:
        self.vae, self.text_encoder, self.unet, self.noise_scheduler = vae, text_encoder, unet, noise_scheduler
        self.weight_dtype, self.noise_offset, self.snr_gamma = weight_dtype, noise_offset, snr_gamma
        self.cached_latents = cached_latents
        # once the text encoder's trained part stops (--train_text_encoder(_ti)_frac), it runs without gradients
        self.text_encoder_trains = text_encoder_trains or (lambda: True)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        latents = encode_latents(self.vae, batch["pixel_values"], self.cached_latents, self.weight_dtype)
        noisy_latents, timesteps, target = diffusion_targets(self.noise_scheduler, latents, self.noise_offset)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder_trains()):
            conditioning = self.conditioning(batch)
        prediction = self.unet(noisy_latents, timesteps, **conditioning).sample
        return per_sample_loss(prediction, target, self.noise_scheduler, timesteps, self.snr_gamma)

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict:
        """The UNet's conditioning inputs: the text encoder's last hidden states."""
        return {"encoder_hidden_states": self.text_encoder(batch["input_ids"])[0]}


def encode_sdxl_prompt(text_encoders, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning, as its pipeline computes it: every encoder's penultimate hidden states side by
    side, and the last encoder's pooled (projected) output."""
    hidden_states = []
    for text_encoder, ids in zip(text_encoders, input_ids):
        output = text_encoder(ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output[0]


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL's size and crop conditioning of a batch: (original height, width, crop top, left, target height,
    width) per image; the target is the square training resolution."""
    target = torch.tensor([resolution, resolution], device=original_sizes.device).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)


class SDXLDenoisingLoss(DenoisingLoss):
    """The denoising loss of SDXL's UNet: text from both encoders, pooled text and time ids as added conditions."""

    def __init__(
        self,
        vae,
        text_encoders: list,
        unet,
        noise_scheduler,
        weight_dtype: torch.dtype,
        resolution: int,
        noise_offset: float = 0.0,
        snr_gamma: float | None = None,
        cached_latents: bool = False,
        text_encoder_trains: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(
            vae,
            None,
            unet,
            noise_scheduler,
            weight_dtype,
            noise_offset,
            snr_gamma,
            cached_latents,
            text_encoder_trains,
        )
        self.text_encoders, self.resolution = list(text_encoders), resolution

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict:
        input_ids = [batch["input_ids"], batch["input_ids_2"]]
        hidden_states, pooled = encode_sdxl_prompt(self.text_encoders, input_ids)
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], self.resolution)
        return {
            "encoder_hidden_states": hidden_states,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(self.weight_dtype)},
        }
