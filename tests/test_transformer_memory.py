"""benchmarks/transformer_memory.py: one method's run on a published transformer at one block, and the extrapolation
of the held memory from two depths to the full model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.transformer_memory import CONFIGS, extrapolate, markdown_table, transformer_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_published_configurations_have_the_published_sizes():
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(**CONFIGS["flux"])
        sd3 = SD3Transformer2DModel(**CONFIGS["sd3"])
    assert sum(p.numel() for p in flux.parameters()) == 11_901_408_320, "FLUX.1-dev's transformer"
    assert round(sum(p.numel() for p in sd3.parameters()) / 1e9, 2) == 8.06, "SD 3.5 Large's transformer"
    assert transformer_config("flux", 2)["num_single_layers"] == 4, "the published 1:2 ratio of block kinds"


def test_one_method_at_one_block_reports_its_memory_and_values():
    command = [sys.executable, "-m", "benchmarks.transformer_memory", "--model", "sd3", "--resolution", "32"]
    command += ["--text-tokens", "8", "--steps", "1", "--run", "sara_0.02", "1"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["blocks"] == 1 and row["trainable_values"] == pytest.approx(0.02 * row["linear_weights"], rel=0.01)
    assert row["training_peak_bytes"] >= row["held_bytes"] > 2 * row["parameters"], "bf16 weights and more are held"


def test_held_memory_extrapolates_linearly_and_the_transient_is_added_once():
    rows = [
        {"blocks": 1, "trainable_values": 10, "held_bytes": 3.0, "setup_peak_bytes": 3.5, "training_peak_bytes": 4.0},
        {"blocks": 2, "trainable_values": 18, "held_bytes": 5.0, "setup_peak_bytes": 5.5, "training_peak_bytes": 5.5},
    ]
    figures = extrapolate(rows, full_depth=10)
    assert figures["held_per_block_bytes"] == 2.0 and figures["held_full_model_bytes"] == 21.0
    assert figures["full_model_trainable_values"] == 82 and figures["setup_full_model_bytes"] == 21.5
    assert figures["training_transient_bytes"] == 1.0 and figures["full_model_bytes"] == 22.0
    report = {"settings": {"blocks": [1, 2]}, "results": {"frozen": rows}, "extrapolated": {"frozen": figures}}
    assert "| frozen | 82 |" in markdown_table(report)
