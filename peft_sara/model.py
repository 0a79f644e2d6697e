"""The SaRA tuner: which modules get a SaRA layer, and how a saved adapter is fitted back onto them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists, delete_adapter
from torch import nn

from .config import SaRAConfig
from .layer import Conv2d, Linear, ModelReference, SaRALayer
from .sharding import full_tensor
from .sparse_ops import index_dtype_for
from .zero import needs_gathering

SUPPORTED_LAYERS = {nn.Linear: Linear, nn.Conv2d: Conv2d}
PEFT_MODEL_PREFIX = "base_model.model."  # how a PeftModel names its base model's modules
# (positions attribute, values attribute, name of the base layer's tensor they update, name of the packed form)
SPARSE_UPDATES = (
    ("sara_indices", "sara_values", "weight", "sara_mask"),
    ("sara_bias_indices", "sara_bias_values", "bias", "sara_bias_mask"),
)
FSDP1_WRAPPER_PREFIX = "_fsdp_wrapped_module."
INCOMPLETE_STATE_REFUSAL = (
    "The state dict holds only part of the SaRA adapter (a shard of an engine's): under FSDP1, gather the full state "
    "dict on every process and pass it: state = torch.distributed.checkpoint.state_dict.get_model_state_dict("
    "wrapped_model, options=StateDictOptions(full_state_dict=True)), then peft_model.save_pretrained(folder, "
    "state_dict=state, is_main_process=rank == 0)"
)
# Saved with each layer's update: the shape of the tensor it updates, so that an adapter describes itself and cannot
# load onto a base whose layer of the same name has another shape (adapters saved before these keys still load).
SHAPE_ATTRS = {"weight": "sara_shape", "bias": "sara_bias_shape"}
# The third form of saved positions, beside int32 positions and the bitmask: the steps from one position to the next
# as uint16 (the first from -1), 2 bytes a position at any density; a step of 0 stands for MAX_STEP entries skipped
# without a position, so that a gap of any length fits (clustered selections in large layers have gaps of millions).
DELTAS_ATTRS = {"weight": "sara_deltas", "bias": "sara_bias_deltas"}
MAX_STEP = 2**16 - 1
# Adapters saved before the steps could skip: uint16 gaps, the first gap being the first position (read only).
GAPS_ATTRS = {"weight": "sara_gaps", "bias": "sara_bias_gaps"}
BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_positions(positions: torch.Tensor, numel: int) -> torch.Tensor:
    """Positions as a bitmask over the tensor's entries, 8 per byte.

    Smaller than int32 positions when more than 1/32 of the entries are trainable: at the paper's 5.8% it takes
    2.2 bytes per trainable value instead of 4.
    """
    bits = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8, device=positions.device)
    bits[positions.long()] = 1
    return (bits.view(-1, 8) * BIT_WEIGHTS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_positions(mask: torch.Tensor, numel: int) -> torch.Tensor:
    bits = mask.unsqueeze(1).bitwise_right_shift(torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1
    return bits.view(-1).nonzero().squeeze(1).to(index_dtype_for(numel))


def deltas_of(positions: torch.Tensor) -> torch.Tensor:
    """Sorted positions as uint16 steps (see DELTAS_ATTRS): each step d >= 1 is written as (d - 1) // MAX_STEP zeros
    followed by the remainder, in [1, MAX_STEP]."""
    steps = torch.diff(positions.long(), prepend=positions.new_full((1,), -1, dtype=torch.long))
    skips = (steps - 1) // MAX_STEP
    ends = (skips + 1).cumsum(0) - 1
    deltas = torch.zeros(int(ends[-1]) + 1 if ends.numel() else 0, dtype=torch.int32, device=positions.device)
    deltas[ends] = (steps - skips * MAX_STEP).to(torch.int32)
    return deltas.to(torch.uint16)


def positions_of_deltas(deltas: torch.Tensor, numel: int) -> torch.Tensor:
    steps = deltas.to(torch.int64)
    totals = torch.where(steps == 0, MAX_STEP, steps).cumsum(0)
    return (totals[steps != 0] - 1).to(index_dtype_for(numel))


def positions_of_gaps(gaps: torch.Tensor, numel: int) -> torch.Tensor:
    return gaps.to(torch.int64).cumsum(0).to(index_dtype_for(numel))


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _is_supported(module: nn.Module) -> bool:
    return type(_base_layer(module)) in SUPPORTED_LAYERS


def threshold_for_fraction(tensors: list[torch.Tensor], fraction: float) -> float:
    """Smallest θ such that at least `fraction` of all entries of `tensors` have |w| < θ.

    The bit patterns of non-negative fp32 numbers order like the numbers, so the k-th smallest |w| is found exactly by
    a radix selection: one pass counts the high 16 bits, a second the low 16 bits within the right bucket. It never
    holds more than one tensor's copy at a time, unlike a global sort.
    """
    wanted = max(1, round(fraction * sum(tensor.numel() for tensor in tensors)))

    def magnitude_bits(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().float().abs().view(torch.int32).view(-1)

    high_counts = sum(torch.bincount(magnitude_bits(t) >> 16, minlength=1 << 15) for t in tensors)
    high_cumulative = high_counts.cumsum(0)
    bucket = int(torch.searchsorted(high_cumulative, wanted))
    before_bucket = int(high_cumulative[bucket - 1]) if bucket else 0
    low_counts = sum(
        torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
        for bits in map(magnitude_bits, tensors)
    )
    low = int(torch.searchsorted(low_counts.cumsum(0), wanted - before_bucket))
    kth_smallest_bits = (bucket << 16) | low
    # the next float above the k-th smallest |w|: |w| < θ then holds for it and everything below it
    return torch.tensor(kth_smallest_bits + 1, dtype=torch.int32).view(torch.float32).item()


class _SavedUpdate(NamedTuple):
    """One layer's saved update, checked against the layer, with the state-dict keys it is loaded from."""

    module: SaRALayer
    update: tuple[str, str, str, str]  # a row of SPARSE_UPDATES
    index_key: str
    value_key: str
    extra_keys: tuple[str, ...]  # the keys of its bitmask or gaps and its shape, which no tensor of the layer takes
    indices: torch.Tensor
    values: torch.Tensor


