"""The denoising loss: noisy latents and their targets, the per-sample MSE with optional min-SNR weighting."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cli import UserInputError
from .data import sample_cached_latents


def encode_latents(vae, images: torch.Tensor, cached: bool, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents of a batch of images, or drawn from their cached distributions (`--cache_latents`)."""
    if cached:
        latents = sample_cached_latents(images.to(vae.device)).to(dtype)
    else:
        latents = vae.encode(images.to(dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


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
            text_embeddings = self.text_encoder(batch["input_ids"])[0]
        prediction = self.unet(noisy_latents, timesteps, text_embeddings).sample
        return per_sample_loss(prediction, target, self.noise_scheduler, timesteps, self.snr_gamma)
