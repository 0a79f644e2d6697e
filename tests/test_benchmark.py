"""benchmarks/benchmark.py in its short setting: every method runs in its own process and the report is complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = [sys.executable, "-m", "benchmarks.benchmark"]  # run from REPO_ROOT, as documented
PLOTTED_TOGETHER = ("benchmark_sd15_floor.json", "benchmark_sd15.json")  # with and without mean steps


def test_small_benchmark_reports_every_method_and_the_budget(tmp_path):
    output = tmp_path / "bench.json"
    methods = "frozen,dense_grad,full,sara,masked_dense,lora_attention,lora_matched,supertuning,shira"
    command = [*BENCHMARK, "--model", "small", "--steps", "1", "--latent-size", "16", "--methods", methods]
    plot = tmp_path / "bench.png"
    result = subprocess.run(
        command + ["--output", str(output), "--plot", str(plot)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    results = report["results"]
    assert list(results) == methods.split(",")
    full, sara = results["full"], results["sara"]
    assert full["trainable_values"] == full["total_parameters"] and results["frozen"]["trainable_values"] == 0
    assert 0 < sara["trainable_values"] < 0.1 * sara["total_parameters"]
    for matched in ("masked_dense", "lora_matched", "supertuning", "shira"):  # same budget as SaRA, within 5%
        assert abs(results[matched]["trainable_values"] / sara["trainable_values"] - 1) < 0.05, matched
    assert results["masked_dense"]["values_with_gradients"] > 10 * sara["trainable_values"]  # dense gradients
    assert results["lora_attention"]["trainable_values"] < sara["trainable_values"]
    # the floor computes every Linear/Conv2d weight's gradient and steps no optimizer
    floor = results["dense_grad"]
    assert sara["trainable_values"] < 0.1 * floor["trainable_values"] < floor["total_parameters"]
    assert all(row["peak_memory_bytes"] > 0 and row["mean_step_seconds"] > 0 for row in results.values())
    assert 0 < sara["adapter_bytes"] <= 8 * sara["trainable_values"] + 65536  # header: about 200 B per tensor
    assert all(results[name]["adapter_load_seconds"] > 0 for name in ("sara", "lora_attention", "shira"))
    assert results["full"]["adapter_bytes"] is None
    assert results["full"]["optimizer"] == "AdamW" and results["dense_grad"]["optimizer"] is None
    budget = report["sara_budget"]
    assert set(budget) == {"memory_vs_frozen_budget", "memory_vs_full", "time_vs_full", "time_vs_dense_grad"}
    assert budget["time_vs_dense_grad"]["value"] == sara["mean_step_seconds"] / floor["mean_step_seconds"]
    assert "| sara |" in result.stdout and "time / floor" in result.stdout
    with Image.open(plot) as image:
        assert image.format == "PNG"
    # saved runs are plotted side by side without running anything
    replot = subprocess.run(
        [*BENCHMARK, "--from-json", str(output), str(output), "--plot", str(tmp_path / "both.png")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replot.returncode == 0, replot.stderr[-2000:]
    with Image.open(tmp_path / "both.png") as image:
        assert image.format == "PNG"
    no_plot = subprocess.run([*BENCHMARK, "--from-json", str(output)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert no_plot.returncode != 0 and "--plot" in no_plot.stderr


def test_unknown_method_is_refused():
    result = subprocess.run([*BENCHMARK, "--methods", "sara,lora9"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "unknown method" in result.stderr


@pytest.mark.slow
def test_sd15_unet_meets_the_memory_budget(tmp_path):
    """SD 1.5's UNet architecture (860M parameters, about 6 minutes and 14 GiB): the tuner issue's memory targets."""
    output = tmp_path / "sd15.json"
    command = [*BENCHMARK, "--model", "sd15", "--steps", "1", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    budget = json.loads(output.read_text())["sara_budget"]
    assert budget["memory_vs_frozen_budget"]["passes"], budget
    assert budget["memory_vs_full"]["passes"], budget


def test_sdxl_architecture_and_full_fine_tuning_reported_as_not_run_beyond_the_memory_limit(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.benchmark import full_fine_tuning_does_not_fit, unet_config

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**unet_config("sdxl"))
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684, "SDXL base 1.0's UNet"
    assert "38.3 GiB" in full_fine_tuning_does_not_fit("sdxl", 24.0)
    assert full_fine_tuning_does_not_fit("sd15", 24.0) is None  # 12.8 GiB: it runs
    output = tmp_path / "bench.json"
    command = [*BENCHMARK, "--model", "small", "--steps", "1", "--latent-size", "16"]
    command += ["--methods", "frozen,lora_attention,full", "--memory-limit-gib", "0.01", "--output", str(output)]
    result = subprocess.run(command + ["--fused-adamw"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert list(report["results"]) == ["frozen", "lora_attention"]
    assert "more than 0.01 GiB" in report["not_run"]["full"] and "full: not run (" in result.stdout
    assert report["results"]["lora_attention"]["optimizer"] == "AdamW (fused)" and report["settings"]["fused_adamw"]


def test_saved_reports_with_and_without_mean_steps_plot_together(tmp_path):
    """Reports written before the mean step was recorded (the docs' first SD 1.5 table) plot beside newer ones."""
    from benchmarks import benchmark

    reports = [json.loads((REPO_ROOT / "docs" / name).read_text()) for name in PLOTTED_TOGETHER]
    assert not benchmark._has_mean_steps(reports[1]) and benchmark._has_mean_steps(reports[0])
    assert benchmark.setting_label(reports[1]).endswith("median step")
    assert benchmark._step_seconds(reports[1], "sara") == reports[1]["results"]["sara"]["median_step_seconds"]
    benchmark.plot_reports(reports, str(tmp_path / "plot.png"))
    with Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG"
