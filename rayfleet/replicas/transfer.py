"""Host values to the device without waiting for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the copy wait
for the work already queued on the stream: with overlapped scheduling (and between a proposal's
draft steps) that would stall the host for a whole step. Staging through pinned memory (torch's
caching host allocator, which keeps a buffer until its copy is done) lets the copy queue instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(
    values: list[int] | list[float] | list[bool] | np.ndarray | torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``values`` (a list, a numpy array or a host tensor) as ``dtype`` on ``device``."""
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    elif isinstance(values, np.ndarray):
        host = torch.from_numpy(values).to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


_NUMPY = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.float32: np.float32,
    torch.bool: np.bool_,
}


def to_device_packed(
    parts: Sequence[tuple[Sequence[int] | Sequence[float] | np.ndarray, torch.dtype]],
    device: torch.device,
) -> list[torch.Tensor]:
    """Several host arrays (``(values, dtype)``, any shape) on ``device`` with one copy: packed
    into one pinned byte buffer, each part at a 16-byte aligned offset, and returned as typed
    views of the device buffer. A step's inputs take one transfer instead of one each (each
    small copy costs the stream a few microseconds). 16 bytes: Triton specializes kernels on
    16-byte aligned pointers, and a part that were not would compile another variant mid-step."""
    arrays = [np.array(values, dtype=_NUMPY[dtype]) for values, dtype in parts]
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // 16) * 16
    host = torch.empty(max(total, 16), dtype=torch.uint8, pin_memory=True)
    buf = host.numpy()
    for a, off in zip(arrays, offsets):
        buf[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
    dev = host.to(device, non_blocking=True)
    return [
        dev[off : off + a.nbytes].view(dtype).view(a.shape)
        for a, off, (_, dtype) in zip(arrays, offsets, parts)
    ]


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on ``device``."""
    return to_device(values, torch.long, device)
