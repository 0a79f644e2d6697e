"""benchmarks/transformer_memory.py: one method's run on a published transformer at one block, and the extrapolation
of the held memory from two depths to the full model."""

from __future__ import annotations

import json
import os
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


def test_activations_that_grow_with_the_depth_extrapolate_with_it():
    """At 1024 px each block saves its activations: the training peak grows faster than the held memory, and the full
    model's figure follows the peak's own line, not held memory plus one step's transient."""
    rows = [
        {"blocks": 1, "trainable_values": 10, "held_bytes": 3.0, "setup_peak_bytes": 3.5, "training_peak_bytes": 6.0},
        {"blocks": 2, "trainable_values": 18, "held_bytes": 5.0, "setup_peak_bytes": 5.5, "training_peak_bytes": 9.0},
    ]
    figures = extrapolate(rows, full_depth=10)
    assert figures["training_full_model_bytes"] == 33.0 and figures["full_model_bytes"] == 33.0


def one_run(*extra: str) -> dict:
    from benchmarks.benchmark import CHILD_ENV

    command = [sys.executable, "-m", "benchmarks.transformer_memory", "--model", "sd3", "--resolution", "32"]
    command += ["--text-tokens", "8", "--steps", "1", *extra]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **CHILD_ENV})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fp8_storage_holds_a_byte_less_per_cast_linear_weight():
    """--layerwise-casting stores the frozen Linear weights in fp8 as the scripts do: the held memory falls by a byte
    per weight cast (diffusers leaves the norms' modulation Linears, about a quarter of them here, in bf16), while
    SaRA trains as many values."""
    bf16 = one_run("--run", "sara_0.02", "1")
    fp8 = one_run("--layerwise-casting", "float8_e4m3fn", "--run", "sara_0.02", "1")
    assert fp8["trainable_values"] == bf16["trainable_values"]
    assert bf16["held_bytes"] - fp8["held_bytes"] > 0.5 * bf16["linear_weights"]


def test_method_lists_are_checked_before_anything_runs():
    from benchmarks.transformer_memory import methods_to_run, parse_args

    default = methods_to_run(parse_args(["--fractions", "0.01"]))
    assert default == ["frozen", "dense_grad", "lora_attention", "sara_0.01"]
    assert "dense_grad" not in methods_to_run(parse_args(["--layerwise-casting", "float8_e4m3fn"]))
    for methods, message in (("frozen,sara_2", "give frozen"), ("sara_0.02", "give frozen"), ("frozen,lora", "give")):
        with pytest.raises(SystemExit, match=message):
            methods_to_run(parse_args(["--methods", methods]))
    with pytest.raises(SystemExit, match="fp8 storage"):
        methods_to_run(parse_args(["--methods", "frozen,dense_grad", "--layerwise-casting", "float8_e5m2"]))
