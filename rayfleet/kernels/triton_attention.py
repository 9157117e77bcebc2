"""Triton paged attention over the varlen batch: decodes, multi-token queries and prefill chunks.

Same contract as the torch reference (``attention_ref.paged_attention``). One launch covers the
whole batch; a program owns one (request, KV head, query tile[, KV split]):

    M rows of a tile = BLOCK_Q query positions x GROUP_P query heads sharing one KV head (GQA)

        row r  ->  query index  q_tile * BLOCK_Q + r // GROUP_P
                   query head   kv_head * GROUP + r % GROUP_P     (rows of padded heads masked)

    so each K/V tile is loaded once for the whole group and fed to ``tl.dot`` as [M, D] x [D, N].

The KV loop walks token positions [lo, hi) of the request's context in steps of BLOCK_N; each
position is looked up in the block table (``block_tables[seq, pos // block_size]``), so BLOCK_N
is independent of the cache's block size. ``hi`` is the last query position of the tile + 1
(never past ``seq_lens``), ``lo`` is 0 or the sliding window's first key.

Split-KV (decode with long contexts and few programs): the [lo, hi) range of a tile is cut into
``num_splits`` chunks handled by separate programs that write unnormalized partial results
(max, sum, acc) to an fp32 workspace; ``_combine_kernel`` merges them. Softmax runs in fp32 in the
log2 domain (``exp2`` with ``scale * log2(e)`` folded into the scores).

Grid size depends only on host ints (number of requests, ``meta.max_query_len``,
``meta.max_seq_len``), never on device values, so there is no host sync and a launch can be
captured in a CUDA graph with upper-bound metadata.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rayfleet.kernels import register
from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.kernels.triton_ops import (
    from_cache,
    gdc_launch_dependents,
    gdc_wait,
    pdl_enter,
    pdl_launch,
    rope_and_write_kv,
    round_to,
    to_cache,
)

_LOG2E = 1.4426950408889634

# Heuristic knobs for the split-KV decision (see ``choose_num_splits``).
_SPLIT_MAX_QUERY_LEN = 16  # only split batches whose longest query is at most this many tokens
# Never plan a split over fewer context tokens than this: at most max_seq_len // it splits. A
# decode graph plans for its longest context (8192 tokens: up to 64 splits); a shorter context
# leaves the last splits empty, and they end at once.
_SPLIT_MIN_CHUNK = 128
_SPLIT_MAX = 64
# The fused decode variant reads its first KV tile before the PDL wait (PRELOAD) when split and
# the batch has at most this many (request, KV head) programs before splitting. H100 llama-3-8b
# decode steps at 512 tokens of context (.scratch sweep, preload vs not, everything else equal):
# batch 1 (8 programs) 5.340 vs 5.458 ms; batch 4, 8, 16, 64 lose 2.5, 3.3, 4.0, 3.3%.
_PRELOAD_MAX_PROGRAMS = 8


@triton.jit
def _rope(x, x_rot, cos, sin, sign, TY: tl.constexpr):
    """x * cos + rotate_half(x) * sin over whole heads, fp32 in, rounded as the torch expression
    rounds in ``TY`` (each product, then the sum; see triton_ops._rope_rotate). ``x_rot`` is x
    with its halves swapped, ``sign`` -1 on the first half, +1 on the second."""
    a = round_to(x * cos, TY).to(tl.float32)
    b = round_to((sign * x_rot) * sin, TY).to(tl.float32)
    return round_to(a + b, TY)


@triton.jit
def _kv_tile_offsets(bt_row, pos, ok, PAGE: tl.constexpr):
    """(cache block, offset in it) [N] of context positions ``pos`` from the block table."""
    block = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
    return block, pos % PAGE


@triton.jit
def _load_k(k_base, block, offset, ok, dims, stride_kb, stride_ks, DT: tl.constexpr):
    """K^T [D, N] (zeros where not ``ok``) in the compute dtype ``DT``."""
    k = tl.load(
        k_base + (block * stride_kb + offset * stride_ks)[None, :] + dims[:, None],
        mask=ok[None, :],
        other=0.0,
    )
    return from_cache(k, DT)


@triton.jit
def _load_v(v_base, block, offset, ok, dims, stride_vb, stride_vs, DT: tl.constexpr):
    """V [N, D] (zeros where not ``ok``) in the compute dtype ``DT``."""
    v = tl.load(
        v_base + (block * stride_vb + offset * stride_vs)[:, None] + dims[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    return from_cache(v, DT)


@triton.jit
def _scores(
    q,
    k,
    pos,
    in_ctx,
    q_pos,
    m_i,
    l_i,
    qk_scale,
    window,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """The online softmax's first half for one KV tile: q [M, D] . k [D, N] at positions ``pos``
    (masked by ``in_ctx``, causality and the window) -> (p [M, N], alpha [M], m_new, l_new)."""
    if DOT_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [M, N] log2 domain
    ok = in_ctx[None, :] & (pos[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        ok = ok & (pos[None, :] > q_pos[:, None] - window)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # [M, N]
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _accumulate_pv(acc, alpha, p, v, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Its second half: acc [M, D] * alpha + p @ v (P @ V in the model dtype, like flash-attn)."""
    p = p.to(v.dtype)
    if DOT_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    return acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)


