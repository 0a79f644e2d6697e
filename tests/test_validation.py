"""peft_sara.script_utils.validation: what to sample, and where the images go."""

from __future__ import annotations

import argparse

from PIL import Image

from peft_sara.script_utils.validation import ValidationSettings, log_validation


def test_settings_from_the_flags():
    args = argparse.Namespace(
        validation_prompt="a dog", num_validation_images=2, num_inference_steps=5, resolution=64, seed=None
    )
    assert ValidationSettings.from_args(args) == ValidationSettings("a dog", 2, 5, 64, None)


def test_images_are_saved_as_pngs_and_sent_to_tensorboard(tmp_path):
    class Writer:
        def __init__(self):
            self.calls = []

        def add_images(self, tag, images, step, dataformats):
            self.calls.append((tag, images.shape, step, dataformats))

    tracker = argparse.Namespace(name="tensorboard", writer=Writer())
    images = [Image.new("RGB", (8, 8), (index * 50, 0, 0)) for index in range(2)]
    paths = log_validation([tracker], images, str(tmp_path), "step-3", 3)
    assert [path.name for path in paths] == ["step-3-0.png", "step-3-1.png"]
    assert tracker.writer.calls == [("step-3", (2, 8, 8, 3), 3, "NHWC")]
