"""SaRA layers: selection, no-op init, sparse backward against dense autograd, dtypes, merge and scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.layer import Conv2d, Linear


def sara_layer(base: nn.Module, threshold: float = 0.1, init_weights: bool = False, **config) -> nn.Module:
    torch.manual_seed(3)
    base.requires_grad_(False)  # as the tuner does
    layer_cls = Linear if isinstance(base, nn.Linear) else Conv2d
    return layer_cls(base, "default", SaRAConfig(threshold=threshold, init_weights=init_weights, **config))


def dense_reference(layer, x: torch.Tensor, grad_output: torch.Tensor):
    """Output and gradients from plain autograd on the dense effective weight (what the sparse backward must match)."""
    base = layer.get_base_layer()
    weight = base.weight.detach().contiguous().requires_grad_(True)
    indices = layer.sara_indices["default"].long()
    effective = weight + torch.zeros_like(weight).view(-1).index_add(
        0, indices, layer.sara_values["default"].detach()
    ).view_as(weight)
    x = x.detach().clone().requires_grad_(True)
    if isinstance(base, nn.Linear):
        output = F.linear(x, effective, base.bias)
    else:
        output = base._conv_forward(x, effective, base.bias)
    output.backward(grad_output)
    return output.detach(), x.grad, weight.grad.view(-1)[indices]


def test_trainable_count_equals_small_entries():
    base = nn.Linear(40, 30)
    layer = sara_layer(base, threshold=0.05)
    expected = int((base.weight.abs() < 0.05).sum())
    assert layer.sara_values["default"].numel() == expected
    assert layer.sara_values["default"].dtype == torch.float32
    assert torch.equal(layer.sara_indices["default"].long(), (base.weight.abs() < 0.05).view(-1).nonzero().squeeze(1))


@pytest.mark.parametrize(
    "base",
    [
        nn.Linear(12, 9),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, (3, 1), stride=2, padding=(2, 0), dilation=2),
        nn.Conv2d(4, 8, 3, groups=2, padding="same"),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 1, bias=False),
        nn.Conv2d(4, 6, 2, stride=2, padding="valid"),
    ],
    ids=["linear", "conv3x3", "conv-strided-dilated", "conv-groups-same", "conv-reflect", "conv1x1-nobias", "valid"],
)
def test_sparse_backward_matches_dense_autograd(base):
    torch.manual_seed(0)
    layer = sara_layer(base, threshold=0.15)
    shape = (3, 5, 12) if isinstance(base, nn.Linear) else (2, 4, 9, 9)
    x = torch.randn(shape, requires_grad=True)
    output = layer(x)
    grad_output = torch.randn_like(output)
    output.backward(grad_output)
    expected_output, expected_x_grad, expected_values_grad = dense_reference(layer, x, grad_output)
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(x.grad, expected_x_grad)
    torch.testing.assert_close(layer.sara_values["default"].grad, expected_values_grad)
    assert base.weight.grad is None


@pytest.mark.parametrize("base", [nn.Linear(12, 9), nn.Conv2d(4, 6, 3, padding=1)], ids=["linear", "conv"])
def test_freeze_gradient_gives_no_gradient_at_its_positions_and_the_same_output(base):
    layer = sara_layer(base)
    x = torch.randn(2, 12) if isinstance(base, nn.Linear) else torch.randn(2, 4, 5, 5)
    values = layer.sara_values["default"]
    expected = layer(x)
    expected.square().sum().backward()
    plain_grad, values.grad = values.grad, None
    positions = torch.tensor([0, 3, values.numel() - 1])
    handle = layer.freeze_gradient("default", positions)
    output = layer(x)
    output.square().sum().backward()
    assert torch.equal(output, expected)
    assert torch.equal(values.grad, plain_grad.index_fill(0, positions, 0))
    handle.remove()
    values.grad = None
    layer(x).square().sum().backward()
    assert torch.equal(values.grad, plain_grad)


def test_bias_entries_train_sparsely():
    base = nn.Linear(6, 50)
    layer = sara_layer(base, threshold=0.1, include_bias=True)
    bias_indices = layer.sara_bias_indices["default"].long()
    assert torch.equal(bias_indices, (base.bias.abs() < 0.1).nonzero().squeeze(1))
    output = layer(torch.randn(4, 6))
    output.sum().backward()
    bias_grad = layer.sara_bias_values["default"].grad
    assert torch.allclose(bias_grad, torch.full_like(bias_grad, 4.0))


def test_init_weights_true_is_an_exact_no_op():
    base = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    expected = base(x)
    layer = sara_layer(base, threshold=0.2, init_weights=True)
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.sara_values["default"]) == 0


def test_no_dense_weight_copy_is_saved_for_backward():
    base = nn.Linear(256, 256)
    layer = sara_layer(base, threshold=0.05)
    weight_size = base.weight.numel()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = layer(x)
    weight_sized = [t for t in saved if t.numel() >= weight_size]
    # the only weight-sized tensor kept is the base weight itself (a reference, not a copy)
    assert len(weight_sized) == 1 and weight_sized[0].data_ptr() == base.weight.data_ptr()
    output.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_values(dtype):
    base = nn.Linear(16, 8).to(dtype)
    layer = sara_layer(base, threshold=0.1)
    x = torch.randn(4, 16, dtype=dtype, requires_grad=True)
    output = layer(x)
    assert output.dtype == dtype
    output.float().sum().backward()
    assert layer.sara_values["default"].dtype == torch.float32
    assert layer.sara_values["default"].grad.dtype == torch.float32
    assert x.grad.dtype == dtype


def test_autocast_computes_in_the_autocast_dtype():
    base = nn.Linear(16, 8)
    layer = sara_layer(base, threshold=0.1)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)
    assert output.dtype == torch.bfloat16
    output.float().sum().backward()
    assert x.grad.dtype == torch.float32
    _, _, expected_grad = dense_reference(layer, x, torch.ones(4, 8))
    torch.testing.assert_close(layer.sara_values["default"].grad, expected_grad, rtol=0.05, atol=0.05)


def test_gradient_checkpointing_gives_the_same_gradients(unet):
    from conftest import unet_inputs

    model = get_peft_model(unet, SaRAConfig(threshold=0.02, init_weights=False))
    inputs = unet_inputs(unet)
    model(**inputs).sample.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    unet.enable_gradient_checkpointing()
    unet.train()
    model(**inputs).sample.square().mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, plain[name], msg=name)


def test_merge_unmerge_and_safe_merge():
    base = nn.Conv2d(3, 4, 3, padding=1)
    original = base.weight.detach().clone()
    layer = sara_layer(base, threshold=0.2)
    x = torch.randn(1, 3, 5, 5)
    adapted = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base(x), adapted)
    torch.testing.assert_close(layer(x), adapted)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original)
    layer.sara_values["default"].data[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    torch.testing.assert_close(base.weight, original)


def test_scale_multiplies_the_update():
    base = nn.Linear(10, 10)
    layer = sara_layer(base, threshold=0.2)
    x = torch.randn(3, 10)
    plain, adapted = base(x), layer(x)
    layer.set_scale("default", 0.5)
    torch.testing.assert_close(layer(x), plain + 0.5 * (adapted - plain))
    layer.scale_layer(2.0)
    torch.testing.assert_close(layer(x), adapted)
    layer.unscale_layer()
    assert layer.sara_scaling["default"] == 1.0
    torch.testing.assert_close(
        layer.get_delta_weight("default").view(-1).count_nonzero(), layer.sara_values["default"].count_nonzero()
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_base_weight_is_restored_bit_exactly(channels_last):
    base = nn.Conv2d(4, 6, 3, padding=1)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    original = base.weight.detach().clone()
    layer = sara_layer(base, threshold=0.15)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    for _ in range(3):
        output = layer(x)
        output.square().sum().backward()
        assert torch.equal(layer.get_base_layer().weight, original)
    with torch.no_grad():
        layer(x)  # inference adds the update for the op's duration only
    assert torch.equal(base.weight, original)
    expected_output, _, expected_values_grad = dense_reference(layer, x, 2 * output.detach())
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(layer.sara_values["default"].grad / 3, expected_values_grad)


def test_base_weight_is_restored_when_the_op_fails():
    base = nn.Linear(8, 4)
    original = base.weight.detach().clone()
    layer = sara_layer(base, threshold=0.2)
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode), pytest.raises(RuntimeError):
            layer(torch.randn(3, 7))  # wrong input width
        assert torch.equal(base.weight, original)


def test_every_layer_exposes_in_and_out_features():
    model = get_peft_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 5)), SaRAConfig(threshold=0.5))
    conv, linear = model.base_model.model[0], model.base_model.model[2]
    assert isinstance(conv, Conv2d) and (conv.in_features, conv.out_features) == (3, 8)
    assert (conv.in_channels, conv.out_channels) == (3, 8)
    assert isinstance(linear, Linear) and (linear.in_features, linear.out_features) == (8, 5)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_accelerate_offload_hooks_load_what_the_sparse_op_reads(tmp_path, offload):
    """accelerate's cpu/disk offload (diffusers' enable_sequential_cpu_offload) keeps weights on the meta device and
    loads them around each module's own forward; SaRA's op reads them without those forwards."""
    from accelerate import cpu_offload, disk_offload

    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), SaRAConfig(threshold=0.1, init_weights=False)
    )
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
    if offload == "cpu":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, str(tmp_path), execution_device="cpu")
    layer = model.base_model.model[0]
    assert layer.get_base_layer().weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        assert torch.equal(model(x), expected)
    assert layer.get_base_layer().weight.device.type == "meta" and layer.sara_values["default"].device.type == "meta"


# How users drive a model while it trains (diffusers' scripts, Diffusion-DPO, LoRA-style scales), each against a run
# without the extra step or against plain autograd on the dense effective weight (`plain_sara_forward`).


def _plain_sparse_forward(self, x, op, adapter_names):
    """The reference: op(x, W + Σ scale · scatter(values)) with the effective weight built by autograd."""
    base = self.get_base_layer()
    weight = base.weight.detach().reshape(-1)
    for name in adapter_names:
        indices = self.sara_indices[name].long()
        weight = weight.index_add(0, indices, self.sara_values[name].to(weight.dtype), alpha=self.sara_scaling[name])
    bias = self._effective_bias(base.bias, adapter_names)
    return op.forward(x, weight.view_as(base.weight), bias)


@pytest.fixture
def plain_sara_forward(monkeypatch):
    """Switch every SaRA layer to the plain-autograd reference inside a `with`."""
    from contextlib import contextmanager

    from peft_sara.layer import _SaRAModule

    @contextmanager
    def switched():
        with monkeypatch.context() as patch:
            patch.setattr(_SaRAModule, "_sparse_forward", _plain_sparse_forward)
            yield

    return switched


def _unet_model(seed: int = 0):
    from conftest import tiny_unet

    model = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02, init_weights=False, include_bias=True))
    torch.manual_seed(seed)
    return model


def _base_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "sara_" not in name}


def _values_grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for name, p in model.named_parameters() if "sara_" in name]


def _assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor], **tolerance) -> None:
    assert len(actual) == len(expected) > 0
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, **tolerance)


def _train(model, steps: int, between_steps=None) -> list[torch.Tensor]:
    from conftest import unet_inputs

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    outputs = []
    for step in range(steps):
        output = model(**unet_inputs(model, seed=step)).sample
        output.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(output.detach())
        if between_steps is not None:
            between_steps(model, step)
    return outputs


def test_ema_store_copy_to_and_restore_leave_training_as_it_was():
    """diffusers' scripts: EMA over model.parameters(), validation with the EMA weights, then restore."""
    from conftest import unet_inputs
    from diffusers.training_utils import EMAModel

    reference = _unet_model()
    base = _base_tensors(reference)
    expected = _train(reference, steps=4)
    model = _unet_model()
    ema = EMAModel(model.parameters())

    def validate_with_ema(model, step):
        ema.step(model.parameters())
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        with torch.no_grad():
            model(**unet_inputs(model, seed=9))
        ema.restore(model.parameters())

    outputs = _train(model, steps=4, between_steps=validate_with_ema)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert all(torch.equal(tensor, base[name]) for name, tensor in _base_tensors(model).items())


