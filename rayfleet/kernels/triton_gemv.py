"""Small-M linear layers (decode at batch 1-4, the draft's proposal) as one Triton GEMV that also
runs the op in front of the linear: RMSNorm, residual add + RMSNorm, or SiLU-and-mul.

At M = 1 a decoder step is a chain of GEMVs, each reading its whole weight once; what costs time
beyond the weight bytes is one kernel launch per small op (norm, SiLU) and each GEMM's ramp-up.
Fusing the op into the GEMV's prologue removes the small kernels: every program recomputes the
normalised input row from the raw one (K values, from L2), so nothing else is launched.

    y[M, N] = prologue(x)[M, K] @ W[N, K]^T (+ b)

Prologues (``PROLOGUE``) of ``ops_ref.gemv``:
    0  none          a = x
    1  rms           a = rms_norm(x) * g
    2  add_rms       h = x + residual (model dtype); a = rms_norm(h) * g; h is written to new_res
    3  silu_mul      a = silu(x[:, :K]) * x[:, K:]  (rounded to the model dtype as the op rounds)
An FP8 weight (float8_e4m3fn, ``weight_scale`` one fp32 scale per output row; quant/fp8.py) is
read as it is stored, a byte per weight, widened to fp32 in registers, and the finished dot
product scaled: y = (a . q) * scale + b. The input stays in the model dtype (weight-only).

The RMS prologues take one pass over K: a program accumulates (g * h) . w and sum(h^2) together
and scales by rstd at the end, so the normalised input is never materialised. That is the
reference's math with one rounding fewer in 16-bit dtypes (the reference rounds h * rstd and
g * that to the model dtype); in fp32 only the summation order differs. A second pass for rstd
first would cost each of the thousands of programs a dependent read of the row before its weight
stream starts, which measured 10% of a decode step. Accumulation is fp32 in a [BLOCK_M, BLOCK_N,
BLOCK_K] register tile reduced once at the end.

``_gemv_kernel`` computes it two ways (a constexpr); ``gemv`` picks one per call (``kernel_for``):

- FMA (``MMA=False``): fp32 multiply-adds in registers, 1-2 rows. Exact up to summation order
  in fp32; the only kernel for fp32 models and, at one row, the fastest for 16-bit weights.
- MMA (``MMA=True``, tensor cores): the rows padded to 16 and the product one ``tl.dot`` per
  K chunk, y^T[BLOCK_N, 16] += W[BLOCK_N, BLOCK_K] @ a^T[BLOCK_K, 16]. Weights in the model
  dtype go in as they are; an FP8 weight widens exactly to fp16 (one cvt per two weights, where
  the FMA kernel spends two conversions per weight and is bound by them: 1.57 T weights/s on
  the H100 whatever the tile, 1.6 TB/s of FP8). The input a is rounded once to the operand
  dtype (for the RMS prologues, g * h before the rstd scaling); an fp16 operand goes in scaled
  per row by a power of two that puts the row's largest |a| in [2^14, 2^15), so neither a tiny
  residual nor one past 65504 loses precision (the product is scaled back, exactly). Each program
  finds that maximum in one pass over the real rows (from L2) before its weight stream: per K
  chunk instead, its cross-thread max in every iteration cost the FP8 LM head of llama-3.2-1b
  108.5 us against 96 (H100). 16-bit models at 2-16 rows, and FP8 weights of wide layers.
  A SiLU-and-mul prologue (the down projection) is computed on all 16 padded rows of every
  program, 16x the FMA kernel's prologue work per weight chunk: there it loses 2x to the SiLU
  kernel + cuBLAS, which ``gemv`` runs instead for 16-bit rows past the first.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rayfleet import kernels
from rayfleet.kernels import fp8_linear, register
from rayfleet.kernels.ops_ref import PROLOGUES, apply_prologue
from rayfleet.kernels.triton_ops import (  # triton_ops also registers the references first
    gdc_launch_dependents,
    gdc_wait,
    pdl_launch,
    round_to,
)

NONE, RMS, ADD_RMS, SILU_MUL = 0, 1, 2, 3
MAX_M = 2  # rows the FMA kernel takes
MMA_M = 16  # rows the MMA kernel takes (one tensor-core tile)
# FP8 weights: the MMA kernel needs this many output rows (one program per 32-64 of them) to beat
# the FMA kernel; qkv, o and down of a llama-3.2-1b layer (N <= 3072) stay on the FMA kernel.
MMA_MIN_N_FP8 = 8192


@triton.jit
def _prologue_chunk(
    x_ptr,
    res_ptr,
    g_ptr,
    rows,  # [BLOCK_M]
    cols,  # [BLOCK_K]
    row_mask,
    k_mask,
    K,
    stride_xm,
    stride_rm,
    PROLOGUE: tl.constexpr,
    DT: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] chunk of the linear's input, fp32: (a, h) with a the input of the
    product (for the RMS prologues still to be scaled by the row's rstd) and h the chunk of the
    row whose RMS is taken (ADD_RMS: residual + x, rounded to ``DT`` as the layer rounds it)."""
    mask = row_mask[:, None] & k_mask[None, :]
    offs = rows[:, None] * stride_xm + cols[None, :]
    if PROLOGUE == 3:
        gate = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + offs + K, mask=mask, other=0.0).to(tl.float32)
        silu = round_to(gate / (1.0 + tl.exp(-gate)), DT).to(tl.float32)
        a = round_to(silu * up, DT).to(tl.float32)
        return a, a
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE == 0:
        return h, h
    if PROLOGUE == 2:
        r = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        h = round_to(r.to(tl.float32) + h, DT).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)
    return g[None, :] * h, h


