"""Build the demo's base model: a tiny Stable Diffusion pipeline pre-trained on a world of coloured shapes.

The demo needs a base that has learned something, so that fine-tuning visibly adds a subject while the rest of what
the base draws stays as it was. This script draws the world itself (no download): 32×32 pictures of circles, squares
and triangles in four colours, captioned "a photo of a red circle" and so on. It trains, from scratch, a small VAE,
then a CLIP text encoder and a UNet together, and saves a standard `StableDiffusionPipeline` that
`StableDiffusionPipeline.from_pretrained` loads offline. From the repository root:

    python -m demo.build_demo_base --output_dir demo/base      # about 17 minutes on 2 CPU cores (or: make demo-base)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo.build_demo_base",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", default="demo/base", help="Where the pipeline is saved.")
    parser.add_argument("--num_images", type=int, default=4000, help="Pictures in the generated world.")
    parser.add_argument("--vae_steps", type=int, default=800, help="Training steps of the VAE.")
    parser.add_argument("--unet_steps", type=int, default=3000, help="Training steps of the text encoder and UNet.")
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of both stages.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the world and of training.")
    return parser.parse_args(argv)


def draw_shape(shape: str, colour: tuple[int, int, int], rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """One picture: a shape of random size and place on a light background with a little noise."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def make_world(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The pictures (N×3×32×32 in [-1, 1]) and their captions."""
    rng = random.Random(seed)
    pixels, captions = [], []
    for _ in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image = draw_shape(shape, COLOURS[colour], rng)
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        captions.append(f"a photo of a {colour} {shape}")
    return torch.stack(pixels), captions


def char_tokenizer(model_max_length: int = 32):
    """A CLIP tokenizer whose vocabulary is the printable characters: no merges, no download."""
    from transformers import CLIPTokenizer

    vocab = {chr(code): index for index, code in enumerate(range(33, 127))}
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_models(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(32, 64),
        cross_attention_dim=64,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    return vae, text_encoder, unet


def train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    start = time.time()
    for step in range(steps):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 250 == 0 or step == steps - 1:
            print(f"vae step {step}: reconstruction {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)


def latent_scaling_factor(vae, pixels: torch.Tensor) -> float:
    """1 / std of the latents, as Stable Diffusion's 0.18215 is for its VAE."""
    with torch.no_grad():
        latents = vae.encode(pixels[:512]).latent_dist.mean
    return float(1.0 / latents.std())


def train_denoiser(vae, text_encoder, unet, tokenizer, scheduler, pixels, captions, steps, batch_size, generator):
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        latents = latents * vae.config.scaling_factor
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    unet.train()
    text_encoder.train()
    start = time.time()
    for step in range(steps):
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        batch, batch_ids = latents[index], ids[index]
        drop = torch.rand(batch_size, generator=generator) < 0.1  # unconditional examples for classifier-free guidance
        batch_ids[drop] = ids_of_empty_prompt(tokenizer)
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(batch_ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        if step % 250 == 0 or step == steps - 1:
            print(f"denoiser step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)


def ids_of_empty_prompt(tokenizer) -> torch.Tensor:
    return tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]


def main(argv=None) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    pixels, captions = make_world(args.num_images, args.seed)
    tokenizer = char_tokenizer()
    vae, text_encoder, unet = build_models(tokenizer)
    train_vae(vae, pixels, args.vae_steps, args.batch_size, generator)
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pixels))
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
    )
    train_denoiser(
        vae, text_encoder, unet, tokenizer, scheduler, pixels, captions, args.unet_steps, args.batch_size, generator
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    output = Path(args.output_dir)
    pipeline.save_pretrained(output)
    (output / "world.json").write_text(
        json.dumps(
            {
                "colours": list(COLOURS),
                "shapes": list(SHAPES),
                "image_size": IMAGE_SIZE,
                "num_images": args.num_images,
                "vae_steps": args.vae_steps,
                "unet_steps": args.unet_steps,
                "seed": args.seed,
            },
            indent=2,
        )
    )
    return output


if __name__ == "__main__":
    main()
