"""peft_sara.script_utils.dreambooth: the instance/class dataset for one or two tokenizers, its batches, and the
prior-preservation loss."""

from __future__ import annotations

import torch
from conftest import tiny_pipeline
from PIL import Image

from peft_sara.script_utils.data import ImageTransform, tokenize
from peft_sara.script_utils.dreambooth import DreamBoothDataset, collate, prior_preservation_loss


def test_batches_put_the_class_half_after_the_instance_half_for_every_tokenizer(tmp_path):
    tokenizer = tiny_pipeline().tokenizer
    Image.new("RGB", (40, 40), "red").save(tmp_path / "instance.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "class.png")
    dataset = DreamBoothDataset(
        [tmp_path / "instance.png"],
        "a photo of sks dog",
        [tmp_path / "class.png"],
        "a photo of dog",
        [tokenizer, tokenizer],
        ImageTransform(32, center_crop=True, random_flip=False),
    )
    batch = collate([dataset[0], dataset[0]])
    assert sorted(batch) == ["input_ids", "input_ids_2", "pixel_values"], "no micro-conditioning unless asked"
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"][:2, 0].eq(1).all() and batch["pixel_values"][2:, 2].eq(1).all(), "red, then blue"
    instance, cls = tokenize(tokenizer, "a photo of sks dog"), tokenize(tokenizer, "a photo of dog")
    for key in ("input_ids", "input_ids_2"):
        assert torch.equal(batch[key], torch.stack([instance, instance, cls, cls]))


def test_micro_conditioning_gives_each_image_its_own_size_and_crop(tmp_path):
    Image.new("RGB", (80, 40), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (40, 120), "blue").save(tmp_path / "tall.png")
    dataset = DreamBoothDataset(
        [tmp_path / "wide.png"],
        "sks",
        [tmp_path / "tall.png"],
        "dog",
        [],
        ImageTransform(32, center_crop=True, random_flip=False),
        micro_conditioning=True,
    )
    batch = collate([dataset[0]])
    assert batch["original_size"].tolist() == [[40, 80], [120, 40]], "(height, width) before resizing"
    assert batch["crop_top_left"].tolist() == [[0, 16], [32, 0]], "(top, left) of the centre crop"


def test_prior_preservation_loss_weights_the_class_half():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert prior_preservation_loss(per_sample, with_prior=False, prior_loss_weight=0.5) == per_sample.mean()
    assert prior_preservation_loss(per_sample, with_prior=True, prior_loss_weight=0.5) == 2.0 + 0.5 * 15.0
