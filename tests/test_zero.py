"""peft_sara.zero: SaRA under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3, two gloo processes on CPU (DS_ACCELERATOR=cpu),
against a plain run: the regulariser and the progressive step reach the fp32 partitions ZeRO steps, so the adapter is
the plain run's (bit for bit under ZeRO-1/2), with one parameter group or two, and a DeepSpeed checkpoint resumes to
the same adapter. Under ZeRO-3 the layers compute with partitioned base weights and values, which they gather."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import free_port, two_process_env
from safetensors.torch import load_file

# installed by `make test` (the deepspeed extra); not imported here, only in the worker processes
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "zero_train.py")


def run_zero(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    # DeepSpeed on CPU: its CPU accelerator over gloo (the first run compiles its shared-memory op, about a minute)
    env = {**two_process_env(), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([*command, HELPER, *args], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_adapter(folder, expected_folder, atol=0.0):
    expected = load_file(expected_folder / "adapter_model.safetensors")
    actual = load_file(folder / "adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype and actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def assert_plain_run_s_training(folder, plain, exact=True):
    zero = torch.load(folder / "report.pt")
    assert plain["frozen_fraction"] > 0 and zero["frozen_fraction"] == plain["frozen_fraction"]
    for key, positions in plain["training"]["frozen_positions"].items():
        assert torch.equal(zero["training"]["frozen_positions"][key], positions), key
    if exact:
        assert zero["losses"] == plain["losses"]
    else:
        torch.testing.assert_close(zero["losses"], plain["losses"], rtol=1e-6, atol=0)
    return zero


# ZeRO-1 steps as ZeRO-2 does (the same optimizer class): make test-all runs it
@pytest.mark.parametrize(
    "stage,groups",
    [pytest.param(1, 1, marks=pytest.mark.slow), (2, 1), (2, 2)],
    ids=["zero1", "zero2", "zero2-two-groups"],
)
def test_zero_trains_the_plain_run_s_adapter_bit_for_bit(plain_sharding_run, tmp_path, stage, groups):
    plain_folder, plain = plain_sharding_run
    run_zero(str(tmp_path), str(stage), str(groups))
    zero = assert_plain_run_s_training(tmp_path, plain)
    # the values are whole: the training scripts save and validate on the main process alone
    assert not zero["reading_needs_every_process"] and not zero["forward_needs_every_process"]
    assert_same_adapter(tmp_path, plain_folder)


def test_under_zero2_in_bf16_the_adapter_holds_zero_s_fp32_values_not_the_model_s_bf16_copy(tmp_path):
    run_zero(str(tmp_path), "2", "1", "all", "bf16")
    report = torch.load(tmp_path / "report.pt")
    assert report["reading_needs_every_process"]  # the fp32 values lie in the partitions: every process saves
    assert not report["forward_needs_every_process"]  # the model is whole: the main process validates alone
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name, fp32 in report["fp32_copies"].items():
        assert fp32.dtype == torch.float32 and torch.equal(saved[name.removesuffix(".default")], fp32), name
    assert any(
        not torch.equal(report["fp32_copies"][name], model_values)
        for name, model_values in report["model_values"].items()
    ), "the model's bf16 copy differs: the test tells the two apart"


# ZeRO-3's hooks add nodes to the autograd graph, which then sums the UNet's skip connections' gradients in another
# order: 23 of the 83 layers' first gradients differ from the plain run's by up to 3e-9, and after 4 AdamW steps the
# adapter by 5.9e-6. Leaving out the frozen write-back or the subgradient puts it 0.07 and 0.18 off.
ZERO3_ATOL = 2e-5


@pytest.mark.parametrize("groups", [1, 2], ids=["one-group", "two-groups"])
def test_zero3_trains_the_plain_run_s_adapter_on_partitioned_weights(plain_sharding_run, tmp_path, groups):
    plain_folder, plain = plain_sharding_run
    run_zero(str(tmp_path), "3", str(groups))
    zero = assert_plain_run_s_training(tmp_path, plain, exact=False)
    assert zero["held_whole"] == 0  # every parameter partitioned: the layers gathered what they computed with
    # so the training scripts save and validate on every process
    assert zero["reading_needs_every_process"] and zero["forward_needs_every_process"]
    assert_same_adapter(tmp_path, plain_folder, atol=ZERO3_ATOL)


# ZeRO-2's resume is also the DreamBooth script's under accelerate (test_train_dreambooth_sara): make test-all runs it
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3], ids=["zero2", "zero3"])
def test_a_deepspeed_checkpoint_resumes_to_the_straight_run_s_adapter(plain_sharding_run, tmp_path, stage):
    """Steps 1-2, engine.save_checkpoint with attach's state_dict in its client state, new processes, load_checkpoint
    and load_state_dict, steps 3-4 (after the progressive step, whose frozen set must come back)."""
    plain_folder, _ = plain_sharding_run
    if stage == 3:
        run_zero(str(tmp_path / "straight"), "3", "1")
        plain_folder = tmp_path / "straight"  # ZeRO-3's own straight run: the resumed one is that bit for bit
    run_zero(str(tmp_path), str(stage), "1", "first")
    assert (tmp_path / "checkpoint").is_dir()
    run_zero(str(tmp_path), str(stage), "1", "rest")
    assert_same_adapter(tmp_path, plain_folder)
    shutil.rmtree(tmp_path / "checkpoint")
