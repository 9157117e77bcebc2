"""Greedy engine output equals transformers generate(), token for token (fp32, CPU).

Every architecture family and rope variant, a batch of prompts of different lengths submitted
together; plus the same under prefix caching, chunked prefill, preemption and mixed dtypes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayfleet import LLM, SamplingParams
from tests.model_factory import make_tiny_model

MAX_NEW = 10
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    list(range(20, 57)),  # 37 tokens: crosses block boundaries
    [3],
    list(range(100, 116)),  # exactly one 16-token block
]

VARIANTS = {
    "llama-mha": dict(arch="llama", num_kv_heads=4),
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "llama-mqa": dict(arch="llama", num_kv_heads=1),
    "llama-linear": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-dynamic": dict(
        arch="llama",
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        max_position_embeddings=32,
    ),
    "llama3": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-yarn": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral-window": dict(arch="mistral", sliding_window=8),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen3": dict(arch="qwen3", head_dim=32),
    "llama-metaspace": dict(arch="llama", tokenizer="metaspace"),
}


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], max_new: int, device: str = "cpu"
) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(out[0, len(p) :].tolist())
    return outs


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_matches_transformers(tmp_path: Path, name: str) -> None:
    kw = dict(VARIANTS[name])
    model_dir = make_tiny_model(tmp_path / name, **kw)
    prompts = PROMPTS
    if name == "llama-dynamic":
        # Prompts beyond the original 32 positions exercise the dynamic scaling itself.
        prompts = [list(range(10, 50)), [7, 8, 9]]
    ref = hf_greedy(model_dir, prompts, MAX_NEW)
    max_len = 128 if name == "llama-dynamic" else None
    llm = LLM(str(model_dir), dtype="float32", max_model_len=max_len)
    outs = llm.generate(prompts, GREEDY)
    for p, o, r in zip(prompts, outs, ref):
        assert o.token_ids == r, f"{name}: prompt of {len(p)} tokens diverged"
        assert o.finish_reason == "length"
        assert o.prompt_token_ids == p


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_kv_heads=2)


@pytest.fixture(scope="module")
def llama_ref(llama_dir: Path) -> list[list[int]]:
    return hf_greedy(llama_dir, PROMPTS, MAX_NEW)


def test_prefix_cache_hit_same_tokens(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", block_size=4)
    shared = list(range(40, 61))  # 21 tokens = 5 full blocks of 4 + 1
    a = llm.generate([shared + [1, 2]], GREEDY)[0]
    b = llm.generate([shared + [3, 4, 5]], GREEDY)[0]
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 20
    no_cache = LLM(str(llama_dir), dtype="float32", block_size=4, enable_prefix_caching=False)
    b_ref = no_cache.generate([shared + [3, 4, 5]], GREEDY)[0]
    assert b.token_ids == b_ref.token_ids
    assert b_ref.num_cached_tokens == 0
    # A full repeat hits every block but the one holding its last token.
    c = llm.generate([shared + [1, 2]], GREEDY)[0]
    assert c.num_cached_tokens == 20 and c.token_ids == a.token_ids


def test_chunked_prefill_same_tokens(llama_dir: Path, llama_ref) -> None:
    llm = LLM(str(llama_dir), dtype="float32", max_num_batched_tokens=5, block_size=4)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == llama_ref


def test_preemption_same_tokens(llama_dir: Path, llama_ref) -> None:
    # 12 usable blocks of 4 tokens = 48 tokens: the batch cannot all run at once.
    llm = LLM(str(llama_dir), dtype="float32", block_size=4, num_blocks=13)
    outs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert [o.token_ids for o in outs] == llama_ref
    llm.engine.scheduler.check_integrity()
    assert llm.engine.scheduler.pool.num_free_blocks == 12


def test_max_num_seqs_one_same_tokens(llama_dir: Path, llama_ref) -> None:
    llm = LLM(str(llama_dir), dtype="float32", max_num_seqs=1)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == llama_ref


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(llama_dir: Path, dtype: str) -> None:
    llm = LLM(str(llama_dir), dtype=dtype)
    assert llm.engine.model.lm_head.weight.dtype == getattr(torch, dtype)
    outs = llm.generate(PROMPTS, GREEDY)
    assert all(len(o.token_ids) == MAX_NEW for o in outs)
