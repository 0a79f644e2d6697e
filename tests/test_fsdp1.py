"""peft_sara.fsdp1: SaRA under FSDP1 (`FullyShardedDataParallel`, use_orig_params=True, a unit per UNet block), two
gloo processes on CPU against a plain run: the regulariser and the progressive step read the whole values in their
unit and write into each process's part, the frozen positions get no gradient before clipping, and the adapter,
saved from FSDP1's full state dict, is the plain run's bit for bit, also after a resume from a distributed
checkpoint. What FSDP1 cannot train is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import free_port, two_process_env
from safetensors.torch import load_file

from peft_sara.fsdp1 import FSDP1_WRAPPED_LAYER_REFUSAL
from peft_sara.model import INCOMPLETE_STATE_REFUSAL

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")


def run_fsdp1(mode: str, folder) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    command += [os.path.join(HELPERS, "fsdp1_train.py"), mode, str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=two_process_env())
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_adapter(folder, expected_folder):
    expected = load_file(expected_folder / "adapter_model.safetensors")
    actual = load_file(folder / "adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_fsdp1_trains_and_saves_the_plain_run_s_adapter_bit_for_bit(plain_sharding_run, tmp_path):
    plain_folder, plain = plain_sharding_run
    run_fsdp1("all", tmp_path)
    sharded = torch.load(tmp_path / "all" / "report.pt")
    assert sharded["losses"] == plain["losses"]
    assert plain["frozen_fraction"] > 0 and sharded["frozen_fraction"] == plain["frozen_fraction"]
    assert sharded["frozen_gradient"] == plain["frozen_gradient"] == 0  # clipping and AdamW see none there
    frozen = sharded["training"]["frozen_positions"]
    assert frozen.keys() == plain["training"]["frozen_positions"].keys()
    assert all(torch.equal(frozen[key], positions) for key, positions in plain["training"]["frozen_positions"].items())
    assert_same_adapter(tmp_path / "all", plain_folder)
    # saving from the model's own state dict (each process's part of the values) is refused, not written short
    assert sharded["parts_refusal"] is not None and sharded["parts_refusal"].startswith(INCOMPLETE_STATE_REFUSAL)


def test_fsdp1_resumes_from_a_distributed_checkpoint_to_the_plain_run_s_adapter(plain_sharding_run, tmp_path):
    plain_folder, _ = plain_sharding_run
    run_fsdp1("straight", tmp_path)
    run_fsdp1("resume", tmp_path)  # new processes: steps 3-4 after the progressive step, from the checkpoint
    assert_same_adapter(tmp_path / "resume", plain_folder)


def test_a_sara_layer_wrapped_as_a_unit_of_its_own_is_refused_by_attach():
    """Its forward would read a base weight that FSDP1 gathers only around the unit's own forward, which SaRA's op
    does not run."""
    command = [sys.executable, os.path.join(HELPERS, "fsdp1_attach.py"), free_port()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=two_process_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"refused: {FSDP1_WRAPPED_LAYER_REFUSAL}"
