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


def _pack(
    parts: Sequence[tuple[Sequence[int] | Sequence[float] | np.ndarray, torch.dtype]],
) -> tuple[list[np.ndarray], list[int], int]:
    """The parts as numpy arrays, their byte offsets in one buffer (16-byte aligned) and its
    size. 16 bytes: Triton specializes kernels on 16-byte aligned pointers, and a part that
    were not would compile another variant mid-step."""
    arrays = [np.array(values, dtype=_NUMPY[dtype]) for values, dtype in parts]
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // 16) * 16
    return arrays, offsets, max(total, 16)


def _fill(
    buf: torch.Tensor, arrays: list[np.ndarray], offsets: list[int], dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """Write the arrays into the byte buffer ``buf`` (host) and return typed views of ``buf``."""
    raw = buf.numpy()
    for a, off in zip(arrays, offsets):
        raw[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
    return _views(buf, arrays, offsets, dtypes)


def _views(
    buf: torch.Tensor, arrays: list[np.ndarray], offsets: list[int], dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """Typed views of the byte buffer ``buf`` (any device) where ``_pack`` placed the arrays."""
    return [
        buf[off : off + a.nbytes].view(dtype).view(a.shape)
        for a, off, dtype in zip(arrays, offsets, dtypes)
    ]


def to_device_packed(
    parts: Sequence[tuple[Sequence[int] | Sequence[float] | np.ndarray, torch.dtype]],
    device: torch.device,
) -> list[torch.Tensor]:
    """Several host arrays (``(values, dtype)``, any shape) on ``device`` with one copy: packed
    into one pinned byte buffer, each part at a 16-byte aligned offset, and returned as typed
    views of the device buffer. A step's inputs take one transfer instead of one each (each
    small copy costs the stream a few microseconds)."""
    arrays, offsets, total = _pack(parts)
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    dtypes = [dtype for _, dtype in parts]
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    _fill(host, arrays, offsets, dtypes)
    return _views(host.to(device, non_blocking=True), arrays, offsets, dtypes)


class PinnedStaging:
    """Pinned host buffers that device kernels read or write in place (pinned memory is
    device-accessible under unified addressing): no copy, and no turn of the copy engine on the
    stream.

    A ring: ``take`` hands out the next buffer and ``queued`` records an event once the kernels
    using it are queued; a buffer is handed out again only after its event has completed
    (``slots`` takes later, long done unless the host runs that far ahead), so no kernel still
    touches it and nothing returns it to torch's allocator meanwhile. On a CPU device the
    buffers are plain host tensors."""

    def __init__(self, device: torch.device, slots: int = 4) -> None:
        self.device = device
        self._bufs: list[torch.Tensor | None] = [None] * slots
        # (an event never recorded is complete: synchronizing on it returns at once)
        self._events = [torch.cuda.Event() for _ in range(slots)] if device.type == "cuda" else []
        self._i = 0

    def take(self, nbytes: int) -> torch.Tensor:  # [>= nbytes] uint8
        if self.device.type != "cuda":
            return torch.empty(nbytes, dtype=torch.uint8)
        self._i = (self._i + 1) % len(self._bufs)
        self._events[self._i].synchronize()  # the kernels that used it have run
        buf = self._bufs[self._i]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 4096), dtype=torch.uint8, pin_memory=True)
            self._bufs[self._i] = buf
        return buf

    def take_ids(self, n: int) -> torch.Tensor:  # [n] int64
        """The next buffer as n int64 token ids (a kernel or a copy stores them there)."""
        return self.take(8 * n)[: 8 * n].view(torch.int64)

    def stage(
        self, parts: Sequence[tuple[Sequence[int] | Sequence[float] | np.ndarray, torch.dtype]]
    ) -> list[torch.Tensor]:
        """The host arrays ``(values, dtype)`` in the next buffer, as typed views."""
        arrays, offsets, total = _pack(parts)
        if self.device.type != "cuda":
            return [torch.from_numpy(a) for a in arrays]
        return _fill(self.take(total), arrays, offsets, [dtype for _, dtype in parts])

    def queued(self) -> None:
        """The kernels using the last buffer taken are queued on the stream."""
        if self.device.type == "cuda":
            self._events[self._i].record()


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on ``device``."""
    return to_device(values, torch.long, device)
