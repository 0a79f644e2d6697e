"""demo/build_demo_base.py (make demo-base): the demo's generated world and its tiny pre-trained base."""

from __future__ import annotations

from demo import build_demo_base


def test_demo_world_is_captioned_and_drawn(tmp_path):
    builder = build_demo_base
    pixels, captions = builder.make_world(12, seed=3)
    assert pixels.shape == (12, 3, 32, 32) and -1 <= pixels.min() < pixels.max() <= 1
    assert all(caption.startswith("a photo of a ") for caption in captions)
    assert {caption.split()[-1] for caption in captions} <= set(builder.SHAPES)
    assert builder.make_world(12, seed=3)[1] == captions  # reproducible


def test_demo_base_builder_saves_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    output = build_demo_base.main(
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
