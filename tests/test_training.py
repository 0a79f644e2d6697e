"""attach(): the nuclear-norm regulariser and the progressive step, alone, with accelerate, and across processes."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from conftest import launch_two_cpu_processes, round_layers_to, tiny_unet, two_process_env, unet_inputs
from peft import get_peft_model
from torch import nn

import peft_sara
from peft_sara import SaRAConfig, SaRALayer, attach, paper_learning_rate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sara_unet(**config):
    config = {"threshold": 0.02, "rank_min_dim": 8, **config}
    return get_peft_model(tiny_unet(), SaRAConfig(**config))


def adapter_values(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model, steps: int, lr: float = 1e-3, with_attach: bool = True, seed: int = 0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-2)
    training = attach(model, optimizer) if with_attach else None
    for step in range(steps):
        model(**unet_inputs(model, seed=seed + step)).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, training


def test_paper_learning_rate():
    assert paper_learning_rate(2e-3) == pytest.approx(4.966e-4, rel=1e-3)
    assert paper_learning_rate(0) == 1e-3


def test_regulariser_adds_the_nuclear_norm_subgradient_of_the_masked_weight():
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(80, 96)), SaRAConfig(threshold=0.05, lambda_rank=0.1, init_weights=False)
    )
    layer = model.base_model.model[0]
    values, indices = layer.sara_values["default"], layer.sara_indices["default"].long()
    masked_values = values.detach().clone().requires_grad_(True)
    base = layer.get_base_layer().weight.detach()
    masked = torch.zeros(96 * 80).index_add(0, indices, base.view(-1)[indices] + masked_values).view(96, 80)
    nuclear_norm = torch.linalg.matrix_norm(masked, ord="nuc")
    nuclear_norm.backward()
    optimizer = torch.optim.SGD([values], lr=0.0)
    training = attach(model, optimizer)
    values.grad = torch.zeros_like(values)
    optimizer.step()
    torch.testing.assert_close(values.grad, 0.1 * masked_values.grad, rtol=1e-4, atol=1e-6)
    assert training.rank_loss == pytest.approx(0.1 * nuclear_norm.item(), rel=1e-5)
    assert training.last_rank_layers == ["0:default"]


def test_lambda_zero_changes_nothing_and_lambda_positive_changes_training():
    plain = sara_unet(lambda_rank=0.0)
    train(plain, 3, with_attach=False)
    with_zero = sara_unet(lambda_rank=0.0)
    train(with_zero, 3)
    regularised = sara_unet(lambda_rank=0.5)
    _, training = train(regularised, 3)
    regularised_again = sara_unet(lambda_rank=0.5)
    train(regularised_again, 3)
    plain_values, regularised_values = adapter_values(plain), adapter_values(regularised)
    assert all(torch.equal(plain_values[n], v) for n, v in adapter_values(with_zero).items())
    assert any(not torch.equal(plain_values[n], v) for n, v in regularised_values.items())
    assert all(torch.equal(regularised_values[n], v) for n, v in adapter_values(regularised_again).items())
    assert training.rank_loss > 0 and training.step == 3


def test_regularised_layer_depends_only_on_seed_and_step():
    def chosen_layers(seed: int) -> list[list[str]]:
        model = sara_unet(lambda_rank=0.1, rank_seed=seed)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        training = attach(model, optimizer)
        chosen = []
        for _ in range(6):
            model(**unet_inputs(model)).sample.mean().backward()
            optimizer.step()
            chosen.append(training.last_rank_layers)
        return chosen

    assert chosen_layers(0) == chosen_layers(0)
    assert chosen_layers(0) != chosen_layers(1)
    assert len({layers[0] for layers in chosen_layers(0)}) > 1


def test_skipped_gradient_scaler_steps_add_nothing():
    model = sara_unet(lambda_rank=0.1, progressive_step=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    training = attach(model, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    before = adapter_values(model)
    loss = model(**unet_inputs(model)).sample.mean() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert training.step == 0 and training.last_rank_loss is None and training.frozen_fraction == 0
    assert all(torch.equal(before[n], v) for n, v in adapter_values(model).items())
    scaler.scale(model(**unet_inputs(model)).sample.square().mean()).backward()
    scaler.step(optimizer)
    assert training.step == 1 and training.last_rank_loss is not None


@pytest.mark.parametrize("unscaled_for_clipping", [False, True])
def test_fused_optimizer_under_a_gradient_scaler_gets_the_regulariser_at_the_gradients_scale(unscaled_for_clipping):
    # a GradScaler steps a fused AdamW with the gradients still scaled (unless unscale_ ran for clipping): the
    # regulariser's subgradient must be scaled with them, or the optimizer divides it by the scale (65536)
    def trained_values(scaler: torch.amp.GradScaler | None) -> dict[str, torch.Tensor]:
        model = sara_unet(lambda_rank=2.0, init_weights=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
        attach(model, optimizer)
        for step in range(2):
            loss = model(**unet_inputs(model, seed=step)).sample.mean() * 1e-3
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                if unscaled_for_clipping:
                    scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad()
        return adapter_values(model)

    plain = trained_values(None)
    scaled = trained_values(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    for name, values in plain.items():
        torch.testing.assert_close(scaled[name], values, rtol=1e-5, atol=1e-7)


def test_fused_optimizer_step_skipped_for_inf_gradients_adds_nothing():
    model = sara_unet(lambda_rank=0.1, progressive_step=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    training = attach(model, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    before = adapter_values(model)
    scaler.scale(model(**unet_inputs(model)).sample.mean() * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert training.step == 0 and training.last_rank_loss is None and training.frozen_fraction == 0
    assert all(torch.equal(before[n], v) for n, v in adapter_values(model).items())
    scaler.scale(model(**unet_inputs(model)).sample.square().mean()).backward()
    scaler.step(optimizer)
    assert training.step == 1 and training.last_rank_loss is not None


def test_progressive_step_freezes_grown_entries_for_good():
    model = sara_unet(lambda_rank=0.0, progressive_step=2)
    optimizer, training = train(model, 2, lr=0.05)
    assert training.frozen_fraction > 0.05
    layers = [m for m in model.modules() if isinstance(m, SaRALayer)]
    frozen = {}
    for layer in layers:
        values = layer.sara_values["default"].detach()
        base = layer.get_base_layer().weight.detach().reshape(-1)[layer.sara_indices["default"].long()]
        frozen[layer] = ((base + values).abs() >= 0.02, values.clone())
    for step in range(3):
        model(**unet_inputs(model, seed=10 + step)).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    still_training_moved = False
    for layer, (is_frozen, values_at_freeze) in frozen.items():
        values = layer.sara_values["default"].detach()
        assert torch.equal(values[is_frozen], values_at_freeze[is_frozen])
        still_training_moved |= not torch.equal(values[~is_frozen], values_at_freeze[~is_frozen])
        state = optimizer.state[layer.sara_values["default"]]
        assert int(state["step"]) == 5  # moments kept through the progressive step, not restarted
    assert still_training_moved


def test_resume_reproduces_a_straight_run():
    straight = sara_unet(lambda_rank=0.2, progressive_step=2)
    train(straight, 4, lr=0.05)

    first_half = sara_unet(lambda_rank=0.2, progressive_step=2)
    optimizer, training = train(first_half, 3, lr=0.05)
    checkpoint = {
        "values": adapter_values(first_half),
        "optimizer": optimizer.state_dict(),
        "training": training.state_dict(),
    }
    resumed = sara_unet(lambda_rank=0.2, progressive_step=2)
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            param.data.copy_(checkpoint["values"][name])
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=0.05, weight_decay=1e-2)
    optimizer.load_state_dict(checkpoint["optimizer"])
    training = attach(resumed, optimizer)
    training.load_state_dict(checkpoint["training"])
    assert training.step == 3 and training.frozen_fraction > 0
    resumed(**unet_inputs(resumed, seed=3)).sample.square().mean().backward()
    optimizer.step()
    straight_values = adapter_values(straight)
    assert all(torch.equal(straight_values[n], v) for n, v in adapter_values(resumed).items())


def test_accelerate_wrapped_optimizer_and_gradient_accumulation():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = sara_unet(lambda_rank=0.1, progressive_step=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    training = attach(model, optimizer)
    for micro_batch in range(4):
        with accelerator.accumulate(model):
            inputs = unet_inputs(accelerator.unwrap_model(model), seed=micro_batch)
            accelerator.backward(model(**inputs).sample.square().mean())
            optimizer.step()
            optimizer.zero_grad()
    assert training.step == 2
    assert training.frozen_fraction > 0


def test_attach_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="no trainable SaRA adapter"):
        attach(nn.Linear(3, 3), torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1))
    model = sara_unet()
    with pytest.raises(ValueError, match="does not hold the SaRA parameters"):
        attach(model, torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, optimizer)
    with pytest.raises(ValueError, match="already called"):
        attach(model, optimizer)


def test_two_processes_end_with_identical_adapters(tmp_path):
    """DDP over gloo on CPU: each rank sees other data, yet regularises the same layers and ends identical."""
    worker = os.path.join(REPO_ROOT, "tests", "helpers", "ddp_train.py")
    command = launch_two_cpu_processes(worker, [str(tmp_path)])
    result = subprocess.run(command, env=two_process_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank_files = sorted(tmp_path.glob("rank*.pt"))
    assert len(rank_files) == 2, "two processes must really have run"
    first, second = (torch.load(path) for path in rank_files)
    assert first["num_processes"] == second["num_processes"] == 2
    assert first["rank_layers"] == second["rank_layers"] and first["rank_layers"]
    assert first["frozen_fraction"] == second["frozen_fraction"] > 0
    assert first["values"].keys() == second["values"].keys()
    assert all(torch.equal(first["values"][name], second["values"][name]) for name in first["values"])
    assert not torch.equal(first["first_batch"], second["first_batch"])  # the ranks trained on different data


def test_package_exports_the_public_api():
    for name in ("SaRAConfig", "SaRAModel", "attach", "paper_learning_rate", "load_sara_weights"):
        assert hasattr(peft_sara, name)


@pytest.mark.parametrize("method", ["auto", "svd", "gram", "newton_schulz"])
@pytest.mark.parametrize("shape", [(96, 400), (400, 96), (128, 128), (64, 200)])
def test_polar_factor_agrees_with_the_svd(shape, method):
    from peft_sara.training import polar_factor

    torch.manual_seed(0)
    weight = torch.randn(*shape) * 0.02
    masked = weight * (weight.abs() < 2e-3)  # SaRA's masked matrix: sparse, full rank
    u, singular_values, vh = torch.linalg.svd(masked, full_matrices=False)
    polar, nuclear_norm = polar_factor(masked, method)
    torch.testing.assert_close(polar, u @ vh, atol=1e-5, rtol=0)
    torch.testing.assert_close(nuclear_norm, singular_values.sum(), atol=0, rtol=1e-5)
    # a rank-2 matrix: every method must give a subgradient, U₂V₂ᵀ on its range plus at most a contraction on its null
    # directions; the Gram path gives those none
    low_rank = torch.outer(masked[:, 0], masked[0, :]) + torch.outer(masked[:, 1], masked[1, :])
    polar, nuclear_norm = polar_factor(low_rank, method)
    u, singular_values, vh = torch.linalg.svd(low_rank, full_matrices=False)
    torch.testing.assert_close(u[:, :2].T @ polar @ vh[:2].T, torch.eye(2), atol=1e-4, rtol=0)
    assert torch.linalg.matrix_norm(polar, ord=2) <= 1 + 1e-3
    torch.testing.assert_close(nuclear_norm, singular_values.sum(), atol=0, rtol=1e-4)
    if method == "gram" or (method == "auto" and shape[0] != shape[1]):
        torch.testing.assert_close(polar, u[:, :2] @ vh[:2], atol=1e-4, rtol=0)


def test_polar_factor_refuses_an_unknown_method():
    from peft_sara.training import polar_factor

    with pytest.raises(ValueError, match="newton_schulz"):
        polar_factor(torch.ones(3, 4), "qr")


def test_a_base_stored_in_fp8_trains_what_its_fp32_copy_trains():
    """diffusers' layerwise casting (fp8 storage, the usual way to fit Flux on 24 GB) under attach: the fp32 values,
    the regulariser and the progressive step train what they train on the same weights stored in fp32."""
    import copy

    unet = tiny_unet()
    round_layers_to(unet, torch.float8_e4m3fn)  # weights that fp8 holds exactly: both runs start from the same base
    config = SaRAConfig(threshold=0.02, init_weights=False, rank_min_dim=8, lambda_rank=0.2, progressive_step=2)
    unet.add_adapter(config)
    stored_in_fp8 = copy.deepcopy(unet)
    stored_in_fp8.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert any(m.weight.dtype == torch.float8_e4m3fn for m in stored_in_fp8.modules() if isinstance(m, nn.Linear))
    initial, trained = adapter_values(unet), []
    for model in (unet, stored_in_fp8):
        _, training = train(model, steps=4, lr=0.05)
        assert training.frozen_fraction > 0
        trained.append(adapter_values(model))
    assert trained[0].keys() == trained[1].keys() == initial.keys()
    assert any(not torch.equal(values, initial[name]) for name, values in trained[1].items())
    for name, values in trained[0].items():
        assert trained[1][name].dtype == torch.float32
        torch.testing.assert_close(trained[1][name], values, rtol=1e-5, atol=1e-7, msg=name)
