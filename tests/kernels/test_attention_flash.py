"""The "flash_attn" attention backend (kernels/attention_flash.py): the adapter from our
paged-attention contract to flash-attn's ``flash_attn_varlen_func``.

flash-attn runs on CUDA only and is installed on neither of our machines, so these tests drive
the adapter through ``flash_varlen_standin``: flash-attn 2.8's documented varlen semantics
written in torch (fp32 math), with the checks its C++ entry point makes (dtype, page size,
contiguity, GQA, int32 metadata). It shares no code with attention_ref, so a wrong argument
(cumulative key lengths, window, causal alignment, block table) shows as a mismatch against the
reference. On a machine where flash-attn imports, ``test_installed_flash_attn_matches_reference``
runs the real package.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rayfleet import kernels
from rayfleet.kernels import attention_flash
from rayfleet.kernels.attention_ref import AttentionMetadata, paged_attention
from tests.model_factory import make_tiny_model


def flash_varlen_standin(
    q: torch.Tensor,  # [total_q, H, D]
    k: torch.Tensor,  # paged: [num_blocks, page, Hkv, D]
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    cu_seqlens_k: torch.Tensor,  # [B + 1] int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,  # [B, max_blocks] int32
) -> torch.Tensor:
    """flash-attn 2.8.3's ``flash_attn_varlen_func`` for a paged cache, as its docstring and
    ``mha_varlen_fwd`` define it: query i of a sequence with sq queries and sk keys attends keys
    j in [i + sk - sq - left, i + sk - sq + right] (causal: right = 0; -1: unbounded); sk is the
    difference of consecutive cu_seqlens_k; key j of sequence b is in block block_table[b, j //
    page] at j % page."""
    assert block_table is not None and dropout_p == 0.0 and alibi_slopes is None and not softcap
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError("query and key must have the same dtype")
    if block_table.dtype != torch.int32 or block_table.stride(-1) != 1:
        raise RuntimeError("block_table must have dtype torch.int32 and a contiguous last dim")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
        raise RuntimeError("cu_seqlens_q / cu_seqlens_k must have dtype int32")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise RuntimeError("Input tensor must have contiguous last dimension")
    page, hkv = k.shape[1], k.shape[2]
    if page % 256:
        raise RuntimeError("Paged KV cache block size must be divisible by 256")
    h, d = q.shape[1], q.shape[2]
    if h % hkv:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        if sq == 0:
            continue
        j = torch.arange(sk)
        blocks = block_table[b].long()[j // page]
        kb = k[blocks, j % page].float().repeat_interleave(h // hkv, dim=1)  # [sk, H, D]
        vb = v[blocks, j % page].float().repeat_interleave(h // hkv, dim=1)
        s = torch.einsum("ihd,jhd->hij", q[cq[b] : cq[b + 1]].float(), kb) * scale
        i = torch.arange(sq)[:, None] + sk - sq
        ok = torch.ones(sq, sk, dtype=torch.bool)
        if left >= 0:
            ok &= j[None, :] >= i - left
        if right >= 0:
            ok &= j[None, :] <= i + right
        s = s.masked_fill(~ok, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # a fully masked row gives 0
        out[cq[b] : cq[b + 1]] = torch.einsum("hij,jhd->ihd", p, vb).to(q.dtype)
    return out


@pytest.fixture
def registry() -> Iterator[None]:
    """Registrations made by a test are undone after it (the registry is process-wide)."""
    kernels.backends("paged_attention")  # load the built-in backends first
    saved = copy.deepcopy((kernels._REGISTRY, kernels._PREFERENCE))
    yield
    kernels._REGISTRY.clear()
    kernels._REGISTRY.update(saved[0])
    kernels._PREFERENCE.clear()
    kernels._PREFERENCE.update(saved[1])


def paged_batch(
    gen: torch.Generator,
    spans: list[tuple[int, int]],  # per request: (cached tokens, new tokens)
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """q for the new tokens and a filled paged cache whose blocks are handed out shuffled."""
    lens = [c + n for c, n in spans]
    per_req = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_req) + 2
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays the null block
    tables, o = [], 0
    for n in per_req:
        tables.append(order[o : o + n].tolist())
        o += n
    width = max(per_req)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(*shape, generator=gen).to(dtype)
    v_cache = torch.randn(*shape, generator=gen).to(dtype)
    total = sum(n for _, n in spans)
    q = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    qsl = [0]
    for _, n in spans:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(total, dtype=torch.int64),  # (the write is not under test)
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in spans),
        max_seq_len=max(lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
    )
    return q, k_cache, v_cache, meta


# decode rows, a 1-token context, a prefill chunk over a cached prefix crossing a block boundary,
# a fresh prompt longer than a block, a verification query (5 new tokens)
SPANS = [(40, 1), (0, 1), (250, 20), (0, 300), (511, 5), (256, 1)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_matches_reference(
    heads: int,
    kv_heads: int,
    head_dim: int,
    window: int | None,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> None:
    q, kc, vc, meta = paged_batch(
        gen, SPANS, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype
    )
    attend = attention_flash.make_paged_attention(flash_varlen_standin)
    scale = head_dim**-0.5
    out = attend(q, kc, vc, meta, scale, window)
    ref = paged_attention(q, kc, vc, meta, scale, window)
    assert out.shape == q.shape and out.dtype == dtype
    # the same fp32 math in another order, rounded once to the model dtype
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_wrong_translation_would_fail(gen: torch.Generator) -> None:
    """The comparison above can fail: the window off by one, or keys counted from the query
    lengths, change the output."""
    q, kc, vc, meta = paged_batch(
        gen, SPANS, heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16
    )
    ref = paged_attention(q, kc, vc, meta, 0.125, 37)

    def off_by_one(*args, window_size, **kw):
        return flash_varlen_standin(*args, window_size=(window_size[0] + 1, 0), **kw)

    out = attention_flash.make_paged_attention(off_by_one)(q, kc, vc, meta, 0.125, 37)
    assert not torch.allclose(out, ref, rtol=1e-2, atol=1e-2)


def test_check_supported_names_the_setting() -> None:
    ok = dict(block_size=256, dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16, head_dim=128)
    attention_flash.check_supported(**ok)
    attention_flash.check_supported(**{**ok, "block_size": 512})
    cases = {
        "block_size divisible by 256": {"block_size": 16},
        "float16/bfloat16 only": {"dtype": torch.float32, "kv_cache_dtype": torch.float32},
        "kv_cache_dtype='auto'": {"kv_cache_dtype": torch.float8_e4m3fn},
        "head_dim <= 256": {"head_dim": 512},
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            attention_flash.check_supported(**{**ok, **bad})


def test_registers_only_a_varlen_with_block_tables(registry: None) -> None:
    def old_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):  # < 2.5.7
        raise AssertionError("never called")

    assert not attention_flash.register_backend(old_varlen)
    assert "flash_attn" not in kernels.backends("paged_attention")
    assert attention_flash.register_backend(flash_varlen_standin)
    assert "flash_attn" in kernels.backends("paged_attention")
    # the K/V write stays the Triton one, under the backend's name
    assert kernels.get("write_kv", "flash_attn") is kernels.get("write_kv", "triton")
    fused = kernels.get_fused("rope_and_write_kv", "flash_attn")
    assert fused is kernels.get("rope_and_write_kv", "triton")
    assert kernels.get_fused("rope_write_kv_attention", "flash_attn") is None
    # the default on CUDA stays the measured one; flash_attn is chosen by name
    assert kernels.choose_attention_backend(None, "cuda") == "triton"
    assert kernels.choose_attention_backend("flash_attn", "cuda") == "flash_attn"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("flash"), "llama", num_kv_heads=2, max_position_embeddings=1024
    )


def test_engine_generates_through_the_backend(registry: None, model_dir: Path) -> None:
    """An engine with attention_backend='flash_attn' (block_size 256) generates what the
    reference backend generates; with block_size 16 it refuses at start-up, naming it."""
    from rayfleet import LLM, SamplingParams

    attention_flash.register_backend(flash_varlen_standin)
    prompts = [[5, 6, 7], list(range(3, 300))]  # the second one spans two blocks
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(**kw) -> list[list[int]]:
        llm = LLM(str(model_dir), dtype="float16", enable_prefix_caching=True, **kw)
        return [o.token_ids for o in llm.generate(prompts, params)]

    want = run(block_size=256, attention_backend="torch")
    assert run(block_size=256, attention_backend="flash_attn") == want
    with pytest.raises(ValueError, match="block_size divisible by 256"):
        run(block_size=16, attention_backend="flash_attn")


def test_installed_flash_attn_matches_reference(gen: torch.Generator) -> None:
    if not torch.cuda.is_available():
        pytest.skip("flash-attn runs on CUDA only")
    fa = pytest.importorskip("flash_attn", reason="the flash-attn package is not installed")
    if not attention_flash.takes_block_table(fa.flash_attn_varlen_func):
        pytest.skip("this flash-attn has no paged varlen entry point (needs 2.5.7+)")
    q, kc, vc, meta = paged_batch(
        gen, SPANS, heads=8, kv_heads=2, head_dim=128, dtype=torch.bfloat16
    )
    q, kc, vc = q.cuda(), kc.cuda(), vc.cuda()
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).cuda())
    attend = attention_flash.make_paged_attention(fa.flash_attn_varlen_func)
    for window in (None, 37):
        out = attend(q, kc, vc, meta, 128**-0.5, window)
        ref = paged_attention(q, kc, vc, meta, 128**-0.5, window)
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
