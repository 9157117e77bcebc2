"""``kv_cache_dtype="fp8"``: the engine stores K/V as float8 e4m3 (half the bytes of bf16, a
quarter of fp32), the pool holds proportionally more tokens, and the output stays close to the
full-precision cache's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayfleet import LLM, SamplingParams
from rayfleet.config import CacheConfig
from tests.model_factory import make_tiny_model

BUDGET = 4 << 20  # bytes of KV cache, the same for both dtypes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fp8kv"), "llama", num_kv_heads=2, head_dim=16)


def llm(model_dir: Path, kv: str, **kw) -> LLM:
    return LLM(
        str(model_dir), dtype="float32", kv_cache_dtype=kv, kv_cache_memory_bytes=BUDGET, **kw
    )


def test_rejects_unknown_kv_cache_dtype() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        CacheConfig(kv_cache_dtype="int4")


def test_fp8_cache_holds_four_times_the_fp32_tokens(model_dir: Path) -> None:
    full, fp8 = llm(model_dir, "auto"), llm(model_dir, "fp8")
    assert fp8.engine.kv_cache_dtype == torch.float8_e4m3fn
    assert all(
        k.dtype == torch.float8_e4m3fn and v.dtype == torch.float8_e4m3fn
        for k, v in fp8.engine.runner.kv_caches
    )
    assert full.engine.runner.kv_caches[0][0].dtype == torch.float32
    assert fp8.engine.runner.bytes_per_block * 4 == full.engine.runner.bytes_per_block
    assert fp8.engine.num_blocks == 4 * full.engine.num_blocks


def test_fp8_cache_output_is_close_to_full_precision(model_dir: Path) -> None:
    """The first token's distribution (prefill attends over the cache) moves by little. e4m3 keeps
    3 mantissa bits, so on this random model the top-5 log-probabilities move by 0.16-0.25 nats
    (a bf16 model moves them by 0.05-0.10); a cache read back wrongly moves them by whole nats."""
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    prompts = [list(range(3, 40)), [7, 1, 9, 2, 33, 5], list(range(100, 180))]
    full = llm(model_dir, "auto").generate(prompts, params)
    fp8 = llm(model_dir, "fp8").generate(prompts, params)
    for a, b in zip(full, fp8, strict=True):
        top_a, top_b = dict(a.logprobs[0].top), dict(b.logprobs[0].top)
        shared = [t for t in top_a if t in top_b]
        assert len(shared) >= 3
        assert max(abs(top_a[t] - top_b[t]) for t in shared) < 0.35


def test_fp8_cache_on_triton_matches_the_reference_backend(model_dir: Path) -> None:
    """Both backends quantize K/V to the same bytes and read them back exactly, so greedy output
    agrees token for token (on a GPU when there is one; on CPU the Triton kernels run in its
    interpreter)."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [list(range(3, 30)), [7, 1, 9]]
    ref = llm(model_dir, "fp8", attention_backend="torch", device=dev).generate(prompts, params)
    tri = llm(model_dir, "fp8", attention_backend="triton", block_size=8, device=dev).generate(
        prompts, params
    )
    assert [o.token_ids for o in tri] == [o.token_ids for o in ref]
    one = llm(model_dir, "fp8", attention_backend="triton", device=dev).generate(
        prompts[:1], params
    )
    assert one[0].token_ids == ref[0].token_ids  # alone: its decode takes the GEMV path
