"""scripts/run_demo.py (make demo) in a short setting on the shipped base, and the demo base builder."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script
from PIL import Image

BASE = Path(__file__).resolve().parent.parent / "demo" / "base"


@pytest.mark.skipif(
    not (BASE / "model_index.json").is_file(), reason="demo/base is built by scripts/build_demo_base.py"
)
def test_demo_writes_adapter_card_and_grid(tmp_path):
    grid = load_script("run_demo").main(
        [
            "--output_dir",
            str(tmp_path),
            "--seeds",
            "0",
            "1",
            "--num_inference_steps",
            "2",
            "--max_train_steps",
            "2",
            "--num_class_images",
            "2",
            "--num_validation_images",
            "1",
        ]
    )
    output = tmp_path / "sks-circle-sara"
    assert (output / "unet" / "adapter_model.safetensors").is_file()
    assert (output / "text_encoder" / "adapter_model.safetensors").is_file()
    assert 'instance_prompt: "a photo of sks circle"' in (output / "README.md").read_text()
    with Image.open(grid) as image:
        assert image.size == (90 + 4 * 128, 28 + 2 * 128)  # 2 prompts × 2 seeds, base and SaRA rows
    assert len(list((tmp_path / "data" / "sks-circle").glob("*.png"))) == 5


def test_demo_world_is_captioned_and_drawn(tmp_path):
    builder = load_script("build_demo_base")
    pixels, captions = builder.make_world(12, seed=3)
    assert pixels.shape == (12, 3, 32, 32) and -1 <= pixels.min() < pixels.max() <= 1
    assert all(caption.startswith("a photo of a ") for caption in captions)
    assert {caption.split()[-1] for caption in captions} <= set(builder.SHAPES)
    assert builder.make_world(12, seed=3)[1] == captions  # reproducible


def test_demo_base_builder_saves_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    output = load_script("build_demo_base").main(
        [
            "--output_dir",
            str(tmp_path / "base"),
            "--num_images",
            "16",
            "--vae_steps",
            "2",
            "--unet_steps",
            "2",
            "--batch_size",
            "4",
        ]
    )
    pipeline = StableDiffusionPipeline.from_pretrained(output, safety_checker=None, requires_safety_checker=False)
    image = pipeline("a photo of a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