class SaRAModel(BaseTuner):
    """Injects SaRA layers into a model (see `SaRAConfig`); created by `get_peft_model` or diffusers' `add_adapter`.

    Every `nn.Linear` and `nn.Conv2d` is targeted unless `target_modules` says otherwise. Before any module is
    replaced, the targets are checked (supported types only) and the threshold is resolved and checked to select at
    least one entry, so a bad configuration leaves the model untouched.
    """

    prefix: str = "sara_"
    tuner_layer_cls = SaRALayer
    target_module_mapping: dict[str, list[str]] = {}

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """SaRA keeps its values in fp32 by default; `autocast_adapter_dtype=False` keeps them in each base weight's
        dtype (bf16/fp16), also through later moves and loads."""
        for module in self.model.modules():
            if isinstance(module, SaRALayer) and adapter_name in module.sara_values:
                module.set_value_dtype(adapter_name, autocast_adapter_dtype)

    def _prepare_adapter_config(self, peft_config: SaRAConfig, model_config: dict) -> SaRAConfig:
        # The default looks up target modules by transformers' `model_type`, which diffusers models lack; SaRA's
        # default (every Linear and Conv2d) is resolved in `_prepare_model`, which sees the model.
        return peft_config

    def _prepare_model(self, peft_config: SaRAConfig, model: nn.Module) -> None:
        if peft_config.target_modules is None:
            peft_config.target_modules = {
                name for name, module in self._candidate_modules(model) if _is_supported(module)
            }
        targets = [
            (name, module)
            for name, module in self._candidate_modules(model)
            if check_target_module_exists(peft_config, name)
        ]
        unsupported = sorted(
            f"{name} ({type(_base_layer(module)).__name__})" for name, module in targets if not _is_supported(module)
        )
        if unsupported:
            raise ValueError(
                f"SaRA supports nn.Linear and nn.Conv2d layers, but target_modules also matches: "
                f"{', '.join(unsupported[:10])}{' ...' if len(unsupported) > 10 else ''}. Narrow `target_modules` "
                "or list these in `exclude_modules`."
            )
        if not targets:
            return  # peft's injection raises its own clear error for targets that match nothing
        weights = [_base_layer(module).weight for _, module in targets]
        if peft_config.target_fraction is not None:
            # resolved once: the saved config then records the θ used, and loading it does not search again
            peft_config.threshold = threshold_for_fraction(weights, peft_config.target_fraction)
            peft_config.target_fraction = None
        selected = sum(int((weight.detach().float().abs() < peft_config.threshold).sum()) for weight in weights)
        if selected == 0:
            smallest = min(float(weight.detach().float().abs().min()) for weight in weights)
            raise ValueError(
                f"threshold={peft_config.threshold:g} selects no weight entry in the {len(targets)} targeted modules "
                f"(the smallest |w| is {smallest:.3g}). Raise `threshold` above that, or set `target_fraction` "
                "(e.g. 0.058) to pick it from the share of entries to train."
            )

    def _candidate_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Named modules that can be targeted: every module except those inside an existing tuner layer."""
        tuner_layer_prefixes: list[str] = []
        for name, module in model.named_modules():
            if not name or any(name.startswith(prefix) for prefix in tuner_layer_prefixes):
                continue
            if isinstance(module, BaseTunerLayer):
                tuner_layer_prefixes.append(name + ".")
            yield name, module

    def _create_and_replace(
        self,
        peft_config: SaRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if isinstance(target, SaRALayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target)
        new_module.model_reference = ModelReference(self.model)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is made active
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(peft_config: SaRAConfig, adapter_name: str, target: nn.Module) -> nn.Module:
        layer_cls = SUPPORTED_LAYERS.get(type(_base_layer(target)))
        if layer_cls is None:
            raise ValueError(
                f"SaRA supports nn.Linear and nn.Conv2d layers, got {type(_base_layer(target)).__name__}."
            )
        return layer_cls(target, adapter_name, peft_config)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: SaRAConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Save each layer's positions in the smallest of three forms (integers, a bitmask, 16-bit steps), and the
        shape of the tensor they index. Values an engine shards (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions, whose
        fp32 copy is saved) are gathered whole: every process must call this (as `save_pretrained` does), and the main
        process writes. Under ZeRO-1/2 with half-precision values, ZeRO's fp32 copy is saved as well. Under FSDP1,
        pass `save_pretrained` FSDP1's full state dict (`INCOMPLETE_STATE_REFUSAL` says how)."""
        given = state_dict
        state_dict = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # the state dict's tensors are detached: a ZeRO parameter is gathered through the parameter itself
        gathered = {name: param for name, param in model.named_parameters() if needs_gathering(param)}
        state_dict = {key: full_tensor(gathered.get(key, tensor)) for key, tensor in state_dict.items()}
        for module_name, module in model.named_modules():
            if not isinstance(module, SaRALayer):
                continue
            # FSDP1's units add `_fsdp_wrapped_module.` to the names of the modules they wrap, anywhere in a name, and
            # its full state dict leaves it out (PEFT's selection above drops it at the start of a name only)
            module_name = module_name.replace(FSDP1_WRAPPER_PREFIX, "")
            for index_attr, values_attr, tensor_name, mask_attr in SPARSE_UPDATES:
                if adapter_name not in getattr(module, index_attr):
                    continue
                index_key, values_key = (f"{module_name}.{name}.{adapter_name}" for name in (index_attr, values_attr))
                for key in (index_key, values_key):
                    if key not in state_dict and key in given:
                        state_dict[key] = given[key]
                positions, values = state_dict.get(index_key), state_dict.get(values_key)
                if positions is None or values is None or values.numel() != positions.numel():
                    raise ValueError(f"{INCOMPLETE_STATE_REFUSAL} (layer {module_name})")
                shape = module.whole_base_shape(tensor_name)
                shape_key = f"{module_name}.{SHAPE_ATTRS[tensor_name]}.{adapter_name}"
                state_dict[shape_key] = torch.tensor(shape, dtype=torch.int64)
                numel, positions = shape.numel(), state_dict[index_key]
                deltas = deltas_of(positions)
                forms = {
                    index_attr: positions.nbytes,
                    mask_attr: math.ceil(numel / 8),
                    DELTAS_ATTRS[tensor_name]: deltas.nbytes,
                }
                smallest = min(forms, key=forms.get)
                if smallest != index_attr:
                    del state_dict[index_key]
                    packed = pack_positions(positions, numel) if smallest == mask_attr else deltas
                    state_dict[f"{module_name}.{smallest}.{adapter_name}"] = packed
        return state_dict

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SaRAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Fit each SaRA layer to the positions saved in the adapter, after checking them against this base model.

        The layers were created with positions selected from the base model in hand, which may differ from the one
        the adapter was trained on (another dtype breaks ties at θ differently): the saved positions are the truth,
        so the layers are resized to them before peft copies the tensors in. Every layer is checked before any is
        resized, so a refused load changes no layer; an adapter made only to receive these weights (its config read
        by `SaRAConfig.from_pretrained`, as `PeftModel.from_pretrained` and `load_adapter` do) is removed again.
        """
        state_dict = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, _with_model_prefix(model, state_dict)
        )
        try:
            fitted = cls._match_saved_updates(model, adapter_name, state_dict)
        except ValueError:
            if getattr(config, "_awaits_saved_weights", False):
                remove_sara_adapter(model, adapter_name)
            raise
        config._awaits_saved_weights = False
        for saved in fitted:
            index_attr, value_attr, tensor_name, _ = saved.update
            for key in saved.extra_keys:
                del state_dict[key]
            current_values = getattr(saved.module, value_attr)[adapter_name]
            state_dict[saved.index_key] = saved.indices
            state_dict[saved.value_key] = saved.values.to(current_values.dtype)
            if current_values.shape != saved.values.shape:
                # Only a differently sized selection gets new tensors: an optimizer (or DDP) that already holds the
                # current values, as when a training run resumes, must keep training the loaded ones.
                device = getattr(saved.module.get_base_layer(), tensor_name).device
                getattr(saved.module, index_attr)[adapter_name] = torch.empty_like(saved.indices, device=device)
                getattr(saved.module, value_attr)[adapter_name] = nn.Parameter(
                    torch.empty(saved.values.numel(), dtype=current_values.dtype, device=device),
                    requires_grad=current_values.requires_grad,
                )
        return state_dict

    @classmethod
    def _saved_key(
        cls, state_dict: dict[str, torch.Tensor], module_name: str, attribute: str, adapter_name: str
    ) -> str | None:
        """The key under which a saved file holds a layer's extra tensor (saved without the adapter name), if any."""
        key = cls._remove_adapter_name_from_key(f"{module_name}.{attribute}.{adapter_name}", adapter_name)
        return next((k for k in (key, PEFT_MODEL_PREFIX + key) if k in state_dict), None)

    @classmethod
    def _match_saved_updates(
        cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> list[_SavedUpdate]:
        """Pair every SaRA layer of `adapter_name` with its saved positions and values, checked; change nothing."""
        fitted, expected_keys, missing = [], set(), []
        for module_name, module in model.named_modules():
            if not isinstance(module, SaRALayer):
                continue
            for update in SPARSE_UPDATES:
                index_attr, value_attr, tensor_name, mask_attr = update
                if adapter_name not in getattr(module, value_attr):
                    continue
                index_key = f"{module_name}.{index_attr}.{adapter_name}"
                value_key = f"{module_name}.{value_attr}.{adapter_name}"
                extra = {
                    attribute: key
                    for attribute in (mask_attr, *_packed_forms(tensor_name), SHAPE_ATTRS[tensor_name])
                    if (key := cls._saved_key(state_dict, module_name, attribute, adapter_name)) is not None
                }
                expected_keys.update((index_key, value_key, *extra.values()))
                tensors = {attribute: state_dict[key] for attribute, key in extra.items()}
                if index_key in state_dict:
                    tensors[index_attr] = state_dict[index_key]
                if (
                    value_key not in state_dict
                    or not {index_attr, mask_attr, *_packed_forms(tensor_name)} & tensors.keys()
                ):
                    missing.append(f"{module_name} ({tensor_name})")
                    continue
                base_tensor = getattr(module.get_base_layer(), tensor_name)
                name = f"{module_name.removeprefix(PEFT_MODEL_PREFIX)}.{tensor_name}"
                indices = _saved_positions(name, update, tensors, base_tensor)
                values = state_dict[value_key]
                _check_saved_update(name, indices, values, base_tensor)
                fitted.append(
                    _SavedUpdate(module, update, index_key, value_key, tuple(extra.values()), indices, values)
                )
        unexpected = sorted(key for key in state_dict if f".{cls.prefix}" in key and key not in expected_keys)
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"no saved update for {len(missing)} targeted module(s), e.g. {missing[:3]}")
            if unexpected:
                problems.append(
                    f"{len(unexpected)} saved tensor(s) for modules not in this model, e.g. {unexpected[:3]}"
                )
            raise ValueError(
                f"The SaRA adapter does not fit this model: {'; '.join(problems)}. Load it onto the base model it was "
                "trained on (same architecture and module names)."
            )
        return fitted


