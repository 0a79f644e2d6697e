"""scripts/benchmark.py in its short setting: every method runs in its own process and the report is complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "benchmark.py")


def test_small_benchmark_reports_every_method_and_the_budget(tmp_path):
    output = tmp_path / "bench.json"
    command = [
        sys.executable,
        SCRIPT,
        "--model",
        "small",
        "--steps",
        "1",
        "--latent-size",
        "16",
        "--output",
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"frozen", "full", "sara"}
    full, sara = report["results"]["full"], report["results"]["sara"]
    assert full["trainable_values"] == full["total_parameters"]
    assert 0 < sara["trainable_values"] < 0.1 * sara["total_parameters"]
    assert report["results"]["frozen"]["trainable_values"] == 0
    assert 0 < sara["adapter_bytes"] <= 8 * sara["trainable_values"] + 65536  # header: about 200 B per tensor
    assert sara["adapter_load_seconds"] > 0
    assert all(row["peak_memory_bytes"] > 0 and row["median_step_seconds"] > 0 for row in report["results"].values())
    assert set(report["sara_budget"]) == {"memory_vs_frozen_budget", "memory_vs_full", "time_vs_full"}
    assert "| sara |" in result.stdout


def test_unknown_method_is_refused():
    result = subprocess.run([sys.executable, SCRIPT, "--methods", "sara,lora9"], capture_output=True, text=True)
    assert result.returncode != 0 and "unknown method" in result.stderr


@pytest.mark.slow
def test_sd15_unet_meets_the_memory_budget(tmp_path):
    """SD 1.5's UNet architecture (860M parameters, about 6 minutes and 14 GiB): the tuner issue's memory targets."""
    output = tmp_path / "sd15.json"
    command = [sys.executable, SCRIPT, "--model", "sd15", "--steps", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    budget = json.loads(output.read_text())["sara_budget"]
    assert budget["memory_vs_frozen_budget"]["passes"], budget
    assert budget["memory_vs_full"]["passes"], budget
