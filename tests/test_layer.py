"""SaRA layers: selection, no-op init, sparse backward against dense autograd, dtypes, merge and scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.layer import Conv2d, Linear, select_entries


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


def test_selection_is_exactly_the_small_entries_in_fp32():
    weight = torch.tensor([[0.5, -0.01, 0.02], [-0.03, 0.0, 0.2]])
    assert select_entries(weight, 0.025).tolist() == [1, 2, 4]
    # the comparison is made in fp32, so an fp16 weight selects what its fp32 value selects
    half = torch.tensor([0.0999755859375, 0.10009765625], dtype=torch.float16)
    assert select_entries(half, 0.1).tolist() == [0]
    assert select_entries(weight, 0.025).dtype == torch.int32


def test_largest_and_random_selections_train_as_many_entries_as_the_smallest():
    weight = torch.tensor([[0.5, -0.01, 0.02], [-0.03, 0.0, -0.2]])
    assert select_entries(weight, 0.025, "largest").tolist() == [0, 3, 5]
    big = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    smallest = select_entries(big, 0.1)
    torch.manual_seed(1)
    random = select_entries(big, 0.1, "random")
    assert random.numel() == smallest.numel() and random.dtype == torch.int32
    assert bool((random[1:] > random[:-1]).all()) and not torch.equal(random, smallest)
    torch.manual_seed(1)
    assert torch.equal(select_entries(big, 0.1, "random"), random)  # torch's global RNG decides


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


def test_gradcheck_in_double_precision():
    from peft_sara.layer import _Conv2dOp, _SparseWeightOp

    base = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    layer = sara_layer(base, threshold=0.2)
    op = _Conv2dOp(base.stride, base.padding, base.dilation, base.groups)
    indices = layer.sara_indices["default"]

    def sparse_conv(x, values):
        return _SparseWeightOp.apply(x, base.weight, base.bias, op, torch.double, (0.5,), False, indices, values)

    x = torch.randn(1, 2, 5, 5, dtype=torch.double, requires_grad=True)
    values = torch.randn(indices.numel(), dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(sparse_conv, (x, values))


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
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(torch.randn(3, 7))  # wrong input width
    assert torch.equal(base.weight, original)
    with pytest.raises(RuntimeError):
        layer(torch.randn(3, 7))  # while training: the fold stays, and the base reads back exactly
    assert torch.equal(layer.get_base_layer().weight, original)


def test_every_layer_exposes_in_and_out_features():
    model = get_peft_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 5)), SaRAConfig(threshold=0.5))
    conv, linear = model.base_model.model[0], model.base_model.model[2]
    assert isinstance(conv, Conv2d) and (conv.in_features, conv.out_features) == (3, 8)
    assert (conv.in_channels, conv.out_channels) == (3, 8)
    assert isinstance(linear, Linear) and (linear.in_features, linear.out_features) == (8, 5)


# While an adapter trains, its update stays folded into the base weight (SaRALayer._hold_fold). Everything a user
# sees must be bit-identical to the unfolded path: the model below is trained and then operated on twice, with folding
# allowed and with it refused.


def _trained_pair(steps: int = 3, dtype: torch.dtype = torch.float32, autocast: bool = False):
    """Two identical models trained identically, the first with folding allowed, the second without."""
    import peft_sara

    pair = []
    for fold_allowed in (True, False):
        torch.manual_seed(0)
        base = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 40), nn.GELU(), nn.Linear(40, 24)
        )
        config = SaRAConfig(
            threshold=0.05, include_bias=True, lambda_rank=5e-3, rank_min_dim=4, progressive_step=2, init_weights=False
        )
        model = get_peft_model(base.to(dtype), config)
        for module in model.modules():
            if hasattr(module, "_fold_allowed"):
                module._fold_allowed = fold_allowed
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        peft_sara.attach(model, optimizer)
        pair.append((model, optimizer))
    torch.manual_seed(1)
    inputs = [torch.randn(2, 3, 6, 6, dtype=dtype) for _ in range(steps)]
    for x in inputs:
        results = []
        for model, optimizer in pair:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                output = model(x)
            output.float().square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            optimizer.step()
            optimizer.zero_grad()
            results.append((output, grads))
        (output, grads), (reference_output, reference_grads) = results
        assert torch.equal(output, reference_output)
        assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))
    return pair[0][0], pair[1][0]


def _sara_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, (Linear, Conv2d))]


def _raw_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer as stored (state_dict would unfold first)."""
    return [tensor.detach() for tensor in [*model.parameters(), *model.buffers()]]


