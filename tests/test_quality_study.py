"""benchmarks/quality_study.py in its short setting on the shipped demo base, and its input checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import quality_study

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE = REPO_ROOT / "demo" / "base"


@pytest.mark.skipif(not (BASE / "model_index.json").is_file(), reason="demo/base is built by demo/build_demo_base.py")
def test_short_study_writes_table_plot_grids_and_consistent_results(tmp_path):
    rows = quality_study.main(
        [
            "--output_dir",
            str(tmp_path),
            "--methods",
            "sara",
            "masked_dense",
            "--learning_rates",
            "sara=1e-3",
            "masked_dense=1e-3",
            "--ablations",
            "sara_neither",
            "sara_random",
            "--seeds",
            "0",
            "--max_train_steps",
            "3",
            "--num_eval_images",
            "6",
            "--noise_draws",
            "1",
            "--sample_seeds",
            "0",
            "1",
            "--num_inference_steps",
            "2",
        ]
    )
    report = json.loads((tmp_path / "results.json").read_text())
    found = {(row["target"], row["variant"]) for row in report["summary"]}
    assert found == {
        ("subject", "sara"),
        ("subject", "masked_dense"),
        ("style", "sara"),
        ("style", "masked_dense"),
        ("style", "sara_neither"),
        ("style", "sara_random"),
    }
    assert len(report["runs"]) == len(rows) == 6
    by_variant = {(row["target"], row["variant"]): row for row in rows}
    style = {variant: row for (target, variant), row in by_variant.items() if target == "style"}
    # one trainable count for SaRA, its ablations and the masked dense baseline: the same |w| < θ budget
    assert len({row["trainable_values"] for row in style.values()}) == 1
    # SaRA without regulariser and progressive step is masked dense training done sparsely: the same result
    assert style["sara_neither"]["target_loss"] == pytest.approx(style["masked_dense"]["target_loss"], rel=1e-3)
    assert style["sara_neither"]["target_loss"] != style["sara_random"]["target_loss"]
    for row in rows:
        assert row["target_loss"] < report["base"][row["target"]]["target_loss"]  # three steps already fit
        assert row["pixel_drift"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| style | sara_random | 0.001 |" in table and "base (not fine-tuned)" in table
    for picture in ("fit_vs_drift.png", "grid_subject.png", "grid_style.png"):
        with Image.open(tmp_path / picture) as image:
            assert image.format == "PNG", picture
    with Image.open(tmp_path / "grid_style.png") as grid:
        assert grid.size == (120 + 7 * 128, 28 + 3 * 128)  # base, SaRA, masked dense × (2 prompts × 2 seeds + 3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning_rates", "dora=1e-3"], "write METHOD=LR"),
        (["--learning_rates", "sara=fast"], "are not numbers"),
        (["--learning_rates", "sara=-1e-3"], "must be positive"),
        (["--base_dir", "/nonexistent"], "holds no pipeline"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        (["--methods", "lora_matched"], "keep sara in --methods"),
        (["--targets", "subject"], "not in --targets"),
    ],
)
def test_bad_input_is_one_line_before_any_work(flags, message):
    command = [sys.executable, "-m", "benchmarks.quality_study", *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and message in result.stderr
    assert "Traceback" not in result.stderr
