"""SD3's training inputs against StableDiffusion3Pipeline's own: the joint prompt embeddings and pooled projections,
the validation's negative prompt, and both flow-matching targets."""

from __future__ import annotations

import pytest
import torch
from conftest import MeanVAE, tiny_sd3_pipeline

from peft_sara.script_utils.flow_matching import FlowMatching
from peft_sara.script_utils.sd3 import SD3DenoisingLoss, joint_prompt_embeds, sd3_prompts, sd3_validation_inputs


def encoders(pipeline):
    tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3]
    return tokenizers, [pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3]


@pytest.mark.parametrize("clip_trains", [False, True])
def test_prompts_are_encoded_as_the_pipeline_encodes_them(clip_trains):
    pipeline = tiny_sd3_pipeline()
    prompts = {"instance": "a photo of sks dog", "validation": "a dog in a bucket"}
    encoded = sd3_prompts(*encoders(pipeline), prompts, 16, clip_trains=clip_trains)
    assert sorted(encoded.t5) == ["instance", "negative", "validation"], "the validation's empty negative prompt"
    clips = [pipeline.text_encoder, pipeline.text_encoder_2]
    inputs = sd3_validation_inputs(encoded, clips)
    expected = pipeline.encode_prompt(
        prompts["validation"], None, None, do_classifier_free_guidance=True, max_sequence_length=16
    )
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, tensor in zip(names, expected):
        torch.testing.assert_close(inputs[name], tensor, msg=name)
    t5, (hidden, pooled) = encoded.batch(
        ["instance", "instance"], clips, [i.repeat(2, 1) for i in encoded.clip_ids(prompts["instance"])]
    )
    instance = pipeline.encode_prompt(prompts["instance"], None, None, do_classifier_free_guidance=False,
                                      max_sequence_length=16)  # fmt: skip
    torch.testing.assert_close(joint_prompt_embeds(t5, hidden)[:1], instance[0])
    torch.testing.assert_close(pooled[:1], instance[2])


class VelocityOracle(torch.nn.Module):
    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def forward(self, **inputs):
        return (self.answer(inputs),)


@pytest.mark.parametrize("precondition_outputs", [True, False])
def test_the_true_velocity_scores_zero_in_both_targets(precondition_outputs):
    pipeline = tiny_sd3_pipeline()
    prompts = sd3_prompts(*encoders(pipeline), {"instance": "a sks dog", "class": "a dog"}, 16, clip_trains=False)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean
    latents = (latents - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor
    seen = {}

    def velocity(inputs):  # noise - x = (noisy - x) / sigma, sigma = timestep / 1000
        seen.update(inputs)
        sigmas = (inputs["timestep"] / 1000).view(-1, 1, 1, 1)
        return (inputs["hidden_states"] - latents) / sigmas

    loss = SD3DenoisingLoss(
        MeanVAE(pipeline.vae), VelocityOracle(velocity), [None, None], pipeline.scheduler, prompts, FlowMatching(),
        torch.float32, precondition_outputs, with_prior_preservation=True,
    )  # fmt: skip
    with torch.no_grad():
        per_sample = loss({"pixel_values": pixels})
    torch.testing.assert_close(per_sample, torch.zeros(2), atol=1e-6, rtol=0)
    assert seen["encoder_hidden_states"].shape == (2, 77 + 16, 64), "CLIP's 77 tokens, then T5's"
    torch.testing.assert_close(seen["pooled_projections"][1], prompts.clip["class"][1][0])
