"""peft_sara.script_utils.loss: targets and the per-sample loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from peft_sara.script_utils.cli import UserInputError
from peft_sara.script_utils.loss import diffusion_targets, per_sample_loss


def test_min_snr_weighting():
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler()
    timesteps = torch.tensor([10, 900])
    prediction, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    plain = per_sample_loss(prediction, target, scheduler, timesteps, snr_gamma=None)
    weighted = per_sample_loss(prediction, target, scheduler, timesteps, snr_gamma=5.0)
    snr = compute_snr(scheduler, timesteps)
    torch.testing.assert_close(weighted, plain * torch.clamp(snr, max=5.0) / snr)


def test_targets_follow_the_prediction_type():
    latents = torch.randn(2, 4, 2, 2)
    torch.manual_seed(0)
    _, _, epsilon_target = diffusion_targets(DDPMScheduler(), latents, noise_offset=0.0)
    torch.manual_seed(0)
    velocity_scheduler = DDPMScheduler(prediction_type="v_prediction")
    _, timesteps, velocity_target = diffusion_targets(velocity_scheduler, latents, noise_offset=0.0)
    torch.testing.assert_close(velocity_target, velocity_scheduler.get_velocity(latents, epsilon_target, timesteps))
    with pytest.raises(UserInputError, match="Unsupported prediction type sample"):
        diffusion_targets(DDPMScheduler(prediction_type="sample"), latents, noise_offset=0.0)
