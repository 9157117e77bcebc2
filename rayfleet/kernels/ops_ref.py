"""Torch references for the fused elementwise ops (backend "torch"); the oracle of triton_ops.

Numerics follow the model layers exactly (``replicas/model/layers.py`` RMSNorm / SiluAndMul and
``rotary.apply_rotary``); tests check that equality bit for bit:

    rms_norm            h = x.float(); h = h * rsqrt(mean(h^2) + eps); out = weight * h.to(x.dtype)
    fused_add_rms_norm  new_residual = residual + x (model dtype); out = rms_norm(new_residual)
    silu_and_mul        gate, up = x.chunk(2, -1); out = silu(gate) * up (model dtype)
    rotary_embedding    x * cos + rotate_half(x) * sin, rotate-half convention, model dtype
    gemv                F.linear(prologue(x), weight, bias), the prologue one of the ops above
    fp8_linear          x W^T + b for an FP8 weight W = q * scale[:, None] (one scale per output
                        row), computed in fp32 from the unrounded product and rounded once
    quantize_rows_fp8   per-row (token) FP8: scale = max(|x|) / 448, q = fp8_e4m3(x / scale)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayfleet import kernels
from rayfleet.kernels import register
from rayfleet.kernels.attention_ref import (
    FP8_MAX,
    AttentionMetadata,
    paged_attention,
    store_slots,
    to_cache_dtype,
)


@register("rms_norm", "torch")
def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [..., hidden]
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@register("fused_add_rms_norm", "torch")
def fused_add_rms_norm(
    x: torch.Tensor,  # [..., hidden]
    residual: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new_residual), both [..., hidden]
    """``(rms_norm(residual + x), residual + x)``; out of place (inputs are not modified)."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


@register("silu_and_mul", "torch")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2 * d] -> [..., d]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


@register("rotary_embedding", "torch")
def rotary_embedding(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim], gathered per token (RotaryEmbedding.forward)
    sin: torch.Tensor,  # [num_tokens, head_dim]
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated (q, k)
    """Rotate-half RoPE. ``inplace=True`` writes the result into ``q`` and ``k`` and returns them;
    otherwise new tensors are returned and the inputs are left untouched."""
    q_rot, k_rot = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if not inplace:
        return q_rot, k_rot
    q.copy_(q_rot)
    k.copy_(k_rot)
    return q, k


@register("rope_and_write_kv", "torch")
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
    """RoPE on q and k, then the KV-cache write of (rotated k, v). The rotated k only lands in the
    cache; ``q``, ``k`` and ``v`` are not modified."""
    q_rot, k_rot = _rotate(q, cos, sin), _rotate(k, cos, sin)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    store_slots(k_cache, slots, k_rot[keep])
    store_slots(v_cache, slots, v[keep])
    return q_rot


@register("rope_write_kv_attention", "torch")
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
    """``rope_and_write_kv``, then ``paged_attention`` of the rotated q over the cache."""
    q = rope_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
    return paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)


# What ``gemv`` runs on its input before the linear (the small-M decode path fuses it in).
PROLOGUES = ("none", "rms_norm", "add_rms_norm", "silu_and_mul")


