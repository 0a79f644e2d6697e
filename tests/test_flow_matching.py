"""Flow matching: noisy latents on the straight path at the scheduler's training sigmas, the schemes' densities and
loss weights."""

from __future__ import annotations

import pytest
import torch

from peft_sara.script_utils.flow_matching import FlowMatching


@pytest.fixture
def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def test_noisy_latents_lie_between_the_data_and_the_noise_at_the_schedules_sigma(scheduler):
    latents = torch.randn(64, 4, 2, 2)
    torch.manual_seed(0)
    noisy, timesteps, sigmas, noise = FlowMatching().noisy_latents(scheduler, latents)
    assert sigmas.shape == (64, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    # every timestep is one of the training schedule's, with its own sigma (shifted, as the base's config says)
    index = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    torch.testing.assert_close(sigmas.flatten(), scheduler.sigmas[index])
    torch.testing.assert_close(timesteps, sigmas.flatten() * 1000)


def test_logit_normal_draws_middle_timesteps_and_mode_scale_moves_them(scheduler):
    latents = torch.zeros(4000, 1, 1, 1)
    uniform = FlowMatching().noisy_latents(scheduler, latents)[2]
    logit_normal = FlowMatching("logit_normal", logit_mean=0.0, logit_std=0.5).noisy_latents(scheduler, latents)[2]
    assert logit_normal.std() < uniform.std(), "logit_normal concentrates the draws"
    shifted = FlowMatching("logit_normal", logit_mean=2.0, logit_std=0.5).noisy_latents(scheduler, latents)[2]
    assert shifted.mean() < logit_normal.mean(), "a larger logit mean draws earlier timesteps (lower indices)"


def test_loss_weighting_per_scheme():
    prediction, target = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    sigmas = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    torch.testing.assert_close(FlowMatching().per_sample_loss(prediction, target, sigmas), torch.ones(2))
    torch.testing.assert_close(
        FlowMatching("sigma_sqrt").per_sample_loss(prediction, target, sigmas), torch.tensor([4.0, 16.0])
    )
    cosmap = FlowMatching("cosmap").per_sample_loss(prediction, target, sigmas)
    expected = 2 / (torch.pi * (1 - 2 * sigmas.flatten() + 2 * sigmas.flatten() ** 2))
    torch.testing.assert_close(cosmap, expected)
