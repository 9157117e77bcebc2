"""Triton twins of the small per-token ops: KV write, RMSNorm (+ residual add), SiLU-and-mul, RoPE.

Each op has the signature and the numerics of its torch reference (``attention_ref.write_kv`` and
``ops_ref``): math in fp32 with a rounding to the model dtype exactly where the torch layers round
(after each elementwise op the layer runs in the model dtype). One program handles one token
(row); head/hidden dims are padded to powers of two and masked, so any sizes work.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from rayfleet.kernels import register

# The references register first so that, at equal priority, they stay each op's default.
from rayfleet.kernels import attention_ref, ops_ref  # noqa: F401, E402  isort: skip


@triton.jit
def round_to(x, TY: tl.constexpr):
    """fp32 ``x`` -> ``TY`` with round-to-nearest-even, as torch rounds. For bf16 the rounding is
    done on the bits first: Triton's CPU interpreter truncates fp32 -> bf16 casts, the GPU does
    not; after this the cast is exact on both. (NaN payloads may turn into inf.)"""
    if TY == tl.bfloat16:  # noqa: SIM300  (a compile-time dtype test)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(TY)


FP8_MAX = tl.constexpr(attention_ref.FP8_MAX)  # a constexpr: kernels read it
INV_FP8_MAX = tl.constexpr(1.0 / attention_ref.FP8_MAX)  # rounded to fp32 where it is used


@triton.jit
def to_cache(x, TY: tl.constexpr):
    """A K/V value -> the cache dtype ``TY``, as ``attention_ref.to_cache_dtype`` does it: an fp8
    (e4m3) cache saturates at +-FP8_MAX and rounds to nearest even. The rounding is done here in
    fp32, so the final cast is exact: Triton's CPU interpreter rounds fp8 casts half-up and
    flushes subnormals, the GPU does not."""
    if TY == tl.float8e4nv:  # noqa: SIM300  (a compile-time dtype test)
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)  # (drops NaN: restored below)
        r = x.to(tl.uint32, bitcast=True)  # normal range: keep 3 of 23 mantissa bits
        normal = ((r + 0x7FFFF + ((r >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        # |x| < 2^-6: multiples of 2^-9 (the ulp of 1.5 * 2^14), keeping the sign (-0 too)
        sub = (tl.abs(x) + 24576.0) - 24576.0
        sub = (sub.to(tl.uint32, bitcast=True) | (r & 0x80000000)).to(tl.float32, bitcast=True)
        y = tl.where(tl.abs(x) < 0.015625, sub, normal).to(TY)
        # NaN -> e4m3's NaN byte (0x7F, with the sign), as torch converts it
        nan = (((bits >> 24) & 0x80) | 0x7F).to(tl.uint8).to(TY, bitcast=True)
        return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, nan, y)
    return x.to(TY)


@triton.jit
def _quantize_rows_fp8_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [M, K] float8_e4m3fn
    s_ptr,  # [M] float32
    K,
    stride_x,
    stride_q,
    BLOCK: tl.constexpr,
):
    """One program per row: scale = absmax * fp32(1 / 448), then the row divided by it
    (correctly rounded, as torch divides tensors) and rounded as ``to_cache`` rounds."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) * INV_FP8_MAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        q = to_cache(tl.math.div_rn(x, scale), tl.float8e4nv)
        tl.store(q_ptr + row * stride_q + k0 + cols, q, mask=mask)


