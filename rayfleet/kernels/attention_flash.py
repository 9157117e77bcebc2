"""Paged attention through the ``flash-attn`` package (backend "flash_attn"), registered only
where ``flash_attn`` imports and its ``flash_attn_varlen_func`` takes a ``block_table`` (2.5.7+).

Same contract as the reference in attention_ref.py. One varlen call covers the whole batch,
decode rows, prefill chunks, prefix-cache hits and verification queries alike:

    q        [num_tokens, num_heads, head_dim]           the step's new tokens, requests in order
    k/v      [num_blocks, block_size, num_kv_heads, head_dim]  our cache, which is flash-attn's
             paged layout as it is (no copy)
    cu_seqlens_q = meta.query_start_loc; cu_seqlens_k = [0, cumsum(meta.seq_lens)] (only the
             differences are read: a paged sequence's keys come through its block_table row)
    causal   bottom-right aligned: new token i of n in a context of L sits at L - n + i, as here
    window   keys j with p - window < j <= p: flash-attn's window_size = (window - 1, 0)

What flash-attn does not take, it is not asked to (``check_supported``, called by the engine at
start-up so a bad combination fails there, not mid-step): a block size that is not a multiple
of 256 (upstream flash-attn 2.x checks ``page_block_size % 256 == 0`` in both paged entry points;
vLLM ships its own fork for 16), an fp8 KV cache or fp32 (it computes in fp16/bf16 only), head
dims above 256. The K/V write stays ours: "write_kv" and "rope_and_write_kv" of this backend are
the Triton ones where Triton imports.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from rayfleet import kernels
from rayfleet.kernels.attention_ref import AttentionMetadata

BACKEND = "flash_attn"
PAGE_MULTIPLE = 256  # flash-attn 2.x: "Paged KV cache block size must be divisible by 256"
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16)


def check_supported(
    *, block_size: int, dtype: torch.dtype, kv_cache_dtype: torch.dtype, head_dim: int
) -> None:
    """Raise ValueError naming the setting flash-attn's paged attention cannot take."""
    if block_size % PAGE_MULTIPLE:
        raise ValueError(
            f"attention_backend='flash_attn' needs block_size divisible by {PAGE_MULTIPLE} "
            f"(flash-attn's paged KV cache); got block_size={block_size}"
        )
    if dtype not in DTYPES:
        raise ValueError(
            f"attention_backend='flash_attn' computes in float16/bfloat16 only; got dtype={dtype}"
        )
    if kv_cache_dtype != dtype:
        raise ValueError(
            "attention_backend='flash_attn' reads a KV cache of the model dtype only; "
            f"got kv_cache_dtype={kv_cache_dtype} (use kv_cache_dtype='auto')"
        )
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"attention_backend='flash_attn' takes head_dim <= {MAX_HEAD_DIM}; got {head_dim}"
        )


def make_paged_attention(varlen: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The "paged_attention" op over ``varlen`` (``flash_attn.flash_attn_varlen_func``)."""

    def paged_attention_flash(
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        # (check_supported ran at engine start-up: nothing is re-checked per layer and step)
        # [num_seqs + 1] int32 on the device: no host sync, and a CUDA graph replays it.
        cu_k = F.pad(torch.cumsum(meta.seq_lens, 0, dtype=torch.int32), (1, 0))
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        return varlen(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=meta.query_start_loc,
            cu_seqlens_k=cu_k,
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_seq_len,
            softmax_scale=scale,
            causal=True,
            window_size=window,
            block_table=meta.block_tables,
        )

    return paged_attention_flash


def takes_block_table(varlen: Callable[..., Any]) -> bool:
    """Whether this flash-attn's varlen entry point reads a paged cache (2.5.7 and later)."""
    try:
        return "block_table" in inspect.signature(varlen).parameters
    except (TypeError, ValueError):
        return False


def register_backend(varlen: Callable[..., torch.Tensor]) -> bool:
    """Register "flash_attn" for paged_attention over ``varlen`` (and the Triton K/V writes
    under the same name where Triton imports); False when ``varlen`` takes no block table."""
    if not takes_block_table(varlen):
        return False
    kernels.register("paged_attention", BACKEND, priority=0)(make_paged_attention(varlen))
    if "triton" in kernels.backends("write_kv"):
        kernels.register("write_kv", BACKEND, priority=0)(kernels.get("write_kv", "triton"))
    if "triton" in kernels.backends("rope_and_write_kv"):
        fused = kernels.get("rope_and_write_kv", "triton")
        kernels.register("rope_and_write_kv", BACKEND, priority=0)(fused)
    return True


def register_if_installed() -> bool:
    """Called by the registry on first use: registers the backend when flash-attn imports."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # (also: built for another torch / CUDA, which raises ImportError)
        return False
    return register_backend(flash_attn_varlen_func)
