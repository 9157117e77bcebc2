"""Host values to the device without waiting for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the copy wait
for the work already queued on the stream: with overlapped scheduling (and between a proposal's
draft steps) that would stall the host for a whole step. Staging through pinned memory (torch's
caching host allocator, which keeps a buffer until its copy is done) lets the copy queue instead.
"""

from __future__ import annotations

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


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on ``device``."""
    return to_device(values, torch.long, device)