def _reference_pass_with_the_adapter_disabled(model, inputs):
    with torch.no_grad(), model.disable_adapter():  # Diffusion-DPO's reference model
        model(**inputs)


INTERLEAVED = {
    "disable_adapter_forward": _reference_pass_with_the_adapter_disabled,
    "no_grad_forward": lambda model, inputs: torch.no_grad()(model)(**inputs),
    "state_dict": lambda model, inputs: model.state_dict(),
    "eval_then_train": lambda model, inputs: (model.eval(), model.train()),
    "cast_to_the_same_dtype": lambda model, inputs: model.to(torch.float32),
}


@pytest.mark.parametrize("between", INTERLEAVED)
def test_what_runs_between_forward_and_backward_leaves_the_gradients_alone(between, plain_sara_forward):
    from conftest import unet_inputs

    model = _unet_model()
    base = _base_tensors(model)
    inputs = unet_inputs(model)
    output = model(**inputs).sample
    INTERLEAVED[between](model, unet_inputs(model, seed=7))
    output.square().mean().backward()
    grads = _values_grads(model)
    model.zero_grad()
    with plain_sara_forward():
        expected = model(**inputs).sample
    expected.square().mean().backward()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    _assert_all_close(grads, _values_grads(model), rtol=1e-5, atol=1e-7)
    assert all(torch.equal(tensor, base[name]) for name, tensor in _base_tensors(model).items())


