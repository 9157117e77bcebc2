"""Triton RMSNorm / SiLU-and-mul / RoPE (+ fused KV write) against the torch references, and the
references against the model layers whose numerics they define."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rayfleet import kernels  # noqa: E402
from rayfleet.kernels import ops_ref, triton_ops  # noqa: E402
from rayfleet.replicas.model.layers import RMSNorm, SiluAndMul  # noqa: E402
from rayfleet.replicas.model.rotary import apply_rotary  # noqa: E402

Tol = Callable[[torch.dtype], dict[str, float]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize(
    "op",
    ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "rope_and_write_kv"],
)
def test_registered_beside_reference(op: str) -> None:
    assert kernels.backends(op)[0] == "torch"  # the reference stays the default
    assert kernels.get(op, "triton") is getattr(triton_ops, op)


# ---- the references reproduce the model layers exactly ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_match_layers(dtype: torch.dtype, gen: torch.Generator) -> None:
    x, r = rand(gen, 5, 48, dtype=dtype, device="cpu"), rand(gen, 5, 48, dtype=dtype, device="cpu")
    norm = RMSNorm(48, 1e-5, dtype=dtype)
    norm.weight.data.copy_(rand(gen, 48, dtype=dtype, device="cpu"))
    assert torch.equal(ops_ref.rms_norm(x, norm.weight, 1e-5), norm(x))
    out, res = norm(x, r)
    ref_out, ref_res = ops_ref.fused_add_rms_norm(x, r, norm.weight, 1e-5)
    assert torch.equal(ref_out, out) and torch.equal(ref_res, res)
    gu = rand(gen, 5, 64, dtype=dtype, device="cpu")
    assert torch.equal(ops_ref.silu_and_mul(gu), SiluAndMul()(gu))
    q, k = (
        rand(gen, 5, 4, 16, dtype=dtype, device="cpu"),
        rand(gen, 5, 2, 16, dtype=dtype, device="cpu"),
    )
    cos, sin = (
        rand(gen, 5, 16, dtype=dtype, device="cpu"),
        rand(gen, 5, 16, dtype=dtype, device="cpu"),
    )
    q_rot, k_rot = ops_ref.rotary_embedding(q, k, cos, sin)
    assert torch.equal(q_rot, apply_rotary(q, cos, sin))
    assert torch.equal(k_rot, apply_rotary(k, cos, sin))


# ---- Triton vs reference ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 100), (2, 3, 64), (1, 1024)])
def test_rms_norm(
    dtype: torch.dtype, shape: tuple[int, ...], device: str, gen: torch.Generator, tol: Tol
) -> None:
    x = rand(gen, *shape, dtype=dtype, device=device) * 3
    w = rand(gen, shape[-1], dtype=dtype, device=device)
    out = triton_ops.rms_norm(x, w, 1e-6)
    ref = ops_ref.rms_norm(x, w, 1e-6)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 100), (3, 256)])
def test_fused_add_rms_norm(
    dtype: torch.dtype, shape: tuple[int, ...], device: str, gen: torch.Generator, tol: Tol
) -> None:
    x = rand(gen, *shape, dtype=dtype, device=device)
    residual = rand(gen, *shape, dtype=dtype, device=device)
    w = rand(gen, shape[-1], dtype=dtype, device=device)
    x_before, res_before = x.clone(), residual.clone()
    out, new_res = triton_ops.fused_add_rms_norm(x, residual, w, 1e-5)
    ref_out, ref_res = ops_ref.fused_add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(new_res, ref_res)  # one rounding of the same sum: bit-exact
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)  # out of place


def test_rms_norm_strided_rows(device: str, gen: torch.Generator, tol: Tol) -> None:
    base = rand(gen, 6, 160, dtype=torch.float32, device=device)
    x = base[:, 16:144]  # [6, 128] rows with stride 160
    w = rand(gen, 128, dtype=torch.float32, device=device)
    torch.testing.assert_close(
        triton_ops.rms_norm(x, w, 1e-6), ops_ref.rms_norm(x, w, 1e-6), **tol(torch.float32)
    )


def test_norm_with_fp32_weight_promotes(device: str, gen: torch.Generator, tol: Tol) -> None:
    x = rand(gen, 4, 64, dtype=torch.bfloat16, device=device)
    w = rand(gen, 64, dtype=torch.float32, device=device)
    out, ref = triton_ops.rms_norm(x, w, 1e-6), ops_ref.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, **tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 96), (2, 3, 2 * 1500), (1, 2 * 16)])
def test_silu_and_mul(
    dtype: torch.dtype, shape: tuple[int, ...], device: str, gen: torch.Generator, tol: Tol
) -> None:
    x = rand(gen, *shape, dtype=dtype, device=device) * 4
    out, ref = triton_ops.silu_and_mul(x), ops_ref.silu_and_mul(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tol(dtype))


def _cos_sin(
    t: int, d: int, dtype: torch.dtype, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin as RotaryEmbedding gathers them (cat(freqs, freqs)), random positions."""
    pos = torch.randint(0, 4096, (t,), generator=gen).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = (pos[:, None] * inv_freq[None, :]).repeat(1, 2)  # [T, D]
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 1, 64), (6, 2, 128), (3, 3, 80)])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_embedding(
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inplace: bool,
    device: str,
    gen: torch.Generator,
    tol: Tol,
) -> None:
    t = 5
    qkv = rand(gen, t, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : heads * head_dim].view(t, heads, head_dim)  # strided views, as the model has
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    cos, sin = _cos_sin(t, head_dim, dtype, device, gen)
    ref_q, ref_k = ops_ref.rotary_embedding(q, k, cos, sin)
    out_q, out_k = triton_ops.rotary_embedding(q, k, cos, sin, inplace=inplace)
    if inplace:
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    torch.testing.assert_close(out_q, ref_q, **tol(dtype))
    torch.testing.assert_close(out_k, ref_k, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_write_kv(dtype: torch.dtype, device: str, gen: torch.Generator, tol: Tol) -> None:
    t, hq, hkv, d, block_size = 6, 8, 2, 64, 16
    q = rand(gen, t, hq, d, dtype=dtype, device=device)
    k = rand(gen, t, hkv, d, dtype=dtype, device=device)
    v = rand(gen, t, hkv, d, dtype=dtype, device=device)
    cos, sin = _cos_sin(t, d, dtype, device, gen)
    k_cache = rand(gen, 4, block_size, hkv, d, dtype=dtype, device=device)
    v_cache = rand(gen, 4, block_size, hkv, d, dtype=dtype, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([17, 18, -1, 63, 5, 40], dtype=torch.int64, device=device)
    out_q = triton_ops.rope_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    ref_q = ops_ref.rope_and_write_kv(q, k, v, cos, sin, k_ref, v_ref, slots)
    torch.testing.assert_close(out_q, ref_q, **tol(dtype))
    torch.testing.assert_close(k_cache, k_ref, **tol(dtype))
    assert torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama3_8b_shapes_gpu(dtype: torch.dtype, gen: torch.Generator, tol: Tol) -> None:
    t, hidden, inter = 4096, 4096, 14336
    x = rand(gen, t, hidden, dtype=dtype, device="cuda")
    r = rand(gen, t, hidden, dtype=dtype, device="cuda")
    w = rand(gen, hidden, dtype=dtype, device="cuda")
    torch.testing.assert_close(
        triton_ops.rms_norm(x, w, 1e-5), ops_ref.rms_norm(x, w, 1e-5), **tol(dtype)
    )
    out, res = triton_ops.fused_add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = ops_ref.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    assert torch.equal(res, ref_res)
    gu = rand(gen, t, 2 * inter, dtype=dtype, device="cuda")
    torch.testing.assert_close(triton_ops.silu_and_mul(gu), ops_ref.silu_and_mul(gu), **tol(dtype))
    q = rand(gen, t, 32, 128, dtype=dtype, device="cuda")
    k = rand(gen, t, 8, 128, dtype=dtype, device="cuda")
    cos, sin = _cos_sin(t, 128, dtype, "cuda", gen)
    for a, b in zip(
        triton_ops.rotary_embedding(q, k, cos, sin), ops_ref.rotary_embedding(q, k, cos, sin)
    ):
        torch.testing.assert_close(a, b, **tol(dtype))
