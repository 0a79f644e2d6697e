"""The sparse update's arithmetic: selecting the trainable entries and computing a layer's op with them.

`SparseWeightOp` is SaRA's "unstructured backpropagation": it computes op(x, W + Σ scale · scatter(values)) and gives
the values the dense weight gradient gathered at their positions. The update is written into the weight's storage for
the duration of each forward and backward computation only, and the original entries are copied back before the
function returns, so between calls (and to every optimizer, EMA, engine or reference pass that reads the weight) the
base weight is the pre-trained one bit for bit. `dense_update` is the plain alternative for layers whose base is
another adapter's layer: the update as a dense tensor that autograd differentiates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

INDEX_DTYPE_LIMIT = 2**31 - 1
# One sparse update of a tensor: its flat positions, its values and the adapter's scale.
Update = tuple[torch.Tensor, torch.Tensor, float]


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 positions (half the memory and disk of int64) unless the tensor is too large for them."""
    return torch.int32 if numel <= INDEX_DTYPE_LIMIT else torch.int64


def select_entries(tensor: torch.Tensor, threshold: float, selection: str = "smallest") -> torch.Tensor:
    """Sorted flat positions of the trainable entries: those with |w| < threshold (compared in fp32 whatever the
    tensor's dtype), or as many of the largest-magnitude or of random entries (see `SaRAConfig.selection`)."""
    magnitudes = tensor.detach().float().abs().reshape(-1)
    small = magnitudes < threshold
    if selection == "smallest":
        positions = small.nonzero().squeeze(1)
    elif selection == "largest":
        positions = magnitudes.topk(int(small.sum())).indices.sort().values
    elif selection == "random":
        positions = torch.randperm(magnitudes.numel())[: int(small.sum())].to(magnitudes.device).sort().values
    else:
        raise ValueError(f"unknown selection {selection!r}")
    return positions.to(index_dtype_for(tensor.numel()))