@register("quantize_rows_fp8", "triton", priority=0)
def quantize_rows_fp8(
    x: torch.Tensor,  # [M, K]
) -> tuple[torch.Tensor, torch.Tensor]:  # (q [M, K] float8_e4m3fn, scale [M, 1] float32)
    """``ops_ref.quantize_rows_fp8`` in one launch (the input of fp8_linear's FP8 GEMM)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        _quantize_rows_fp8_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block)
    return q, scale


@triton.jit
def from_cache(x, TY: tl.constexpr):
    """A tile read from the KV cache -> the compute dtype ``TY`` (exact; a no-op unless fp8)."""
    if x.dtype != TY:
        x = x.to(tl.float32).to(TY)
    return x


# ---- programmatic dependent launch (Hopper+) -------------------------------------------------
# A kernel launched with ``launch_pdl=True`` may start while the kernel before it in the stream is
# still running: its programs run their independent prologue (weight reads) and then block in
# ``gdc_wait()`` until that kernel has finished and its writes are visible; the previous kernel
# lets it start early with ``gdc_launch_dependents()``. Every store of a PDL kernel comes after its
# wait, so memory the caching allocator hands from one kernel to the next is never raced.

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_PDL = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except ImportError:  # an older triton: never launched with PDL, the calls below are dead code
    _HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@functools.cache
def _pdl_device(index: int) -> bool:
    return (
        _HAS_PDL
        and os.environ.get("RAYFLEET_PDL", "1") != "0"
        and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
        and torch.cuda.get_device_capability(index)[0] >= 9
    )


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The start of a PDL-aware kernel that reads nothing before waiting: let the next kernel
    launch, then wait for the previous one."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Launch keywords of a PDL-aware kernel (its ``PDL`` constexpr and triton's ``launch_pdl``):
    on when the device is Hopper or newer and triton supports it; RAYFLEET_PDL=0 turns it off."""
    on = device.type == "cuda" and _pdl_device(device.index or 0)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


# ---- KV write -------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    slot_ptr,  # [T] int64
    num_heads,
    head_dim,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // PAGE
    offset = slot % PAGE
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (dims < head_dim)[None, :]
    k = tl.load(k_ptr + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    kc = k_cache_ptr + block * stride_kcb + offset * stride_kcs
    vc = v_cache_ptr + block * stride_vcb + offset * stride_vcs
    tl.store(
        kc + heads[:, None] * stride_kch + dims[None, :],
        to_cache(k, k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc + heads[:, None] * stride_vch + dims[None, :],
        to_cache(v, v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def _unit_last(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


@register("write_kv", "triton", priority=0)
def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; slots < 0 are skipped (padding)
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a unit last stride")
    k, v = _unit_last(k, v)
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        num_heads,
        head_dim,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        PAGE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


# ---- RMSNorm ----------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [R, N]
    res_ptr,  # [R, N]  residual (read only when HAS_RESIDUAL)
    w_ptr,  # [N]
    out_ptr,  # [R, N]
    new_res_ptr,  # [R, N]  residual + x (written only when HAS_RESIDUAL)
    n_cols,
    eps,
    stride_x,
    stride_res,
    stride_out,
    stride_new_res,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # the decoder's ``residual + x`` runs in the model dtype: one rounding
        x = round_to(r.to(tl.float32) + x.to(tl.float32), new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
    y = round_to(h * rstd, x.dtype).to(tl.float32)  # RMSNorm casts back before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = round_to(w * y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def _norm_launch(
    x: torch.Tensor,  # [..., N]
    residual: torch.Tensor | None,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)  # [R, N]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = new_res = None
    norm_dtype = x.dtype
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        norm_dtype = torch.promote_types(residual.dtype, x.dtype)
        new_res = torch.empty(x2.shape, dtype=norm_dtype, device=x.device)  # [R, N]
    weight = weight.contiguous()
    out = torch.empty(
        x2.shape, dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device
    )  # [R, N]
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            x2,
            r2 if r2 is not None else x2,
            weight,
            out,
            new_res if new_res is not None else out,
            n,
            eps,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            out.stride(0),
            new_res.stride(0) if new_res is not None else 0,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(4, block // 1024)),
            **pdl_launch(x.device),
        )
    shape = x.shape
    return out.view(shape), new_res.view(shape) if new_res is not None else None


@register("rms_norm", "triton", priority=0)
def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [..., hidden]
    return _norm_launch(x, None, weight, eps)[0]


@register("fused_add_rms_norm", "triton", priority=0)
def fused_add_rms_norm(
    x: torch.Tensor,  # [..., hidden]
    residual: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new_residual), both [..., hidden]
    """``(rms_norm(residual + x), residual + x)`` in one pass; out of place."""
    out, new_res = _norm_launch(x, residual, weight, eps)
    assert new_res is not None
    return out, new_res


# ---- SiLU and mul -----------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [R, 2 * I]
    out_ptr,  # [R, I]
    inter,
    stride_x,
    stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = round_to(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)  # F.silu rounds
    tl.store(out_ptr + row * stride_out + cols, round_to(silu * up, dtype), mask=mask)


@register("silu_and_mul", "triton", priority=0)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] -> [..., d]
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"last dim must be even, got {two_i}")
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)  # [R, 2I]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)  # [R, I]
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, inter, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], inter)


