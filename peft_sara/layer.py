"""SaRA tuner layers: a sparse additive update on the small-magnitude entries of a frozen weight.

Each adapter keeps two tensors per layer: `sara_indices`, the sorted flat positions of the trainable entries (saved
with the adapter, never recomputed from the base at load time), and `sara_values`, the trainable fp32 update at those
positions. The backward pass gathers the dense weight gradient at the positions ("unstructured backpropagation"): no
dense weight copy is kept for the backward pass and no dense weight gradient outlives its layer's backward step.

While one adapter trains, its update stays folded into the base weight's storage between calls and is refreshed once
after each optimizer step (see `SaRALayer._hold_fold`); everything that reads the base weight through PEFT's API
(`get_base_layer`, `state_dict`, merging, moves, switching adapters) first gets it back bit for bit. Otherwise (several
adapters active, inference) each op adds the update for its own duration and puts the original entries back.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import SaRAConfig

INDEX_DTYPE_LIMIT = 2**31 - 1


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


def _scatter_updates(
    dense: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Return a copy of `dense` (in `dtype`, default its own) with every (indices, values, scale) update added."""
    flat = dense.reshape(-1).to(dtype or dense.dtype, copy=True)
    for indices, values, scale in updates:
        flat.index_add_(0, indices, values.to(flat.dtype), alpha=scale)
    return flat.view_as(dense)


def _write_updated_entries(
    flat: torch.Tensor, positions: torch.Tensor, entries: torch.Tensor, values: torch.Tensor, scale: float
) -> None:
    """flat[positions] = entries + scale · values, where `entries` are flat's current entries at those positions.

    The one formula every path uses to put an update into a weight, so that the folded and unfolded paths agree bit
    for bit; computed out of place on the entries and written with `index_copy_` (int64 positions): over SD 1.5's
    49.8M positions on a 2-core CPU 0.22 s, against 0.32 s for `scatter_` and 0.29 s for `index_put_`.
    """
    update = _as_dtype(values.detach(), flat.dtype)
    if scale != 1.0:  # multiplying by 1.0 is exact: skipping it changes no bit and saves a kernel
        update = update * scale
    flat.index_copy_(0, positions, entries + update)


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without the call when it is a no-op: the sparse op runs once per layer per step, and on a
    GPU a small model's step is bound by such per-call overheads."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@contextmanager