@triton.jit
def _new_kv(
    k_new_ptr,
    v_new_ptr,
    cos_ptr,
    sin_ptr,
    row,
    kv_head,
    dims,
    rot,
    sign,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_cos,
    stride_sin,
    DT: tl.constexpr,
    CACHE_DT: tl.constexpr,
):
    """The new token's (rotated k, v) [D] of one KV head, rounded to the cache dtype."""
    new_k = k_new_ptr + row * stride_knt + kv_head * stride_knh
    k = _rope(
        tl.load(new_k + dims).to(tl.float32),
        tl.load(new_k + rot).to(tl.float32),
        tl.load(cos_ptr + row * stride_cos + dims).to(tl.float32),
        tl.load(sin_ptr + row * stride_sin + dims).to(tl.float32),
        sign,
        DT,
    )
    v = tl.load(v_new_ptr + row * stride_vnt + kv_head * stride_vnh + dims)
    return to_cache(k, CACHE_DT), to_cache(v, CACHE_DT)


@triton.jit
def _store_new_kv(
    k_cache_ptr,
    v_cache_ptr,
    k,
    v,
    slot,
    kv_head,
    dims,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    PAGE: tl.constexpr,
):
    """(k, v) [D] of one KV head into the paged cache at ``slot`` (>= 0)."""
    block = slot // PAGE
    offset = slot % PAGE
    tl.store(k_cache_ptr + kv_head * stride_kh + block * stride_kb + offset * stride_ks + dims, k)
    tl.store(v_cache_ptr + kv_head * stride_vh + block * stride_vb + offset * stride_vs + dims, v)


