"""A step's host inputs reach the device in one packed copy, each part with its dtype and shape;
or stay in pinned host buffers that the device reads in place (PinnedStaging)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayfleet.replicas.transfer import PinnedStaging, to_device_packed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_parts_keep_values_dtypes_and_shapes(device: str) -> None:
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    parts = [
        ([5, -1, 2**40], torch.int64),  # needs 64 bits
        ([0, 1, 3], torch.int32),  # 12 bytes: the next part starts 16-byte aligned again
        (table, torch.int32),
        ([], torch.int64),  # empty parts are fine
        ([0.5, -2.25], torch.float32),
        ([True, False, True], torch.bool),
        ([7], torch.int64),
    ]
    out = to_device_packed(parts, torch.device(device))
    assert [t.dtype for t in out] == [dtype for _, dtype in parts]
    assert [tuple(t.shape) for t in out] == [(3,), (3,), (3, 4), (0,), (2,), (3,), (1,)]
    assert all(t.device.type == device for t in out)
    assert all(t.data_ptr() % 16 == 0 for t in out if t.numel())
    for t, (values, dtype) in zip(out, parts):
        assert torch.equal(t.cpu(), torch.as_tensor(np.array(values), dtype=dtype))
    table[0, 0] = 99  # the copy does not alias the caller's array
    assert int(out[2][0, 0]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_parts_are_independent_tensors_in_place(device: str) -> None:
    """Writing into one part (the runner fills input ids in place) leaves its neighbours alone."""
    ids, positions = to_device_packed(
        [([1, 2, 3], torch.int64), ([10, 11, 12], torch.int64)], torch.device(device)
    )
    ids[torch.tensor([2], device=device)] = torch.tensor([42], device=device)
    assert ids.cpu().tolist() == [1, 2, 42] and positions.cpu().tolist() == [10, 11, 12]


@pytest.mark.parametrize("device", DEVICES)
def test_staged_parts_are_pinned_views_reused_only_after_their_readers(device: str) -> None:
    ring = PinnedStaging(torch.device(device), slots=2)
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    ids, tab = ring.stage([([4, 5], torch.int64), (table, torch.int32)])
    assert ids.tolist() == [4, 5] and tab.tolist() == table.tolist()
    assert ids.device.type == "cpu" and ids.is_pinned() == (device == "cuda")
    assert tab.data_ptr() % 16 == 0
    if device == "cuda":
        dev = torch.zeros(2, dtype=torch.int64, device=device)
        torch.cuda._sleep(50_000_000)  # a long kernel ahead of the reader (~tens of ms)
        dev.copy_(ids, non_blocking=True)  # the reader
        ring.queued()
        ring.stage([([1, 2], torch.int64)])  # the other slot: no wait
        ring.queued()
        ring.stage([([7, 8], torch.int64)])  # the first slot again: waits for its reader
        assert dev.tolist() == [4, 5]  # which read the values staged for it
