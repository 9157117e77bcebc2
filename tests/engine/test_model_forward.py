"""Our models' logits equal transformers' for every family, RoPE variant and head layout (CPU fp32).

Each case is a tiny random checkpoint loaded twice: by rayfleet's loader and by transformers.
(a) several prompts of different lengths prefilled together in one varlen forward;
(b) the same prompts run in two steps through the paged cache (a prefix first, the rest second;
    one request finishes its prompt in step 2 while another decodes a single token), with block
    tables of shuffled, non-contiguous block ids.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayfleet.kernels import get as get_kernel
from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.replicas.model import ForwardBatch, LlamaForCausalLM, load_model
from tests.model_factory import make_tiny_model

BLOCK_SIZE = 4
NUM_BLOCKS = 48
# fp32 noise between two GEMM orderings: max |diff| is ~6e-6 at logits of magnitude ~7.
ATOL, RTOL = 2e-5, 1e-5


@dataclass(frozen=True)
class Case:
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    lengths: tuple[int, ...] = (5, 11, 17)
    # (prefix length computed in step 1) per request of (b); the rest is computed in step 2.
    splits: tuple[int, ...] = (6, 16)


CASES: dict[str, Case] = {
    "llama-gqa-default": Case("llama"),
    "llama-mha": Case("llama", {"num_kv_heads": 4}),
    "llama-mqa": Case("llama", {"num_kv_heads": 1, "attention_bias": True}),
    "llama-linear": Case("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic": Case(
        "llama",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32},
        lengths=(9, 40, 47),
        splits=(20, 46),
    ),
    "llama-dynamic-long-prefix": Case(
        "llama",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 3.0}, "max_position_embeddings": 32},
        lengths=(45, 38),
        splits=(36, 37),
    ),
    "llama-llama3": Case(
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama-yarn": Case(
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral-sliding": Case("mistral", {"sliding_window": 4}),
    "qwen2-tied-sliding": Case("qwen2", {"tie_word_embeddings": True, "sliding_window": 5}),
    "qwen2-mqa": Case("qwen2", {"num_kv_heads": 1}),
    "qwen3": Case("qwen3", {"head_dim": 24}),
    "qwen3-bias-mha": Case("qwen3", {"num_kv_heads": 4, "attention_bias": True}),
}


@dataclass
class Loaded:
    ours: LlamaForCausalLM
    hf: torch.nn.Module
    vocab: int
    dynamic: bool


@pytest.fixture(params=sorted(CASES), scope="module")
def case_models(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Case, Loaded]:
    case = CASES[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), case.arch, **case.kwargs)
    ours = load_model(path, dtype=torch.float32, device="cpu", show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    dynamic = (case.kwargs.get("rope_scaling") or {}).get("rope_type") == "dynamic"
    return case, Loaded(ours, hf, ours.arch.vocab_size, dynamic)


class PagedState:
    """KV caches and per-request block tables, built by hand as the runner would."""

    def __init__(self, model: LlamaForCausalLM, num_requests: int, seed: int = 0) -> None:
        arch = model.arch
        shape = (NUM_BLOCKS, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(arch.num_layers)]
        ids = list(range(1, NUM_BLOCKS))
        random.Random(seed).shuffle(ids)
        per_req = (NUM_BLOCKS - 1) // num_requests
        self.tables = [ids[i * per_req : (i + 1) * per_req] for i in range(num_requests)]

    def batch(
        self, new_tokens: Sequence[int], context_lens: Sequence[int]
    ) -> tuple[ForwardBatch, torch.Tensor]:
        """The ForwardBatch for requests with ``new_tokens[i]`` new tokens ending at
        ``context_lens[i]``, and the positions of those tokens."""
        slots: list[int] = []
        positions: list[int] = []
        qsl = [0]
        for table, n, ctx in zip(self.tables, new_tokens, context_lens, strict=True):
            for p in range(ctx - n, ctx):
                slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
                positions.append(p)
            qsl.append(qsl[-1] + n)
        width = max(len(t) for t in self.tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(list(context_lens), dtype=torch.int32),
            block_tables=tables[: len(context_lens)],
            max_query_len=max(new_tokens),
            max_seq_len=max(context_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=list(context_lens),
        )
        batch = ForwardBatch(
            meta=meta,
            kv_caches=self.kv_caches,
            attention=get_kernel("paged_attention", "torch"),
            write_kv=get_kernel("write_kv", "torch"),
        )
        return batch, torch.tensor(positions, dtype=torch.int64)


def _prompts(vocab: int, lengths: Sequence[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@torch.no_grad()
def _hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # A fresh copy: transformers' dynamic RoPE keeps state between calls.
    return copy.deepcopy(hf)(ids[None]).logits[0].float()


@torch.no_grad()
def _hf_two_step_logits(hf: torch.nn.Module, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits of ids[split:] when transformers runs ids[:split], then the rest with its cache."""
    model = copy.deepcopy(hf)
    first = model(ids[None, :split], use_cache=True)
    second = model(ids[None, split:], past_key_values=first.past_key_values, use_cache=True)
    return second.logits[0].float()