def _with_model_prefix(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved keys as a PeftModel names them: a file saved from a model the adapter was injected into (diffusers'
    `add_adapter`, `get_peft_model_state_dict(unet)`) lacks PEFT's `base_model.model.` prefix, which PEFT only ever
    removes."""
    wants_prefix = any(name.startswith(PEFT_MODEL_PREFIX) for name, _ in model.named_modules())
    if not wants_prefix or any(key.startswith(PEFT_MODEL_PREFIX) for key in state_dict):
        return state_dict
    return {PEFT_MODEL_PREFIX + key: tensor for key, tensor in state_dict.items()}


def check_saved_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse saved SaRA updates that cannot go onto `model`, before any adapter is injected into it: each must belong
    to an nn.Linear or nn.Conv2d of the model and fit the tensor it updates. (Whether every layer the adapter targets
    has one is checked while loading.)"""
    for (module_name, (index_attr, value_attr, tensor_name, mask_attr)), tensors in _saved_tensors(state_dict).items():
        name = f"{module_name}.{tensor_name}"
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        supported = module is not None and _is_supported(module)
        base_tensor = getattr(_base_layer(module), tensor_name) if supported else None
        if base_tensor is None:
            raise ValueError(
                f"The SaRA adapter does not fit this model: it updates {name}, which is not the {tensor_name} of an "
                "nn.Linear or nn.Conv2d here. Load it onto the base model it was trained on (same architecture and "
                "module names)."
            )
        if value_attr not in tensors or not {index_attr, mask_attr, *_packed_forms(tensor_name)} & tensors.keys():
            lacking = "values" if value_attr not in tensors else "positions"
            raise ValueError(f"The SaRA adapter's update for {name} has no {lacking}: its file is damaged.")
        indices = _saved_positions(name, (index_attr, value_attr, tensor_name, mask_attr), tensors, base_tensor)
        _check_saved_update(name, indices, tensors[value_attr], base_tensor)


def _saved_tensors(state_dict: dict[str, torch.Tensor]) -> dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]]:
    """A saved adapter's tensors grouped by (module name, row of SPARSE_UPDATES), keyed by attribute name."""
    saved: dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module_name, _, attribute = key.removeprefix(PEFT_MODEL_PREFIX).rpartition(".")
        for update in SPARSE_UPDATES:
            index_attr, value_attr, tensor_name, mask_attr = update
            if attribute in (index_attr, value_attr, mask_attr, SHAPE_ATTRS[tensor_name], *_packed_forms(tensor_name)):
                saved.setdefault((module_name, update), {})[attribute] = tensor
    return saved


