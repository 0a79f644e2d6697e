"""peft_sara/sparse_ops.py: selection, the sparse op's gradients and the base weight it leaves as it found it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_sara.sparse_ops import (
    Conv2dOp,
    LinearOp,
    SparseWeightOp,
    dense_update,
    select_entries,
    weight_with_updates,
)


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


def test_gradcheck_in_double_precision():
    torch.manual_seed(0)
    base = nn.Conv2d(2, 3, 3, stride=2, padding=1).double().requires_grad_(False)
    op = Conv2dOp(base.stride, base.padding, base.dilation, base.groups)
    indices = select_entries(base.weight, 0.2)

    def sparse_conv(x, values):
        return SparseWeightOp.apply(x, base.weight, base.bias, op, torch.double, (0.5,), indices, values)

    x = torch.randn(1, 2, 5, 5, dtype=torch.double, requires_grad=True)
    values = torch.randn(indices.numel(), dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(sparse_conv, (x, values))


def test_the_op_computes_what_plain_autograd_computes_on_the_dense_update():
    """Two updates of one weight (stacked SaRA adapters) against W + dense_update(...) through autograd."""
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    first, second = select_entries(weight, 0.8), select_entries(weight, 0.4)
    values = [torch.randn(first.numel(), requires_grad=True), torch.randn(second.numel(), requires_grad=True)]
    x = torch.randn(3, 5, requires_grad=True)
    output = SparseWeightOp.apply(
        x, weight, None, LinearOp, torch.float32, (1.0, 0.5), first, values[0], second, values[1]
    )
    output.square().sum().backward()
    grads = [x.grad.clone(), *(value.grad.clone() for value in values)]
    for tensor in (x, *values):
        tensor.grad = None
    updates = [(first, values[0], 1.0), (second, values[1], 0.5)]
    expected = nn.functional.linear(x, weight + dense_update(weight, updates, torch.float32))
    expected.square().sum().backward()
    torch.testing.assert_close(output, expected)
    for grad, tensor in zip(grads, (x, *values)):
        torch.testing.assert_close(grad, tensor.grad)


def test_the_weight_holds_the_update_inside_the_block_only():
    weight = nn.Parameter(torch.randn(4, 4), requires_grad=False)
    original, version = weight.detach().clone(), weight._version
    indices = select_entries(weight, 0.7)
    values = torch.ones(indices.numel())
    with weight_with_updates(weight, [(indices, values, 2.0)], torch.float32) as effective:
        assert torch.equal(effective.view(-1)[indices.long()], original.view(-1)[indices.long()] + 2.0)
    assert torch.equal(weight, original) and weight._version == version
    with (
        pytest.raises(RuntimeError, match="inside"),
        weight_with_updates(weight, [(indices, values, 1.0)], torch.float32),
    ):
        raise RuntimeError("inside")
    assert torch.equal(weight, original)
