"""A step's host inputs reach the device in one packed copy, each part with its dtype and shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayfleet.replicas.transfer import to_device_packed

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
