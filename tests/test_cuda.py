"""SaRA on a CUDA device: the sparse op in half precision under autocast and a gradient scaler, the regulariser and
the progressive step, save and load, a fused optimizer under a scaler, torch.compile with inductor, and a DreamBooth
run. Skipped without a GPU; `make test-gpu` runs them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, tiny_unet, unet_inputs, write_images
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_sara
from peft_sara import SaRAConfig
from peft_sara.layer import Conv2d, Linear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"
REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_values_grad(layer, x: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values' gradient from plain autograd on the dense effective weight, under the same autocast."""
    base = layer.get_base_layer()
    indices = layer.sara_indices["default"].long()
    weight = base.weight.detach().clone().requires_grad_(True)
    update = (
        torch.zeros_like(weight).view(-1).index_add(0, indices, layer.sara_values["default"].detach().to(weight.dtype))
    )
    with torch.autocast(DEVICE, dtype=dtype):
        effective = weight + update.view_as(weight)
        output = (
            F.linear(x, effective, base.bias)
            if isinstance(base, nn.Linear)
            else base._conv_forward(x, effective, base.bias)
        )
    output.backward(grad_output)
    return weight.grad.view(-1)[indices].float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparse_op_matches_autograd_under_autocast(dtype, kind):
    torch.manual_seed(0)
    base = (nn.Linear(64, 32) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)).to(DEVICE, dtype)
    base.requires_grad_(False)
    layer = (Linear if kind == "linear" else Conv2d)(base, "default", SaRAConfig(threshold=0.05, init_weights=False))
    assert layer.sara_values["default"].dtype == torch.float32
    x = torch.randn((4, 64) if kind == "linear" else (2, 8, 10, 10), device=DEVICE, dtype=dtype)
    before = base.weight.detach().clone()
    with torch.autocast(DEVICE, dtype=dtype):
        output = layer(x)
    grad_output = torch.randn_like(output)
    output.backward(grad_output)
    assert torch.equal(layer.get_base_layer().weight, before), "the base weight is restored bit for bit"
    expected = reference_values_grad(layer, x, grad_output, dtype)
    torch.testing.assert_close(layer.sara_values["default"].grad, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ema_validation_between_steps_changes_nothing_under_autocast_and_a_scaler(dtype):
    """diffusers' scripts between two steps: EMA store, copy_to, a no_grad validation forward, restore. Training
    stays bit for bit what it is without them, and the base weights stay the pre-trained ones."""
    from diffusers.training_utils import EMAModel

    runs = []
    for with_ema in (False, True):
        torch.manual_seed(0)
        unet = tiny_unet().to(DEVICE)
        model = get_peft_model(unet, SaRAConfig(threshold=0.02, lambda_rank=5e-3, rank_min_dim=8, init_weights=False))
        base = {name: p.detach().clone() for name, p in model.named_parameters() if "sara_" not in name}
        ema = EMAModel(model.parameters()) if with_ema else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        peft_sara.attach(model, optimizer)
        scaler = torch.amp.GradScaler(DEVICE)
        inputs = {key: value.to(DEVICE) for key, value in unet_inputs(unet).items()}
        outputs = []
        for _ in range(3):
            with torch.autocast(DEVICE, dtype=dtype):
                output = model(**inputs).sample
            scaler.scale(output.float().pow(2).mean()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            outputs.append(output.detach())
            if ema is not None:
                ema.step(model.parameters())
                ema.store(model.parameters())
                ema.copy_to(model.parameters())
                with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
                    model(**inputs)
                ema.restore(model.parameters())
        assert all(torch.equal(p, base[name]) for name, p in model.named_parameters() if "sara_" not in name)
        values = [param.detach() for name, param in model.named_parameters() if "sara_values" in name]
        runs.append((outputs, values))
    (outputs, values), (reference_outputs, reference_values) = runs
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference_outputs))
    assert all(torch.equal(a, b) for a, b in zip(values, reference_values))