# ---- RoPE (rotate-half) -----------------------------------------------------------------------


@triton.jit
def _rope_rotate(
    x_row_ptr,  # -> [H, D] of one token
    stride_h,
    cos_row_ptr,  # -> [D]
    sin_row_ptr,
    num_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    ROUND_TY: tl.constexpr,
):
    """Rotated halves (o1, o2) of one token's heads: x*cos + rotate_half(x)*sin, each product and
    the sum rounded to ROUND_TY as the torch expression does in the model dtype."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    d_ok = dims < HALF
    mask = (heads < num_heads)[:, None] & d_ok[None, :]
    ptrs = x_row_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [H, HALF]
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_row_ptr + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_row_ptr + HALF + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row_ptr + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row_ptr + HALF + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    a1 = round_to(x1 * c1, ROUND_TY).to(tl.float32)
    b1 = round_to(-x2 * s1, ROUND_TY).to(tl.float32)
    a2 = round_to(x2 * c2, ROUND_TY).to(tl.float32)
    b2 = round_to(x1 * s2, ROUND_TY).to(tl.float32)
    return round_to(a1 + b1, ROUND_TY), round_to(a2 + b2, ROUND_TY), mask


@triton.jit
def _rope_kernel(
    x_ptr,  # [T, H, D]
    out_ptr,  # [T, H, D] (may alias x_ptr)
    cos_ptr,  # [T, D]
    sin_ptr,  # [T, D]
    num_heads,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_cos,
    stride_sin,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    o1, o2, mask = _rope_rotate(
        x_ptr + tok * stride_xt,
        stride_xh,
        cos_ptr + tok * stride_cos,
        sin_ptr + tok * stride_sin,
        num_heads,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
        out_ptr.dtype.element_ty,
    )
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    ptrs = out_ptr + tok * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(ptrs, o1, mask=mask)
    tl.store(ptrs + HALF, o2, mask=mask)


def _check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    if x.shape[-1] % 2 or cos.shape != (x.shape[0], x.shape[-1]) or sin.shape != cos.shape:
        raise ValueError(f"rope needs x [T, H, even D], cos/sin [T, D]; got {x.shape}, {cos.shape}")
    return torch.promote_types(x.dtype, cos.dtype)


def _rope_one(
    x: torch.Tensor,  # [T, H, D]
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,  # [T, D]
    inplace: bool,
) -> torch.Tensor:  # [T, H, D]
    out_dtype = _check_rope(x, cos, sin)
    if inplace:
        if out_dtype != x.dtype:
            raise ValueError(f"in-place rope would round {out_dtype} results into {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError("in-place rope needs a unit last stride")
        out = x
    else:
        (x,) = _unit_last(x)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    cos, sin = _unit_last(cos, sin)
    t, h, d = x.shape
    if t:
        _rope_kernel[(t,)](
            x,
            out,
            cos,
            sin,
            h,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            cos.stride(0),
            sin.stride(0),
            HALF=d // 2,
            BLOCK_H=triton.next_power_of_2(h),
            BLOCK_HALF=triton.next_power_of_2(d // 2),
            num_warps=4,
        )
    return out


@register("rotary_embedding", "triton", priority=0)
def rotary_embedding(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated (q, k)
    """Rotate-half RoPE; ``inplace=True`` overwrites q and k (views such as the split of a fused
    qkv output are fine) and returns them, else returns new tensors."""
    return _rope_one(q, cos, sin, inplace), _rope_one(k, cos, sin, inplace)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr,  # [T, Hq, D]
    q_out_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    cos_ptr,  # [T, D]
    sin_ptr,  # [T, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    slot_ptr,  # [T] int64
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_qot,
    stride_qoh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    PAGE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    cos_row = cos_ptr + tok * stride_cos
    sin_row = sin_ptr + tok * stride_sin
    dims = tl.arange(0, BLOCK_HALF)

    o1, o2, mask = _rope_rotate(
        q_ptr + tok * stride_qt,
        stride_qh,
        cos_row,
        sin_row,
        num_q_heads,
        HALF,
        BLOCK_HQ,
        BLOCK_HALF,
        q_out_ptr.dtype.element_ty,
    )
    heads = tl.arange(0, BLOCK_HQ)
    ptrs = q_out_ptr + tok * stride_qot + heads[:, None] * stride_qoh + dims[None, :]
    tl.store(ptrs, o1, mask=mask)
    tl.store(ptrs + HALF, o2, mask=mask)

    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        block = slot // PAGE
        offset = slot % PAGE
        k1, k2, kmask = _rope_rotate(
            k_ptr + tok * stride_kt,
            stride_kh,
            cos_row,
            sin_row,
            num_kv_heads,
            HALF,
            BLOCK_HKV,
            BLOCK_HALF,
            q_out_ptr.dtype.element_ty,
        )
        kv_heads = tl.arange(0, BLOCK_HKV)
        cache_ty = k_cache_ptr.dtype.element_ty
        kc = (
            k_cache_ptr
            + block * stride_kcb
            + offset * stride_kcs
            + kv_heads[:, None] * stride_kch
            + dims[None, :]
        )
        tl.store(kc, to_cache(k1, cache_ty), mask=kmask)
        tl.store(kc + HALF, to_cache(k2, cache_ty), mask=kmask)
        vp = v_ptr + tok * stride_vt + kv_heads[:, None] * stride_vh + dims[None, :]
        vc = (
            v_cache_ptr
            + block * stride_vcb
            + offset * stride_vcs
            + kv_heads[:, None] * stride_vch
            + dims[None, :]
        )
        vty = v_cache_ptr.dtype.element_ty
        tl.store(vc, to_cache(tl.load(vp, mask=kmask), vty), mask=kmask)
        tl.store(vc + HALF, to_cache(tl.load(vp + HALF, mask=kmask), vty), mask=kmask)


@register("rope_and_write_kv", "triton", priority=0)
def rope_and_write_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; slots < 0 are skipped
) -> torch.Tensor:  # rotated q, [num_tokens, num_heads, head_dim]
    """RoPE on q and k plus the KV write of (rotated k, v) in one launch; inputs unmodified."""
    out_dtype = _check_rope(q, cos, sin)
    _check_rope(k, cos, sin)
    if k.dtype != q.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a unit last stride")
    q, k, v, cos, sin = _unit_last(q, k, v, cos, sin)
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if t:
        _rope_write_kv_kernel[(t,)](
            q,
            q_out,
            k,
            v,
            cos,
            sin,
            k_cache,
            v_cache,
            slot_mapping,
            hq,
            hkv,
            q.stride(0),
            q.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            cos.stride(0),
            sin.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            PAGE=k_cache.shape[1],
            HALF=d // 2,
            BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HKV=triton.next_power_of_2(hkv),
            BLOCK_HALF=triton.next_power_of_2(d // 2),
            num_warps=4,
            **pdl_launch(q.device),
        )
    return q_out