def _weight_with_updates(
    weight: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """The effective weight W + Σ scale · scatter(values), in `dtype`, valid inside the `with` block.

    The updates are added into the weight's own storage and the original entries are put back afterwards (copied,
    not subtracted, so the base weight is restored bit for bit). That costs a few passes over the positions instead of
    a copy of the whole weight per call. Going through `.data` leaves autograd's version counter of the parameter
    alone. A non-contiguous weight (channels_last) gets a patched copy instead. Like any in-place use of a weight,
    this is not for one model run by several threads at once (torch.nn.DataParallel); DDP runs processes.

    A weight stored narrower than it computes (diffusers' layerwise casting keeps it in fp8 or bf16) also gets a
    patched copy in `dtype`: the updates would otherwise be rounded to the storage dtype.
    """
    if not weight.is_contiguous() or weight.dtype.itemsize < dtype.itemsize:
        yield _scatter_updates(weight.detach(), updates, dtype)
        return
    flat = weight.data.view(-1)
    positions = [indices.long() for indices, _, _ in updates]
    originals = [flat.index_select(0, where) for where in positions]
    try:
        for number, (where, (_, values, scale)) in enumerate(zip(positions, updates)):
            # the first update sees the originals; a later one what the earlier ones made of shared positions
            entries = originals[0] if number == 0 else flat.index_select(0, where)
            _write_updated_entries(flat, where, entries, values, scale)
        yield weight.data.to(dtype)
    finally:
        for where, original in zip(positions, originals):
            flat.index_copy_(0, where, original)


def _effective_weight(weight: torch.Tensor, indices_and_values, scales, dtype: torch.dtype, folded: bool):
    """The effective weight in `dtype` for one op: the weight itself when the updates are folded into it already."""
    if folded:
        return nullcontext(_as_dtype(weight.detach(), dtype))
    return _weight_with_updates(weight, _pair_updates(indices_and_values, scales), dtype)


class _SparseWeightOp(torch.autograd.Function):
    """y = op(x, W + Σ scatter(indices_a, scale_a · values_a), bias), differentiable in x, bias and the values only.

    `folded` says that the weight holds the updates already (one adapter training, see `SaRALayer._hold_fold`); a
    fold takes this op only when it computes in another dtype than the weight's (autocast over fp32 weights), where
    torch's own op would save a cast copy of every weight for backward. The values are saved for backward either
    way, so that autograd refuses a backward after they changed in place. The effective weight is rebuilt (and cast)
    in backward instead of being saved, and the dense weight gradient is gathered at the indices and freed at once:
    the only weight-sized temporary is that gradient (plus a cast copy under autocast).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op, compute_dtype, scales, folded, *indices_and_values):
        ctx.input_dtype, ctx.has_bias = x.dtype, bias is not None
        x = _as_dtype(x, compute_dtype)
        with _effective_weight(weight, indices_and_values, scales, compute_dtype, folded) as effective:
            output = op.forward(x, effective, None if bias is None else _as_dtype(bias, compute_dtype))
        ctx.op, ctx.scales, ctx.compute_dtype, ctx.folded = op, scales, compute_dtype, folded
        ctx.save_for_backward(x, weight, *indices_and_values)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, *indices_and_values = ctx.saved_tensors
        compute_dtype, scales = ctx.compute_dtype, ctx.scales
        grad_output = _as_dtype(grad_output, compute_dtype)
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        needs_values = ctx.needs_input_grad[8::2]
        needs_dense_grad = needs_weight or any(needs_values)
        with _effective_weight(weight, indices_and_values, scales, compute_dtype, ctx.folded) as effective:
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
        return (grad_x, grad_weight, grad_bias, None, None, None, None, *grads_of_pairs)


class _FoldedWeight(torch.autograd.Function):
    """The base weight holding one training adapter's folded update, as it enters the layer's own op.

    With the weight already in the op's dtype, the op runs as torch's native function, so autograd computes the input
    and dense weight gradients in C++; this function's backward only gathers the weight gradient at the positions.
    Per layer and step that is one small Python call each way instead of `_SparseWeightOp`'s formulas, which is what
    a GPU step of a small batch waits for. The values are saved so that autograd refuses a backward after the
    optimizer changed them in place.
    """

    @staticmethod
    def forward(ctx, weight, indices, values, scale):
        ctx.scale = scale
        ctx.save_for_backward(indices, values)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        indices, _ = ctx.saved_tensors
        return None, None, _values_grad(grad_weight.reshape(-1), indices, ctx.scale), None


def _values_grad(flat_grad: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """The values' gradient: the dense weight gradient at the positions, in fp32, times the adapter's scale.
    index_select takes the int32 positions as they are (no int64 copy per call)."""
    grad = _as_dtype(flat_grad.index_select(0, indices), torch.float32)
    return grad if scale == 1.0 else grad * scale


def _pair_updates(indices_and_values, scales) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    return [(indices_and_values[2 * i], indices_and_values[2 * i + 1], scale) for i, scale in enumerate(scales)]


class _LinearOp:
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


class _Conv2dOp:
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


class ModelReference:
    """A weak reference from a SaRA layer to the model it was injected into: merging one layer safely checks the
    layer's peers first, as diffusers' `fuse_lora` merges layer by layer with no model-wide step.

    A deep copy of the whole model refers to the copy; a layer copied or pickled on its own refers to no model and
    checks only itself.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._reference = None if model is None else weakref.ref(model)

    def __call__(self) -> nn.Module | None:
        return None if self._reference is None else self._reference()

    def __deepcopy__(self, memo: dict) -> ModelReference:
        model = self()
        return ModelReference(None if model is None else memo.get(id(model)))

    def __reduce__(self) -> tuple:
        return ModelReference, ()


@dataclass
class _Fold:
    """One adapter's update held in a base weight's storage between calls, and what undoes it exactly."""

    weight: torch.Tensor  # the parameter folded into
    indices: torch.Tensor
    values: torch.Tensor
    originals: torch.Tensor  # the weight's entries at `indices` before the fold, in its dtype
    state: tuple[int, int, float]  # values' and indices' version counters and the scale, when folded


class SaRALayer(BaseTunerLayer):
    """State and generic operations shared by the SaRA layers of every base type."""

    adapter_layer_names = ("sara_values", "sara_bias_values")
    other_param_names = ("sara_indices", "sara_bias_indices", "sara_scaling", "sara_value_dtype")

    def __init__(self, base_layer: nn.Module) -> None:
        self._sara_fold: _Fold | None = None
        # whether a training adapter's update may stay folded into the weight (tests compare with the unfolded path)
        self._fold_allowed = True
        self.base_layer = base_layer
        self.sara_values = nn.ParameterDict({})
        self.sara_indices = BufferDict({}, persistent=True)
        self.sara_bias_values = nn.ParameterDict({})
        self.sara_bias_indices = BufferDict({}, persistent=True)
        self.sara_scaling: dict[str, float] = {}
        # dtype of each adapter's values: fp32 (peft's autocast_adapter_dtype=True, the default) or, with False, the
        # base weight's dtype (None here)
        self.sara_value_dtype: dict[str, torch.dtype | None] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # per merged adapter, the base weight's and bias's positions and entries there before the merge: unmerging
        # copies them back, so that the base returns bit for bit (subtracting the update drifts in fp16/bf16)
        self._entries_before_merge: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        # PEFT's switch for casting a layer's input to its adapter's dtype (diffusers' layerwise casting turns it off);
        # the sparse op computes in the weight's compute dtype, so SaRA has no input cast to switch
        self.cast_input_dtype_enabled = True
        self.model_reference = ModelReference()
        self._checked_for_merge: list[str] | None = None  # adapters a peer's safe merge has checked for this layer
        base_layer = self.get_base_layer()
        for attribute in ("in_channels", "out_channels"):
            if hasattr(base_layer, attribute):
                setattr(self, attribute, getattr(base_layer, attribute))
        # every PEFT layer exposes in_features/out_features; a convolution's are its channels, as in PEFT's LoRA
        self.in_features = getattr(base_layer, "in_features", getattr(base_layer, "in_channels", None))
        self.out_features = getattr(base_layer, "out_features", getattr(base_layer, "out_channels", None))

    def get_base_layer(self) -> nn.Module:
        """The base layer, its weight restored first if an update is folded into it: code that reads the base weight
        through PEFT's API (merging, unloading, saving, moving, `weight`) sees the base bit for bit."""
        self._restore_base()
        return self._raw_base_layer()

    def _raw_base_layer(self) -> nn.Module:
        """The base layer as it is, for the forward pass, which keeps a training fold in place."""
        base_layer = self.base_layer
        # PEFT's lookup probes every level with hasattr, which raises inside torch for a plain layer: once per call
        return super().get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer

    def _restore_base(self) -> None:
        """Take a folded update out of the base weight: its original entries are copied back, not subtracted."""
        fold, self._sara_fold = self._sara_fold, None
        if fold is not None:
            fold.weight.data.view(-1).index_copy_(0, fold.indices.long(), fold.originals)

    def _hold_fold(
        self, weight: nn.Parameter, updates: list[tuple[torch.Tensor, torch.Tensor, float]], compute_dtype: torch.dtype
    ) -> bool:
        """Keep the update of a training adapter folded into the base weight; whether the op takes the weight as is.

        A fold holds for one active adapter whose values train (grad mode on), on a contiguous weight stored at least
        as wide as the op computes. It is refreshed when the values, positions or scale changed since the last call
        (an optimizer's in-place step bumps the values' version counter), so an update costs one scatter of
        originals + scale · values per optimizer step instead of several passes per op. The unfolded path writes the
        same formula, so both compute bit-identical weights. Anything else unfolds.
        """
        if len(updates) != 1 or not self._fold_allowed:
            self._restore_base()
            return False
        indices, values, scale = updates[0]
        if not (
            torch.is_grad_enabled()
            and values.requires_grad
            and weight.is_contiguous()
            and weight.dtype.itemsize >= compute_dtype.itemsize
            and weight.device.type != "meta"
        ):
            self._restore_base()
            return False
        state = (values._version, indices._version, scale)
        fold, flat = self._sara_fold, weight.data.view(-1)
        current = fold is not None and fold.weight is weight and fold.indices is indices and fold.values is values
        if current and fold.state == state:
            return True
        positions = indices.long()
        if not current:
            self._restore_base()
            fold = self._sara_fold = _Fold(weight, indices, values, flat.index_select(0, positions), state)
        _write_updated_entries(flat, positions, fold.originals, values, scale)
        fold.state = state
        return True

    def base_entries(self, adapter_name: str) -> torch.Tensor:
        """The base weight's entries at an adapter's positions, without any update: the regulariser and the
        progressive step read them every step, so a fold's saved originals are used rather than unfolding."""
        indices = self.sara_indices[adapter_name]
        fold = self._sara_fold
        if fold is not None and fold.indices is indices:
            return fold.originals
        return self.get_base_layer().weight.detach().reshape(-1).index_select(0, indices)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        self._restore_base()
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        self._restore_base()
        super().enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self._restore_base()
        super().delete_adapter(adapter_name)

    def update_layer(self, adapter_name: str, config: SaRAConfig) -> None:
        """Select the trainable entries of this layer for `adapter_name` and create their zero update."""
        base_layer = self.get_base_layer()
        self._add_sparse_update(adapter_name, base_layer.weight, config, self.sara_indices, self.sara_values)
        if config.include_bias and base_layer.bias is not None:
            self._add_sparse_update(
                adapter_name, base_layer.bias, config, self.sara_bias_indices, self.sara_bias_values
            )
        self.sara_scaling[adapter_name] = 1.0
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Follow the base layer's device; keep the values in fp32 whatever the base dtype, or in the base weight's
        dtype when the adapter was made with `autocast_adapter_dtype=False`. peft's own move casts every float
        tensor to the base dtype, which would round fp32 values through fp16: the values are set aside first."""
        values_before = [value_dict.get(adapter_name) for value_dict in (self.sara_values, self.sara_bias_values)]
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        weight = self.get_base_layer().weight
        dtype = self.sara_value_dtype.get(adapter_name, torch.float32) or weight.dtype
        target_device = device if device is not None else weight.device
        for value_dict, values in zip((self.sara_values, self.sara_bias_values), values_before):
            if values is None or values.device.type == "meta":
                continue
            if values.dtype == dtype and values.device == torch.device(target_device):
                value_dict[adapter_name] = values  # the same Parameter: an optimizer holding it keeps training it
            else:
                moved = values.detach().to(device=target_device, dtype=dtype)
                value_dict[adapter_name] = nn.Parameter(moved, requires_grad=values.requires_grad)

    def set_value_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """Values in fp32 (True) or in the base weight's dtype (False), as peft's `autocast_adapter_dtype` asks."""
        self.sara_value_dtype[adapter_name] = torch.float32 if autocast_adapter_dtype else None
        self._move_adapter_to_device_of_base_layer(adapter_name)

    @staticmethod
    def _add_sparse_update(adapter_name, base_tensor, config, index_dict, value_dict) -> None:
        indices = select_entries(base_tensor, config.threshold, config.selection)
        if config.init_weights:
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=base_tensor.device)
        else:
            values = torch.randn(indices.numel(), dtype=torch.float32, device=base_tensor.device) * config.threshold
        index_dict[adapter_name] = indices
        value_dict[adapter_name] = nn.Parameter(values)

    def _updates(self, adapter_names, index_dict, value_dict):
        return [
            (index_dict[name], value_dict[name], self.sara_scaling[name])
            for name in adapter_names
            if name in value_dict
        ]

    def _effective_bias(self, bias: torch.Tensor | None, adapter_names) -> torch.Tensor | None:
        if bias is None or not self.sara_bias_values:
            return bias
        for indices, values, scale in self._updates(adapter_names, self.sara_bias_indices, self.sara_bias_values):
            bias = bias.index_add(0, indices, values.to(bias.dtype), alpha=scale)
        return bias

    def _active_sara_adapters(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.sara_values]

    # scaling, as diffusers' set_adapters(weights), fuse_lora(lora_scale) and the lora_scale kwargs use it
    def set_scale(self, adapter: str, scale: float) -> None:
        self._restore_base()
        if adapter in self.sara_scaling:
            self.sara_scaling[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        self._restore_base()
        for adapter in self._active_sara_adapters():
            self.sara_scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        self._restore_base()
        for adapter in self._active_sara_adapters():
            self.sara_scaling[adapter] = 1.0 if scale is None else self.sara_scaling[adapter] / scale

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update of the weight for one adapter, in the base weight's dtype."""
        weight = self.get_base_layer().weight
        return _scatter_updates(
            torch.zeros_like(weight), self._updates([adapter_name], self.sara_indices, self.sara_values)
        )

    def _folded(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The base weight and bias with one adapter's updates added, as copies."""
        base_layer = self.get_base_layer()
        folded = {}
        for tensor_name, index_dict, value_dict in (
            ("weight", self.sara_indices, self.sara_values),
            ("bias", self.sara_bias_indices, self.sara_bias_values),
        ):
            updates = self._updates([adapter_name], index_dict, value_dict)
            if updates:
                folded[tensor_name] = _scatter_updates(getattr(base_layer, tensor_name).data, updates)
        return folded

    def _merge_into_base(self, adapter_name: str, check_finite: bool = False) -> None:
        """Add one adapter's updates to the base weight and bias."""
        folded = self._folded(adapter_name)
        if check_finite and not all(torch.isfinite(tensor).all() for tensor in folded.values()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        for tensor_name, tensor in folded.items():
            getattr(self.get_base_layer(), tensor_name).data.copy_(tensor)

    def _adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        """The SaRA adapters of this layer that `merge(adapter_names=...)` merges, as `check_adapters_to_merge` picks
        them but without its warnings."""
        names = self.active_adapters if adapter_names is None else adapter_names
        return [name for name in names if name in self.sara_values and name not in self.merged_adapters]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the updates of the given (default: active) adapters into the base weight and bias, keeping the entries
        they replace (one per position, in the base dtype) until `unmerge` copies them back.

        With `safe_merge`, the first layer merged checks every SaRA layer of its model, so that a non-finite update
        anywhere refuses the whole merge before any weight changes; the layers it checked then skip that model-wide
        check (one pass over the model per merge, not one per layer).
        """
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.sara_values]
        checked, self._checked_for_merge = self._checked_for_merge, None
        if safe_merge and names and checked != names:
            self._check_merge_of_peers(adapter_names)
        for name in names:
            entries = self._base_entries_at_positions(name)
            self._merge_into_base(name, check_finite=safe_merge)
            self._entries_before_merge[name] = entries
            self.merged_adapters.append(name)

    def _check_merge_of_peers(self, adapter_names: list[str] | None) -> None:
        """Raise if merging would put a non-finite value into any SaRA layer of this layer's model; otherwise mark
        the other layers as checked for this merge."""
        model = self.model_reference()
        named_layers = [] if model is None else [(n, m) for n, m in model.named_modules() if isinstance(m, SaRALayer)]
        if not any(layer is self for _, layer in named_layers):
            named_layers = [("", self)]
        to_merge = [(name, layer, layer._adapters_to_merge(adapter_names)) for name, layer in named_layers]
        for module_name, layer, names in to_merge:
            for adapter_name in names:
                if not all(torch.isfinite(tensor).all() for tensor in layer._folded(adapter_name).values()):
                    raise ValueError(
                        f"NaNs detected in the merged weights of {module_name or type(layer).__name__}. The adapter "
                        f"{adapter_name} seems to be broken; nothing was merged."
                    )
        for _, layer, names in to_merge:
            if layer is not self:
                layer._checked_for_merge = names

    def unmerge(self) -> None:
        """Take the merged updates out of the base weight and bias, last merged first, by copying back the entries
        they replaced: the base returns bit for bit in any dtype, also after a scale change, and (cast) after the
        merged model was cast to another dtype or moved."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            for tensor_name, (indices, entries) in self._entries_before_merge.pop(self.merged_adapters.pop()).items():
                flat = getattr(base_layer, tensor_name).data.view(-1)
                flat.index_copy_(0, indices.to(flat.device, torch.int64), entries.to(flat.device, flat.dtype))

    def _base_entries_at_positions(self, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per base tensor (weight, bias) one adapter trains, its positions and a copy of its current entries there."""
        base_layer = self.get_base_layer()
        entries = {}
        for tensor_name, index_dict in (("weight", self.sara_indices), ("bias", self.sara_bias_indices)):
            if adapter_name in index_dict:
                indices = index_dict[adapter_name]
                entries[tensor_name] = (indices, getattr(base_layer, tensor_name).detach().reshape(-1)[indices])
        return entries

    # torch.compile runs this eagerly, a graph break per layer: traced, the training fold's state (version counters,
    # a Python object changed between calls) is baked into the graph, which then skips refreshes, and inductor
    # mis-compiles the per-op path's in-place write and restore (wrong gradients, a changed base weight). Disabled
    # here rather than chosen by torch.compiler.is_compiling(): dynamo also compiles frames eager code calls.
    @torch.compiler.disable
    def _sparse_forward(self, x: torch.Tensor, op, adapter_names: list[str]) -> torch.Tensor:
        base_layer = self._raw_base_layer()
        weight = base_layer.weight
        updates = self._updates(adapter_names, self.sara_indices, self.sara_values)
        compute_dtype = _layerwise_compute_dtype(base_layer) or weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            compute_dtype = torch.get_autocast_dtype(x.device.type)
        folded = self._hold_fold(weight, updates, compute_dtype)
        bias = self._effective_bias(base_layer.bias, adapter_names)
        if folded and weight.dtype == compute_dtype:
            weight = _FoldedWeight.apply(weight, *updates[0])
            return op.forward(
                _as_dtype(x, compute_dtype), weight, None if bias is None else _as_dtype(bias, compute_dtype)
            )
        indices_and_values = [tensor for indices, values, _ in updates for tensor in (indices, values)]
        scales = tuple(scale for _, _, scale in updates)
        return _SparseWeightOp.apply(x, weight, bias, op, compute_dtype, scales, folded, *indices_and_values)


@contextmanager
def _offloaded_tensors_loaded(modules: tuple[nn.Module, ...]) -> Iterator[None]:
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


def _layerwise_compute_dtype(base_layer: nn.Module) -> torch.dtype | None:
    """The compute dtype of diffusers' layerwise casting on the base layer, if enabled: the base layer's own forward,
    whose hook would cast its weight for the computation, does not run while SaRA computes with its weight."""
    registry = vars(base_layer).get("_diffusers_hook")  # not getattr: a miss raises inside torch.nn.Module
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    return getattr(hook, "compute_dtype", None)


class _SaRAModule(nn.Module, SaRALayer):
    """The module side shared by the layer classes: construction, forward and repr. Subclasses say how their base
    type's input and op are formed."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SaRAConfig) -> None:
        super().__init__()
        SaRALayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _input_and_op(self, x: torch.Tensor):
        """The input as the sparse op takes it, and the op's formulas for this base type."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            self._restore_base()
            return self.base_layer(x, *args, **kwargs)
        active = self._active_sara_adapters()
        if self.merged or not active:
            self._restore_base()
            return self.base_layer(x, *args, **kwargs)
        with _offloaded_tensors_loaded((self.base_layer, self.sara_values, self.sara_indices)):
            return self._sparse_forward(*self._input_and_op(x), active)

    # A folded update is taken out of the weight before the module's tensors are saved, loaded, moved or cast, and
    # when the module leaves training mode.
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._restore_base()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._restore_base()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self._restore_base()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if not mode:
            self._restore_base()
        return super().train(mode)

    def __repr__(self) -> str:
        return "sara." + super().__repr__()


class Linear(_SaRAModule):
    """SaRA on an `nn.Linear`."""

    def _input_and_op(self, x: torch.Tensor):
        return x, _LinearOp


class Conv2d(_SaRAModule):
    """SaRA on an `nn.Conv2d` of any kernel, stride, padding (and padding mode), dilation and groups."""

    def _input_and_op(self, x: torch.Tensor):
        """Apply non-zero or string padding to the input here, so that the sparse op only sees zero padding."""
        conv = self._raw_base_layer()
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            return x, _Conv2dOp(conv.stride, conv.padding, conv.dilation, conv.groups)
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        return x, _Conv2dOp(conv.stride, (0, 0), conv.dilation, conv.groups)
