"""peft_sara.script_utils: the pieces the training scripts share, one by one."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from PIL import Image

from peft_sara import script_utils as su


def test_checkpoint_folders_skip_unfinished_and_foreign_folders(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-30.unfinished", "checkpoint-best", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-40").write_text("a file, not a checkpoint")
    assert [path.name for path in su.checkpoint_folders(str(tmp_path))] == ["checkpoint-2", "checkpoint-10"]
    assert su.resolve_resume_checkpoint("latest", str(tmp_path)).name == "checkpoint-10"
    assert su.resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert su.checkpoint_step(Path("out/checkpoint-10")) == 10


def test_save_checkpoint_is_atomic_and_keeps_the_limit(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    for step in (1, 2, 3):
        su.save_checkpoint(accelerator, str(tmp_path), step, total_limit=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "random_states_0.pkl").is_file()


def test_image_transform_resizes_crops_and_scales():
    image = Image.new("RGB", (60, 40), (255, 0, 0))
    pixels = su.ImageTransform(32, center_crop=True, random_flip=True)(image)
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels[0], torch.ones(32, 32)) and torch.allclose(pixels[1], -torch.ones(32, 32))


def test_list_images_skips_what_is_not_an_image(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"broken")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    assert [path.name for path in su.list_images(str(tmp_path), "--data")] == ["a.png"]
    assert "b.png" in caplog.text


def test_min_snr_weighting():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler()
    timesteps = torch.tensor([10, 900])
    prediction, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    plain = su.per_sample_loss(prediction, target, scheduler, timesteps, snr_gamma=None)
    weighted = su.per_sample_loss(prediction, target, scheduler, timesteps, snr_gamma=5.0)
    snr = compute_snr(scheduler, timesteps)
    torch.testing.assert_close(weighted, plain * torch.clamp(snr, max=5.0) / snr)


def test_updates_per_epoch_counts_each_process_share():
    batches = list(range(10))
    assert su.updates_per_epoch(batches, num_processes=1, accumulation=1) == 10
    assert su.updates_per_epoch(batches, num_processes=2, accumulation=2) == 3  # 5 batches each, in steps of 2
    assert su.updates_per_epoch(batches, num_processes=4, accumulation=1) == 3


def test_data_generator_is_seeded():
    assert torch.equal(torch.rand(3, generator=su.data_generator(7)), torch.rand(3, generator=su.data_generator(7)))


def test_tracker_config_keeps_scalars_and_never_the_token():
    args = argparse.Namespace(seed=1, threshold=2e-3, hub_token="secret", seeds=[1, 2], name="x", flag=True)
    assert su.tracker_config(args) == {"seed": 1, "threshold": 2e-3, "name": "x", "flag": True}


def test_model_card_for_text_to_image_and_dreambooth(tmp_path):
    (tmp_path / "validation").mkdir()
    image = tmp_path / "validation" / "final-0.png"
    Image.new("RGB", (4, 4)).save(image)
    card = su.write_model_card(str(tmp_path), "me/style", "org/base", [image], False, validation_prompt="a castle")
    text = card.read_text()
    assert "library_name: peft" in text and "base_model: org/base" in text and "- text-to-image" in text
    assert "dreambooth" not in text and "![final-0](validation/final-0.png)" in text
    assert "[org/base](https://huggingface.co/org/base)" in text
    text = su.write_model_card(str(tmp_path), "me/dog", str(tmp_path), [], True, instance_prompt="sks dog").read_text()
    assert "- dreambooth" in text and 'instance_prompt: "sks dog"' in text and "text_encoder/" in text
    assert "https://huggingface.co/" + str(tmp_path) not in text  # a local base is not linked to the Hub


def test_output_dir_check(tmp_path):
    su._check_output_dir_writable(str(tmp_path / "new" / "deeper"))  # creatable: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(su.UserInputError, match="not writable"):
        su._check_output_dir_writable(str(tmp_path / "file" / "out"))