@triton.jit
def _fp16_row_scales(
    x_ptr,
    res_ptr,
    g_ptr,
    rows,  # [BLOCK_M]
    M,
    K,
    stride_xm,
    stride_rm,
    PROLOGUE: tl.constexpr,
    DT: tl.constexpr,
    CHUNK: tl.constexpr = 2048,
):
    """(up, down) [BLOCK_M] fp32 for an fp16 MMA operand: up is the power of two that puts the
    row's largest |a| in [2^14, 2^15), down its exact inverse (rows past M: any). Within fp16's
    range a row keeps full precision down to 2^-29 of its largest value (g * h of an
    un-normalised residual can be tiny or past 65504). One pass over each real row (from L2)
    before the weight stream."""
    ks = tl.arange(0, CHUNK)
    one = tl.arange(0, 1)
    e = tl.full([rows.shape[0]], 15, tl.int32)
    for m in range(M):
        amax = tl.zeros([1, CHUNK], dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            cols = k0 + ks
            a, _ = _prologue_chunk(
                x_ptr,
                res_ptr,
                g_ptr,
                one + m,
                cols,
                one == 0,
                cols < K,
                K,
                stride_xm,
                stride_rm,
                PROLOGUE,
                DT,
            )
            amax = tl.maximum(amax, tl.abs(a))
        top = tl.max(tl.max(amax, 1), 0)
        em = tl.maximum((top.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15)  # biased exponent
        e = tl.where(rows == m, em, e)
    up = ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(141 - e)
    down = ((e - 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 141), exact inverse
    return up, down


@triton.jit
def _accumulate(
    acc,  # MMA: [BLOCK_N, BLOCK_M] (y^T); FMA: [BLOCK_M, BLOCK_N, BLOCK_K]; fp32
    sq,  # MMA: [BLOCK_M]; FMA: [BLOCK_M, BLOCK_K]; fp32
    up,  # MMA with an fp16 operand: [BLOCK_M] power-of-two scale of each input row
    w,  # [BLOCK_N, BLOCK_K] this chunk of the weight rows
    k0,
    ks,
    x_ptr,
    res_ptr,
    g_ptr,
    new_res_ptr,
    rows,
    row_mask,
    pid,
    K,
    stride_xm,
    stride_rm,
    stride_nrm,
    PROLOGUE: tl.constexpr,
    DT: tl.constexpr,
    MMA: tl.constexpr,
    OP: tl.constexpr,
    EMULATE: tl.constexpr,
):
    cols = k0 + ks
    k_mask = cols < K
    a, h = _prologue_chunk(
        x_ptr, res_ptr, g_ptr, rows, cols, row_mask, k_mask, K, stride_xm, stride_rm, PROLOGUE, DT
    )
    if PROLOGUE == 2:  # noqa: SIM102  (a compile-time test around a runtime one)
        if pid == 0:
            tl.store(
                new_res_ptr + rows[:, None] * stride_nrm + cols[None, :],
                h.to(DT),
                mask=row_mask[:, None] & k_mask[None, :],
            )
    if MMA:
        wo = w.to(OP)  # [BLOCK_N, BLOCK_K]; FP8 widens exactly to fp16
        if OP == tl.float16:  # noqa: SIM300  (a compile-time dtype test)
            a = a * up[:, None]  # the row's power of two (_fp16_row_scales)
        a = round_to(a, OP)  # [BLOCK_M, BLOCK_K]: the product's input, rounded once
        if EMULATE:  # the CPU interpreter's dot mishandles bf16: the same products in fp32
            acc = tl.dot(wo.to(tl.float32), tl.trans(a.to(tl.float32)), acc)
        else:
            acc = tl.dot(wo, tl.trans(a), acc)  # [BLOCK_N, BLOCK_M]
        if PROLOGUE == 1 or PROLOGUE == 2:
            sq += tl.sum(h * h, 1)
    else:
        acc += a[:, None, :] * w.to(tl.float32)[None, :, :]
        if PROLOGUE == 1 or PROLOGUE == 2:
            sq += h * h
    return acc, sq


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] ([M, 2K] for SILU_MUL)
    res_ptr,  # [M, K] residual (ADD_RMS)
    g_ptr,  # [K] norm weight (RMS, ADD_RMS)
    w_ptr,  # [N, K] model dtype, or FP8 (HAS_SCALE)
    b_ptr,  # [N] bias (HAS_BIAS)
    s_ptr,  # [N] fp32 per-row scale of an FP8 weight (HAS_SCALE)
    y_ptr,  # [M, N]
    new_res_ptr,  # [M, K] x + residual (ADD_RMS; written by program 0)
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_rm,
    stride_wn,
    stride_ym,
    stride_nrm,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # MMA: 16, rows past M masked to 0
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    MMA: tl.constexpr,  # tensor cores (a 16-bit model dtype); FMA otherwise
    EMULATE: tl.constexpr,  # MMA under the CPU interpreter
):
    pid = tl.program_id(0)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    # MMA operand dtype: an FP8 weight widens exactly to fp16 (and the input goes in scaled per
    # row); 16-bit weights go in as they are.
    OP: tl.constexpr = tl.float16 if HAS_SCALE else DT
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    ks = tl.arange(0, BLOCK_K)
    n_offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N

    # One pass over K: the product and, for the RMS prologues, each row's sum of squares; the
    # row's rstd scales the finished dot product (rms_norm(h) . w = rstd * ((g * h) . w)).
    # FMA accumulates in a register tile reduced once at the end; MMA in the dot's tile.
    if MMA:
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    w_rows = w_ptr + n_offs[:, None].to(tl.int64) * stride_wn
    # The first weight chunk is read before waiting for the previous kernel (PDL): weights are
    # never written, and the reads fill the bandwidth that kernel's last wave leaves idle.
    w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & (ks < K)[None, :], other=0.0)
    if PDL:
        gdc_launch_dependents()  # the next kernel may start once every program got here
        gdc_wait()  # everything the previous kernel wrote (x, residual) is visible after this
    # An fp16 MMA operand goes in scaled per row (_fp16_row_scales); the product is scaled back.
    up = tl.full([BLOCK_M], 1.0, tl.float32)
    down = up
    if MMA:  # noqa: SIM102  (compile-time tests)
        if OP == tl.float16:  # noqa: SIM300
            up, down = _fp16_row_scales(
                x_ptr, res_ptr, g_ptr, rows, M, K, stride_xm, stride_rm, PROLOGUE, DT
            )
    acc, sq = _accumulate(
        acc,
        sq,
        up,
        w,
        0,
        ks,
        x_ptr,
        res_ptr,
        g_ptr,
        new_res_ptr,
        rows,
        row_mask,
        pid,
        K,
        stride_xm,
        stride_rm,
        stride_nrm,
        PROLOGUE,
        DT,
        MMA,
        OP,
        EMULATE,
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + ks
        w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & (cols < K)[None, :], other=0.0)
        acc, sq = _accumulate(
            acc,
            sq,
            up,
            w,
            k0,
            ks,
            x_ptr,
            res_ptr,
            g_ptr,
            new_res_ptr,
            rows,
            row_mask,
            pid,
            K,
            stride_xm,
            stride_rm,
            stride_nrm,
            PROLOGUE,
            DT,
            MMA,
            OP,
            EMULATE,
        )
    if MMA:
        y = tl.trans(acc) * down[:, None]  # [BLOCK_M, BLOCK_N]
    else:
        y = tl.sum(acc, 2)  # [BLOCK_M, BLOCK_N]
        sq = tl.sum(sq, 1)
    if PROLOGUE == 1 or PROLOGUE == 2:
        y *= tl.rsqrt(sq / K + eps)[:, None]
    if HAS_SCALE:
        y *= tl.load(s_ptr + n_offs, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + n_offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + n_offs[None, :],
        y.to(DT),
        mask=row_mask[:, None] & n_mask[None, :],
    )


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per (row count, prologue), the best summed over the
# llama-3-8b and llama-3.2-1b shapes in the H100 sweep of bench/gemv.py: narrow row tiles with
# long K chunks keep enough loads in flight per SM and give 2-4x the SMs in programs even at
# N = 2048; the norm prologues amortise their input reads over wider tiles.
_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (1, NONE): (2, 2048, 4, 2),
    (1, RMS): (8, 1024, 4, 2),
    (1, ADD_RMS): (8, 1024, 4, 2),
    (1, SILU_MUL): (8, 1024, 4, 4),
    **{(2, p): (4, 1024, 4, 4) for p in (NONE, RMS, ADD_RMS, SILU_MUL)},
}
# FP8 weights (a byte each): longer K chunks keep 16-byte loads per thread. From the H100 sweep
# of llama-3.2-1b shapes (bench/gemv.py --fp8 --models 1b); RMS follows ADD_RMS (unswept).
_CONFIGS_FP8: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (1, NONE): (4, 2048, 4, 2),
    (1, RMS): (8, 1024, 4, 2),
    (1, ADD_RMS): (8, 1024, 4, 2),
    (1, SILU_MUL): (8, 2048, 8, 3),
    (2, NONE): (4, 1024, 4, 4),
    (2, RMS): (4, 2048, 4, 2),
    (2, ADD_RMS): (4, 2048, 4, 2),
    (2, SILU_MUL): (8, 2048, 8, 2),
}
_CONFIG_OVERRIDE: tuple[int, int, int, int] | None = None  # the microbenchmark's sweep sets this


