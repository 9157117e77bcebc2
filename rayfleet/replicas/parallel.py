"""Tensor-parallel state of this process (rank, group size) and the collectives layers use.

The defaults (rank 0 of 1) make every collective an identity, so a single-GPU or CPU replica never
touches ``torch.distributed``. A TP worker calls ``set_tensor_parallel(rank, size)`` once, after
``torch.distributed.init_process_group`` and before building its model: layers read the state at
construction time to size their shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelState:
    rank: int = 0
    size: int = 1


_state = TensorParallelState()


def set_tensor_parallel(rank: int, size: int) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"invalid tensor-parallel rank {rank} of size {size}")
    global _state
    _state = TensorParallelState(rank, size)


def get_tp_rank() -> int:
    return _state.rank


def get_tp_size() -> int:
    return _state.size


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the TP group (in place when size > 1); identity for a group of one."""
    if _state.size == 1:
        return t
    dist.all_reduce(t)
    return t


def all_gather(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in rank order; identity for a group of one."""
    if _state.size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_state.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)
