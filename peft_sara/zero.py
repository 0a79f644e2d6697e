"""DeepSpeed ZeRO stages 1 and 2 under SaRA's step hooks.

ZeRO keeps the SaRA values replicated in the model (in the run's precision) but steps fp32 copies of them: each
process holds one slice ("partition") of every parameter group as a flat fp32 tensor, with its gradient, and steps
the client's torch optimizer on those partitions, one group at a time. What SaRA adds to a step has to happen there:
the regulariser's subgradient goes into the partition's gradient (after ZeRO's own unscaling and clipping, where a
plain run adds it after clipping too), and the progressive step's frozen values are written back into the
partition after the optimizer moved them; ZeRO then copies the partitions into the model's values and gathers them.
DeepSpeed's own mapping between a parameter and its slice of a partition (`_hp_mapping`) says where.

Stage 3 partitions the base weights too, which SaRA's op reads whole: it stays refused (`sharding.ZERO3_REFUSAL`).
"""

from __future__ import annotations

from typing import Any

import torch

ZERO_OPTIMIZER_CLASS = "DeepSpeedZeroOptimizer"  # deepspeed.runtime.zero.stage_1_and_2: stages 1 and 2


def zero_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO-1/2 optimizer behind `optimizer` (as accelerate wraps it, or as deepspeed.initialize
    returns it), or None."""
    while optimizer is not None:
        if type(optimizer).__name__ == ZERO_OPTIMIZER_CLASS and type(optimizer).__module__.startswith("deepspeed."):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class ZeroPartitions:
    """The fp32 partitions a ZeRO-1/2 optimizer steps in place of the model's SaRA values."""

    def __init__(self, zero: Any) -> None:
        self.zero = zero
        self.optimizer: torch.optim.Optimizer = zero.optimizer  # the client's, stepped on the partitions
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"SaRA under DeepSpeed needs a torch optimizer inside ZeRO, got {type(self.optimizer).__name__}: "
                "pass a torch.optim optimizer (such as AdamW) to deepspeed.initialize."
            )
        if getattr(zero, "cpu_offload", False):
            raise ValueError(
                "SaRA under DeepSpeed ZeRO with offload_optimizer is untested: set offload_optimizer's device to "
                "none in the DeepSpeed config."
            )
        # ZeRO steps the optimizer once per parameter group, with param_groups holding that group alone, whose one
        # parameter is the group's flat fp32 partition (the same tensor also after a checkpoint is loaded)
        self.partitions: list[torch.Tensor] = zero.single_partition_of_fp32_groups
        self._group_of = {id(param): index for index, group in enumerate(zero.bit16_groups) for param in group}

    def holds(self, values: torch.Tensor) -> bool:
        return id(values) in self._group_of

    def group_of(self, values: torch.Tensor) -> int:
        return self._group_of[id(values)]

    def stepped_group(self) -> int:
        """The index of the parameter group the optimizer is stepping now (inside its step hooks)."""
        stepped = self.optimizer.param_groups[0]["params"][0]
        return next(index for index, partition in enumerate(self.partitions) if partition is stepped)

    @property
    def last_group(self) -> int:
        return len(self.partitions) - 1

    @staticmethod
    def full_values(values: torch.Tensor) -> torch.Tensor:
        """The fp32 values ZeRO steps, whole (a collective: every process calls it for the same values)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(values).view(-1)

    @torch.no_grad()
    def add_to_gradient(self, values: torch.Tensor, addition: torch.Tensor) -> None:
        """Add a whole-tensor `addition` to the gradient of this process's slice of `values` in its partition."""
        mapping = values._hp_mapping
        if mapping is None:  # no slice of these values in this process's partition
            return
        partition = self.partitions[self.group_of(values)]
        hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
        partition.grad.narrow(0, hp.start, hp.numel).add_(addition.view(-1).narrow(0, lp.start, lp.numel))

    @staticmethod
    @torch.no_grad()
    def write(values: torch.Tensor, positions: torch.Tensor, new_values: torch.Tensor) -> None:
        """Write `new_values` at the whole-tensor `positions` of `values` into this process's slice of them."""
        mapping = values._hp_mapping
        if mapping is None:
            return
        lp = mapping.lp_fragment_address
        inside = (positions >= lp.start) & (positions < lp.start + lp.numel)
        mapping.get_hp_fragment().view(-1).index_copy_(0, positions[inside] - lp.start, new_values[inside])
