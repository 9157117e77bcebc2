"""Per-row FP8 quantization of a linear's input (``quantize_rows_fp8``, fp8_linear's first step):
the Triton kernel against the torch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rayfleet.kernels import ops_ref, triton_ops  # noqa: E402


@pytest.mark.parametrize("m,k", [(1, 1), (3, 16), (37, 4097), (2, 8192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_bit_for_bit(
    m: int, k: int, dtype: torch.dtype, gen: torch.Generator, device: str
) -> None:
    x = torch.randn(m, k, generator=gen) * torch.logspace(-8, 4, m)[:, None]
    if m > 2:
        x[1] = 0.0  # a zero row: the scale's floor
        x[2, 0] = 1e-30  # a value that rounds to an FP8 subnormal or zero
    x = x.to(device=device, dtype=dtype)
    q, scale = triton_ops.quantize_rows_fp8(x)
    ref_q, ref_scale = ops_ref.quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k) and scale.shape == (m, 1)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    # each nonzero row reaches the top of the range, and the rows round-trip within FP8
    nz = x.float().abs().amax(dim=1) > 0
    assert bool((q.float().abs().amax(dim=1)[nz] == 448.0).all())
    back = q.float() * scale
    assert bool(((back - x.float()).abs() <= 2.0**-4 * x.float().abs() + 2.0**-9 * scale).all())