class SavedSparseUpdate(NamedTuple):
    """One sparse update of a saved adapter, decoded without a base model: `values` at the flat `positions` of the
    `tensor_name` ("weight" or "bias") of `module_name`, a tensor of `shape`."""

    module_name: str
    tensor_name: str
    shape: tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor


def read_saved_updates(state_dict: dict[str, torch.Tensor]) -> tuple[list[SavedSparseUpdate], list[str]]:
    """Decode a saved SaRA adapter's updates from the adapter alone (for export, inspection), checked as a load checks
    them; also return the keys that belong to no sparse update (e.g. `modules_to_save`). The tensors' shapes come
    from the adapter, which records them since positions are saved in packed forms."""
    updates = []
    for (module_name, update), tensors in _saved_tensors(state_dict).items():
        index_attr, value_attr, tensor_name, mask_attr = update
        name = f"{module_name}.{tensor_name}"
        if SHAPE_ATTRS[tensor_name] not in tensors:
            raise ValueError(
                f"The SaRA adapter does not record the shape of {name}: it was saved by an older peft-sara. Load it "
                "onto its base model and save it again."
            )
        if value_attr not in tensors or not {index_attr, mask_attr, *_packed_forms(tensor_name)} & tensors.keys():
            lacking = "values" if value_attr not in tensors else "positions"
            raise ValueError(f"The SaRA adapter's update for {name} has no {lacking}: its file is damaged.")
        shape = tuple(int(size) for size in tensors[SHAPE_ATTRS[tensor_name]].reshape(-1).tolist())
        like = torch.empty(shape, device="meta")  # stands for the base tensor in the checks: its shape only
        positions = _saved_positions(name, update, tensors, like)
        _check_saved_update(name, positions, tensors[value_attr], like)
        updates.append(SavedSparseUpdate(module_name, tensor_name, shape, positions, tensors[value_attr]))
    sparse_attributes = {
        attribute
        for index_attr, value_attr, tensor_name, mask_attr in SPARSE_UPDATES
        for attribute in (index_attr, value_attr, mask_attr, SHAPE_ATTRS[tensor_name], *_packed_forms(tensor_name))
    }
    others = sorted(key for key in state_dict if key.rpartition(".")[2] not in sparse_attributes)
    return updates, others


