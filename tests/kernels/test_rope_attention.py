"""The decode fast path: RoPE + KV write + paged attention in one Triton launch,
against ``rope_and_write_kv`` + ``paged_attention`` (torch reference; CPU: Triton interpreter)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rayfleet import kernels  # noqa: E402
from rayfleet.kernels import ops_ref, triton_attention, triton_ops  # noqa: E402
from tests.kernels.test_triton_attention import PagedBatch, build_batch  # noqa: E402

Tol = Callable[[torch.dtype], dict[str, float]]


def rope_tables(
    t: int, head_dim: int, dtype: torch.dtype, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin [t, head_dim], halves repeated as HF does
    theta = torch.rand(t, head_dim // 2, generator=gen) * 6.3
    theta = torch.cat([theta, theta], dim=-1)
    return theta.cos().to(device, dtype), theta.sin().to(device, dtype)


def poison_new_slots(b: PagedBatch) -> None:
    """NaN at the slots this step writes: attention that reads them before the write sees NaN."""
    slots = b.meta.slot_mapping.cpu()
    page = b.k_cache.shape[1]
    for s in slots[slots >= 0].tolist():
        b.k_cache[s // page, s % page] = float("nan")
        b.v_cache[s // page, s % page] = float("nan")


def check_fused(
    b: PagedBatch,
    tol: Tol,
    gen: torch.Generator,
    *,
    num_splits: int | None,
    sliding_window: int | None = None,
    strided: bool = False,
) -> None:
    """``strided``: the kernel gets sin with a row stride unlike cos's and k with a last-dim
    stride of 2 (same values); the references get the plain tensors."""
    t, _, d = b.q.shape
    cos, sin = rope_tables(t, d, b.q.dtype, b.q.device.type, gen)
    k_in, sin_in = b.k_new, sin
    if strided:
        sin_in = torch.cat([sin, sin], dim=-1)[:, :d]
        k_in = torch.stack([b.k_new, b.k_new], dim=-1)[..., 0]
        assert sin_in.stride(0) != cos.stride(0) and k_in.stride(-1) == 2
    poison_new_slots(b)
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    k_unfused, v_unfused = b.k_cache.clone(), b.v_cache.clone()
    ref = ops_ref.rope_write_kv_attention(
        b.q, b.k_new, b.v_new, cos, sin, k_ref, v_ref, b.meta, 0.3, sliding_window
    )
    out = triton_attention.paged_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.meta,
        0.3,
        sliding_window,
        num_splits=num_splits,
        rope=(k_in, b.v_new, cos, sin_in),
    )
    # The cache holds exactly what the unfused Triton op writes (same rounding of rotated k).
    triton_ops.rope_and_write_kv(
        b.q, b.k_new, b.v_new, cos, sin, k_unfused, v_unfused, b.meta.slot_mapping
    )
    torch.testing.assert_close(b.k_cache, k_unfused, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b.v_cache, v_unfused, rtol=0, atol=0, equal_nan=True)
    rows = b.meta.query_start_loc_cpu[-1]
    assert not out[:rows].isnan().any()
    torch.testing.assert_close(out[:rows].float(), ref[:rows].float(), **tol(b.q.dtype))


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_around_block_boundaries(
    group: int, num_splits: int, device: str, gen: torch.Generator, tol: Tol
) -> None:
    """Contexts of 1, block_size +- 1, 2 * block_size + 1 tokens; GQA ratios 1/4/8."""
    ctx = [1, 15, 16, 17, 33]
    b = build_batch(
        ctx,
        [1] * len(ctx),
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    check_fused(b, tol, gen, num_splits=num_splits)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_splits"),
    [(torch.bfloat16, 128, None), (torch.bfloat16, 128, 5), (torch.float16, 64, 2)],
)
def test_half_dtypes(
    dtype: torch.dtype,
    head_dim: int,
    num_splits: int | None,
    device: str,
    gen: torch.Generator,
    tol: Tol,
) -> None:
    b = build_batch(
        [70, 3, 129],
        [1, 1, 1],
        num_heads=8,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=16,
        dtype=dtype,
        device=device,
        gen=gen,
    )
    check_fused(b, tol, gen, num_splits=num_splits)


def test_more_splits_than_chunks_and_sliding_window(
    device: str, gen: torch.Generator, tol: Tol
) -> None:
    """Empty splits merge to nothing; the new token still lands in the split that reads it."""
    b = build_batch(
        [200, 2, 65],
        [1, 1, 1],
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    check_fused(b, tol, gen, num_splits=16, sliding_window=50)


def test_inputs_as_views_with_other_strides(device: str, gen: torch.Generator, tol: Tol) -> None:
    """sin with its own row stride (as a rotary cache may hand it out) and k with a non-unit last
    stride (copied to unit stride first) give the same cache and output."""
    b = build_batch(
        [30, 9],
        [1, 1],
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    check_fused(b, tol, gen, num_splits=None, strided=True)


def test_fp8_cache(device: str, gen: torch.Generator, tol: Tol) -> None:
    b = build_batch(
        [40, 17],
        [1, 1],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.bfloat16,
        device=device,
        gen=gen,
    )
    b.k_cache, b.v_cache = b.k_cache.to(torch.float8_e4m3fn), b.v_cache.to(torch.float8_e4m3fn)
    check_fused(b, tol, gen, num_splits=2)


def skipped_slot_batch(device: str, gen: torch.Generator) -> PagedBatch:
    """Two decoding requests (contexts 5 and 9), the first with slot -1 (CUDA-graph padding)."""
    b = build_batch(
        [5, 9],
        [1, 1],
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        block_size=8,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    b.meta.slot_mapping[0] = -1
    return b


def test_skipped_slot_is_not_written(device: str, gen: torch.Generator) -> None:
    """A slot of -1 (CUDA-graph padding) writes nothing; the other request is served."""
    b = skipped_slot_batch(device, gen)
    before = b.k_cache.clone()
    cos, sin = rope_tables(2, 32, torch.float32, device, gen)
    triton_attention.paged_attention(
        b.q, b.k_cache, b.v_cache, b.meta, 0.3, rope=(b.k_new, b.v_new, cos, sin)
    )
    changed = (b.k_cache != before) & ~(before.isnan() & b.k_cache.isnan())
    slot = int(b.meta.slot_mapping[1])
    assert changed.nonzero()[:, :2].unique(dim=0).tolist() == [[slot // 8, slot % 8]]


def test_registered_op_takes_multi_token_batches(
    device: str, gen: torch.Generator, tol: Tol
) -> None:
    """The registered op fuses decode batches and runs the two kernels for the rest."""
    assert kernels.get_fused("rope_write_kv_attention", "triton") is (
        triton_attention.rope_write_kv_attention
    )
    assert kernels.get_fused("rope_write_kv_attention", "torch") is None
    b = build_batch(
        [20, 33],
        [4, 17],
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    cos, sin = rope_tables(21, 64, torch.float32, device, gen)
    poison_new_slots(b)
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    ref = ops_ref.rope_write_kv_attention(
        b.q, b.k_new, b.v_new, cos, sin, k_ref, v_ref, b.meta, 0.3
    )
    out = triton_attention.rope_write_kv_attention(
        b.q, b.k_new, b.v_new, cos, sin, b.k_cache, b.v_cache, b.meta, 0.3
    )
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    with pytest.raises(ValueError, match="decode batches"):
        triton_attention.paged_attention(
            b.q, b.k_cache, b.v_cache, b.meta, 0.3, rope=(b.k_new, b.v_new, cos, sin)
        )


@pytest.mark.parametrize("num_splits", [None, 2])
def test_skipped_slot_attends_to_the_cache(
    num_splits: int | None, device: str, gen: torch.Generator, tol: Tol
) -> None:
    """A slot of -1 writes nothing, and attention reads what the cache holds at that position,
    as the reference does: split (2 programs, so the first tile is read before the PDL wait)
    or not."""
    check_fused(skipped_slot_batch(device, gen), tol, gen, num_splits=num_splits)


def test_split_new_token_past_the_first_tile(device: str, gen: torch.Generator, tol: Tol) -> None:
    """Few programs, split: the first tile is read before the wait, and the new token (position
    299; split 1 covers [192, 300)) lies in the second, read back from the cache after the
    write."""
    b = build_batch(
        [300, 64, 65],
        [1, 1, 1],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    check_fused(b, tol, gen, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_cache_fp32_model(num_splits: int, device: str, gen: torch.Generator, tol: Tol) -> None:
    """fp32 tolerances over an fp8 cache: the new token's k/v are read as the cache rounds them,
    also where the split's first tile was read before the write (2 requests x 2 KV heads)."""
    b = build_batch(
        [40, 17],
        [1, 1],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    b.k_cache, b.v_cache = b.k_cache.to(torch.float8_e4m3fn), b.v_cache.to(torch.float8_e4m3fn)
    check_fused(b, tol, gen, num_splits=num_splits)