def apply_prologue(
    x: torch.Tensor,  # [M, K]; [M, 2K] for "silu_and_mul"
    prologue: str,
    norm_weight: torch.Tensor | None,  # [K] ("rms_norm", "add_rms_norm")
    eps: float,
    residual: torch.Tensor | None,  # [M, K] ("add_rms_norm")
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (prologue(x) [M, K], residual + x or None)
    """The op ``gemv`` runs in front of its linear, by ``backend``'s kernels: these references
    for ``gemv`` here, the Triton ones for the rows triton_gemv runs unfused."""
    if prologue == "rms_norm":
        assert norm_weight is not None
        return kernels.get("rms_norm", backend)(x, norm_weight, eps), None
    if prologue == "add_rms_norm":
        assert norm_weight is not None and residual is not None
        return kernels.get("fused_add_rms_norm", backend)(x, residual, norm_weight, eps)
    if prologue == "silu_and_mul":
        return kernels.get("silu_and_mul", backend)(x), None
    if prologue != "none":
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    return x, None


@register("gemv", "torch")
def gemv(
    x: torch.Tensor,  # [M, K]; [M, 2K] for "silu_and_mul"
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    *,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,  # [K] ("rms_norm", "add_rms_norm")
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # [M, K] ("add_rms_norm")
    weight_scale: torch.Tensor | None = None,  # [N] fp32: weight is FP8, see fp8_linear
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (y [M, N], residual + x [M, K] or None)
    """A linear layer with the op in front of it: ``F.linear(prologue(x), weight, bias)``
    (``fp8_linear`` with a ``weight_scale``). Only "add_rms_norm" returns a second tensor, the
    new residual stream ``residual + x``."""
    x, new_residual = apply_prologue(x, prologue, norm_weight, eps, residual)
    if weight_scale is not None:
        return fp8_linear(x, weight, weight_scale, bias), new_residual
    return F.linear(x, weight, bias), new_residual


@register("fp8_linear", "torch")
def fp8_linear(
    x: torch.Tensor,  # [..., K] model dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] x.dtype
    """``x (q * scale[:, None])^T + b`` in fp32 (the weight-only reference: the input is not
    quantized), rounded to the input's dtype once."""
    y = F.linear(x.float(), weight.float()) * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@register("quantize_rows_fp8", "torch")
def quantize_rows_fp8(
    x: torch.Tensor,  # [M, K]
) -> tuple[torch.Tensor, torch.Tensor]:  # (q [M, K] float8_e4m3fn, scale [M, 1] float32)
    """Each row scaled into the FP8 range by its own absmax (a zero row gets the tiny floor
    1e-12 / 448): x ~= q * scale. The scale is absmax times the fp32 reciprocal of 448 (what
    CUDA torch makes of a division by a scalar, so CPU and GPU agree)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) * (1.0 / FP8_MAX)
    return to_cache_dtype(x.float() / scale, torch.float8_e4m3fn), scale


@register("argmax", "torch")
def argmax(
    x: torch.Tensor,  # [N, V]
    out_host: torch.Tensor | None = None,  # [N] int64 host tensor, also given the ids
) -> torch.Tensor:  # [N] int64 on x's device
    """The first index of each row's maximum, NaN ranked highest (``torch.argmax``)."""
    out = x.argmax(dim=-1)
    if out_host is not None:
        out_host.copy_(out, non_blocking=True)
    return out


@register("stage_step_inputs", "torch")
def stage_step_inputs(
    src: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    dst: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    q: int,
    size: int,
    fill: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
) -> None:
    """A step of b requests computing q tokens each, into a CUDA graph's static buffers of batch
    ``size`` >= b (cuda_graphs.py). ``src`` = (ids, positions, slots [b*q] int64, seq_lens [b]
    int32, block tables [b, w] int32), ``dst`` the same buffers with room for ``size`` requests
    (tables [>= size, W >= w]). Token row t takes the id ``prev[fill[t]]`` where fill[t] >= 0
    (a token the previous step sampled and the host has not seen). Padding requests b..size-1
    get q rows of id 0 at position 0 into slot 0 (the null block) and context q; their table
    rows, and table columns past w, are left as they are."""
    b, w = check_stage(src, dst, q, size, fill, prev)
    s_ids, s_pos, s_slots, s_lens, s_tables = src
    ids, pos, slots, lens, tables = dst
    n, dev = b * q, ids.device
    ids[:n].copy_(s_ids)
    if fill is not None and prev is not None:
        f = fill.to(dev)
        ids[:n] = torch.where(f >= 0, prev[f.clamp(min=0)], ids[:n])
    pos[:n].copy_(s_pos)
    slots[:n].copy_(s_slots)
    lens[:b].copy_(s_lens)
    tables[:b, :w].copy_(s_tables)
    for buf in (ids, pos, slots):
        buf[n : size * q] = 0
    lens[b:size] = q


def check_stage(
    src: tuple[torch.Tensor, ...],
    dst: tuple[torch.Tensor, ...],
    q: int,
    size: int,
    fill: torch.Tensor | None,
    prev: torch.Tensor | None,
) -> tuple[int, int]:
    """(requests b, table width w) after checking the shapes ``stage_step_inputs`` relies on."""
    s_ids, s_pos, s_slots, s_lens, s_tables = src
    ids, pos, slots, lens, tables = dst
    b, w = s_tables.shape
    n = b * q
    if s_lens.shape != (b,) or any(t.shape != (n,) for t in (s_ids, s_pos, s_slots)):
        raise ValueError(f"a step of {b} requests x {q} tokens needs [{n}] token rows, [{b}] lens")
    if b > size or ids.shape[0] < size * q or lens.shape[0] < size or tables.shape[0] < size:
        raise ValueError(f"{b} requests do not fit buffers of batch {size} x {q}")
    if w > tables.shape[1] or tables.stride(1) != 1 or s_tables.stride(1) != 1:
        raise ValueError(f"block tables of width {w} do not fit {tuple(tables.shape)}")
    if (fill is None) != (prev is None) or (fill is not None and fill.shape != (n,)):
        raise ValueError("fill [b*q] and prev go together")
    return b, w


# Offsets into the int64 static inputs of a chained whole-proposal graph (spec/proposal_graphs.py),
# in this order: forward 1's ids, positions, slots [size * 2], context lengths [size]; forwards
# 2..k's positions, slots, context lengths [(k - 1) * size]; the per-row parameters x_last, off,
# dbase, kv [4 * size].
CHAIN_FIELDS = (
    "ids",
    "pos",
    "slots",
    "seq_lens",
    "step_pos",
    "step_slots",
    "step_seq_lens",
    "params",
)


@register("chain_proposal_inputs", "torch")
def chain_proposal_inputs(
    inputs: torch.Tensor,  # int64 static inputs, staged for a = 0 (start L - 1, end L + 1)
    tables: torch.Tensor,  # [>= size, W] int32 block tables
    best: torch.Tensor,  # [N] int64: the target's argmax per verified row
    drafts: torch.Tensor,  # flat int64: the drafts the verification checked
    offsets: tuple[int, ...],  # CHAIN_FIELDS' offsets into inputs
    size: int,
    k: int,
    block_size: int,
    max_kv: int,
) -> None:
    """Turn a chained proposal's inputs, staged as if no draft were accepted, into those for
    each row's accepted count a: a = how many of the row's kv drafts at ``drafts[dbase:]`` lead
    equal to ``best[off:]`` (the greedy rule); forward 1 feeds ``best[off + a - 1]`` (x_last
    when a = 0) and ``best[off + a]``, every position and context length moves up by a, and each
    real slot (nonzero) is recomputed from the table at its new position; forward 1's first row
    writes its slot only when a = kv (else 0, the null slot). Rows with kv = 0 (padding) keep
    a = 0. In place; no host synchronization. ``max_kv`` >= every row's kv and k."""
    o = dict(zip(CHAIN_FIELDS, offsets, strict=True))

    def field(name: str, n: int) -> torch.Tensor:
        return inputs[o[name] : o[name] + n]

    x_last, off, dbase, kv = field("params", 4 * size).view(4, size)
    j = torch.arange(max(max_kv, 1), device=inputs.device)
    drafted = drafts[(dbase[:, None] + j).clamp_(max=drafts.numel() - 1)]
    target = best[(off[:, None] + j).clamp_(max=best.numel() - 1)]
    a = ((drafted == target) & (j < kv[:, None])).long().cumprod(1).sum(1)  # [size]
    ids = field("ids", 2 * size).view(size, 2)
    ids[:, 1] = best[off + a]
    ids[:, 0] = torch.where(a > 0, best[(off + a - 1).clamp(min=0)], x_last)
    pos = field("pos", 2 * size).view(size, 2)
    pos += a[:, None]
    field("seq_lens", size).add_(a)
    step_pos = field("step_pos", (k - 1) * size).view(k - 1, size).T  # [size, k - 1]
    step_pos += a[:, None]
    field("step_seq_lens", (k - 1) * size).view(k - 1, size).T.add_(a[:, None])
    table = tables[:size].long()
    width = table.shape[1] - 1
    first = torch.stack((a == kv, torch.ones_like(a, dtype=torch.bool)), 1)
    for slots, p, keep in (
        (field("slots", 2 * size).view(size, 2), pos, first),
        (field("step_slots", (k - 1) * size).view(k - 1, size).T, step_pos, None),
    ):
        real = slots != 0 if keep is None else (slots != 0) & keep
        blocks = table.gather(1, (p // block_size).clamp_(max=width))
        slots.copy_(torch.where(real, blocks * block_size + p % block_size, 0))
