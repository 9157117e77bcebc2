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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rayfleet.kernels import register
from rayfleet.kernels.ops_ref import PROLOGUES
from rayfleet.kernels.triton_ops import (  # triton_ops also registers the references first
    gdc_launch_dependents,
    gdc_wait,
    pdl_launch,
    round_to,
)

NONE, RMS, ADD_RMS, SILU_MUL = 0, 1, 2, 3
MAX_M = 2  # rows the kernel takes


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
def _accumulate(
    acc,  # [BLOCK_M, BLOCK_N, BLOCK_K] fp32
    sq,  # [BLOCK_M, BLOCK_K] fp32
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    ks = tl.arange(0, BLOCK_K)
    n_offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N

    # One pass over K: the product and, for the RMS prologues, each row's sum of squares; the
    # row's rstd scales the finished dot product (rms_norm(h) . w = rstd * ((g * h) . w)).
    sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    w_rows = w_ptr + n_offs[:, None].to(tl.int64) * stride_wn
    # The first weight chunk is read before waiting for the previous kernel (PDL): weights are
    # never written, and the reads fill the bandwidth that kernel's last wave leaves idle.
    w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & (ks < K)[None, :], other=0.0)
    if PDL:
        gdc_launch_dependents()  # the next kernel may start once every program got here
        gdc_wait()  # everything the previous kernel wrote (x, residual) is visible after this
    acc, sq = _accumulate(
        acc,
        sq,
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
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + ks
        w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & (cols < K)[None, :], other=0.0)
        acc, sq = _accumulate(
            acc,
            sq,
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
        )
    y = tl.sum(acc, 2)  # [BLOCK_M, BLOCK_N]
    if PROLOGUE == 1 or PROLOGUE == 2:
        y *= tl.rsqrt(tl.sum(sq, 1) / K + eps)[:, None]
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
    """``ops_ref.gemv`` for 1..MAX_M rows; out of place (the inputs are not modified)."""
    m = x.shape[0]
    n, k = weight.shape
    pid = _PROLOGUE_IDS[prologue]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} rows, got {m}")
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
    new_res = None
    if pid == ADD_RMS:
        assert residual is not None
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        new_res = torch.empty(m, k, dtype=x.dtype, device=x.device)  # [M, K]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    block_m = triton.next_power_of_2(m)
    table = _CONFIGS if weight_scale is None else _CONFIGS_FP8
    block_n, block_k, warps, stages = _CONFIG_OVERRIDE or table[block_m, pid]
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
        **pdl_launch(x.device),
    )
    return y, new_res


# Rows the model routes here (larger M goes to F.linear): at M = 2 the fused GEMV already loses
# to norm kernel + cuBLAS on the H100 (bench/gemv.py: 202 vs 173 us per llama-3-8b layer).
gemv.max_rows = 1  # type: ignore[attr-defined]
# With an FP8 weight the alternative reads the same bytes but quantizes the input first
# (fp8_linear's scaled_mm), so the GEMV takes every row it has configs for.
gemv.max_rows_quantized = MAX_M  # type: ignore[attr-defined]
