"""Tensors that a sharding engine splits across processes (FSDP2's `fully_shard` makes every parameter a DTensor
sharded along its first dimension): what SaRA's training logic needs of them, whole or as this process's shard.

`full_tensor` is a collective: every process must call it for the same tensors in the same order, which SaRA's step
hooks do (their decisions depend only on the step count, the seed and the parameters). The other helpers take no
communication. Plain tensors pass through unchanged.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support: nothing can be sharded
    DTensor = distribute_tensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process's shard)."""
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
