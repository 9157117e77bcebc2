"""Paged attention through torch's scaled_dot_product_attention (backend "sdpa").

Same contract as the reference in attention_ref.py, built for speed with stock torch:

- decode rows (one new token) of the whole batch in one call: their blocks are gathered into a
  padded [num_decode, max_blocks * block_size] key/value tensor and masked past each context;
- other rows (prefill chunks, multi-token queries) one call each, bottom-right causal (the new
  tokens are the last ones of the context), so SDPA's fused kernels run without a dense mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayfleet.kernels import register
from rayfleet.kernels.attention_ref import AttentionMetadata, gather_blocks


def _gather(
    cache: torch.Tensor, table: torch.Tensor, n_blocks: int, dtype: torch.dtype
) -> torch.Tensor:
    # cache [num_blocks, bs, Hkv, D], table [B, >=n_blocks] -> [B, Hkv, n_blocks * bs, D] in dtype
    # (an fp8 cache is read into the model dtype)
    g = gather_blocks(cache, table[:, :n_blocks].long()).to(dtype)  # [B, n_blocks, bs, Hkv, D]
    b, nb, bs, h, d = g.shape
    return g.reshape(b, nb * bs, h, d).transpose(1, 2)


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


@register("paged_attention", "sdpa", priority=1)
def paged_attention_sdpa(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu
    seq_lens = meta.seq_lens_cpu
    decode = [s for s in range(len(seq_lens)) if qsl[s + 1] - qsl[s] == 1]
    if decode:
        rows = torch.tensor(decode, device=q.device)
        tok = torch.tensor([qsl[s] for s in decode], device=q.device)
        max_len = max(seq_lens[s] for s in decode)
        n_blocks = -(-max_len // block_size)
        k = _expand_kv(_gather(k_cache, meta.block_tables[rows], n_blocks, q.dtype), group)
        v = _expand_kv(_gather(v_cache, meta.block_tables[rows], n_blocks, q.dtype), group)
        lens = meta.seq_lens[rows].unsqueeze(1)  # [B, 1]
        pos = torch.arange(n_blocks * block_size, device=q.device).unsqueeze(0)
        mask = pos < lens  # key j visible to the query at position len-1 iff j < len
        if sliding_window is not None:
            mask &= pos > lens - 1 - sliding_window
        qd = q[tok].unsqueeze(2)  # [B, H, 1, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask[:, None, None, :], scale=scale)
        out[tok] = o.squeeze(2)
    for s in range(len(seq_lens)):
        start, end = qsl[s], qsl[s + 1]
        n = end - start
        if n <= 1:
            continue
        ctx = seq_lens[s]
        n_blocks = -(-ctx // block_size)
        table = meta.block_tables[s : s + 1]
        k = _expand_kv(_gather(k_cache, table, n_blocks, q.dtype)[:, :, :ctx], group)
        v = _expand_kv(_gather(v_cache, table, n_blocks, q.dtype)[:, :, :ctx], group)
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if sliding_window is None and ctx == n:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
        else:
            q_pos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
            k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out
