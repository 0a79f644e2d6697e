"""peft_sara.zero: SaRA under DeepSpeed ZeRO-1 and ZeRO-2, two gloo processes on CPU (DS_ACCELERATOR=cpu), against a
plain run: the regulariser and the progressive step reach the fp32 partitions ZeRO steps, so the adapter is the
plain run's bit for bit, with one parameter group or two, and a DeepSpeed checkpoint resumes to the same adapter."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import free_port, two_process_env
from helpers.fsdp2_train import train as plain_train
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


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DeepSpeed process (two_process_env), so that the kernels sum alike
    try:
        report = plain_train(str(folder), sharded=False)
    finally:
        torch.set_num_threads(threads)
    return folder, report


def assert_same_adapter(folder, expected_folder):
    expected = load_file(expected_folder / "adapter_model.safetensors")
    actual = load_file(folder / "adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("stage,groups", [(1, 1), (2, 1), (2, 2)], ids=["zero1", "zero2", "zero2-two-groups"])
def test_zero_trains_the_plain_run_s_adapter_bit_for_bit(plain_run, tmp_path, stage, groups):
    plain_folder, plain = plain_run
    run_zero(str(tmp_path), str(stage), str(groups))
    zero = torch.load(tmp_path / "report.pt")
    assert plain["frozen_fraction"] > 0 and zero["frozen_fraction"] == plain["frozen_fraction"]
    for key, positions in plain["training"]["frozen_positions"].items():
        assert torch.equal(zero["training"]["frozen_positions"][key], positions), key
    assert zero["losses"] == plain["losses"]
    assert_same_adapter(tmp_path, plain_folder)


def test_a_deepspeed_checkpoint_resumes_to_the_straight_run_s_adapter(plain_run, tmp_path):
    """Steps 1-2, engine.save_checkpoint with attach's state_dict in its client state, new processes, load_checkpoint
    and load_state_dict, steps 3-4 (after the progressive step, whose frozen set must come back)."""
    plain_folder, _ = plain_run
    run_zero(str(tmp_path), "2", "1", "first")
    assert (tmp_path / "checkpoint").is_dir()
    run_zero(str(tmp_path), "2", "1", "rest")
    assert_same_adapter(tmp_path, plain_folder)
    shutil.rmtree(tmp_path / "checkpoint")
