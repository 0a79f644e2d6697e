"""FSDP1 (`FullyShardedDataParallel` with `use_orig_params=True`) under SaRA's step hooks.

FSDP1 flattens each wrapped unit's parameters into one flat parameter and gives each process an equal slice of it.
Outside a unit's forward and backward, every original parameter of the unit is a 1-D view of the part of it that
this process's slice holds (possibly none), and so is its gradient; inside them, the unit's parameters are whole.
So SaRA's layers compute as in a plain run, provided a layer's base weight and values are in a unit that runs its
forward around the layer (a layer wrapped on its own is refused); what SaRA does in the optimizer's step is adapted
here: the regulariser and the progressive step read the whole values inside `FSDP.summon_full_params` of the unit,
and write into this process's part of the values and gradients (`_ShardParamInfo` says which part it is).

Gradient hooks on the original parameters never run under FSDP1 (autograd sees views of the flat parameter), so the
progressive step's frozen positions get no gradient from the layer itself (`SaRALayer.freeze_gradient`), before
the gradients are clipped, as a plain run's hook gives them none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

FSDP1_WRAPPED_LAYER_REFUSAL = (
    "Under FSDP1 a SaRA layer must lie inside a wrapped unit, not be (or contain) one: its op reads its base weight "
    "whole, which a unit of its own gathers only around a forward that SaRA does not run. Wrap whole blocks (e.g. an "
    "auto_wrap_policy on the UNet's down, mid and up blocks)."
)


def fsdp1_units(models: Iterable[nn.Module]) -> list[nn.Module]:
    """The FSDP1 instances in `models` (none when torch has no FSDP1)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return []
    return [module for model in models for module in model.modules() if isinstance(module, FullyShardedDataParallel)]


class Fsdp1Shards:
    """Where each original parameter of FSDP1's units lies: its unit and this process's part of it."""

    def __init__(self, units: list[nn.Module]) -> None:
        self._unit = {}  # id(param) -> the unit whose flat parameter holds it
        self._part = {}  # id(param) -> (first whole-tensor position held here, how many), or None
        for unit in units:
            handle = unit._handle
            # a unit without parameters of its own, or one without use_orig_params, which FSDP1 allows only where all
            # its parameters train or none do (so no SaRA layer's: that unit would lie inside the layer, refused)
            if handle is None or handle.flat_param._params is None:
                continue
            flat = handle.flat_param
            for param, info in zip(flat._params, flat._shard_param_infos):
                self._unit[id(param)] = unit
                self._part[id(param)] = (
                    (info.intra_param_start_idx, info.intra_param_end_idx - info.intra_param_start_idx + 1)
                    if info.in_shard
                    else None
                )

    def _part_of(self, param: torch.Tensor) -> tuple[int, int] | None:
        """Where this process's part of `param` lies (first whole-tensor position, how many); the whole of a
        parameter outside every unit; None when it holds none."""
        if id(param) not in self._unit:
            return 0, param.numel()
        return self._part[id(param)]

    @contextlib.contextmanager
    def whole(self, param: torch.Tensor) -> Iterator[None]:
        """The unit holding `param` gathered whole for the block (a collective: every process enters it for the same
        parameter); what is written into its parameters there is dropped."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        unit = self._unit.get(id(param))
        if unit is None:  # outside every unit: whole already
            yield
            return
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            yield

    def local_positions(self, positions: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The whole-tensor `positions` that this process holds, as positions in its part of `param`."""
        part = self._part_of(param)
        if part is None:
            return positions[:0]
        start, count = part
        return positions[(positions >= start) & (positions < start + count)] - start

    @torch.no_grad()
    def add_to_gradient(self, param: torch.Tensor, addition: torch.Tensor) -> None:
        """Add a whole-tensor `addition` to this process's part of `param`'s gradient."""
        part = self._part_of(param)
        if part is None:
            return
        start, count = part
        piece = addition.reshape(-1).narrow(0, start, count).to(param.dtype)
        if param.grad is None:
            param.grad = piece.clone()
        else:
            param.grad.add_(piece)


def wrapped_layer_problem(models: Iterable[nn.Module], units: list[nn.Module], layer_type: type) -> str | None:
    """Why SaRA cannot train these models under their FSDP1 `units`: a SaRA layer that is a unit of its own, or
    holds one (its base layer wrapped apart)."""
    unit_types = tuple({type(unit) for unit in units})
    if any(isinstance(unit.module, layer_type) for unit in units):
        return FSDP1_WRAPPED_LAYER_REFUSAL
    for model in models:
        for layer in model.modules():
            if isinstance(layer, layer_type) and any(isinstance(inner, unit_types) for inner in layer.modules()):
                return FSDP1_WRAPPED_LAYER_REFUSAL
    return None
