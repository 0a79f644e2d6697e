"""benchmarks/engine_memory.py: each engine trains on two processes and the report compares it with DDP."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.engine_memory import markdown_table, summarize

REPO_ROOT = Path(__file__).resolve().parent.parent


def process_report(engine: str, rank: int, held: int, peak: int) -> dict:
    return {
        "engine": engine,
        "rank": rank,
        "held_bytes": held,
        "peak_bytes": peak,
        "seconds_per_step": 1.0,
        "losses": [1.0],
    }


def test_each_engine_is_its_largest_process_against_ddp():
    rows = summarize(
        {
            "ddp": [process_report("ddp", 0, 4 << 30, 8 << 30), process_report("ddp", 1, 4 << 30, 8 << 30)],
            "zero3": [process_report("zero3", 0, 1 << 30, 2 << 30), process_report("zero3", 1, 2 << 30, 3 << 30)],
        }
    )
    assert rows["zero3"]["held_bytes"] == 2 << 30 and rows["zero3"]["held_vs_ddp"] == 0.5
    assert rows["zero3"]["peak_vs_ddp"] == 3 / 8 and rows["ddp"]["held_vs_ddp"] == 1.0
    assert "| zero3 | 2.00 GiB | 3.00 GiB | 0.50 | 0.38 |" in markdown_table(rows)


def test_fsdp2_units_are_the_blocks_or_each_of_their_layers():
    from conftest import tiny_unet
    from diffusers.models.resnet import ResnetBlock2D

    from benchmarks.engine_memory import fsdp2_units

    unet = tiny_unet()
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert fsdp2_units(unet, "blocks") == blocks
    layers = fsdp2_units(unet, "layers")
    assert len(layers) > len(blocks) and not set(layers) & set(blocks)
    assert {type(layer).__name__ for layer in layers} >= {ResnetBlock2D.__name__, "Transformer2DModel"}
    # every parameter of the blocks lies in one of the layers
    assert sum(p.numel() for layer in layers for p in layer.parameters()) == sum(
        p.numel() for block in blocks for p in block.parameters()
    )


@pytest.mark.slow  # four launches of two processes: make test-all
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed (make test installs it)")
def test_ddp_and_zero3_train_the_same_steps_on_two_processes(tmp_path):
    output = tmp_path / "engines.json"
    command = [sys.executable, "-m", "benchmarks.engine_memory", "--model", "small", "--engines", "ddp,zero3"]
    command += ["--steps", "2", "--latent-size", "16", "--device", "cpu", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert list(report["engines"]) == ["ddp", "zero3"]
    assert [len(report["processes"][engine]) for engine in ("ddp", "zero3")] == [2, 2]
    ddp, zero3 = (report["engines"][engine] for engine in ("ddp", "zero3"))
    assert ddp["losses"] == pytest.approx(zero3["losses"], rel=1e-5), "the same model trained the same steps"
    assert all(row["held_bytes"] > 0 and row["peak_bytes"] >= row["held_bytes"] for row in (ddp, zero3))
    assert "| zero3 |" in result.stdout
