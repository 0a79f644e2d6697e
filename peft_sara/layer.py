"""SaRA tuner layers: a sparse additive update on the small-magnitude entries of a frozen weight.

Each adapter keeps two tensors per layer: `sara_indices`, the sorted flat positions of the trainable entries (saved
with the adapter, never recomputed from the base at load time), and `sara_values`, the trainable fp32 update at those
positions. The layer's op is `sparse_ops.SparseWeightOp`: the backward pass gathers the dense weight gradient at the
positions ("unstructured backpropagation"), no dense weight copy is kept for the backward pass, and the base weight
holds the pre-trained entries whenever no op is running. A layer whose base is another adapter's layer (a LoRA loaded
first) adds its update on top of what that layer computes.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import SaRAConfig
from .sharding import full_tensor
from .sparse_ops import (
    Conv2dOp,
    LinearOp,
    SparseWeightOp,
    dense_update,
    layerwise_compute_dtype,
    offloaded_tensors_loaded,
    scatter_updates,
    select_entries,
)
from .zero import gather_for_layer, is_zero3_partitioned, whole_shape


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


class _GradientFreeze:
    """What `SaRALayer.freeze_gradient` returns: `remove()` gives the positions their gradient back."""

    def __init__(self, layer: SaRALayer, adapter_name: str) -> None:
        self.layer, self.adapter_name = layer, adapter_name

    def remove(self) -> None:
        self.layer._gradient_frozen.pop(self.adapter_name, None)


class SaRALayer(BaseTunerLayer):
    """State and generic operations shared by the SaRA layers of every base type."""

    adapter_layer_names = ("sara_values", "sara_bias_values")
    other_param_names = ("sara_indices", "sara_bias_indices", "sara_scaling", "sara_value_dtype")

    def __init__(self, base_layer: nn.Module) -> None:
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
        # per adapter, positions of its values that get no gradient from the op (see `freeze_gradient`)
        self._gradient_frozen: dict[str, torch.Tensor] = {}
        base_layer = self.get_base_layer()
        # the base tensors' shapes now, before an engine shards them (ZeRO-3 and FSDP1 leave 1-D pieces behind)
        self._base_shapes = {
            name: whole_shape(tensor)
            for name in ("weight", "bias")
            if (tensor := getattr(base_layer, name, None)) is not None
        }
        for attribute in ("in_channels", "out_channels"):
            if hasattr(base_layer, attribute):
                setattr(self, attribute, getattr(base_layer, attribute))
        # every PEFT layer exposes in_features/out_features; a convolution's are its channels, as in PEFT's LoRA
        self.in_features = getattr(base_layer, "in_features", getattr(base_layer, "in_channels", None))
        self.out_features = getattr(base_layer, "out_features", getattr(base_layer, "out_channels", None))

    def get_base_layer(self) -> nn.Module:
        """The innermost base layer (an nn.Linear or nn.Conv2d), also below another adapter's layer."""
        base_layer = self.base_layer
        # PEFT's lookup probes every level with hasattr, which raises inside torch for a plain layer: once per call
        return super().get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer

    def whole_base_shape(self, tensor_name: str) -> torch.Size:
        """The shape of the base layer's `weight` or `bias`, also while an engine holds only a piece of it."""
        return self._base_shapes[tensor_name]

    def base_entries(self, adapter_name: str) -> torch.Tensor:
        """The base weight's entries at an adapter's positions, without any update (the regulariser and the
        progressive step read them)."""
        weight = full_tensor(self.get_base_layer().weight).detach()  # whole, also where an engine shards it
        return weight.reshape(-1).index_select(0, self.sara_indices[adapter_name])

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
        updates = []
        for name in adapter_names:
            if name not in value_dict:
                continue
            values = value_dict[name]
            frozen = self._gradient_frozen.get(name) if value_dict is self.sara_values else None
            if frozen is not None:  # the same values, with no path for a gradient at the frozen positions
                values = values.index_put((frozen,), values.detach().index_select(0, frozen))
            updates.append((index_dict[name], values, self.sara_scaling[name]))
        return updates

    def freeze_gradient(self, adapter_name: str, positions: torch.Tensor) -> _GradientFreeze:
        """Have the op give the adapter's values no gradient at `positions` (until the returned handle's
        `remove()`), for engines under which gradient hooks on the values never run (FSDP1 computes with views of
        its flat parameters); the forward is unchanged."""
        self._gradient_frozen[adapter_name] = positions
        return _GradientFreeze(self, adapter_name)

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
        if adapter in self.sara_scaling:
            self.sara_scaling[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        for adapter in self._active_sara_adapters():
            self.sara_scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        for adapter in self._active_sara_adapters():
            self.sara_scaling[adapter] = 1.0 if scale is None else self.sara_scaling[adapter] / scale

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update of the weight for one adapter, in the base weight's dtype."""
        weight = self.get_base_layer().weight
        return scatter_updates(
            torch.zeros_like(weight), self._updates([adapter_name], self.sara_indices, self.sara_values)
        )

    def _merged_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The base weight and bias with one adapter's updates added, as copies."""
        base_layer = self.get_base_layer()
        merged = {}
        for tensor_name, index_dict, value_dict in (
            ("weight", self.sara_indices, self.sara_values),
            ("bias", self.sara_bias_indices, self.sara_bias_values),
        ):
            updates = self._updates([adapter_name], index_dict, value_dict)
            if updates:
                merged[tensor_name] = scatter_updates(getattr(base_layer, tensor_name).data, updates)
        return merged

    def _merge_into_base(self, adapter_name: str, check_finite: bool = False) -> None:
        """Add one adapter's updates to the base weight and bias."""
        merged = self._merged_tensors(adapter_name)
        if check_finite and not all(torch.isfinite(tensor).all() for tensor in merged.values()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        for tensor_name, tensor in merged.items():
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
                if not all(torch.isfinite(tensor).all() for tensor in layer._merged_tensors(adapter_name).values()):
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

    # torch.compile runs this eagerly, a graph break per layer: inductor mis-compiles the in-place write and restore
    # of the sparse op (wrong gradients, a changed base weight). Disabled here rather than chosen by
    # torch.compiler.is_compiling(): dynamo also compiles frames eager code calls.
    @torch.compiler.disable
    def _sparse_forward(self, x: torch.Tensor, op, adapter_names: list[str]) -> torch.Tensor:
        """The base layer's op with the active adapters' updates in its weight and bias."""
        base_layer = self.get_base_layer()
        updates = self._updates(adapter_names, self.sara_indices, self.sara_values)
        compute_dtype = self._compute_dtype(x, base_layer)
        bias = self._effective_bias(base_layer.bias, adapter_names)
        indices_and_values = [tensor for indices, values, _ in updates for tensor in (indices, values)]
        scales = tuple(scale for _, _, scale in updates)
        return SparseWeightOp.apply(x, base_layer.weight, bias, op, compute_dtype, scales, *indices_and_values)

    def _update_output(self, x: torch.Tensor, op, adapter_names: list[str]) -> torch.Tensor:
        """The op applied with the updates alone (dense, through autograd), for a layer whose base is another
        adapter's layer: what that layer computes is added to it as it is (its own adapters included)."""
        base_layer = self.get_base_layer()
        compute_dtype = self._compute_dtype(x, base_layer)
        weight_updates = self._updates(adapter_names, self.sara_indices, self.sara_values)
        bias_updates = self._updates(adapter_names, self.sara_bias_indices, self.sara_bias_values)
        weight = dense_update(base_layer.weight, weight_updates, compute_dtype)
        bias = dense_update(base_layer.bias, bias_updates, compute_dtype) if bias_updates else None
        return op.forward(x.to(compute_dtype), weight, bias)

    @staticmethod
    def _compute_dtype(x: torch.Tensor, base_layer: nn.Module) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return layerwise_compute_dtype(base_layer) or base_layer.weight.dtype


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
            return self.base_layer(x, *args, **kwargs)
        active = self._active_sara_adapters()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base_layer = self.get_base_layer()
        if is_zero3_partitioned(base_layer.weight):  # DeepSpeed ZeRO-3 partitions every parameter of its model
            adapter_values = (*self.sara_values.values(), *self.sara_bias_values.values())
            gather_for_layer(self, (base_layer.weight, base_layer.bias, *adapter_values))
        if isinstance(self.base_layer, BaseTunerLayer):  # e.g. a LoRA loaded before this adapter
            result = self.base_layer(x, *args, **kwargs)
            return result + self._update_output(*self._input_and_op(x), active).to(result.dtype)
        with offloaded_tensors_loaded((self.base_layer, self.sara_values, self.sara_indices)):
            return self._sparse_forward(*self._input_and_op(x), active)

    def __repr__(self) -> str:
        return "sara." + super().__repr__()


class Linear(_SaRAModule):
    """SaRA on an `nn.Linear`."""

    def _input_and_op(self, x: torch.Tensor):
        return x, LinearOp


class Conv2d(_SaRAModule):
    """SaRA on an `nn.Conv2d` of any kernel, stride, padding (and padding mode), dilation and groups."""

    def _input_and_op(self, x: torch.Tensor):
        """Apply non-zero or string padding to the input here, so that the sparse op only sees zero padding."""
        conv = self.get_base_layer()
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            return x, Conv2dOp(conv.stride, conv.padding, conv.dilation, conv.groups)
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        return x, Conv2dOp(conv.stride, (0, 0), conv.dilation, conv.groups)

    # What another adapter's layer reads of the convolution it wraps (PEFT's LoRA, when loaded after SaRA).
    kernel_size = property(lambda self: self.get_base_layer().kernel_size)
    stride = property(lambda self: self.get_base_layer().stride)
    padding = property(lambda self: self.get_base_layer().padding)
    dilation = property(lambda self: self.get_base_layer().dilation)
    groups = property(lambda self: self.get_base_layer().groups)
    padding_mode = property(lambda self: self.get_base_layer().padding_mode)