# Runtime ints that vary with the batch are marked do_not_specialize: Triton would otherwise
# compile a variant for == 1 and for multiples of 16 (~0.5 s each, the first time a batch
# brings one, in the middle of a step: the block-table width turning 16 as contexts pass 256
# tokens did on the GPU host).
@triton.jit(do_not_specialize=["num_q_tiles", "num_splits", "stride_bt"])
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    out_ptr,  # [T, Hq, D]                    (not SPLIT)
    ws_acc_ptr,  # [T, Hq, num_splits, D] fp32  (SPLIT)
    ws_m_ptr,  # [T, Hq, num_splits] fp32
    ws_l_ptr,  # [T, Hq, num_splits] fp32
    k_new_ptr,  # [T, Hkv, D] this step's K, not yet rotated (ROPE)
    v_new_ptr,  # [T, Hkv, D] (ROPE)
    cos_ptr,  # [T, D] (ROPE)
    sin_ptr,  # [T, D] (ROPE)
    slot_ptr,  # [T] int64; slots < 0 are not written (ROPE)
    query_start_loc_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window (used only when USE_WINDOW)
    num_q_tiles,
    num_splits,  # KV splits (grid axis 2); > 1 only with SPLIT
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_cos,
    stride_sin,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query positions per tile
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_P
    BLOCK_N: tl.constexpr,  # KV positions per loop step
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,  # cache block size
    SPLIT: tl.constexpr,  # num_splits > 1: partial results into the workspace
    ROPE: tl.constexpr,  # decode (one new token per request): RoPE on q and k + the KV write here
    PRELOAD: tl.constexpr,  # ROPE, SPLIT, few programs: first KV tile read before the wait
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands (Triton's CPU interpreter mis-multiplies bf16)
    PDL: tl.constexpr,
):
    if PRELOAD:
        # Split fused decode tiles of a small batch (latency-bound) read the metadata and
        # their first KV tile before waiting for the kernel before them (the q/k/v producer),
        # so that after the wait only q, the new token's k/v and the math remain. Invariant
        # this relies on: the metadata and every cached position but the new one are written
        # before the forward's first kernel starts (by the step's input staging and earlier
        # steps; the forward opens with the embedding, a launch without PDL, so nothing before
        # it still runs), never by the kernels of this forward. Stores still come only after
        # the wait. (Larger batches keep the wait first: reading early there cost more than it
        # saved, see _PRELOAD_MAX_PROGRAMS.)
        if PDL:
            gdc_launch_dependents()
    else:
        pdl_enter(PDL)
    pid = tl.program_id(0)
    seq = pid // num_q_tiles
    q_tile = pid % num_q_tiles
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    n_new = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= n_new:
        if PDL and PRELOAD:
            # not done before the kernel before it: a grid of such programs alone would
            # otherwise let the next kernel's wait (the combine's) pass too early
            gdc_wait()
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - n_new  # absolute position of the request's first new token

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP_P  # [M] query index within the request
    head_in_group = rows % GROUP_P
    row_ok = (q_idx < n_new) & (head_in_group < GROUP)  # [M]
    head = kv_head * GROUP + head_in_group  # [M]
    q_pos = ctx_start + q_idx  # [M] absolute position
    tok = (q_start + q_idx).to(tl.int64)  # [M] row of q / out
    dims = tl.arange(0, HEAD_DIM)
    DT: tl.constexpr = q_ptr.dtype.element_ty

    # Keys this tile can see: [lo, hi).
    last_q = tl.minimum(n_new, (q_tile + 1) * BLOCK_Q) - 1
    hi = ctx_start + last_q + 1
    lo = hi * 0
    if USE_WINDOW:
        lo = tl.maximum(ctx_start + q_tile * BLOCK_Q - window + 1, 0)
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
        ml_off = (tok * tl.num_programs(1) * GROUP + head) * num_splits + split  # [M]
        if lo >= hi:
            # Past the context (a graph's split count is fixed for the longest one it may see):
            # only the max, -inf, marks the split empty; the combine reads nothing else of it.
            if PDL and PRELOAD:
                gdc_wait()
            tl.store(ws_m_ptr + ml_off, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_ok)
            return
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    if PRELOAD:
        # The first KV tile, before the wait. Its column at the position this step writes (the
        # new token, unless its slot is < 0: padding writes nothing, and the reference reads
        # what the cache holds there) is stale until the write below and is replaced then.
        slot = tl.load(slot_ptr + q_start).to(tl.int64)
        written = tl.where(slot >= 0, ctx_start, -1)  # the position this step writes, if any
        pos0 = lo + tl.arange(0, BLOCK_N)  # [N]
        block0, offset0 = _kv_tile_offsets(bt_row, pos0, pos0 < hi, PAGE)
        k0 = _load_k(k_base, block0, offset0, pos0 < hi, dims, stride_kb, stride_ks, DT)
        v0 = _load_v(v_base, block0, offset0, pos0 < hi, dims, stride_vb, stride_vs, DT)
        if PDL:
            gdc_wait()

    q_rows = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None], other=0.0)  # [M, D]
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        rot = (dims + HALF) % HEAD_DIM
        sign = tl.where(dims < HALF, -1.0, 1.0)
        cos_rows = cos_ptr + tok[:, None] * stride_cos + dims[None, :]
        sin_rows = sin_ptr + tok[:, None] * stride_sin + dims[None, :]
        q = _rope(
            q.to(tl.float32),
            tl.load(q_rows + rot[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32),
            tl.load(cos_rows, mask=row_ok[:, None], other=0.0).to(tl.float32),
            tl.load(sin_rows, mask=row_ok[:, None], other=0.0).to(tl.float32),
            sign[None, :],
            DT,
        )
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    loop_lo = lo
    if ROPE:
        # The request's one new token (position ctx_start) is written by the program whose range
        # holds it: rotated k and v to the cache, then a barrier makes the writes visible to all
        # its threads before the loop reads them back. Every program rotates it (few loads, in
        # the shadow of q's; the old kernel did it only in the writing program, measured the
        # same): the preloaded first tile may need it.
        k_new, v_new = _new_kv(
            k_new_ptr,
            v_new_ptr,
            cos_ptr,
            sin_ptr,
            q_start.to(tl.int64),
            kv_head,
            dims,
            rot,
            sign,
            stride_knt,
            stride_knh,
            stride_vnt,
            stride_vnh,
            stride_cos,
            stride_sin,
            DT,
            k_cache_ptr.dtype.element_ty,
        )
        if not PRELOAD:
            slot = tl.load(slot_ptr + q_start).to(tl.int64)
        if (ctx_start >= lo) & (ctx_start < hi) & (slot >= 0):
            _store_new_kv(
                k_cache_ptr,
                v_cache_ptr,
                k_new,
                v_new,
                slot,
                kv_head,
                dims,
                stride_kb,
                stride_ks,
                stride_kh,
                stride_vb,
                stride_vs,
                stride_vh,
                PAGE,
            )
            tl.debug_barrier()
        if PRELOAD:
            # the first tile, loaded before the write, gets the new column from registers
            new0 = pos0 == written  # [N]
            k0 = tl.where(new0[None, :], from_cache(k_new, DT)[:, None], k0)
            v0 = tl.where(new0[:, None], from_cache(v_new, DT)[None, :], v0)
            p, alpha, m_i, l_i = _scores(
                q,
                k0,
                pos0,
                pos0 < hi,
                q_pos,
                m_i,
                l_i,
                qk_scale,
                window,
                USE_WINDOW,
                DOT_PRECISION,
                DOT_FP32,
            )
            acc = _accumulate_pv(acc, alpha, p, v0, DOT_PRECISION, DOT_FP32)
            loop_lo = lo + BLOCK_N

    for start in range(loop_lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [N]
        in_ctx = pos < hi
        block, offset = _kv_tile_offsets(bt_row, pos, in_ctx, PAGE)
        k = _load_k(k_base, block, offset, in_ctx, dims, stride_kb, stride_ks, DT)
        p, alpha, m_new, l_i = _scores(
            q,
            k,
            pos,
            in_ctx,
            q_pos,
            m_i,
            l_i,
            qk_scale,
            window,
            USE_WINDOW,
            DOT_PRECISION,
            DOT_FP32,
        )
        v = _load_v(v_base, block, offset, in_ctx, dims, stride_vb, stride_vs, DT)
        acc = _accumulate_pv(acc, alpha, p, v, DOT_PRECISION, DOT_FP32)
        m_i = m_new

    if not SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            round_to(out, out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        tl.store(ws_m_ptr + ml_off, m_i, mask=row_ok)
        tl.store(ws_l_ptr + ml_off, l_i, mask=row_ok)
        tl.store(ws_acc_ptr + ml_off[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    out_ptr,  # [T, Hq, D]
    ws_acc_ptr,  # [T, Hq, num_splits, D] fp32
    ws_m_ptr,  # [T, Hq, num_splits] fp32 (log2 domain)
    ws_l_ptr,  # [T, Hq, num_splits] fp32
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    base = (tok * num_heads + head) * num_splits
    s_ok = splits < num_splits
    m = tl.load(ws_m_ptr + base + splits, mask=s_ok, other=float("-inf"))  # [S]
    seen = m > float("-inf")  # [S]; an empty split wrote only its max
    l_part = tl.load(ws_l_ptr + base + splits, mask=seen, other=0.0)  # [S]
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # [S]; 0 for empty splits
    acc = tl.load(
        ws_acc_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=seen[:, None],
        other=0.0,
    )  # [S, D]
    num = tl.sum(acc * w[:, None], 0)  # [D]
    den = tl.sum(l_part * w, 0)
    out = num / tl.where(den == 0.0, 1.0, den)
    tl.store(
        out_ptr + tok * stride_ot + head * stride_oh + dims, round_to(out, out_ptr.dtype.element_ty)
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _tile_config(max_query_len: int, group: int, head_dim: int) -> tuple[int, int, int, int]:
    """(GROUP_P, BLOCK_Q, BLOCK_M, BLOCK_N) for a batch. BLOCK_M >= 16 for ``tl.dot``."""
    group_p = triton.next_power_of_2(group)
    max_m = 128 if head_dim <= 128 else 64
    block_m = min(max(16, triton.next_power_of_2(max_query_len * group_p)), max(max_m, group_p))
    block_q = max(1, block_m // group_p)
    block_m = block_q * group_p
    block_n = 64 if head_dim <= 128 else 32
    return group_p, block_q, block_m, block_n


def choose_num_splits(
    num_seqs: int,
    num_q_tiles: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int,
) -> int:
    """Split the KV range only when the batch alone would leave most SMs idle.

    Decode-like batches (every query at most ``_SPLIT_MAX_QUERY_LEN`` tokens) with fewer than
    ~2 programs per SM (pure decode: 4, over half-width KV tiles unless preloading, see
    ``paged_attention``) get enough splits to reach that, each covering >= ``_SPLIT_MIN_CHUNK``
    context tokens, at most ``_SPLIT_MAX``.
    """
    if max_query_len > _SPLIT_MAX_QUERY_LEN:
        return 1
    programs = num_seqs * num_q_tiles * num_kv_heads
    target = (4 if max_query_len == 1 else 2) * num_sms
    if programs >= target:
        return 1
    by_len = max_seq_len // _SPLIT_MIN_CHUNK
    return max(1, min(triton.cdiv(target, programs), by_len, _SPLIT_MAX))


@register("paged_attention", "triton", priority=0)
def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Triton twin of ``attention_ref.paged_attention`` (same semantics, fp32 softmax).

    ``num_splits`` forces the number of KV splits (1 = no split); ``None`` lets
    ``choose_num_splits`` decide from the batch shape. Rows of ``q`` past
    ``query_start_loc[-1]`` (padding) are left unwritten in the output, as in the reference.

    ``rope = (k, v, cos, sin)`` (decode batches only: ``meta.max_query_len == 1``): ``q`` and
    ``k`` are not yet rotated; the kernel runs ``rope_and_write_kv`` first (q rotated in
    registers, rotated k and v written at ``meta.slot_mapping``), in the same launch.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if head_dim < 16 or head_dim & (head_dim - 1) or page & (page - 1):
        raise ValueError(f"head_dim ({head_dim}) and block_size ({page}) must be powers of two")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must have the same shape and a unit last stride")
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn) or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"the cache ({k_cache.dtype}/{v_cache.dtype}) must be in q's dtype ({q.dtype}) or fp8"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    if rope is not None:
        k_new, v_new, cos, sin = rope
        if meta.max_query_len != 1:
            raise ValueError("fused RoPE + KV write is for decode batches (one token per request)")
        if any(t.dtype != q.dtype for t in rope):
            raise ValueError(f"rope inputs must be in q's dtype ({q.dtype})")
        if k_new.shape != v_new.shape or k_new.shape != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(f"bad new k/v shapes: {tuple(k_new.shape)}, {tuple(v_new.shape)}")
        if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
            raise ValueError(f"cos/sin must be [{num_tokens}, {head_dim}], got {tuple(cos.shape)}")
        rope = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in rope)
    out = torch.empty_like(q)
    num_seqs = meta.num_seqs
    if num_tokens == 0 or num_seqs == 0 or meta.max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    group_p, block_q, block_m, block_n = _tile_config(meta.max_query_len, group, head_dim)
    num_q_tiles = triton.cdiv(meta.max_query_len, block_q)
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs,
            num_q_tiles,
            num_kv_heads,
            meta.max_query_len,
            meta.max_seq_len,
            _num_sms(q.device),
        )
    num_splits = max(1, int(num_splits))
    preload = (
        rope is not None
        and num_splits > 1
        and num_seqs * num_q_tiles * num_kv_heads <= _PRELOAD_MAX_PROGRAMS
    )
    if num_splits > 1 and meta.max_query_len == 1 and not preload:
        # Split decode tiles are latency-bound: half-width KV steps over twice the programs cut
        # an H100 llama-3-8b batch-1 step by 0.4% at 512 and 1.0% at 3k context (.scratch sweep
        # of BLOCK_N 16-64 x 2-4 programs per SM). Not the preloading variant, which loads its
        # first tile before the wait: full-width tiles measured 5.344 ms against 5.477 per step
        # at 512 tokens of context, 5.611 against 5.594 at 3000 (H100, 64 planned splits).
        block_n //= 2
    grid = (num_seqs * num_q_tiles, num_kv_heads, num_splits)

    if num_splits > 1:
        ws_m = torch.empty(num_tokens, num_heads, num_splits, device=q.device, dtype=torch.float32)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty(
            num_tokens, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32
        )
    else:
        ws_m = ws_l = ws_acc = out  # unused placeholders

    fp32 = q.dtype == torch.float32
    # Only the CPU interpreter sees CPU tensors; its bf16 dot is wrong, an fp32 dot of the same
    # bf16 values is what the tensor cores compute (exact products, fp32 accumulation).
    dot_fp32 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    num_warps = 8 if block_m * head_dim >= 128 * 128 else 4
    if k_cache.dtype == torch.float8_e4m3fn and block_m <= 16 and head_dim <= 128:
        # Decode tiles over an fp8 cache convert twice the elements per byte read: with 4 warps
        # they reached 1.55-2.1 TB/s on an H100 (3.0 TB/s copy), with 2 warps 2.25-2.55
        # (.scratch sweep over BLOCK_N 32-128, 2-8 warps, 2-4 stages; bf16 gains nothing;
        # head_dim 128 only: larger heads keep 4 warps, unmeasured).
        num_warps = 2
    k_new, v_new, cos, sin = rope if rope is not None else (q, q, q, q)  # placeholders
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        ws_acc,
        ws_m,
        ws_l,
        k_new,
        v_new,
        cos,
        sin,
        # (only the fused write reads it: elsewhere a placeholder, so that a slot tensor's
        # alignment never selects another compiled variant)
        meta.slot_mapping if rope is not None else q,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        scale * _LOG2E,
        sliding_window or 0,
        num_q_tiles,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        meta.block_tables.stride(0),
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        cos.stride(0),
        sin.stride(0),
        GROUP=group,
        GROUP_P=group_p,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PAGE=page,
        SPLIT=num_splits > 1,
        ROPE=rope is not None,
        PRELOAD=preload,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if fp32 or dot_fp32 else "tf32",
        DOT_FP32=dot_fp32,
        num_warps=num_warps,
        num_stages=2,
        **pdl_launch(q.device),
    )
    if num_splits > 1:
        _combine_kernel[(num_tokens, num_heads)](
            out,
            ws_acc,
            ws_m,
            ws_l,
            num_heads,
            num_splits,
            out.stride(0),
            out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            num_warps=4 if head_dim <= 128 else 8,
            **pdl_launch(q.device),
        )
    return out


@register("rope_write_kv_attention", "triton", priority=0)
def rope_write_kv_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], not yet rotated
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], not yet rotated
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """``rope_and_write_kv`` then ``paged_attention``: one launch for decode batches, the two
    kernels otherwise (multi-token queries read other programs' new K/V)."""
    if meta.max_query_len == 1 and cos.dtype == q.dtype == k.dtype and sin.dtype == q.dtype:
        return paged_attention(
            q, k_cache, v_cache, meta, scale, sliding_window, rope=(k, v, cos, sin)
        )
    q = rope_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
    return paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)


