"""peft_sara/sharding.py: SaRA under FSDP2 (`fully_shard`, every parameter a DTensor shard) trains, regularises,
freezes and saves exactly what a plain run does (two gloo processes on CPU, launched by torch.distributed.run)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import free_port, tiny_unet, two_process_env, unet_inputs
from helpers.fsdp2_train import train
from peft import PeftModel

from peft_sara.sharding import full_tensor, like, local, local_positions

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "fsdp2_train.py")


def test_plain_tensors_pass_through():
    tensor = torch.arange(6.0)
    positions = torch.tensor([1, 4])
    assert full_tensor(tensor) is tensor and like(tensor, tensor) is tensor and local(tensor) is tensor
    assert local_positions(positions, tensor) is positions


def test_fsdp2_trains_and_saves_what_a_plain_run_does(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the sharded run (two_process_env), so that reductions agree
    try:
        plain = train(str(tmp_path / "plain"), sharded=False)
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    result = subprocess.run(
        [*command, HELPER, str(tmp_path / "sharded")],
        capture_output=True,
        text=True,
        timeout=600,
        env=two_process_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(tmp_path / "sharded" / "report.pt")
    assert plain["frozen_fraction"] > 0 and sharded["frozen_fraction"] == plain["frozen_fraction"]
    assert sharded["frozen_gradient"] == plain["frozen_gradient"] == 0  # clipping and AdamW see none there
    for key, positions in plain["training"]["frozen_positions"].items():
        assert torch.equal(sharded["training"]["frozen_positions"][key], positions), key
    # to float rounding: clipping's gradient norm is summed over the shards in another order
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(plain["losses"]), rtol=1e-6, atol=0)
    outputs = []
    for folder in ("plain", "sharded"):
        model = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / folder))
        with torch.no_grad():
            outputs.append(model(**unet_inputs(model.base_model.model, seed=9)).sample)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