def test_a_training_forward_with_a_lora_scale_gets_the_scaled_gradients(plain_sara_forward):
    """diffusers unscales every adapter layer at the end of the UNet's forward, before backward runs."""
    from conftest import unet_inputs

    model = _unet_model()
    inputs = {**unet_inputs(model), "cross_attention_kwargs": {"scale": 0.5}}
    output = model(**inputs).sample
    output.square().mean().backward()
    grads = _values_grads(model)
    model.zero_grad()
    layers = _sara_layers(model)
    with plain_sara_forward():
        for layer in layers:
            layer.set_scale("default", 0.5)
        expected = model(**{**inputs, "cross_attention_kwargs": None}).sample
        expected.square().mean().backward()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    _assert_all_close(grads, _values_grads(model), rtol=1e-5, atol=1e-7)
    unscaled = _unet_model()
    unscaled(**unet_inputs(unscaled)).sample.square().mean().backward()
    assert not torch.allclose(grads[0], _values_grads(unscaled)[0])


def _sara_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, (Linear, Conv2d))]


def test_parameters_show_the_pretrained_base_while_training():
    from conftest import unet_inputs

    model = _unet_model()
    base = _base_tensors(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        output = model(**unet_inputs(model, seed=step)).sample
        assert all(torch.equal(tensor, base[name]) for name, tensor in _base_tensors(model).items())
        assert all(
            torch.equal(layer.base_layer.weight, layer.get_base_layer().weight) for layer in _sara_layers(model)
        )
        output.square().mean().backward()
        optimizer.step()
        assert all(torch.equal(tensor, base[name]) for name, tensor in _base_tensors(model).items())


# Stacking with LoRA: whichever comes first, the layer computes base + LoRA's update + SaRA's update.


def _lora_and_sara(lora_first: bool):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 6)).requires_grad_(False)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    sara = SaRAConfig(threshold=0.1, init_weights=False, include_bias=True, target_modules=["0", "2"])
    for config, name in [(lora, "lora"), (sara, "sara")][:: 1 if lora_first else -1]:
        torch.manual_seed(1)
        inject_adapter_in_model(config, model, adapter_name=name)
    for module in model.modules():
        if hasattr(module, "set_adapter") and hasattr(module, "active_adapters"):
            module.set_adapter(["lora", "sara"])
    return model, base


