"""Flow matching, the objective of diffusion transformers (Flux, SD3): the timestep density, the noisy latents on the
straight path from the data to the noise, the loss weighting, and their flags (diffusers' names and defaults)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from .cli import UserInputError

# diffusers' schemes: a timestep density (logit_normal, mode) or a loss weighting (sigma_sqrt, cosmap), or neither
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


def add_flow_matching_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("flow matching")
    group.add_argument(
        "--weighting_scheme",
        type=str,
        default="none",
        choices=WEIGHTING_SCHEMES,
        help="How timesteps are drawn (logit_normal, mode) or the loss weighted (sigma_sqrt, cosmap); none: uniform "
        "timesteps, unweighted loss.",
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme.")
    group.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")


# Flags of the Stable Diffusion scripts' noise-prediction loss, which flow matching does not have.
NOISE_PREDICTION_FLAGS = ("snr_gamma", "noise_offset", "prediction_type")


def check_flow_matching_arguments(args: argparse.Namespace, model: str, max_sequence_length: int) -> None:
    """Refuse what a diffusion transformer (`model`: its name) cannot train with: noise-prediction flags, a resolution
    its 2x2 patches do not tile, a T5 prompt length outside (0, `max_sequence_length`]."""
    if noise_prediction_flags := sorted(args.explicit & set(NOISE_PREDICTION_FLAGS)):
        raise UserInputError(
            f"--{noise_prediction_flags[0]} belongs to noise prediction, which {model} does not train with: drop it "
            "(flow matching weights its loss with --weighting_scheme)."
        )
    if args.resolution % 16:
        raise UserInputError(
            f"--resolution must be a multiple of 16 for {model} (the VAE downsamples by 8, then the transformer "
            f"takes 2x2 patches), got {args.resolution}."
        )
    if not 1 <= args.max_sequence_length <= max_sequence_length:
        raise UserInputError(
            f"--max_sequence_length must be between 1 and {max_sequence_length}, got {args.max_sequence_length}."
        )


@dataclass
class FlowMatching:
    """One flow-matching step's noise and loss, from a FlowMatchEulerDiscreteScheduler's training schedule."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FlowMatching:
        return cls(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)

    def noisy_latents(self, noise_scheduler, latents: torch.Tensor):
        """Noisy latents (1 - σ)·x + σ·noise at timesteps drawn from the scheme's density; also the timesteps, the σ
        (shaped to broadcast over the latents) and the noise. The scheduler must hold its training schedule (a copy
        that no pipeline has called `set_timesteps` on)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        density = compute_density_for_timestep_sampling(
            self.weighting_scheme, latents.shape[0], self.logit_mean, self.logit_std, self.mode_scale
        )
        count = noise_scheduler.config.num_train_timesteps
        indices = (density * count).long().clamp(max=count - 1)
        timesteps = noise_scheduler.timesteps[indices].to(latents.device)
        sigmas = noise_scheduler.sigmas[indices].to(latents.device, torch.float32)
        sigmas = sigmas.view(-1, *[1] * (latents.ndim - 1))
        noise = torch.randn_like(latents)
        noisy = ((1 - sigmas) * latents.float() + sigmas * noise.float()).to(latents.dtype)
        return noisy, timesteps, sigmas, noise

    def per_sample_loss(self, prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The weighted squared error of each sample, in fp32."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).float()
        error = weighting * (prediction.float() - target.float()) ** 2
        return error.reshape(len(target), -1).mean(dim=1)
