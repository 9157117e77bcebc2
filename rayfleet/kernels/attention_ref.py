"""Torch reference for paged attention and the KV-cache write. Runs on CPU and CUDA.

KV cache layout, per layer (the layout flash-attn's paged API also uses):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    token t of a request lives in block  block_table[t // block_size]  at offset  t % block_size
    slot = block_id * block_size + offset   (a flat index into the first two dims)
    dtype: the model's, or float8 e4m3 (``kv_cache_dtype="fp8"``): written through
    ``to_cache_dtype``, read back into the model dtype for the attention math

A batch is "varlen": the new tokens of all requests are concatenated along one token dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayfleet.kernels import register


@dataclass
class AttentionMetadata:
    """Describes one forward batch to the attention op. Built by the runner, read by kernels.

    slot_mapping:    [num_tokens]       int64, cache slot to write each new token's K/V into
    query_start_loc: [num_seqs + 1]     int32, cumulative count of new tokens per request
    seq_lens:        [num_seqs]         int32, context length after this step (cached + new)
    block_tables:    [num_seqs, max_blocks] int32, padded with 0 past each request's blocks
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies for the reference op's per-request loop (no device sync inside the forward).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


FP8_MAX = 448.0  # the largest finite float8 e4m3 (fn) value


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """K/V values as the cache stores them. An fp8 (e4m3, unit scale) cache saturates at
    +-FP8_MAX instead of overflowing to NaN, and rounds to nearest even from fp32."""
    if cache_dtype == torch.float8_e4m3fn:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def gather_blocks(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``cache[index]`` along the block dim; fp8 through bytes (torch < 2.7 cannot index fp8 on
    CUDA)."""
    if cache.dtype == torch.float8_e4m3fn:
        return cache.view(torch.uint8)[index].view(cache.dtype)
    return cache[index]


def store_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache [num_blocks, block_size, H, D] at flat slots [n] <- values [n, H, D] (converted by
    to_cache_dtype). fp8 rows are copied as bytes: torch has no fp8 index_copy on CPU."""
    nb, bs, h, d = cache.shape
    values = to_cache_dtype(values, cache.dtype)
    if cache.dtype == torch.float8_e4m3fn:
        cache, values = cache.view(torch.uint8), values.view(torch.uint8)
    cache.view(nb * bs, h, d).index_copy_(0, slots, values)


@register("write_kv", "torch")
def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    store_slots(k_cache, slot_mapping, k)
    store_slots(v_cache, slot_mapping, v)


@register("paged_attention", "torch")
def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of each request's new tokens to its whole context (cached prefix + new tokens).

    New token i of a request whose context after this step is L and which has n new tokens sits at
    position p = L - n + i and attends to keys at positions j with j <= p (and j > p - window when
    a sliding window is set). Softmax is computed in float32.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu
    for s, ctx_len in enumerate(meta.seq_lens_cpu):
        start, end = qsl[s], qsl[s + 1]
        n_new = end - start
        if n_new == 0:
            continue
        n_blocks = (ctx_len + block_size - 1) // block_size
        blocks = meta.block_tables[s, :n_blocks].long()
        # [L, Hkv, D] in fp32 (exact for every cache dtype)
        k = gather_blocks(k_cache, blocks).reshape(-1, num_kv_heads, head_dim)[:ctx_len].float()
        v = gather_blocks(v_cache, blocks).reshape(-1, num_kv_heads, head_dim)[:ctx_len].float()
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        qs = q[start:end].float().transpose(0, 1)  # [H, n, D]
        scores = torch.matmul(qs, k.float().permute(1, 2, 0)) * scale  # [H, n, L]
        q_pos = torch.arange(ctx_len - n_new, ctx_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(ctx_len, device=q.device).unsqueeze(0)
        mask = k_pos > q_pos
        if sliding_window is not None:
            mask |= k_pos <= q_pos - sliding_window
        scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v.float().transpose(0, 1)).transpose(0, 1).to(q.dtype)
    return out