def _expected_weights(model, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base plus each adapter's dense update, from the adapters' own get_delta_weight."""
    from peft.tuners.lora import LoraLayer

    from peft_sara import SaRALayer

    weights = {}
    for index in ("0", "2"):
        layer = model.get_submodule(index)
        lora = next(m for m in layer.modules() if isinstance(m, LoraLayer))
        sara = next(m for m in layer.modules() if isinstance(m, SaRALayer))
        weight = base[f"{index}.weight"] + lora.get_delta_weight("lora") + sara.get_delta_weight("sara")
        bias = base[f"{index}.bias"].index_add(
            0, sara.sara_bias_indices["sara"], sara.sara_bias_values["sara"].detach()
        )
        weights[index] = (weight, bias)
    return weights


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-sara", "sara-then-lora"])
def test_sara_and_lora_stack_in_either_order(lora_first):
    model, base = _lora_and_sara(lora_first)
    weights = _expected_weights(model, base)
    x = torch.randn(2, 3, 4, 4)
    (conv_weight, conv_bias), (linear_weight, linear_bias) = weights["0"], weights["2"]
    expected = F.linear(F.conv2d(x, conv_weight, conv_bias, padding=1).flatten(1), linear_weight, linear_bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    output = model(x)
    output.square().sum().backward()
    sara_layers = [m for m in model.modules() if isinstance(m, (Linear, Conv2d))]
    assert len(sara_layers) == 2 and all(m.sara_values["sara"].grad.abs().sum() > 0 for m in sara_layers)
    lora_params = [p for name, p in model.named_parameters() if "lora_" in name]
    assert lora_params and all(p.grad is not None for p in lora_params)
    assert all(torch.equal(tensor, base[name]) for name, tensor in _innermost_state(model).items())


def _innermost_state(model) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        f"{index}.{tensor_name}": getattr(model.get_submodule(index).get_base_layer(), tensor_name)
        for index in ("0", "2")
        for tensor_name in ("weight", "bias")
        if isinstance(model.get_submodule(index), BaseTunerLayer)
    }


def test_sara_over_lora_trains_as_plain_autograd():
    """The gradient of SaRA's values on top of a LoRA layer is the dense weight gradient at the positions."""
    model, base = _lora_and_sara(lora_first=True)
    x = torch.randn(2, 3, 4, 4)
    weights = _expected_weights(model, base)
    model(x).square().sum().backward()
    sara_layers = [m for m in model.modules() if isinstance(m, (Linear, Conv2d))]
    for index in ("0", "2"):
        weights[index] = (weights[index][0].detach().requires_grad_(True), weights[index][1])
    (conv_weight, conv_bias), (linear_weight, linear_bias) = weights["0"], weights["2"]
    F.linear(
        F.conv2d(x, conv_weight, conv_bias, padding=1).flatten(1), linear_weight, linear_bias
    ).square().sum().backward()
    for index, layer in zip(("0", "2"), sara_layers):
        expected = weights[index][0].grad.reshape(-1)[layer.sara_indices["sara"].long()]
        torch.testing.assert_close(layer.sara_values["sara"].grad, expected, rtol=1e-5, atol=1e-5)