def test_training_with_a_gradient_scaler_regulariser_and_progressive_step(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet().to(DEVICE, torch.float16)
    model = get_peft_model(unet, SaRAConfig(threshold=0.02, lambda_rank=5e-3, rank_min_dim=8, progressive_step=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    training = peft_sara.attach(model, optimizer)
    scaler = torch.amp.GradScaler(DEVICE)
    inputs = {key: value.to(DEVICE) for key, value in unet_inputs(unet).items()}
    for _ in range(4):
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = model(**inputs).sample.float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert training.step >= 1 and training.rank_loss > 0
    values = [param for name, param in model.named_parameters() if "sara_values" in name]
    assert all(param.dtype == torch.float32 and torch.isfinite(param).all() for param in values)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_unet().to(DEVICE, torch.float16), tmp_path / "adapter")
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        torch.testing.assert_close(reloaded(**inputs).sample, model(**inputs).sample, rtol=0, atol=0)


def test_a_dreambooth_run_on_the_gpu(tiny_pipeline_dir, tmp_path):
    write_images(tmp_path / "dog", 4, seed=0)
    output = load_script("train_dreambooth_sara").main(
        [
            "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
            "--instance_data_dir", str(tmp_path / "dog"),
            "--instance_prompt", "a photo of sks dog",
            "--output_dir", str(tmp_path / "out"),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--threshold", "0.02", "--mixed_precision", "fp16", "--report_to", "none", "--seed", "0",
            "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1", "--num_inference_steps", "2",
        ]
    )  # fmt: skip
    assert (output / "unet" / "adapter_model.safetensors").is_file()
    assert (output / "validation" / "final-0.png").is_file()
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_the_dreambooth_script_under_accelerates_deepspeed_zero3_in_bf16_on_the_gpu(tiny_pipeline_dir, tmp_path):
    """The shipped ZeRO-3 config with DeepSpeed's bf16 (it casts the model, values included): the adapter is saved
    from ZeRO's fp32 copy, validation samples during training, and a resumed run finishes."""
    write_images(tmp_path / "dog", 4, seed=0)
    config = REPO_ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"
    script = REPO_ROOT / "scripts" / "train_dreambooth_sara.py"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", "1", "--mixed_precision", "bf16", str(script)]
    command += [
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
        "--instance_data_dir", str(tmp_path / "dog"), "--instance_prompt", "a photo of sks dog",
        "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--threshold", "0.02", "--report_to", "none", "--seed", "0", "--validation_prompt", "a photo of sks dog",
        "--validation_steps", "2", "--num_validation_images", "1", "--num_inference_steps", "2",
    ]  # fmt: skip
    for run in ("straight", "resumed"):
        output = tmp_path / run
        if run == "resumed":
            output.mkdir()
            shutil.copytree(tmp_path / "straight" / "checkpoint-2", output / "checkpoint-2")
        extra = ["--output_dir", str(output)] + (["--resume_from_checkpoint", "latest"] if run == "resumed" else [])
        result = subprocess.run(command + extra, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        adapter = load_file(output / "unet" / "adapter_model.safetensors")
        values = [tensor for key, tensor in adapter.items() if key.endswith("sara_values")]
        assert values and all(tensor.dtype == torch.float32 for tensor in values)
        assert any((tensor != tensor.bfloat16().float()).any() for tensor in values), "ZeRO's fp32 values, not bf16"
    assert (tmp_path / "straight" / "validation" / "step-2-0.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_the_engine_memory_benchmark_reports_cuda_memory(tmp_path):
    output = tmp_path / "engines.json"
    command = [sys.executable, "-m", "benchmarks.engine_memory", "--model", "small", "--processes", "1"]
    command += ["--engines", "ddp,zero3,fsdp2", "--device", "cuda", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["engines"]
    assert all(0 < row["held_bytes"] <= row["peak_bytes"] for row in rows.values())


def test_a_fused_optimizer_under_a_scaler_trains_as_with_unscaled_gradients():
    """A GradScaler steps a fused AdamW with the gradients still scaled unless `unscale_` ran: both must train alike,
    the regulariser included (its subgradient is added at the gradients' scale)."""

    def trained_values(unscale_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        unet = tiny_unet().to(DEVICE)
        model = get_peft_model(unet, SaRAConfig(threshold=0.02, lambda_rank=1.0, rank_min_dim=8, init_weights=False))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
        peft_sara.attach(model, optimizer)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12)
        inputs = {key: value.to(DEVICE) for key, value in unet_inputs(unet).items()}
        for _ in range(3):
            with torch.autocast(DEVICE, dtype=torch.float16):
                loss = model(**inputs).sample.float().pow(2).mean()
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}

    unscaled, scaled = trained_values(True), trained_values(False)
    for name, values in unscaled.items():
        torch.testing.assert_close(scaled[name], values, rtol=1e-4, atol=1e-6)


def test_torch_compile_with_inductor_trains_as_eager():
    def outputs(compile_model: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        unet = tiny_unet().to(DEVICE)
        model = get_peft_model(unet, SaRAConfig(threshold=0.02, lambda_rank=5e-3, rank_min_dim=8, init_weights=False))
        run = torch.compile(model) if compile_model else model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        peft_sara.attach(model, optimizer)
        inputs = {key: value.to(DEVICE) for key, value in unet_inputs(unet).items()}
        results = []
        for _ in range(3):
            output = run(**inputs).sample
            output.pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            results.append(output.detach())
        return results

    for compiled, eager in zip(outputs(True), outputs(False)):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
