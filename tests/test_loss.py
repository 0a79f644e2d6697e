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


def test_sdxl_conditioning_is_what_the_sdxl_pipeline_feeds_its_unet():
    from conftest import tiny_sdxl_pipeline

    from peft_sara.script_utils.data import tokenize
    from peft_sara.script_utils.loss import SDXLDenoisingLoss

    pipeline = tiny_sdxl_pipeline()
    text_encoders = [pipeline.text_encoder, pipeline.text_encoder_2]
    loss = SDXLDenoisingLoss(pipeline.vae, text_encoders, pipeline.unet, pipeline.scheduler, torch.float32, 32)
    batch = {
        "input_ids": tokenize(pipeline.tokenizer, "a photo of sks dog").unsqueeze(0),
        "input_ids_2": tokenize(pipeline.tokenizer_2, "a photo of sks dog").unsqueeze(0),
        "original_size": torch.tensor([[40, 90]]),
        "crop_top_left": torch.tensor([[0, 20]]),
    }
    with torch.no_grad():
        conditioning = loss.conditioning(batch)
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], prompt_embeds)
    torch.testing.assert_close(conditioning["added_cond_kwargs"]["text_embeds"], pooled)
    time_ids = pipeline._get_add_time_ids(
        (40, 90), (0, 20), (32, 32), torch.float32, pipeline.text_encoder_2.config.projection_dim
    )
    torch.testing.assert_close(conditioning["added_cond_kwargs"]["time_ids"], time_ids)