@pytest.mark.parametrize(
    "dtype, autocast",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["fp32", "bf16", "autocast"],
)
def test_training_with_the_fold_is_bit_identical_to_the_unfolded_path(dtype, autocast):
    folded, reference = _trained_pair(steps=4, dtype=dtype, autocast=autocast)
    assert all(layer._sara_fold is not None for layer in _sara_layers(folded))
    assert all(layer._sara_fold is None for layer in _sara_layers(reference))
    assert not any(torch.equal(a, b) for a, b in zip(_raw_tensors(folded)[:1], _raw_tensors(reference)[:1]))
    for layer, reference_layer in zip(_sara_layers(folded), _sara_layers(reference)):
        assert torch.equal(layer.get_base_layer().weight, reference_layer.get_base_layer().weight)
    assert all(layer._sara_fold is None for layer in _sara_layers(folded))


def _second_adapter(model):
    model.add_adapter("other", SaRAConfig(threshold=0.03))
    model.set_adapter("other")
    return model


def _delete_first(model):
    _second_adapter(model)
    model.delete_adapter("default")
    return model


def _rescale(model):
    for layer in _sara_layers(model):
        layer.set_scale("default", 0.5)
    return model


def _save_and_reload(model, tmp_path):
    from peft import PeftModel

    model.save_pretrained(tmp_path / "adapter")
    return PeftModel.from_pretrained(model.unload(), tmp_path / "adapter", is_trainable=True)


OPERATIONS = {
    "merge_and_unload": lambda model, tmp_path: model.merge_and_unload(),
    "merge_then_unmerge": lambda model, tmp_path: (model.merge_adapter(), model.unmerge_adapter(), model)[-1],
    "unload": lambda model, tmp_path: model.unload(),
    "second_adapter": lambda model, tmp_path: _second_adapter(model),
    "delete_adapter": lambda model, tmp_path: _delete_first(model),
    "scale": lambda model, tmp_path: _rescale(model),
    "cast": lambda model, tmp_path: model.to(torch.float64),
    "eval": lambda model, tmp_path: model.eval(),
    "deepcopy": lambda model, tmp_path: __import__("copy").deepcopy(model),
    "save_and_reload": _save_and_reload,
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_sees_the_base_as_if_nothing_was_folded(operation, tmp_path):
    folded, reference = _trained_pair()
    folded = OPERATIONS[operation](folded, tmp_path / "folded")
    reference = OPERATIONS[operation](reference, tmp_path / "reference")
    if operation != "deepcopy":  # a copy keeps the fold, with what undoes it
        assert all(torch.equal(a, b) for a, b in zip(_raw_tensors(folded), _raw_tensors(reference), strict=True))
    x = torch.randn(2, 3, 6, 6, dtype=next(reference.parameters()).dtype)
    assert torch.equal(folded(x), reference(x))  # a training forward: folded again where an adapter trains
    with torch.no_grad():
        assert torch.equal(folded(x), reference(x))  # inference unfolds
    assert all(torch.equal(a, b) for a, b in zip(_raw_tensors(folded), _raw_tensors(reference), strict=True))


def test_state_dict_and_disabled_adapter_see_the_base():
    folded, reference = _trained_pair()
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(), reference.state_dict().values()))
    folded(torch.randn(2, 3, 6, 6))  # fold again
    x = torch.randn(2, 3, 6, 6)
    with folded.disable_adapter(), reference.disable_adapter():
        assert torch.equal(folded(x), reference(x))
        assert all(torch.equal(a, b) for a, b in zip(_raw_tensors(folded), _raw_tensors(reference)))


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
