"""Tensors that a sharding engine splits across processes (FSDP2's `fully_shard` makes every parameter a DTensor
sharded along its first dimension): what SaRA's training logic needs of them, whole or as this process's shard; and
the engines SaRA does not train under yet, recognised so that they are refused instead of training wrong values.
(DeepSpeed ZeRO, which steps fp32 copies of the values, has its own module, `zero`, and so has FSDP1, `fsdp1`;
`full_tensor` also gathers a parameter ZeRO partitions.)

`full_tensor` is a collective: every process must call it for the same tensors in the same order, which SaRA's step
hooks do (their decisions depend only on the step count, the seed and the parameters). The other helpers take no
communication. Plain tensors pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .zero import is_stage3, is_zero3_partitioned, needs_gathering, whole_copy, zero_optimizer

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support: nothing can be sharded
    DTensor = distribute_tensor = None

# Each engine SaRA refuses, why, and what to use instead: one line each, for attach and the training scripts.
_USE_INSTEAD = (
    "train with DDP (accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml) or shard with FSDP2 "
    "(torch.distributed.fsdp.fully_shard)"
)
DEEPSPEED_REFUSAL = (
    "SaRA trains under DeepSpeed with ZeRO (stage 1, 2 or 3) and a torch optimizer only: this DeepSpeed optimizer "
    "steps copies of the SaRA values that the regulariser and the progressive step do not reach, so the run would "
    f"train other values than it reports; set zero_optimization.stage to 1, 2 or 3, or {_USE_INSTEAD}."
)
ACCELERATE_DEEPSPEED_REFUSAL = (
    "The training scripts run under accelerate's DeepSpeed plugin with ZeRO stage 1, 2 or 3 and no offload only "
    "(stage 0 steps copies of the values SaRA does not reach; offload is untested): use "
    "configs/accelerate/deepspeed_zero2.yaml or deepspeed_zero3.yaml, or DDP (configs/accelerate/multi_gpu_ddp.yaml)."
)
ACCELERATE_FSDP_REFUSAL = (
    "The training scripts do not run under accelerate's FSDP plugin yet (untested: accelerate starts FSDP on GPUs "
    "only, and its default FSDP1 is not supported); train with DDP (accelerate launch --config_file "
    "configs/accelerate/multi_gpu_ddp.yaml) or DeepSpeed (configs/accelerate/deepspeed_zero3.yaml shards the "
    "denoiser), or use FSDP2's fully_shard from Python (README: Sharded training)."
)
ZERO3_REFUSAL = (
    "The model's parameters are partitioned by DeepSpeed ZeRO-3, but the optimizer is not the ZeRO-3 optimizer that "
    "steps them: pass attach the engine and the optimizer that deepspeed.initialize (or accelerator.prepare) returns."
)


def is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process's shard: a DTensor, or a parameter ZeRO partitions, which must
    be passed itself, not detached; for a trained one ZeRO's fp32 copy)."""
    if needs_gathering(tensor):
        return whole_copy(tensor)
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `reference` is: this process's shard of it where `reference` is sharded."""
    if not is_sharded(reference):
        return full
    return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard (its own storage: writing into it writes into the tensor)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_positions(positions: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The entries of the 1-D `reference` at the (whole-tensor) `positions` that this process holds, as positions
    in its shard."""
    if not is_sharded(reference):
        return positions
    held = local(like(torch.arange(reference.shape[0], device=positions.device), reference))
    if held.numel() == 0:
        return positions[:0]
    start, end = int(held[0]), int(held[-1]) + 1
    return positions[(positions >= start) & (positions < end)] - start


def forward_needs_every_process(model: nn.Module) -> bool:
    """Whether the model's forward is a collective (it gathers FSDP2 DTensors or ZeRO-3 partitions), so that every
    process must run it, e.g. to sample validation images, not the main one alone."""
    return any(is_sharded(param) or is_zero3_partitioned(param) for param in model.parameters())


def reading_needs_every_process(model: nn.Module) -> bool:
    """Whether reading the model's whole trained values (its adapter's state dict) is a collective: some are FSDP2
    DTensors, ZeRO-3 partitions or ZeRO-1/2's fp32 copies of half-precision values, so every process must take part,
    not the main one alone."""
    return any(is_sharded(param) or needs_gathering(param) for param in model.parameters())


def unsupported_engine(models: Iterable[nn.Module], optimizer: Any) -> str | None:
    """Why SaRA cannot train these models with this optimizer (a DeepSpeed optimizer other than ZeRO's, or a
    DeepSpeed engine without one; ZeRO-3 partitioned parameters without ZeRO-3's optimizer), as one line naming the
    fix; None where it can. (FSDP1's own limits are `fsdp1`'s.)"""
    zero = zero_optimizer(optimizer)
    wrapped = optimizer
    while wrapped is not None and wrapped is not zero:
        if _from_deepspeed(wrapped):
            return DEEPSPEED_REFUSAL
        wrapped = getattr(wrapped, "optimizer", None)
    for model in models:
        if _from_deepspeed(model) and zero is None:
            return DEEPSPEED_REFUSAL
        if not is_stage3(zero) and any(is_zero3_partitioned(param) for param in model.parameters()):
            return ZERO3_REFUSAL
    return None


def unsupported_launch(distributed_type: str, zero_stage: int | None = None, offload: bool = False) -> str | None:
    """Why a training script cannot run under accelerate's engine of this launch (its `DistributedType` name and,
    for DeepSpeed, the ZeRO stage and whether anything is offloaded), said before any model is loaded; None where
    it can."""
    if distributed_type == "DEEPSPEED" and (zero_stage not in (1, 2, 3) or offload):
        return ACCELERATE_DEEPSPEED_REFUSAL
    if distributed_type == "FSDP":
        return ACCELERATE_FSDP_REFUSAL
    return None


def _from_deepspeed(thing: Any) -> bool:
    # by module name, so that recognising DeepSpeed's classes does not import (or need) DeepSpeed
    return type(thing).__module__.split(".")[0] == "deepspeed"
