"""peft_sara/sharding.py: SaRA under FSDP2 (`fully_shard`, every parameter a DTensor shard) trains, regularises,
freezes and saves exactly what a plain run does (two gloo processes on CPU, launched by torch.distributed.run); the
engines it does not train under yet (DeepSpeed, ZeRO-3, FSDP1, accelerate's FSDP plugin) are refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port, tiny_unet, two_process_env, unet_inputs
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sara import SaRAConfig, attach
from peft_sara.script_utils.cli import UserInputError
from peft_sara.script_utils.setup import make_accelerator
from peft_sara.sharding import (
    ACCELERATE_DEEPSPEED_REFUSAL,
    ACCELERATE_FSDP_REFUSAL,
    DEEPSPEED_REFUSAL,
    ZERO3_REFUSAL,
    full_tensor,
    like,
    local,
    local_positions,
    unsupported_launch,
)

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
HELPER = os.path.join(HELPERS, "fsdp2_train.py")


def run_on_two_processes(script: str, *script_args: str) -> None:
    """Run a worker script on two gloo processes with torch.distributed.run, on a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    result = subprocess.run(
        [*command, script, *script_args], capture_output=True, text=True, timeout=600, env=two_process_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]


def sara_unet():
    return get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02))


def deepspeed_stand_in(class_name: str, module: str, **attributes):
    """An object of a class defined in DeepSpeed's package (by its module name, which is all attach looks at), so
    that the refusal is tested without DeepSpeed installed."""
    return type(class_name, (), {"__module__": module, **attributes})()


def test_attach_refuses_deepspeed_without_zero_as_accelerate_wraps_it():
    """Stage 0's bf16 optimizer steps fp32 copies that SaRA's hooks do not reach."""
    model = sara_unet()
    bf16 = deepspeed_stand_in("BF16_Optimizer", "deepspeed.runtime.bf16_optimizer")
    bf16.param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    wrapper = deepspeed_stand_in("DeepSpeedOptimizerWrapper", "accelerate.utils.deepspeed", optimizer=bf16)
    with pytest.raises(ValueError) as error:
        attach(model, wrapper)
    assert str(error.value) == DEEPSPEED_REFUSAL and "stage to 1, 2 or 3" in str(error.value)


def test_attach_refuses_zero_with_optimizer_offload_or_without_a_torch_optimizer():
    model = sara_unet()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    stage = "deepspeed.runtime.zero.stage_1_and_2"
    offloaded = deepspeed_stand_in("DeepSpeedZeroOptimizer", stage, optimizer=optimizer, cpu_offload=True)
    with pytest.raises(ValueError, match="offload_optimizer"):
        attach(model, offloaded)
    stage3 = "deepspeed.runtime.zero.stage3"
    offloaded = deepspeed_stand_in("DeepSpeedZeroOptimizer_Stage3", stage3, optimizer=optimizer, offload_param=True)
    with pytest.raises(ValueError, match="offload_param"):
        attach(model, offloaded)
    own_adam = deepspeed_stand_in("DeepSpeedZeroOptimizer", stage, optimizer=object(), cpu_offload=False)
    with pytest.raises(ValueError, match="needs a torch optimizer inside ZeRO"):
        attach(model, own_adam)


def test_attach_refuses_a_deepspeed_engine():
    model = sara_unet()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    engine = type("DeepSpeedEngine", (torch.nn.Module,), {"__module__": "deepspeed.runtime.engine"})()
    engine.module = model
    with pytest.raises(ValueError, match="DeepSpeed"):
        attach(engine, optimizer)


def test_zero3_partitioned_weights_without_zero3_s_optimizer_are_refused_by_attach():
    """A plain optimizer would step the partitioned (empty) parameters, not ZeRO-3's fp32 partitions."""
    model = sara_unet()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    layer = next(module for module in model.modules() if hasattr(module, "sara_values"))
    layer.get_base_layer().weight.ds_id = 0  # what ZeRO-3 puts on every parameter it partitions
    with pytest.raises(ValueError) as error:
        attach(model, optimizer)
    assert str(error.value) == ZERO3_REFUSAL


def test_scripts_refuse_accelerates_fsdp_and_deepspeed_without_zero_or_with_offload_before_loading_anything(
    tmp_path, monkeypatch
):
    assert unsupported_launch("DEEPSPEED") == ACCELERATE_DEEPSPEED_REFUSAL  # no ZeRO stage: DeepSpeed without ZeRO
    assert unsupported_launch("DEEPSPEED", 0) == ACCELERATE_DEEPSPEED_REFUSAL
    assert unsupported_launch("DEEPSPEED", 3, offload=True) == ACCELERATE_DEEPSPEED_REFUSAL
    assert all(unsupported_launch("DEEPSPEED", stage) is None for stage in (1, 2, 3))
    assert unsupported_launch("FSDP") == ACCELERATE_FSDP_REFUSAL
    assert unsupported_launch("MULTI_GPU") is None and unsupported_launch("NO") is None
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # accelerate starts neither engine on a CPU-only machine: the launch's engine is what the Accelerator reports
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(UserInputError) as error:
        make_accelerator(str(tmp_path), "logs", 1, "no", "none", seed=0)
    assert str(error.value) == ACCELERATE_DEEPSPEED_REFUSAL


def test_plain_tensors_pass_through():
    tensor = torch.arange(6.0)
    positions = torch.tensor([1, 4])
    assert full_tensor(tensor) is tensor and like(tensor, tensor) is tensor and local(tensor) is tensor
    assert local_positions(positions, tensor) is positions


def test_fsdp2_trains_and_saves_what_a_plain_run_does(plain_sharding_run, tmp_path):
    plain_folder, plain = plain_sharding_run
    run_on_two_processes(HELPER, str(tmp_path / "sharded"))
    sharded = torch.load(tmp_path / "sharded" / "report.pt")
    assert plain["frozen_fraction"] > 0 and sharded["frozen_fraction"] == plain["frozen_fraction"]
    assert sharded["frozen_gradient"] == plain["frozen_gradient"] == 0  # clipping and AdamW see none there
    for key, positions in plain["training"]["frozen_positions"].items():
        assert torch.equal(sharded["training"]["frozen_positions"][key], positions), key
    # to float rounding: clipping's gradient norm is summed over the shards in another order
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(plain["losses"]), rtol=1e-6, atol=0)
    outputs = []
    for folder in (plain_folder, tmp_path / "sharded"):
        model = PeftModel.from_pretrained(tiny_unet(), str(folder))
        with torch.no_grad():
            outputs.append(model(**unet_inputs(model.base_model.model, seed=9)).sample)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_fsdp2_resumes_from_a_distributed_checkpoint_to_the_same_adapter(tmp_path):
    """Model and optimizer through torch.distributed.checkpoint, attach's state (the progressive step's frozen set,
    the step count) through its state_dict: new processes resumed after 2 of 4 steps write the straight run's adapter
    bit for bit (without attach's state they do not: the frozen entries would train again)."""
    for mode in ("straight", "resume"):
        run_on_two_processes(os.path.join(HELPERS, "fsdp2_resume.py"), mode, str(tmp_path))
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resume" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and any("sara_values" in key for key in straight)
    for key, tensor in straight.items():
        assert torch.equal(resumed[key], tensor), key