@torch.no_grad()
def test_varlen_prefill_matches_hf(case_models: tuple[Case, Loaded]) -> None:
    case, m = case_models
    prompts = _prompts(m.vocab, case.lengths)
    state = PagedState(m.ours, len(prompts))
    lengths = [len(p) for p in prompts]
    batch, positions = state.batch(lengths, lengths)
    hidden = m.ours(torch.cat(prompts), positions, batch)
    logits = m.ours.compute_logits(hidden)
    assert logits.dtype == torch.float32
    assert logits.shape == (sum(lengths), m.vocab)
    for i, ids in enumerate(prompts):
        ours = logits[batch.meta.query_start_loc_cpu[i] : batch.meta.query_start_loc_cpu[i + 1]]
        torch.testing.assert_close(ours, _hf_logits(m.hf, ids), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_two_step_paged_matches_hf(case_models: tuple[Case, Loaded]) -> None:
    case, m = case_models
    lengths = case.lengths[-len(case.splits) :]
    prompts = _prompts(m.vocab, lengths, seed=2)
    state = PagedState(m.ours, len(prompts), seed=3)
    splits = list(case.splits)

    batch, positions = state.batch(splits, splits)
    hidden = m.ours(
        torch.cat([p[:s] for p, s in zip(prompts, splits, strict=True)]), positions, batch
    )
    step1 = m.ours.compute_logits(hidden)

    rest = [len(p) - s for p, s in zip(prompts, splits, strict=True)]
    batch, positions = state.batch(rest, lengths)
    ids = torch.cat([p[s:] for p, s in zip(prompts, splits, strict=True)])
    step2 = m.ours.compute_logits(m.ours(ids, positions, batch))

    q1, q2 = (
        [0, *torch.tensor(splits).cumsum(0).tolist()],
        [0, *torch.tensor(rest).cumsum(0).tolist()],
    )
    for i, (ids_i, s) in enumerate(zip(prompts, splits, strict=True)):
        torch.testing.assert_close(
            step1[q1[i] : q1[i + 1]], _hf_logits(m.hf, ids_i[:s]), atol=ATOL, rtol=RTOL
        )
        # Dynamic NTK rotates each step with its own context length, as transformers does with a
        # KV cache; its one-shot forward would use the full length for the prefix too.
        full = _hf_two_step_logits(m.hf, ids_i, s) if m.dynamic else _hf_logits(m.hf, ids_i)[s:]
        torch.testing.assert_close(step2[q2[i] : q2[i + 1]], full, atol=ATOL, rtol=RTOL)


ROPE_VARIANTS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
@pytest.mark.parametrize("seq_len", [40, 100])
def test_rotary_tables_equal_hf_bitwise(variant: str, seq_len: int) -> None:
    """cos/sin for one request of ``seq_len`` tokens equal transformers' rotary module exactly."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rayfleet.replicas.model.rotary import RotaryEmbedding

    scaling = ROPE_VARIANTS[variant]
    params = {**(scaling or {"rope_type": "default"}), "rope_theta": 10000.0}
    max_pos = 64
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(seq_len)[None])
    rope = RotaryEmbedding(16, 10000.0, scaling, max_pos, max_positions=128)
    state_meta = AttentionMetadata(
        slot_mapping=torch.zeros(seq_len, dtype=torch.int64),
        query_start_loc=torch.tensor([0, seq_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        max_query_len=seq_len,
        max_seq_len=seq_len,
        query_start_loc_cpu=[0, seq_len],
        seq_lens_cpu=[seq_len],
    )
    cos, sin = rope(torch.arange(seq_len), state_meta)
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
