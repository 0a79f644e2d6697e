"""scripts/export_lora.py: the command line of export_lora, with one `error:` line and status 2 for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import load_script, tiny_unet
from peft import get_peft_model
from safetensors.torch import load_file
from test_export import visible_update

from peft_sara import SaRAConfig
from peft_sara.script_utils.cli import UserInputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "export_lora.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "style"
    unet = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02))
    visible_update(unet)
    unet.save_pretrained(run / "unet")
    return run


def test_exports_with_the_rank_and_format_given(run_dir, tmp_path, capsys):
    result = load_script("export_lora").main([str(run_dir), str(tmp_path), "--rank", "0.8", "--format", "kohya"])
    assert result.path == tmp_path / "style.safetensors" and result.requested_rank == 0.8
    assert all(layer.energy_retained >= 0.8 for layer in result.layers)
    assert "energy retained" in capsys.readouterr().out
    result = load_script("export_lora").main([str(run_dir), str(tmp_path), "--rank", "3", "--save_precision", "bf16"])
    assert result.requested_rank == 3 and max(layer.rank for layer in result.layers) == 3
    assert {str(tensor.dtype) for tensor in load_file(result.path).values()} == {"torch.bfloat16"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{missing}", "{out}"], "No folder at"),
        (["{run}", "{out}", "--rank", "0"], "argument --rank: rank must be an integer >= 1"),
        (["{run}", "{out}", "--rank", "2.5"], "argument --rank: rank must be an integer >= 1"),
        (["{run}", "{out}", "--rank", "many"], "argument --rank: rank must be an integer >= 1"),
        (["{run}", "{out}", "--format", "comfy"], "argument --format: invalid choice"),
    ],
)
def test_bad_input_is_refused(run_dir, tmp_path, argv, message):
    paths = {"missing": tmp_path / "missing", "out": tmp_path / "out", "run": run_dir}
    with pytest.raises(UserInputError, match=message):
        load_script("export_lora").main([arg.format(**paths) for arg in argv])
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_on_stderr_and_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: Found no adapter in {tmp_path}")


def test_an_output_that_would_replace_or_mix_files_is_refused_unless_overwrite(run_dir, tmp_path):
    export = load_script("export_lora").main
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("keep me")
    with pytest.raises(UserInputError, match="is a file, not a folder"):
        export([str(run_dir), str(a_file)])
    with pytest.raises(UserInputError, match="is a file, not a folder"):
        export([str(run_dir), str(a_file), "--overwrite"])
    assert a_file.read_text() == "keep me"

    out = tmp_path / "out"
    first = export([str(run_dir), str(out), "--rank", "2"])
    written = first.path.read_bytes()
    with pytest.raises(UserInputError, match="exists already: pass another output folder, or overwrite=True"):
        export([str(run_dir), str(out), "--rank", "3"])
    assert first.path.read_bytes() == written
    assert export([str(run_dir), str(out), "--rank", "3", "--overwrite"]).path.read_bytes() != written

    inside = run_dir / "unet" / "lora"
    with pytest.raises(UserInputError, match="is inside the source folder"):
        export([str(run_dir), str(inside)])
    with pytest.raises(UserInputError, match="is inside the source folder"):
        export([str(run_dir), str(run_dir)])
    assert not inside.exists()
    assert export([str(run_dir), str(inside), "--overwrite"]).path.parent == inside


def test_the_summary_says_what_each_tool_loads_and_a_tool_s_gaps_can_be_left_out(run_dir, tmp_path, capsys):
    export = load_script("export_lora").main
    result = export([str(run_dir), str(tmp_path / "all"), "--format", "kohya", "--rank", "2"])
    gaps = {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1", "unet.time_embedding.linear_2"}
    assert set(result.unloaded_by["kohya sd-scripts"]) == gaps
    assert result.unloaded_by["ComfyUI"] == result.unloaded_by["AUTOMATIC1111"] == []
    printed = capsys.readouterr().out
    assert f"kohya sd-scripts: will NOT load 4 of {len(result.layers)} layers" in printed
    assert "ComfyUI: loads all" in printed

    only = export(
        [
            str(run_dir),
            str(tmp_path / "kohya"),
            "--format",
            "kohya",
            "--rank",
            "2",
            "--only_loadable_by",
            "kohya sd-scripts",
        ]
    )
    assert {f"{layer.component}.{layer.module}" for layer in only.layers} == {
        f"{layer.component}.{layer.module}" for layer in result.layers
    } - gaps
    assert sorted(only.left_out) == sorted(f"{gap} (not loaded by kohya sd-scripts)" for gap in gaps)
    assert not any("conv_in" in key or "time_embedding" in key for key in load_file(only.path))
    assert "kohya sd-scripts: loads all" in capsys.readouterr().out

    diffusers = export([str(run_dir), str(tmp_path / "diffusers"), "--rank", "2"])
    assert all(".attn" in name for name in diffusers.unloaded_by["ComfyUI"]) and diffusers.unloaded_by["ComfyUI"]
    assert len(diffusers.unloaded_by["AUTOMATIC1111"]) == len(diffusers.layers)
    assert "format='kohya' loads more" in capsys.readouterr().out


def test_a_tool_that_loads_nothing_of_the_format_is_named_not_called_a_zero_update(run_dir, tmp_path):
    with pytest.raises(UserInputError, match="kohya sd-scripts loads none of the layers in format='diffusers'"):
        load_script("export_lora").main(
            [str(run_dir), str(tmp_path / "out"), "--only_loadable_by", "kohya sd-scripts"]
        )
    assert not (tmp_path / "out").exists()
