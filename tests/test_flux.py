"""Flux's training inputs against FluxPipeline's own: the prompt encoding, the packed latents and their ids, and the
flow-matching target."""

from __future__ import annotations

import torch
from conftest import MeanVAE, tiny_flux_pipeline

from peft_sara.script_utils.flow_matching import FlowMatching
from peft_sara.script_utils.flux import FluxDenoisingLoss, flux_prompts


def test_prompts_are_encoded_as_the_pipeline_encodes_them():
    pipeline = tiny_flux_pipeline()
    prompts = {"instance": "a photo of sks dog", "class": "a photo of dog", "validation": None}
    tokenizers, encoders = [pipeline.tokenizer, pipeline.tokenizer_2], [pipeline.text_encoder, pipeline.text_encoder_2]
    encoded = flux_prompts(tokenizers, encoders, prompts, 24, clip_trains=False)
    assert sorted(encoded.t5) == ["class", "instance"]
    for kind in ("instance", "class"):
        hidden_states, pooled, _ = pipeline.encode_prompt(prompts[kind], None, max_sequence_length=24)
        torch.testing.assert_close(encoded.t5[kind], hidden_states)
        torch.testing.assert_close(encoded.clip[kind][0], pooled)
    batch_hidden, (batch_pooled,) = encoded.batch(["instance", "instance", "class"], [None], [None])
    assert batch_hidden.shape == (3, 24, 32) and batch_pooled.shape == (3, 32)
    torch.testing.assert_close(batch_pooled[2], encoded.clip["class"][0][0])
    # where CLIP trains, its pooled output is computed per batch, from the batch's token ids
    trained = flux_prompts(tokenizers, encoders, prompts, 24, clip_trains=True)
    assert trained.clip == {}
    ids = pipeline.tokenizer([prompts["class"]], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(trained.batch(["class"], [pipeline.text_encoder], [ids])[1], encoded.clip["class"])


class VelocityOracle(torch.nn.Module):
    """A 'transformer' that records its inputs and answers the true velocity, packed as the transformer would."""

    def __init__(self, config, answer):
        super().__init__()
        self.config, self.answer, self.inputs = config, answer, {}

    def forward(self, **inputs):
        self.inputs = inputs
        return (self.answer(inputs),)


def test_the_loss_feeds_the_transformer_what_the_pipeline_feeds_it_and_targets_the_velocity():
    from diffusers import FluxPipeline

    pipeline = tiny_flux_pipeline()
    prompts = flux_prompts(
        [pipeline.tokenizer, pipeline.tokenizer_2],
        [pipeline.text_encoder, pipeline.text_encoder_2],
        {"instance": "a photo of sks dog", "class": "a photo of dog"},
        16,
        clip_trains=False,
    )
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean
    latents = (latents - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor
    seen = {}

    def velocity(inputs):  # from the packed noisy latents: noise - x = (noisy - x) / sigma
        seen.update(inputs)
        noisy = FluxPipeline._unpack_latents(inputs["hidden_states"], 32, 32, 2)
        sigmas = (inputs["timestep"] * 1000 / 1000).view(-1, 1, 1, 1)
        return FluxPipeline._pack_latents((noisy - latents) / sigmas, 4, 4, 16, 16)

    oracle = VelocityOracle(pipeline.transformer.config, velocity)
    loss = FluxDenoisingLoss(
        MeanVAE(pipeline.vae), oracle, None, pipeline.scheduler, prompts, FlowMatching(), torch.float32, 3.5, True
    )
    with torch.no_grad():
        per_sample = loss({"pixel_values": pixels})
    assert per_sample.shape == (4,)
    torch.testing.assert_close(per_sample, torch.zeros(4), atol=1e-8, rtol=0)
    # the ids and guidance FluxPipeline gives the transformer for 32x32 px, the prompts by batch half
    _, image_ids = pipeline.prepare_latents(4, 16, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["img_ids"], image_ids)
    assert seen["txt_ids"].shape == (16, 3) and not seen["txt_ids"].any()
    torch.testing.assert_close(seen["guidance"], torch.full((4,), 3.5))
    torch.testing.assert_close(seen["encoder_hidden_states"][1], prompts.t5["instance"][0])
    torch.testing.assert_close(seen["encoder_hidden_states"][2], prompts.t5["class"][0])
    torch.testing.assert_close(seen["pooled_projections"][3], prompts.clip["class"][0][0])
