"""The LM head over tensor-parallel ranks whose vocab shards are padded: the gathered logits are
cut to the vocab as a contiguous tensor, which samplers mask in place through flat views."""

from __future__ import annotations

import pytest
import torch

from rayfleet.replicas import parallel
from rayfleet.replicas.model.layers import ParallelLMHead
from rayfleet.replicas.sampler import mask_min_tokens
from rayfleet.sampling_params import SamplingParams


def test_padded_vocab_logits_are_contiguous_and_maskable(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab, hidden = 33, 8  # 2 ranks x 17 rows: one padding row
    monkeypatch.setattr(parallel, "_state", parallel.TensorParallelState(0, 2))
    head = ParallelLMHead(vocab, hidden, dtype=torch.float32)
    weight = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0))
    head.weight_loader(head.weight, weight)
    # the other rank holds rows 17..32 (and the padding row): gather this rank's shard with it
    other = torch.cat([weight[17:], torch.zeros(1, hidden)])
    h = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(parallel, "all_gather", lambda t, dim=-1: torch.cat([t, h @ other.T], dim))
    logits = head(h)
    assert logits.shape == (3, vocab) and logits.is_contiguous()
    torch.testing.assert_close(logits, h @ weight.T)
    eos = frozenset({5})
    mask_min_tokens(logits, [(SamplingParams(min_tokens=2), 0, eos)] * 3)
    assert logits[:, 5].eq(float("-inf")).all()