@register("attention_warm_up", "triton")
def warm_up(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
    *,
    kv_dtype: torch.dtype | None = None,
) -> int:
    """Compile, on tiny dummy inputs, every variant of the kernels a batch of this head layout
    can select: each tile configuration (by longest query, doubling until BLOCK_M is capped),
    with and without KV splits, the decode tiles with RoPE + KV write fused (split with and
    without the preload of small batches), and the combine kernel for each power-of-two split
    bound. A variant first met while serving costs a compile (~0.5 s) inside a step. Returns
    the number of launches."""
    group = num_heads // num_kv_heads
    # (tile config, single-token) -> shortest query; split single-token tiles that do not
    # preload take half-width KV steps, so q = 1 and q = 2.. of one tile config differ
    configs: dict[tuple[tuple[int, int, int, int], bool], int] = {}
    for q_len in (1, *(2**i for i in range(1, 9))):  # BLOCK_M is capped (at 128) before 256
        configs.setdefault((_tile_config(q_len, group, head_dim), q_len == 1), q_len)
    longest = max(configs.values())
    blocks = -(-longest // block_size)
    shape = (blocks + 1, block_size, num_kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=kv_dtype or dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    launches = 0

    def run(n: int, num_splits: int, rope: bool = False, seqs: int = 1) -> None:
        """``seqs`` requests of ``n`` new tokens each (all in the same cache blocks)."""
        nonlocal launches
        t = n * seqs
        meta = AttentionMetadata(
            slot_mapping=torch.arange(t, device=device, dtype=torch.int64) % n + block_size,
            query_start_loc=torch.arange(0, t + 1, n, device=device, dtype=torch.int32),
            seq_lens=torch.full((seqs,), n, device=device, dtype=torch.int32),
            block_tables=torch.arange(1, blocks + 1, device=device, dtype=torch.int32).repeat(
                seqs, 1
            ),
            max_query_len=n,
            max_seq_len=n,
            query_start_loc_cpu=list(range(0, t + 1, n)),
            seq_lens_cpu=[n] * seqs,
        )
        q = torch.zeros(t, num_heads, head_dim, dtype=dtype, device=device)
        new_kv = torch.zeros(t, num_kv_heads, head_dim, dtype=dtype, device=device)
        cos = torch.zeros(t, head_dim, dtype=dtype, device=device)
        paged_attention(
            q,
            k_cache,
            v_cache,
            meta,
            1.0,
            sliding_window,
            num_splits=num_splits,
            rope=(new_kv, new_kv, cos, cos) if rope else None,
        )
        launches += 1

    for n in configs.values():
        run(n, 1)
        if n <= _SPLIT_MAX_QUERY_LEN:
            run(n, 2)
    run(1, 1, rope=True)  # the fused decode variants (rope_write_kv_attention)
    run(1, 2, rope=True)  # split, preloading where one request's programs are few enough
    run(1, 2, rope=True, seqs=_PRELOAD_MAX_PROGRAMS // num_kv_heads + 1)  # split, not
    splits = 4
    while splits <= _SPLIT_MAX:  # the combine kernel's BLOCK_S = next power of two >= splits
        run(1, splits)
        splits *= 2
    return launches


__all__ = ["choose_num_splits", "paged_attention", "rope_write_kv_attention", "warm_up"]
