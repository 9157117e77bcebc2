"""Kernels at a decode step's two edges: the greedy tokens out of the logits, and the step's inputs
into the CUDA graph's static buffers.

Between two replays of a batch-1 decode graph the stream used to run about fifteen small ops: the
logits' float cast, a five-kernel two-stage argmax, the ids' device-to-host copy, the inputs'
host-to-device copy, two index kernels for the ids still on the device and five buffer copies
(H100: about 70 us of a 5.5 ms step, the copy engine's two turns alone about 17 us). Here that is
three kernels:

- ``argmax``: the first index of each row's maximum (NaN ranked highest, as ``torch.argmax``) in two
  launches: every program reduces one ``BLOCK`` of a row to (max, first index), then one program per
  row picks the first best block. With ``out_host`` (a pinned host tensor) the ids are also stored
  straight into host memory, so no copy follows.
- ``stage_step_inputs``: one program per request slot of the padded batch copies its token rows
  (ids, positions, KV slots), context length and block-table row from wherever the host staged them
  (pinned host memory, read by the kernel directly) into the graph's buffers, replacing an id with
  the previous step's sampled token where the step says so, and writes the padding slots' rows.

Pinned host pointers are device-accessible under unified addressing; a kernel that reads or writes
one must finish before the host reuses or reads that memory (``transfer.PinnedStaging``, events).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from rayfleet.kernels import register
from rayfleet.kernels.ops_ref import check_stage
from rayfleet.kernels.triton_ops import pdl_enter, pdl_launch

ARGMAX_BLOCK = 4096
ARGMAX_PICK_BLOCKS = 64  # blocks the pick kernel's one variant takes: vocabularies to 262144
STAGE_TOKENS = 16  # token rows per request a stage program covers (q above it: a power of two)
STAGE_TABLE_BLOCK = 128  # block-table entries per stage program


def _jit_one_variant(*names: str) -> Callable:
    """``triton.jit`` that compiles one variant whatever the values of the args ``names``: Triton
    otherwise specializes ints on == 1 and on divisibility by 16, and pointers on 16-byte
    alignment. These vary from step to step (table widths, a column of the draft's ids), and a
    variant first met while serving costs a compile (~0.5 s) inside a step."""
    kw: dict = {"do_not_specialize": names}
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        kw["do_not_specialize_on_alignment"] = names
    return triton.jit(**kw)


@triton.jit
def _first_max(vals, idx, BIG: tl.constexpr):
    """(value, index) of the first maximum of ``vals`` at indices ``idx`` (ascending), NaN ranked
    above everything (the first NaN wins)."""
    isnan = vals != vals
    any_nan = tl.max(isnan.to(tl.int32), 0) > 0
    clean = tl.where(isnan, float("-inf"), vals)
    best = tl.max(clean, 0)
    at_best = tl.min(tl.where(clean == best, idx, BIG), 0)
    at_nan = tl.min(tl.where(isnan, idx, BIG), 0)
    return tl.where(any_nan, float("nan"), best), tl.where(any_nan, at_nan, at_best)


@_jit_one_variant("V", "stride_x", "S")
def _argmax_blocks_kernel(
    x_ptr,  # [N, V]
    val_ptr,  # [N, S] fp32: each block's max (NaN if it holds one)
    idx_ptr,  # [N, S] int32: its first index in the row
    V,
    stride_x,
    S,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    pdl_enter(PDL)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < V, other=float("-inf"))
    # (padding lanes: -inf at indices past every real one, so a row of -inf still picks its first)
    best, at = _first_max(x.to(tl.float32), cols, 2147483647)
    tl.store(val_ptr + row * S + blk, best)
    tl.store(idx_ptr + row * S + blk, at)


@_jit_one_variant("out_ptr", "host_ptr", "S")
def _argmax_pick_kernel(
    val_ptr,  # [N, S]
    idx_ptr,  # [N, S]
    out_ptr,  # [N] int64
    host_ptr,  # [N] int64 pinned host memory (HOST)
    S,
    SB: tl.constexpr,
    HOST: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    pdl_enter(PDL)
    s = tl.arange(0, SB)
    vals = tl.load(val_ptr + row * S + s, mask=s < S, other=float("-inf"))
    idx = tl.load(idx_ptr + row * S + s, mask=s < S, other=2147483647)
    # blocks ascend with their indices: the first best block holds the row's first best index
    _, at = _first_max(vals, idx, 2147483647)
    tok = at.to(tl.int64)
    tl.store(out_ptr + row, tok)
    if HOST:
        tl.store(host_ptr + row, tok)


@register("argmax", "triton", priority=0)
def argmax(
    x: torch.Tensor,  # [N, V] any float dtype
    out_host: torch.Tensor | None = None,  # [N] int64, pinned host memory on CUDA
) -> torch.Tensor:  # [N] int64 on x's device
    """``ops_ref.argmax``: the first index of each row's maximum, NaN ranked highest."""
    n, v = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = triton.cdiv(v, ARGMAX_BLOCK)
    vals = torch.empty(n, s, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, s, dtype=torch.int32, device=x.device)
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    pdl = pdl_launch(x.device)
    _argmax_blocks_kernel[(n, s)](
        x, vals, idx, v, x.stride(0), s, BLOCK=ARGMAX_BLOCK, num_warps=8, **pdl
    )
    if out_host is not None and out_host.shape != (n,):
        raise ValueError(f"out_host must be [{n}], got {tuple(out_host.shape)}")
    _argmax_pick_kernel[(n,)](
        vals,
        idx,
        out,
        out_host if out_host is not None else out,
        s,
        SB=max(ARGMAX_PICK_BLOCKS, triton.next_power_of_2(s)),
        HOST=out_host is not None,
        num_warps=1,
        **pdl,
    )
    return out


_STAGE_ARGS = [
    "src_ids_ptr",
    "src_pos_ptr",
    "src_slots_ptr",
    "src_lens_ptr",
    "src_tables_ptr",
    "fill_ptr",
    "prev_ptr",
    "ids_ptr",
    "pos_ptr",
    "slots_ptr",
    "lens_ptr",
    "tables_ptr",
    "b",
    "q",
    "w",
    "stride_src_ids",
    "stride_src_tables",
    "stride_tables",
]


@_jit_one_variant(*_STAGE_ARGS)
def _stage_kernel(
    src_ids_ptr,  # [b*q] int64 (stride stride_src_ids), each source pinned host or device memory
    src_pos_ptr,  # [b*q] int64
    src_slots_ptr,  # [b*q] int64
    src_lens_ptr,  # [b] int32
    src_tables_ptr,  # [b, w] int32
    fill_ptr,  # [b*q] int64: row of prev to take the id from, or -1 (FILL)
    prev_ptr,  # [R] int64 device: the previous step's sampled ids (FILL)
    ids_ptr,  # [>= size*q] int64, the graph's static buffers
    pos_ptr,
    slots_ptr,
    lens_ptr,  # [>= size] int32
    tables_ptr,  # [>= size, W] int32
    b,
    q,
    w,
    stride_src_ids,
    stride_src_tables,
    stride_tables,
    QB: tl.constexpr,
    WB: tl.constexpr,
    FILL: tl.constexpr,
    EARLY: tl.constexpr,  # no kernel writes the sources: read them before waiting (PDL)
    PDL: tl.constexpr,
):
    r = tl.program_id(0)
    c = tl.program_id(1) * WB  # this program's block-table columns [c, c + WB); c = 0 also
    # copies the request's token rows and context
    if not EARLY:
        pdl_enter(PDL)  # the kernels before may still write the sources
    real = r < b  # else a padding request: q rows of id 0 at position 0 into slot 0, context q
    j = tl.arange(0, QB)
    t = r * q + j
    tm = j < tl.where(c == 0, q, 0)
    lm = tm & (t < b * q)
    ids = tl.load(src_ids_ptr + t * stride_src_ids, mask=lm, other=0)
    pos = tl.load(src_pos_ptr + t, mask=lm, other=0)
    slots = tl.load(src_slots_ptr + t, mask=lm, other=0)
    seq_len = tl.where(real, tl.load(src_lens_ptr + tl.minimum(r, b - 1)), q)  # (b >= 1)
    cols = c + tl.arange(0, WB)
    cm = cols < tl.where(real, w, 0)  # (padding requests keep their table rows)
    row = tl.load(src_tables_ptr + r * stride_src_tables + cols, mask=cm)
    if FILL:
        f = tl.load(fill_ptr + t, mask=lm, other=-1)
    if EARLY:
        pdl_enter(PDL)  # the previous replay reads the buffers written below, prev is new
    if FILL:
        prev = tl.load(prev_ptr + tl.maximum(f, 0), mask=f >= 0, other=0)
        ids = tl.where(f >= 0, prev, ids)
    tl.store(ids_ptr + t, ids, mask=tm)
    tl.store(pos_ptr + t, pos, mask=tm)
    tl.store(slots_ptr + t, slots, mask=tm)
    if c == 0:
        tl.store(lens_ptr + r, seq_len)
    tl.store(tables_ptr + r * stride_tables + cols, row, mask=cm)


@register("stage_step_inputs", "triton", priority=0)
def stage_step_inputs(
    src: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    dst: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    q: int,
    size: int,
    fill: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
) -> None:
    """``ops_ref.stage_step_inputs``."""
    b, w = check_stage(src, dst, q, size, fill, prev)
    s_ids, s_pos, s_slots, s_lens = (src[0], *(t.contiguous() for t in src[1:4]))
    s_tables = src[4]
    ids, pos, slots, lens, tables = dst
    _stage_kernel[(size, triton.cdiv(max(w, 1), STAGE_TABLE_BLOCK))](
        s_ids,
        s_pos,
        s_slots,
        s_lens,
        s_tables,
        fill if fill is not None else s_ids,
        prev if prev is not None else ids,
        ids,
        pos,
        slots,
        lens,
        tables,
        b,
        q,
        w,
        s_ids.stride(0),
        s_tables.stride(0),
        tables.stride(0),
        QB=max(STAGE_TOKENS, triton.next_power_of_2(q)),
        WB=STAGE_TABLE_BLOCK,
        FILL=fill is not None,
        EARLY=s_ids.device.type == "cpu" and ids.device.type == "cuda",
        num_warps=1,
        **pdl_launch(ids.device),
    )


_CHAIN_ARGS = [
    "o_ids",
    "o_pos",
    "o_slots",
    "o_lens",
    "o_step_pos",
    "o_step_slots",
    "o_step_lens",
    "o_params",
    "size",
    "k",
    "nb",
    "nd",
    "width",
    "stride_t",
    "block_size",
]


@_jit_one_variant(*_CHAIN_ARGS)
def _chain_kernel(
    inputs_ptr,  # int64 static inputs (ops_ref.CHAIN_FIELDS at the offsets below)
    tables_ptr,  # [>= size, W] int32
    best_ptr,  # [nb] int64
    drafts_ptr,  # [nd] int64
    o_ids,
    o_pos,
    o_slots,
    o_lens,
    o_step_pos,
    o_step_slots,
    o_step_lens,
    o_params,
    size,
    k,
    nb,
    nd,
    width,
    stride_t,
    block_size,
    KB: tl.constexpr,  # >= every row's kv (a power of two)
    SB: tl.constexpr,  # >= k - 1 (a power of two)
):
    i = tl.program_id(0)  # one row (request slot) of the padded batch
    x_last = tl.load(inputs_ptr + o_params + i)
    off = tl.load(inputs_ptr + o_params + size + i)
    dbase = tl.load(inputs_ptr + o_params + 2 * size + i)
    kv = tl.load(inputs_ptr + o_params + 3 * size + i)
    j = tl.arange(0, KB)
    m = j < kv
    d = tl.load(drafts_ptr + tl.minimum(dbase + j, nd - 1), mask=m, other=0)
    t = tl.load(best_ptr + tl.minimum(off + j, nb - 1), mask=m, other=0)
    a = tl.min(tl.where(m & (d != t), j.to(tl.int64), kv), 0)  # the first rejection, else kv
    tok1 = tl.load(best_ptr + off + a)
    tok0 = tl.load(best_ptr + tl.maximum(off + a - 1, 0))
    tok0 = tl.where(a > 0, tok0, x_last)
    p0 = tl.load(inputs_ptr + o_pos + 2 * i) + a
    p1 = tl.load(inputs_ptr + o_pos + 2 * i + 1) + a
    s0 = tl.load(inputs_ptr + o_slots + 2 * i)
    s1 = tl.load(inputs_ptr + o_slots + 2 * i + 1)
    row = tables_ptr + i * stride_t
    b0 = tl.load(row + tl.minimum(p0 // block_size, width - 1)).to(tl.int64)
    b1 = tl.load(row + tl.minimum(p1 // block_size, width - 1)).to(tl.int64)
    tl.store(inputs_ptr + o_ids + 2 * i, tok0)
    tl.store(inputs_ptr + o_ids + 2 * i + 1, tok1)
    tl.store(inputs_ptr + o_pos + 2 * i, p0)
    tl.store(inputs_ptr + o_pos + 2 * i + 1, p1)
    keep0 = (s0 != 0) & (a == kv)
    tl.store(inputs_ptr + o_slots + 2 * i, tl.where(keep0, b0 * block_size + p0 % block_size, 0))
    tl.store(
        inputs_ptr + o_slots + 2 * i + 1, tl.where(s1 != 0, b1 * block_size + p1 % block_size, 0)
    )
    lens = tl.load(inputs_ptr + o_lens + i)
    tl.store(inputs_ptr + o_lens + i, lens + a)
    js = tl.arange(0, SB)
    sm = js < k - 1
    at = js * size + i  # forward js + 2's row i
    sp = tl.load(inputs_ptr + o_step_pos + at, mask=sm, other=0) + a
    ss = tl.load(inputs_ptr + o_step_slots + at, mask=sm, other=0)
    sl = tl.load(inputs_ptr + o_step_lens + at, mask=sm, other=0) + a
    blk = tl.load(row + tl.minimum(sp // block_size, width - 1), mask=sm, other=0).to(tl.int64)
    tl.store(inputs_ptr + o_step_pos + at, sp, mask=sm)
    tl.store(
        inputs_ptr + o_step_slots + at,
        tl.where(ss != 0, blk * block_size + sp % block_size, 0),
        mask=sm,
    )
    tl.store(inputs_ptr + o_step_lens + at, sl, mask=sm)


@register("chain_proposal_inputs", "triton", priority=0)
def chain_proposal_inputs(
    inputs: torch.Tensor,
    tables: torch.Tensor,
    best: torch.Tensor,
    drafts: torch.Tensor,
    offsets: tuple[int, ...],
    size: int,
    k: int,
    block_size: int,
    max_kv: int,
) -> None:
    """``ops_ref.chain_proposal_inputs`` in one launch (one program per row); ``max_kv`` bounds
    every row's kv and k (the tile: one compiled variant for every call with the same bound)."""
    if tables.stride(1) != 1 or inputs.stride(0) != 1:
        raise ValueError("chain_proposal_inputs needs contiguous inputs and table rows")
    if k > max_kv:
        raise ValueError(f"k = {k} is past max_kv = {max_kv}")
    _chain_kernel[(size,)](
        inputs,
        tables,
        best,
        drafts,
        *offsets,
        size,
        k,
        best.numel(),
        drafts.numel(),
        tables.shape[1],
        tables.stride(0),
        block_size,
        KB=triton.next_power_of_2(max_kv),
        SB=triton.next_power_of_2(max(max_kv - 1, 1)),
        num_warps=1,
    )


@register("step_io_warm_up", "triton")
def warm_up(
    model_dtype: torch.dtype, device: torch.device, vocab_size: int = 40, max_query_len: int = 1
) -> int:
    """Compile every variant the step's edges select (argmax over model-dtype and float32
    logits of ``vocab_size`` columns, with and without the host copy; staging from the host and
    from the device, with and without ids from the previous step, for up to ``max_query_len``
    tokens per request) on tiny inputs. Returns the number of launches."""
    launches = 0
    for dtype in {model_dtype, torch.float32}:
        x = torch.zeros(2, vocab_size, dtype=dtype, device=device)
        for host in (None, torch.empty(2, dtype=torch.int64, pin_memory=device.type == "cuda")):
            argmax(x, host)
            launches += 1

    def buffers(reqs: int, q: int, width: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, seq_lens, tables) of ``reqs`` requests, q tokens each."""
        toks = [torch.zeros(reqs * q, dtype=torch.int64, device=dev) for _ in range(3)]
        lens = torch.full((reqs,), q, dtype=torch.int32, device=dev)
        return (*toks, lens, torch.zeros(reqs, width, dtype=torch.int32, device=dev))

    prev = torch.zeros(2, dtype=torch.int64, device=device)
    # query lengths that select different token tiles (QB)
    tiles = {max(STAGE_TOKENS, triton.next_power_of_2(q)): q for q in range(1, max_query_len + 1)}
    for q in tiles.values():
        dst = buffers(4, q, 4, device)
        for where in ("host", "device"):
            pin = where == "host" and device.type == "cuda"
            dev = torch.device("cpu") if where == "host" else device
            src = buffers(2, q, 3, dev)
            fill = torch.full((2 * q,), -1, dtype=torch.int64, device=dev)
            if pin:
                src = tuple(t.pin_memory() for t in src)
                fill = fill.pin_memory()
            for with_fill in (False, True):
                f, p = (fill, prev) if with_fill else (None, None)
                stage_step_inputs(src, dst, q, 4, f, p)
                launches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches
