"""DeepSpeed ZeRO (stages 1, 2 and 3) under SaRA's layers and step hooks.

ZeRO steps fp32 copies of the SaRA values: each process holds one slice ("partition") of every parameter group as a
flat fp32 tensor, with its gradient, and steps the client's torch optimizer on those partitions, one group at a time.
What SaRA adds to a step has to happen there: the regulariser's subgradient goes into the partition's gradient (after
ZeRO's own unscaling and clipping, where a plain run adds it after clipping too), and the progressive step's frozen
values are written back into the partition after the optimizer moved them; ZeRO then copies the partitions into the
model's values. Stages 1 and 2 keep the model's values whole and say where each one's slice lies (`_hp_mapping`);
stage 3 partitions the model's parameters too (values and base weights), each process holding the same slice of every
parameter, at an offset of its group's partition that the optimizer records (`grad_position`).

Stage 3 gathers a module's own parameters around its forward and backward only. A SaRA layer computes with its base
layer's weight and bias and with its values, which belong to submodules whose forward never runs, so the layer
registers them as its external parameters (`gather_for_layer`): ZeRO-3 then gathers and releases them with the layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# deepspeed.runtime.zero.stage_1_and_2 (stages 1 and 2) and deepspeed.runtime.zero.stage3
ZERO_OPTIMIZER_CLASSES = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3")


def zero_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer behind `optimizer` (as accelerate wraps it, or as deepspeed.initialize returns
    it), or None."""
    while optimizer is not None:
        if type(optimizer).__name__ in ZERO_OPTIMIZER_CLASSES and type(optimizer).__module__.startswith("deepspeed."):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def is_stage3(zero: Any) -> bool:
    """Whether a ZeRO optimizer (from `zero_optimizer`; None: no ZeRO) is stage 3's."""
    return type(zero).__name__ == ZERO_OPTIMIZER_CLASSES[1]


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """A parameter that DeepSpeed ZeRO-3 has partitioned (it keeps its bookkeeping on the parameter itself)."""
    return hasattr(param, "ds_id")


def whole_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also while ZeRO-3 holds only this process's slice of it."""
    return param.ds_shape if is_zero3_partitioned(param) else param.shape


def is_half_precision_copy(param: torch.Tensor) -> bool:
    """A parameter that ZeRO-1/2 trains while the model holds it in half precision (bf16, fp16): the fp32 value it
    steps lies in the processes' partitions, a slice each (`_hp_mapping`, None where this process holds none)."""
    return hasattr(param, "_hp_mapping") and param.dtype != torch.float32


def needs_gathering(param: torch.Tensor) -> bool:
    """A parameter whose whole value (fp32 where ZeRO trains it) only all processes together hold: ZeRO-3
    partitioned, or trained by ZeRO-1/2 in half precision. Reading it is a collective (`whole_copy`)."""
    return is_zero3_partitioned(param) or is_half_precision_copy(param)


def whole_copy(param: torch.Tensor) -> torch.Tensor:
    """A parameter of `needs_gathering`, whole and detached (a collective: every process calls it for the same
    parameter). For a trained one, the fp32 copy that ZeRO steps (what a plain run would hold; the model keeps it in
    the run's precision)."""
    if is_half_precision_copy(param) or (param.requires_grad and getattr(param, "_z3_optimizer", None) is not None):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([param]):
        return param.detach().clone()


def gather_for_layer(layer: nn.Module, params: Iterable[torch.Tensor | None]) -> None:
    """Have ZeRO-3 gather `params` with `layer`'s forward and backward (and release them after), as it does the
    layer's own parameters: registered once, and gathered now the first time, when this forward's gathering is past.
    Parameters ZeRO-3 has not partitioned are left alone."""
    partitioned = [param for param in params if param is not None and is_zero3_partitioned(param)]
    registered = getattr(layer, "_external_params", {})
    new = [param for param in partitioned if id(param) not in registered]
    if not new:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, register_external_parameter

    for param in new:
        register_external_parameter(layer, param)
        if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            param.all_gather()


class ZeroPartitions:
    """The fp32 partitions a ZeRO optimizer steps in place of the model's SaRA values."""

    def __init__(self, zero: Any) -> None:
        self.zero = zero
        self.stage3 = is_stage3(zero)
        self.optimizer: torch.optim.Optimizer = zero.optimizer  # the client's, stepped on the partitions
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"SaRA under DeepSpeed needs a torch optimizer inside ZeRO, got {type(self.optimizer).__name__}: "
                "pass a torch.optim optimizer (such as AdamW) to deepspeed.initialize."
            )
        offloaded = getattr(zero, "offload_optimizer", False) or getattr(zero, "offload_param", False)
        if getattr(zero, "cpu_offload", False) or offloaded:
            raise ValueError(
                "SaRA under DeepSpeed ZeRO with offload_optimizer or offload_param is untested: set their device to "
                "none in the DeepSpeed config."
            )
        # one flat fp32 partition per (sub-)group, stepped in order; the same tensors also after a checkpoint is loaded
        if self.stage3:
            self.partitions: list[torch.Tensor] = zero.fp32_partitioned_groups_flat
            groups = zero.fp16_groups
        else:
            self.partitions = zero.single_partition_of_fp32_groups
            groups = zero.bit16_groups
        self._group_of = {id(param): index for index, group in enumerate(groups) for param in group}

    def holds(self, values: torch.Tensor) -> bool:
        return id(values) in self._group_of

    def group_of(self, values: torch.Tensor) -> int:
        return self._group_of[id(values)]

    def stepped_group(self) -> int:
        """The index of the partition the optimizer is stepping now (inside its step hooks): the one tensor its
        parameter groups hold then (stages 1 and 2 leave it the stepped group alone, stage 3 empties the others)."""
        stepped = next(group["params"][0] for group in self.optimizer.param_groups if group["params"])
        return next(index for index, partition in enumerate(self.partitions) if partition is stepped)

    @property
    def last_group(self) -> int:
        return len(self.partitions) - 1

    @staticmethod
    def full_values(values: torch.Tensor) -> torch.Tensor:
        """The fp32 values ZeRO steps, whole (a collective: every process calls it for the same values)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(values).reshape(-1)

    def _slice(self, values: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
        """Where this process's slice of `values` lies: its partition, its offset there, the first whole-tensor
        position it holds and how many; None when it holds none."""
        if self.stage3:
            index, offset, numel = self.zero.grad_position[self.zero.get_param_id(values)]
            start = self.zero._get_param_partition_rank(values) * numel
            count = min(numel, values.ds_numel - start)  # the last slice is padded
            return (self.partitions[index], offset, start, count) if count > 0 else None
        mapping = values._hp_mapping
        if mapping is None:
            return None
        hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
        return self.partitions[self.group_of(values)], hp.start, lp.start, lp.numel

    @torch.no_grad()
    def add_to_gradient(self, values: torch.Tensor, addition: torch.Tensor) -> None:
        """Add a whole-tensor `addition` to the gradient of this process's slice of `values` in its partition."""
        where = self._slice(values)
        if where is not None:
            partition, offset, start, count = where
            partition.grad.narrow(0, offset, count).add_(addition.reshape(-1).narrow(0, start, count))

    @torch.no_grad()
    def write(self, values: torch.Tensor, positions: torch.Tensor, new_values: torch.Tensor) -> None:
        """Write `new_values` at the whole-tensor `positions` of `values` into this process's slice of them."""
        where = self._slice(values)
        if where is not None:
            partition, offset, start, count = where
            inside = (positions >= start) & (positions < start + count)
            partition.narrow(0, offset, count).index_copy_(0, positions[inside] - start, new_values[inside])