def _mma_config(n: int, fp8: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the MMA kernel: the best per layer of the H100
    sweep over llama-3-8b (bf16, 1-16 rows) and llama-3.2-1b (FP8, 1-2 rows) shapes
    (bench/gemv.py --sweep --rows ...); they differ from the runner-up by 1-3%."""
    if fp8:
        return (32, 256, 4, 4) if n >= 65536 else (64, 256, 4, 3)
    return (128, 128, 8, 4) if 16384 <= n < 65536 else (64, 256, 4, 4)


_MMA_CONFIG_OVERRIDE: tuple[int, int, int, int] | None = None  # as _CONFIG_OVERRIDE


@functools.cache
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_for(m: int, n: int, pid: int, dtype: torch.dtype, fp8: bool) -> str:
    """Which kernel ``gemv`` runs for m rows of an [n, K] weight: "fma", "mma" or "unfused".

    From bench/gemv.py on the H100: at one row the FMA kernel is 3-10% faster than the MMA
    kernel for 16-bit weights, at two it loses to cuBLAS (and the MMA kernel wins, 3-19%); a
    SiLU-and-mul prologue costs the MMA kernel 2x, and 16-bit rows past the first run it
    unfused. FP8 weights stay on the FMA kernel where they are narrow (MMA_MIN_N_FP8)."""
    half = dtype in (torch.bfloat16, torch.float16)
    if half and pid != SILU_MUL and m <= MMA_M and (n >= MMA_MIN_N_FP8 if fp8 else m >= 2):
        return "mma"
    if m == 1 or (m <= MAX_M and (fp8 or not half)):
        return "fma"
    return "unfused"


def _unfused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prologue: str,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows neither kernel takes: the prologue's own Triton kernel, then cuBLAS (or fp8_linear's
    fastest backend), as the layers run them unfused."""
    x, new_res = apply_prologue(x, prologue, norm_weight, eps, residual, backend="triton")
    if weight_scale is None:
        return F.linear(x, weight, bias), new_res
    # cuBLAS FP8: a bf16 output, K and N in multiples of 16 (quant/fp8.py checks the same)
    n, k = weight.shape
    fast = fp8_linear.supported(x.device) and x.dtype == torch.bfloat16 and n % 16 == k % 16 == 0
    backend = "scaled_mm" if fast else kernels.REFERENCE
    return kernels.get("fp8_linear", backend)(x, weight, weight_scale, bias), new_res


_PROLOGUE_IDS = dict(zip(PROLOGUES, (NONE, RMS, ADD_RMS, SILU_MUL), strict=True))


@register("gemv", "triton", priority=0)
def gemv(
    x: torch.Tensor,  # [M, K]; [M, 2K] for "silu_and_mul"
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    *,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,  # [K] ("rms_norm", "add_rms_norm")
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # [M, K] ("add_rms_norm")
    weight_scale: torch.Tensor | None = None,  # [N] fp32: weight is float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (y [M, N], residual + x [M, K] or None)
    """``ops_ref.gemv`` for 1..MMA_M rows; out of place (the inputs are not modified). The FMA or
    the MMA kernel by ``kernel_for``, or the prologue's kernel and cuBLAS (``_unfused``)."""
    m = x.shape[0]
    n, k = weight.shape
    pid = _PROLOGUE_IDS[prologue]
    if not 1 <= m <= MMA_M:
        raise ValueError(f"gemv takes 1..{MMA_M} rows, got {m}")
    if x.shape[1] != (2 * k if pid == SILU_MUL else k):
        raise ValueError(f"input width {x.shape[1]} does not fit weight {tuple(weight.shape)}")
    if weight_scale is not None:
        if weight.dtype != torch.float8_e4m3fn or weight_scale.shape != (n,):
            raise ValueError("a weight_scale goes with a float8_e4m3fn weight, one scale per row")
        weight_scale = weight_scale.float().contiguous()
    elif x.dtype != weight.dtype:
        raise ValueError(f"input dtype {x.dtype} != weight dtype {weight.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        # no copy: under PDL the first weight chunk is read before waiting on the kernel before,
        # which only a weight that no kernel writes allows
        raise ValueError("gemv needs a weight with unit-stride rows")
    if pid in (RMS, ADD_RMS):
        assert norm_weight is not None
        norm_weight = norm_weight.contiguous()
    kernel_name = kernel_for(m, n, pid, x.dtype, weight_scale is not None)
    if kernel_name == "unfused":
        return _unfused(x, weight, bias, prologue, norm_weight, eps, residual, weight_scale)
    mma = kernel_name == "mma"
    new_res = None
    if pid == ADD_RMS:
        assert residual is not None
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        new_res = torch.empty(m, k, dtype=x.dtype, device=x.device)  # [M, K]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    if mma:
        block_m = MMA_M
        config = _MMA_CONFIG_OVERRIDE or _mma_config(n, weight_scale is not None)
    else:
        block_m = triton.next_power_of_2(m)
        table = _CONFIGS if weight_scale is None else _CONFIGS_FP8
        config = _CONFIG_OVERRIDE or table[block_m, pid]
    block_n, block_k, warps, stages = config
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else weight,
        weight,
        bias if bias is not None else x,
        weight_scale if weight_scale is not None else x,
        y,
        new_res if new_res is not None else y,
        m,
        n,
        k,
        eps,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        weight.stride(0),
        y.stride(0),
        new_res.stride(0) if new_res is not None else 0,
        PROLOGUE=pid,
        HAS_BIAS=bias is not None,
        HAS_SCALE=weight_scale is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
        MMA=mma,
        EMULATE=mma and _interpreted(),
        **pdl_launch(x.device),
    )
    return y, new_res


# Rows the model routes here (larger M goes to the layers' own forward). fp32 weights: one row
# (at two the FMA kernel loses to norm kernel + cuBLAS on the H100, bench/gemv.py: 202 vs 173 us
# per llama-3-8b layer).
gemv.max_rows = 1  # type: ignore[attr-defined]
# 16-bit weights: the MMA kernel's tile. At 2-16 rows it reads a llama-3-8b layer's qkv, o and
# gate_up weights 3-19% faster than cuBLAS (and the head 9%), the SiLU kernel + cuBLAS run down.
gemv.max_rows_16bit = MMA_M  # type: ignore[attr-defined]
# With an FP8 weight the alternative reads the same bytes but quantizes the input first
# (fp8_linear's scaled_mm), so the GEMV takes every row the FMA kernel has configs for.
gemv.max_rows_quantized = MAX_M  # type: ignore[attr-defined]


def _rows_beside_scaled_mm(n: int) -> int:
    """Rows an FP8 LM head of ``n`` outputs (this rank's) gives the GEMV where FP8 tensor cores
    take the rest: MAX_M where the MMA kernel reads it (llama-3.2-1b's head on the H100: 96 us
    at one row against 107 for the input's quantization + cuBLAS, level at two, 104 us each;
    bench/results/gemv-fp8-1b-rowscale-H100.json), none where the FMA kernel would (128)."""
    return MAX_M if kernel_for(1, n, NONE, torch.bfloat16, fp8=True) == "mma" else 0


gemv.rows_beside_scaled_mm = _rows_beside_scaled_mm  # type: ignore[attr-defined]
