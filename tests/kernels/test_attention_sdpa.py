"""The SDPA paged-attention backend against the torch reference (CPU, and CUDA when present)."""

from __future__ import annotations

import random

import pytest
import torch

from rayfleet import kernels
from rayfleet.kernels.attention_ref import AttentionMetadata

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_batch(q_lens, ctx_lens, block_size, num_blocks, hq, hkv, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)
    tables, slots = [], []
    for n, ctx in zip(q_lens, ctx_lens):
        nb = -(-ctx // block_size)
        row, ids = ids[:nb], ids[nb:]
        tables.append(row)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(ctx - n, ctx)]
    width = max(len(t) for t in tables)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
        ),
        max_query_len=max(q_lens),
        max_seq_len=max(ctx_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(ctx_lens),
    )
    shape = (num_blocks, block_size, hkv, d)
    kc = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    vc = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(qsl[-1], hq, d, generator=g).to(device=device, dtype=dtype)
    return q, kc, vc, meta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_matches_reference(device, group, window):
    # decode rows, a full prefill, an extend over a cached prefix, block-boundary lengths
    q_lens = [1, 1, 17, 5, 1, 16]
    ctx_lens = [1, 17, 17, 21, 33, 40]
    q, kc, vc, meta = make_batch(
        q_lens, ctx_lens, 16, 24, 4 * group, 4, 64, torch.float32, device, seed=group
    )
    ref = kernels.get("paged_attention", "torch")(q, kc, vc, meta, 0.125, window)
    got = kernels.get("paged_attention", "sdpa")(q, kc, vc, meta, 0.125, window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
