"""Triton paged attention and KV write against the torch reference (CPU: Triton interpreter)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rayfleet import kernels  # noqa: E402
from rayfleet.kernels import attention_ref, triton_attention, triton_ops  # noqa: E402
from rayfleet.kernels.attention_ref import AttentionMetadata  # noqa: E402

Tol = Callable[[torch.dtype], dict[str, float]]


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    k_new: torch.Tensor  # [T, Hkv, D]
    v_new: torch.Tensor  # [T, Hkv, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata


def build_batch(
    ctx_lens: list[int],
    new_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
) -> PagedBatch:
    """A varlen batch over a paged cache with shuffled, non-contiguous block ids.

    Every cache entry no request may read is NaN: the null block 0, spare blocks, and the slots
    past each request's context in its last block. A kernel that reads them (even masked to
    zero weight afterwards) produces NaN.
    """
    blocks_per = [-(-n // block_size) for n in ctx_lens]
    num_blocks = 1 + sum(blocks_per) + 3  # null block + used + spare
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(blocks_per) + 2  # padded with 0 (the null block)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    readable = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    tables, slots, qsl = [], [], [0]
    for ctx, new, nb in zip(ctx_lens, new_lens, blocks_per):
        row = [ids.pop() for _ in range(nb)]
        readable[row] = True
        readable[row[-1], (ctx - 1) % block_size + 1 :] = False
        slots += [row[p // block_size] * block_size + p % block_size for p in range(ctx - new, ctx)]
        tables.append(row + [0] * (max_blocks - nb))
        qsl.append(qsl[-1] + new)
    k_cache[~readable] = float("nan")
    v_cache[~readable] = float("nan")
    t = qsl[-1]
    q = torch.randn(t, num_heads, head_dim, generator=gen)
    k_new = torch.randn(t, num_kv_heads, head_dim, generator=gen)
    v_new = torch.randn(t, num_kv_heads, head_dim, generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=max(new_lens),
        max_seq_len=max(ctx_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(ctx_lens),
    )

    def to(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    return PagedBatch(to(q), to(k_new), to(v_new), to(k_cache), to(v_cache), meta)


def check_attention(
    b: PagedBatch,
    tol: Tol,
    *,
    scale: float = 0.3,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> None:
    out = triton_attention.paged_attention(
        b.q, b.k_cache, b.v_cache, b.meta, scale, sliding_window, num_splits=num_splits
    )
    ref = attention_ref.paged_attention(b.q, b.k_cache, b.v_cache, b.meta, scale, sliding_window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), **tol(b.q.dtype))


def test_registered() -> None:
    assert "triton" in kernels.backends("paged_attention")
    assert kernels.get("paged_attention", "triton") is triton_attention.paged_attention
    assert kernels.get("write_kv", "triton") is triton_ops.write_kv
    assert kernels.backends("write_kv")[0] == "torch"  # the reference stays the default


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_block_boundaries(
    group: int, num_splits: int, device: str, gen: torch.Generator, tol: Tol
) -> None:
    """One new token per request, contexts on and around block boundaries (block_size 16)."""
    ctx = [1, 15, 16, 17, 32, 33]
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
    check_attention(b, tol, num_splits=num_splits)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "group"),
    [
        (torch.float32, 64, 4),
        (torch.bfloat16, 128, 4),
        (torch.float16, 64, 8),
        (torch.float32, 128, 1),
    ],
)
def test_mixed_batch_with_kv_write(
    dtype: torch.dtype, head_dim: int, group: int, device: str, gen: torch.Generator, tol: Tol
) -> None:
    """Decode + full prefill + extend (cached prefix + new tokens) + a block_size+1 query + a
    request with no new tokens, K/V of the new tokens written by the Triton write_kv first."""
    ctx = [17, 40, 33, 23, 9]
    new = [1, 40, 17, 0, 2]
    b = build_batch(
        ctx,
        new,
        num_heads=group,
        num_kv_heads=1,
        head_dim=head_dim,
        block_size=16,
        dtype=dtype,
        device=device,
        gen=gen,
    )
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    triton_ops.write_kv(b.k_new, b.v_new, b.k_cache, b.v_cache, b.meta.slot_mapping)
    attention_ref.write_kv(b.k_new, b.v_new, k_ref, v_ref, b.meta.slot_mapping)
    torch.testing.assert_close(b.k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b.v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    check_attention(b, tol)


@pytest.mark.parametrize(("window", "num_splits"), [(1, 1), (8, 1), (20, 4), (5, 2)])
def test_sliding_window(
    window: int, num_splits: int, device: str, gen: torch.Generator, tol: Tol
) -> None:
    b = build_batch(
        [50, 1, 33, 20],
        [1, 1, 17, 20],
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    check_attention(b, tol, sliding_window=window, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [2, 5, 16])
def test_split_kv(num_splits: int, device: str, gen: torch.Generator, tol: Tol) -> None:
    """Forced splits, including more splits than KV chunks (empty splits must combine to 0)."""
    b = build_batch(
        [200, 3, 64, 65],
        [1, 2, 4, 1],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.bfloat16,
        device=device,
        gen=gen,
    )
    check_attention(b, tol, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size: int, device: str, gen: torch.Generator, tol: Tol) -> None:
    b = build_batch(
        [block_size + 1, 2 * block_size, 70],
        [block_size + 1, 1, 3],
        num_heads=4,
        num_kv_heads=4,
        head_dim=32,
        block_size=block_size,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    check_attention(b, tol, num_splits=None)
    check_attention(b, tol, num_splits=2)


def test_noncontiguous_q_view(device: str, gen: torch.Generator, tol: Tol) -> None:
    """q as a head-strided view of a fused qkv projection, as the model produces it."""
    b = build_batch(
        [20, 5],
        [4, 5],
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        gen=gen,
    )
    t = b.q.shape[0]
    qkv = torch.randn(t, (4 + 2 * 2) * 64, generator=gen).to(device)  # [T, (Hq + 2 Hkv) * D]
    b.q = qkv[:, : 4 * 64].view(t, 4, 64)
    assert not b.q.is_contiguous()
    check_attention(b, tol)


def test_split_heuristic() -> None:
    # few long decodes on a 132-SM GPU: split; big batches, prefills and short contexts: don't
    assert triton_attention.choose_num_splits(1, 1, 8, 1, 32768, 132) > 1
    assert triton_attention.choose_num_splits(256, 1, 8, 1, 32768, 132) == 1
    assert triton_attention.choose_num_splits(1, 64, 8, 1024, 32768, 132) == 1
    assert triton_attention.choose_num_splits(1, 1, 8, 1, 128, 132) == 1
    # 4 seqs x 8 kv heads = 32 programs; decode wants 4 per SM, 528 -> 17 splits (4096 // 128 =
    # 32 allowed); queries of 2+ tokens want 2 per SM, 264 -> 9
    assert triton_attention.choose_num_splits(4, 1, 8, 1, 4096, 132) == 17
    assert triton_attention.choose_num_splits(4, 1, 8, 2, 4096, 132) == 9
    assert triton_attention.choose_num_splits(4, 1, 8, 1, 1024, 132) == 8  # 1024 // 128


def test_write_kv_skips_negative_slots(device: str, gen: torch.Generator) -> None:
    k = torch.randn(4, 2, 16, generator=gen).to(device)
    v = torch.randn(4, 2, 16, generator=gen).to(device)
    k_cache = torch.zeros(3, 4, 2, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, -1, 11, 0], dtype=torch.int64, device=device)
    triton_ops.write_kv(k, v, k_cache, v_cache, slots)
    keep = torch.tensor([0, 2, 3])
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    attention_ref.write_kv(k[keep], v[keep], k_ref, v_ref, slots[keep])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_llama3_8b_shapes_gpu(num_splits: int | None, gen: torch.Generator, tol: Tol) -> None:
    """Llama-3-8B heads (32 q / 8 kv, head_dim 128), bf16, long contexts and a mixed batch."""
    ctx = [4097, 1, 300, 2048, 777, 16, 1500]
    new = [1, 1, 300, 129, 1, 16, 5]
    b = build_batch(
        ctx,
        new,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        device="cuda",
        gen=gen,
    )
    check_attention(b, tol, num_splits=num_splits)
    check_attention(b, tol, sliding_window=512, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_long_decode_batch_gpu(gen: torch.Generator, tol: Tol) -> None:
    ctx = [32768, 9000, 1, 17]
    b = build_batch(
        ctx,
        [1] * len(ctx),
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        device="cuda",
        gen=gen,
    )
    check_attention(b, tol)


def _compiled_variants() -> int:
    """Kernels compiled so far for the attention and combine kernels (all devices)."""
    return sum(
        len(caches[0])
        for kernel in (triton_attention._paged_attention_kernel, triton_attention._combine_kernel)
        for caches in kernel.device_caches.values()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim,window", [(128, None), (64, None), (128, 512)])
def test_warm_up_leaves_nothing_to_compile_while_serving(
    head_dim: int, window: int | None, gen: torch.Generator, tol: Tol
) -> None:
    """After warm_up, batches of any shape (query lengths 1..300, 1..64 requests, contexts up
    to 5k, split or not) reuse compiled kernels: no compile stalls a step mid-serving."""
    triton_attention.warm_up(32, 8, head_dim, 16, torch.bfloat16, torch.device("cuda"), window)
    before = _compiled_variants()

    def batch(ctx: list[int], new: list[int]) -> PagedBatch:
        return build_batch(
            ctx,
            new,
            num_heads=32,
            num_kv_heads=8,
            head_dim=head_dim,
            block_size=16,
            dtype=torch.bfloat16,
            device="cuda",
            gen=gen,
        )

    rng = torch.Generator().manual_seed(0)
    for _ in range(24):
        n = int(torch.randint(1, 65, (1,), generator=rng))
        q_max = int(torch.randint(1, 301, (1,), generator=rng))
        new = torch.randint(1, q_max + 1, (n,), generator=rng).tolist()
        ctx = [q + int(torch.randint(0, 5000, (1,), generator=rng)) for q in new]
        check_attention(batch(ctx, new), tol, sliding_window=window)
        if q_max == 1 or _ % 6 == 0:  # decode batches also run with RoPE + KV write fused
            d = batch([c - q + 1 for c, q in zip(ctx, new)], [1] * n)
            cos = torch.ones(n, head_dim, dtype=torch.bfloat16, device="cuda")
            triton_attention.rope_write_kv_attention(
                d.q, d.k_new, d.v_new, cos, cos, d.k_cache, d.v_cache, d.meta, 0.1, window
            )
    # split multi-token batches (verification steps, a draft's first forward) of the decode
    # tile config: full-width KV steps, unlike split single-token tiles
    for q in (2, 3, 4):
        check_attention(batch([3000, 2000], [q, q]), tol, sliding_window=window)
    assert _compiled_variants() == before
