"""benchmarks/export_study.py on a tiny pipeline: a LoRA export's images against its SaRA adapter's, by rank."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_pipeline
from peft import get_peft_model
from test_export import visible_update

from benchmarks import export_study
from peft_sara import SaRAConfig


@pytest.fixture
def adapter_dir(tmp_path):
    pipeline = tiny_pipeline()
    for component, config in (
        ("unet", SaRAConfig(threshold=0.02)),
        ("text_encoder", SaRAConfig(target_fraction=0.05)),
    ):
        model = get_peft_model(getattr(pipeline, component), config)
        visible_update(model)
        model.save_pretrained(tmp_path / "run" / component)
    return tmp_path / "run"


def test_full_rank_matches_and_lower_ranks_keep_less(tiny_pipeline_dir, adapter_dir, tmp_path, capsys):
    argv = ["--base_dir", str(tiny_pipeline_dir), "--adapter", str(adapter_dir), "--ranks", "2", "1.0"]
    argv += ["--seeds", "0", "1", "--num_inference_steps", "2", "--output", str(tmp_path / "study")]
    results = export_study.main(argv)
    sara, low, full = results
    assert sara["model"] == "SaRA adapter" and sara["file_bytes"] > 0
    assert low["max_rank"] == 2 and low["energy_retained"] < 0.9 < full["energy_retained"]
    assert full["max_pixel_difference"] < 2e-3 < low["max_pixel_difference"]
    assert low["file_bytes"] < full["file_bytes"]
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["results"] == results and saved["settings"]["ranks"] == ["2", "1.0"]
    assert (tmp_path / "study.png").is_file()
    assert "| LoRA full |" in capsys.readouterr().out
