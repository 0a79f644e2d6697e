"""demo/run_demo.py (make demo) in a short setting on the shipped base, training through the DreamBooth script."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from demo import run_demo

BASE = Path(__file__).resolve().parent.parent / "demo" / "base"


@pytest.mark.skipif(not (BASE / "model_index.json").is_file(), reason="demo/base is built by demo/build_demo_base.py")
def test_demo_writes_adapter_card_and_grid(tmp_path):
    grid = run_demo.main(
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
