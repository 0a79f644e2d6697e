"""peft_sara.script_utils.data: image folders, the transform, the data loader's generator, cached latents."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image

from peft_sara.script_utils.cli import UserInputError
from peft_sara.script_utils.data import (
    CachedLatents,
    ImageTransform,
    data_generator,
    list_images,
    readable_images,
    sample_cached_latents,
)


def test_image_transform_resizes_crops_and_scales():
    image = Image.new("RGB", (60, 40), (255, 0, 0))
    pixels = ImageTransform(32, center_crop=True, random_flip=True)(image)
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels[0], torch.ones(32, 32)) and torch.allclose(pixels[1], -torch.ones(32, 32))


def test_image_interpolation_mode_is_used():
    image = Image.new("RGB", (8, 8))
    image.putpixel((3, 3), (255, 255, 255))
    nearest = ImageTransform(32, center_crop=True, random_flip=False, interpolation="nearest")(image)
    lanczos = ImageTransform(32, center_crop=True, random_flip=False, interpolation="lanczos")(image)
    assert set(nearest.unique().tolist()) == {-1.0, 1.0} and not torch.equal(nearest, lanczos)


def test_list_images_skips_what_does_not_decode(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"broken")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    (tmp_path / "c.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # passes verify(), not load()
    with caplog.at_level(logging.WARNING):
        assert [path.name for path in list_images(str(tmp_path), "--data")] == ["a.png"]
    assert "b.png" in caplog.text and "c.jpg" in caplog.text


def test_a_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert readable_images(tmp_path) == ([tmp_path / "small.png"], ["bomb.png"])


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no image")
    with pytest.raises(UserInputError, match="--data .* has no readable image"):
        list_images(str(tmp_path), "--data")
    with pytest.raises(UserInputError, match="no such folder"):
        list_images(str(tmp_path / "missing"), "--data")


def test_data_generator_is_seeded():
    assert torch.equal(torch.rand(3, generator=data_generator(7)), torch.rand(3, generator=data_generator(7)))


def test_cached_latents_hold_the_vaes_distribution(tiny_pipeline_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir, subfolder="vae")
    pixels = torch.rand(3, 32, 32) * 2 - 1
    cached = CachedLatents(
        [{"pixel_values": pixels, "input_ids": torch.tensor([1])}], vae, ("pixel_values",), "cpu", torch.float32
    )
    example = cached[0]
    distribution = vae.encode(pixels[None]).latent_dist
    torch.testing.assert_close(example["pixel_values"][0], distribution.mean[0])
    torch.testing.assert_close(example["pixel_values"][1], distribution.std[0])
    assert torch.equal(example["input_ids"], torch.tensor([1]))
    torch.manual_seed(0)
    drawn = sample_cached_latents(example["pixel_values"][None])
    torch.manual_seed(0)
    torch.testing.assert_close(drawn, distribution.mean + distribution.std * torch.randn_like(distribution.mean))


def test_coordinates_name_the_pixels_returned():
    """SDXL's crop conditioning: the reported corner locates the returned pixels in the resized image as returned
    (flipped when flipped), whatever the crop and flip drawn."""
    import random

    import numpy as np

    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8))
    resized = source.resize((72, 32), Image.Resampling.BILINEAR)
    flipped = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    seen = set()
    for seed in range(12):
        random.seed(seed)
        pixels, original_size, (top, left) = transform.with_coordinates(source)
        assert original_size == (40, 90)
        expected = {
            image.crop((left, top, left + 32, top + 32)).tobytes() for image in (resized, flipped)
        }  # the same corner in the unflipped or the flipped image
        actual = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8).tobytes()
        assert actual in expected
        flipped_crop = flipped.crop((left, top, left + 32, top + 32)).tobytes() == actual
        seen.add(flipped_crop)
    assert seen == {True, False}, "both flipped and unflipped draws were checked"
    pixels, original_size, corner = ImageTransform(32, center_crop=True, random_flip=False).with_coordinates(source)
    assert corner == (0, 20) and torch.equal(pixels, ImageTransform(32, True, False)(source))