def remove_sara_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take `adapter_name` out of `model` (a PeftModel, or a model the adapter was injected into) and put back the
    module each SaRA layer wraps where no adapter is left: a refused load leaves no SaRA layer behind."""
    tuner = getattr(model, "base_model", None)
    base = tuner.model if isinstance(tuner, BaseTuner) else model
    delete_adapter(base, adapter_name, prefix=SaRAModel.prefix, layer_cls=SaRALayer)
    for module_name, module in list(base.named_modules()):
        if isinstance(module, SaRALayer) and not module.sara_values:
            parent_name, _, child_name = module_name.rpartition(".")
            setattr(base.get_submodule(parent_name), child_name, module.base_layer)
    configs = getattr(base, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
        if not configs:
            del base.peft_config


def _saved_positions(
    name: str, update: tuple[str, str, str, str], tensors: dict[str, torch.Tensor], base_tensor: torch.Tensor
) -> torch.Tensor:
    """A layer's saved positions from whichever form they were saved in, after checking the saved shape if any."""
    index_attr, _, tensor_name, mask_attr = update
    if SHAPE_ATTRS[tensor_name] in tensors:
        _check_saved_shape(name, tensors[SHAPE_ATTRS[tensor_name]], base_tensor)
    if mask_attr in tensors:
        return _unpack_saved_mask(name, tensors[mask_attr], base_tensor)
    for attribute, decode in (
        (DELTAS_ATTRS[tensor_name], positions_of_deltas),
        (GAPS_ATTRS[tensor_name], positions_of_gaps),
    ):
        if attribute in tensors:
            packed = tensors[attribute]
            if packed.dtype != torch.uint16 or packed.dim() != 1:
                raise ValueError(
                    f"The SaRA adapter's position steps for {name} are not a 1-D uint16 tensor: its file is damaged."
                )
            return decode(packed, base_tensor.numel())
    return tensors[index_attr]


