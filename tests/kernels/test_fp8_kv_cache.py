"""An fp8 (e4m3) KV cache: every writer stores the same bytes as the reference
(``attention_ref.to_cache_dtype``: saturate at +-448, round to nearest even), and every attention
backend reads it back into the model dtype and matches the reference over the same cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rayfleet.kernels import (  # noqa: E402
    attention_ref,
    attention_sdpa,
    ops_ref,
    triton_attention,
    triton_ops,
)
from tests.kernels.test_triton_attention import build_batch  # noqa: E402

Tol = Callable[[torch.dtype], dict[str, float]]
FP8 = torch.float8_e4m3fn


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8)


def test_reference_conversion_saturates_and_rounds_to_nearest_even() -> None:
    x = torch.tensor([1000.0, -1000.0, 448.0, 100.0, -25.0, 0.001, 2.0**-10, 0.0])
    got = attention_ref.to_cache_dtype(x, FP8).float().tolist()
    # 100 and -25 are ties between e4m3 neighbours (96 | 104, -24 | -26): the even one wins;
    # 0.001 is a subnormal: 0.512 units of 2^-9, so one unit; 2^-10 is a tie: to 0
    assert got == [448.0, -448.0, 448.0, 96.0, -24.0, 2.0**-9, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_writers_store_the_reference_bytes(
    dtype: torch.dtype, device: str, gen: torch.Generator
) -> None:
    t, hq, hkv, d, bs = 7, 4, 2, 64, 16
    # large and small magnitudes: saturation, ties and e4m3 subnormals all occur
    scale = torch.tensor([300.0, 1.0, 0.01, 30.0, 600.0, 0.002, 5.0])[:, None, None]
    k = (torch.randn(t, hkv, d, generator=gen) * scale).to(device=device, dtype=dtype)
    v = (torch.randn(t, hkv, d, generator=gen) * scale).to(device=device, dtype=dtype)
    q = torch.randn(t, hq, d, generator=gen).to(device=device, dtype=dtype)
    slots = torch.tensor([17, 18, -1, 63, 5, 40, 0], dtype=torch.int64, device=device)
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
    freqs = torch.arange(d // 2, device=device, dtype=torch.float32)[None] / d
    angles = torch.cat([pos * freqs, pos * freqs], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def caches() -> list[torch.Tensor]:
        return [torch.zeros(4, bs, hkv, d, dtype=FP8, device=device) for _ in range(4)]

    kc, vc, kr, vr = caches()
    triton_ops.write_kv(k[slots >= 0], v[slots >= 0], kc, vc, slots[slots >= 0])
    attention_ref.write_kv(k[slots >= 0], v[slots >= 0], kr, vr, slots[slots >= 0])
    assert torch.equal(as_bytes(kc), as_bytes(kr)) and torch.equal(as_bytes(vc), as_bytes(vr))
    assert kr.float().abs().max() == 448.0  # saturated, not NaN

    kc, vc, kr, vr = caches()
    out_q = triton_ops.rope_and_write_kv(q, k, v, cos, sin, kc, vc, slots)
    ref_q = ops_ref.rope_and_write_kv(q, k, v, cos, sin, kr, vr, slots)
    assert torch.equal(as_bytes(vc), as_bytes(vr))
    torch.testing.assert_close(out_q, ref_q, rtol=1e-2, atol=1e-2)
    # The rotated k is rounded to the model dtype, then converted. Compiled for a GPU the rotation
    # differs from torch's in the last bit for about a fifth of fp16/fp32 elements (H100; the
    # interpreter matches torch), so the fp8 bytes must equal the reference conversion of the
    # kernel's own rotated k.
    k_rot = torch.zeros(4, bs, hkv, d, dtype=dtype, device=device)
    triton_ops.rope_and_write_kv(q, k, v, cos, sin, k_rot, torch.zeros_like(k_rot), slots)
    assert torch.equal(as_bytes(kc), as_bytes(attention_ref.to_cache_dtype(k_rot, FP8)))


@pytest.mark.parametrize(
    ("dtype", "new", "num_splits"),
    [
        (torch.bfloat16, [1, 1, 1, 1], 1),  # decode
        (torch.bfloat16, [1, 1, 1, 1], 3),  # decode, split KV + combine
        (torch.float16, [1, 40, 17, 2], None),  # decode + prefill + extend
        (torch.float32, [5, 1, 9, 3], None),  # multi-token queries (speculative verify)
    ],
)
def test_attention_reads_fp8_cache(
    dtype: torch.dtype,
    new: list[int],
    num_splits: int | None,
    device: str,
    gen: torch.Generator,
    tol: Tol,
) -> None:
    ctx = [17, 40, 33, 23]
    b = build_batch(
        ctx,
        new,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=dtype,
        device=device,
        gen=gen,
    )
    # NaN (unreadable slots) stays NaN in fp8: a Triton kernel that reads them still fails.
    # Values are scaled up 4x so that e4m3's rounding shows (tolerances scale with them).
    k8 = attention_ref.to_cache_dtype(b.k_cache * 4, FP8)
    v8 = attention_ref.to_cache_dtype(b.v_cache * 4, FP8)
    close = {key: 4 * val for key, val in tol(dtype).items()}
    ref = attention_ref.paged_attention(b.q, k8, v8, b.meta, 0.3, None)
    assert ref.dtype == dtype and not ref.isnan().any()
    out = triton_attention.paged_attention(b.q, k8, v8, b.meta, 0.3, None, num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), **close)
    # the reference over the fp8 cache is the reference over its values in the model dtype
    ref_hi = attention_ref.paged_attention(b.q, k8.to(dtype), v8.to(dtype), b.meta, 0.3, None)
    torch.testing.assert_close(ref, ref_hi, rtol=0, atol=0)
    # SDPA gathers whole blocks and masks scores, so its cache holds zeros where others hold NaN
    k8, v8 = (
        attention_ref.to_cache_dtype(c.nan_to_num(0.0) * 4, FP8) for c in (b.k_cache, b.v_cache)
    )
    sdpa = attention_sdpa.paged_attention_sdpa(b.q, k8, v8, b.meta, 0.3, None)
    ref = attention_ref.paged_attention(b.q, k8, v8, b.meta, 0.3, None)
    torch.testing.assert_close(sdpa.float(), ref.float(), **close)


def test_nan_stays_nan(device: str) -> None:
    """A NaN K/V value is stored as NaN by every writer, not clamped to a finite value."""
    k = torch.tensor([[[float("nan"), -float("nan"), 1.0, 500.0]]], device=device)  # [1, 1, 4]
    caches = [torch.zeros(2, 4, 1, 4, dtype=FP8, device=device) for _ in range(4)]
    slot = torch.tensor([5], device=device)
    triton_ops.write_kv(k, k, caches[0], caches[1], slot)
    attention_ref.write_kv(k, k, caches[2], caches[3], slot)
    for c in caches:
        assert c.float().view(-1, 4)[5].tolist()[2:] == [1.0, 448.0]
        assert c.float().view(-1, 4)[5].isnan().tolist() == [True, True, False, False]