def scatter_updates(dense: torch.Tensor, updates: list[Update], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return a copy of `dense` (in `dtype`, default its own) with every (indices, values, scale) update added."""
    flat = dense.reshape(-1).to(dtype or dense.dtype, copy=True)
    for indices, values, scale in updates:
        flat.index_add_(0, indices, values.to(flat.dtype), alpha=scale)
    return flat.view_as(dense)


def dense_update(like: torch.Tensor, updates: list[Update], dtype: torch.dtype) -> torch.Tensor:
    """Σ scale · scatter(values) as a dense tensor shaped like `like`, in `dtype`, differentiable in the values."""
    flat = torch.zeros(like.numel(), dtype=dtype, device=like.device)
    for indices, values, scale in updates:
        flat = flat.index_add(0, indices, _as_dtype(values, dtype), alpha=scale)
    return flat.view(like.shape)


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without the call when it is a no-op: the sparse op runs once per layer per step, and on a
    GPU a small model's step is bound by such per-call overheads."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@contextmanager
def weight_with_updates(weight: torch.Tensor, updates: list[Update], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The effective weight W + Σ scale · scatter(values), in `dtype`, valid inside the `with` block only.

    The updates are written into the weight's own storage (entries + scale · values, with `index_copy_`) and the
    original entries are copied back afterwards, also when the block raises: the base weight returns bit for bit, at
    the cost of a few passes over the positions instead of a copy of the whole weight per call. Going through `.data`
    leaves autograd's version counter of the parameter alone; nothing outside this block ever sees the update. Like
    any in-place use of a weight, this is not for one model run by several threads at once (torch.nn.DataParallel);
    DDP runs processes.

    A non-contiguous weight (channels_last), or one stored narrower than it computes (diffusers' layerwise casting
    keeps it in fp8 or bf16, where the update would be rounded to the storage dtype), gets a patched copy instead.
    """
    if not weight.is_contiguous() or weight.dtype.itemsize < dtype.itemsize:
        yield scatter_updates(weight.detach(), updates, dtype)
        return
    flat = weight.data.view(-1)
    positions = [indices.long() for indices, _, _ in updates]
    originals = [flat.index_select(0, where) for where in positions]
    try:
        for number, (where, (_, values, scale)) in enumerate(zip(positions, updates)):
            # the first update sees the originals; a later one what the earlier ones made of shared positions
            entries = originals[0] if number == 0 else flat.index_select(0, where)
            update = _as_dtype(values.detach(), flat.dtype)
            if scale != 1.0:  # multiplying by 1.0 is exact: skipping it changes no bit and saves a kernel
                update = update * scale
            flat.index_copy_(0, where, entries + update)
        yield _as_dtype(weight.data, dtype)
    finally:
        for where, original in zip(positions, originals):
            flat.index_copy_(0, where, original)


class SparseWeightOp(torch.autograd.Function):
    """y = op(x, W + Σ scatter(indices_a, scale_a · values_a), bias), differentiable in x, bias and the values only.

    The values and the weight are saved for backward (so that autograd refuses a backward after the values changed in
    place); the scales are kept as they were at forward time, so a scale changed before backward (diffusers unscales
    its layers at the end of a UNet's forward) does not change the gradient. The effective weight is rebuilt (and
    cast) in backward instead of being saved, and the dense weight gradient is gathered at the positions and freed at
    once: the only weight-sized temporary is that gradient (plus a cast copy under autocast).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op, compute_dtype, scales, *indices_and_values):
        ctx.input_dtype, ctx.has_bias = x.dtype, bias is not None
        x = _as_dtype(x, compute_dtype)
        with weight_with_updates(weight, _pair_updates(indices_and_values, scales), compute_dtype) as effective:
            output = op.forward(x, effective, None if bias is None else _as_dtype(bias, compute_dtype))
        ctx.op, ctx.scales, ctx.compute_dtype = op, scales, compute_dtype
        ctx.save_for_backward(x, weight, *indices_and_values)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, *indices_and_values = ctx.saved_tensors
        compute_dtype, scales = ctx.compute_dtype, ctx.scales
        grad_output = _as_dtype(grad_output, compute_dtype)
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        needs_values = ctx.needs_input_grad[7::2]
        needs_dense_grad = needs_weight or any(needs_values)
        with weight_with_updates(weight, _pair_updates(indices_and_values, scales), compute_dtype) as effective:
            grad_x, dense_grad, grad_bias = ctx.op.backward(
                grad_output, x, effective, needs_x, needs_dense_grad, needs_bias and ctx.has_bias
            )
        grad_values = [None] * len(needs_values)
        if needs_dense_grad:
            flat_grad = dense_grad.reshape(-1)
            for position, needed in enumerate(needs_values):
                if needed:
                    grad_values[position] = _values_grad(flat_grad, indices_and_values[2 * position], scales[position])
            del flat_grad
        grad_weight = _as_dtype(dense_grad, weight.dtype) if needs_weight else None
        del dense_grad
        grad_x = _as_dtype(grad_x, ctx.input_dtype) if needs_x else None
        grads_of_pairs = [grad for value_grad in grad_values for grad in (None, value_grad)]
        return (grad_x, grad_weight, grad_bias, None, None, None, *grads_of_pairs)


def _values_grad(flat_grad: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """The values' gradient: the dense weight gradient at the positions, in fp32, times the adapter's scale.
    index_select takes the int32 positions as they are (no int64 copy per call)."""
    grad = _as_dtype(flat_grad.index_select(0, indices), torch.float32)
    return grad if scale == 1.0 else grad * scale


def _pair_updates(indices_and_values, scales) -> list[Update]:
    return [(indices_and_values[2 * i], indices_and_values[2 * i + 1], scale) for i, scale in enumerate(scales)]


class LinearOp:
    """Forward and gradient formulas of F.linear, in the dtype they are given."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(grad_output, x, weight, needs_input, needs_weight, needs_bias):
        grad_input = grad_output @ weight if needs_input else None
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = rows.T @ x.reshape(-1, x.shape[-1]) if needs_weight else None
        return grad_input, grad_weight, rows.sum(0) if needs_bias else None


class Conv2dOp:
    """Forward and gradient formulas of a zero-padded F.conv2d (other padding modes pad the input beforehand)."""

    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad_output, x, weight, needs_input, needs_weight, needs_bias):
        """Input, weight and bias gradients from one convolution_backward call, as autograd computes them."""
        return torch.ops.aten.convolution_backward(
            grad_output,
            x,
            weight,
            [weight.shape[0]] if needs_bias else None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            self.groups,
            [needs_input, needs_weight, needs_bias],
        )


@contextmanager
def offloaded_tensors_loaded(modules: tuple[nn.Module, ...]) -> Iterator[None]:
    """Load the tensors of modules that accelerate's offload hooks keep on the meta device (`cpu_offload`,
    `disk_offload`, diffusers' `enable_sequential_cpu_offload`) for the block's duration, and offload them again after.

    Those hooks load a module's tensors around its own forward only; SaRA's op reads the base layer's weight and its
    values and positions without calling their forwards. No hook (the usual case): nothing happens.
    """
    hooked = []
    for module in modules:
        hook = vars(module).get("_hf_hook")  # not getattr: a miss raises inside torch.nn.Module
        if getattr(hook, "offload", False):
            hooked.append((module, hook))
    for module, hook in hooked:
        hook.pre_forward(module)
    try:
        yield
    finally:
        for module, hook in hooked:
            hook.post_forward(module, None)


def layerwise_compute_dtype(base_layer: nn.Module) -> torch.dtype | None:
    """The compute dtype of diffusers' layerwise casting on the base layer, if enabled: the base layer's own forward,
    whose hook would cast its weight for the computation, does not run while SaRA computes with its weight."""
    registry = vars(base_layer).get("_diffusers_hook")  # not getattr: a miss raises inside torch.nn.Module
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    return getattr(hook, "compute_dtype", None)