def _packed_forms(tensor_name: str) -> tuple[str, str]:
    """The attributes of the 16-bit forms of a tensor's saved positions: steps, and the gaps of older adapters."""
    return DELTAS_ATTRS[tensor_name], GAPS_ATTRS[tensor_name]


def _check_saved_shape(name: str, shape: torch.Tensor, base_tensor: torch.Tensor) -> None:
    saved = tuple(int(size) for size in shape.reshape(-1).tolist())
    if saved != tuple(base_tensor.shape):
        raise ValueError(
            f"The SaRA adapter was trained on another base model: it updates {name} of shape {saved}, which has shape "
            f"{tuple(base_tensor.shape)} here. Load it onto the base model it was trained on."
        )


def _unpack_saved_mask(name: str, mask: torch.Tensor, base_tensor: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.uint8 or mask.shape != (math.ceil(base_tensor.numel() / 8),):
        raise ValueError(
            f"The SaRA adapter does not fit {name}: its position mask covers {mask.numel() * 8} entries, not "
            f"{base_tensor.numel()} (shape {tuple(base_tensor.shape)}). The adapter was trained on another base "
            "model, or its file is damaged."
        )
    return unpack_positions(mask, base_tensor.numel())


def _check_saved_update(name: str, indices: torch.Tensor, values: torch.Tensor, base_tensor: torch.Tensor) -> None:
    """Refuse saved positions that cannot belong to `base_tensor`: a wrong base model or a damaged file."""
    problem = None
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        problem = f"positions must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}"
    elif not values.is_floating_point():
        problem = f"values must be floating point, got {values.dtype}"
    elif values.shape != indices.shape:
        problem = f"{tuple(values.shape)} values for {indices.numel()} positions"
    elif indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= base_tensor.numel()):
        problem = (
            f"positions up to {int(indices.max())} do not fit its {base_tensor.numel()} entries "
            f"(shape {tuple(base_tensor.shape)})"
        )
    elif indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        problem = "positions are not strictly increasing"
    elif not bool(torch.isfinite(values).all()):
        problem = "values are not all finite"
    if problem:
        raise ValueError(
            f"The SaRA adapter does not fit {name}: {problem}. The adapter was trained on another base model, or "
            "its file is damaged."
        )
