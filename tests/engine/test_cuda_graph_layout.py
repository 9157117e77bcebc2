"""The padded uniform-query layout of the CUDA-graph path (decode and verification steps) on CPU.

``uniform_query_layout`` is checked on exact rows; then a tiny random Llama runs one step two
ways over the same paged cache: eagerly on the varlen batch, and through ``DecodeGraphs`` in
emulate mode (the static buffers, padding rows and padded batch sizes of a replay, run eagerly).
Real rows' hidden states must match and the KV cache must be identical outside the null block,
for the torch reference attention and the Triton kernel (interpreted on CPU).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rayfleet.replicas import cuda_graphs
from rayfleet.replicas.cuda_graphs import DecodeGraphs, uniform_query_layout
from rayfleet.replicas.model import ForwardBatch
from rayfleet.replicas.model.forward import AttentionKernels
from rayfleet.replicas.runner import allocate_kv_tensors, build_attention_metadata, slot_mapping

BS = 4
NUM_BLOCKS = 40
CPU = torch.device("cpu")
# Block tables: non-contiguous ids, room for context + the step's q tokens.
TABLES = [[3, 17, 8, 30], [11, 2, 25, 6], [21, 9, 14, 33]]


def test_layout_puts_real_rows_first_and_pads_contexts() -> None:
    # Requests computing 3, 1 and 2 tokens with contexts 10, 5, 8 after the step; graph of 4.
    lay = uniform_query_layout([0, 3, 4, 6], [10, 5, 8], q=3, size=4)
    assert lay.dest == [0, 1, 2, 3, 6, 7]
    # Real row j keeps position start + j: start = seq_len - n, padded seq_len = start + q.
    assert lay.seq_lens == [10, 7, 9, 3]
    assert uniform_query_layout([0, 1, 2], [4, 9], q=1, size=2).dest == [0, 1]
    with pytest.raises(ValueError):
        uniform_query_layout([0, 4], [9], q=3, size=1)  # longer than q
    with pytest.raises(ValueError):
        uniform_query_layout([0, 1, 2], [4, 9], q=1, size=1)  # more requests than the graph


@pytest.fixture(scope="module")
def model(tiny_llama) -> torch.nn.Module:
    return tiny_llama


def _owner(model: torch.nn.Module, backend: str) -> SimpleNamespace:
    return SimpleNamespace(
        model=model,
        kv_caches=allocate_kv_tensors(model.arch, NUM_BLOCKS, BS, torch.float32, CPU),
        attn_kernels=AttentionKernels.for_backend(backend),
        device=CPU,
    )


def _graphs(owner, **kw) -> DecodeGraphs:
    """Emulated graphs at batch 1, 2 and 4 over tables of TABLES' width (contexts <= 16)."""
    return DecodeGraphs.capture_for(
        owner,
        capture_sizes=[1, 2, 4],
        max_blocks_per_seq=len(TABLES[0]) + 1,
        max_seq_len=len(TABLES[0]) * BS,
        emulate=True,
        **kw,
    )


def _step(owner, contexts: list[int], counts: list[int], gen: torch.Generator):
    """Inputs of one step: request i has contexts[i] cached tokens and computes counts[i] more."""
    ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
    for i, (c, n) in enumerate(zip(contexts, counts)):
        ids += torch.randint(0, owner.model.arch.vocab_size, (n,), generator=gen).tolist()
        pos += list(range(c, c + n))
        slots += slot_mapping(TABLES[i], c, c + n, BS)
        qsl.append(qsl[-1] + n)
        seq_lens.append(c + n)
    meta, _ = build_attention_metadata(slots, qsl, seq_lens, TABLES[: len(counts)], owner.device)
    return torch.tensor(ids), torch.tensor(pos), meta


def _eager(owner, ids, pos, meta) -> torch.Tensor:
    batch = ForwardBatch(
        meta, owner.kv_caches, owner.attn_kernels.attention, owner.attn_kernels.write_kv
    )
    return owner.model(ids, pos, batch)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "counts,contexts",
    [
        ([3, 1, 2], [6, 9, 3]),  # verification with 2, 0 and 1 drafts: padded to q = 3, 3 -> 4
        ([2, 2], [6, 9]),  # every request at q: identity layout
        ([1, 1, 1], [6, 9, 3]),  # decode, batch 3 -> 4
        ([5], [3]),  # a short prefill: rounds up to the q = 8 bucket
        ([4, 6], [2, 1]),  # two of them: q = 8, batch 2
        ([8], [0]),  # a prompt filling its bucket: identity layout
        ([5], [9]),  # padded context 17: past max_seq_len (16)
        ([5, 1], [3, 15]),  # a decode row padded to context 23: into the table's extra columns
    ],
)
@torch.inference_mode()
def test_padded_replay_equals_varlen_step(
    model, backend: str, counts: list[int], contexts: list[int]
) -> None:
    gen = torch.Generator().manual_seed(len(counts) * 10 + sum(counts))
    owner = _owner(model, backend)
    # Prefill the contexts (and some garbage in the null block, which padding rows may read).
    if any(contexts):
        _eager(owner, *_step(owner, [0] * len(counts), contexts, gen))
    for k, v in owner.kv_caches:
        k[0].normal_(generator=gen)
        v[0].normal_(generator=gen)
    before = [(k.clone(), v.clone()) for k, v in owner.kv_caches]
    ids, pos, meta = _step(owner, contexts, counts, gen)
    want = _eager(owner, ids, pos, meta)
    want_cache = [(k.clone(), v.clone()) for k, v in owner.kv_caches]

    for (k, v), (k0, v0) in zip(owner.kv_caches, before):
        k.copy_(k0)
        v.copy_(v0)
    graphs = _graphs(
        owner,
        query_lens=(1, 2, 3),
        prefill_query_lens=(8,),
        max_prefill_tokens=16,
    )
    # Stale static inputs, as an earlier replay leaves them: the replay must overwrite what
    # it reads (a stale slot here is a real slot of request 2, past its context).
    graphs.slot_mapping.fill_(TABLES[2][3] * BS + 1)
    graphs.positions.fill_(7)
    graphs.seq_lens.fill_(len(TABLES[0]) * BS)
    graphs.block_tables.fill_(TABLES[1][2])
    assert graphs.can_run(meta, ids.shape[0])
    n, width, longest = sum(counts), len(TABLES[0]), max(meta.seq_lens_cpu)
    assert graphs.graph_for(len(counts), max(counts), n, width, longest, round_up=True) == (
        {1: 1, 2: 2, 3: 4}[len(counts)],
        8 if max(counts) > 3 else max(counts),
    )
    got = graphs.run(ids, pos, meta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    written = torch.zeros(NUM_BLOCKS * BS, dtype=torch.bool)
    written[meta.slot_mapping] = True
    untouched = ~written
    untouched[:BS] = False  # the null block: padding rows' slot
    for (k, v), (kw, vw), (k0, v0) in zip(owner.kv_caches, want_cache, before):
        # The step's slots as the eager step wrote them; nothing else but block 0 changed.
        for got_c, want_c, before_c in ((k, kw, k0), (v, vw, v0)):
            flat = got_c.flatten(0, 1)
            torch.testing.assert_close(flat[written], want_c.flatten(0, 1)[written])
            assert torch.equal(flat[untouched], before_c.flatten(0, 1)[untouched])


def test_can_run_only_captured_shapes(model) -> None:
    owner = _owner(model, "torch")
    graphs = _graphs(
        owner,
        query_lens=(1, 3),
        max_multi_query_tokens=6,  # q = 3 only up to batch 2
    )
    assert graphs.sizes_by_q == {1: [1, 2, 4], 3: [1, 2]}
    gen = torch.Generator().manual_seed(0)
    ids, _, meta = _step(owner, [4, 4], [3, 1], gen)
    assert graphs.can_run(meta, ids.shape[0])
    ids, _, meta = _step(owner, [4, 4, 4], [3, 1, 1], gen)
    assert not graphs.can_run(meta, ids.shape[0])  # batch 3 > 2 at q = 3
    ids, _, meta = _step(owner, [4, 4], [2, 1], gen)
    assert not graphs.can_run(meta, ids.shape[0])  # q = 2 not captured
    ids, _, meta = _step(owner, [12, 4], [3, 1], gen)
    assert not graphs.can_run(meta, ids.shape[0])  # padded context 15 + 3 - 1 > 16


def test_short_prefills_round_up_to_a_bucket(model, monkeypatch) -> None:
    owner = _owner(model, "torch")
    graphs = _graphs(
        owner,
        query_lens=(1, 2),
        prefill_query_lens=(4, 8, 32),  # 32 >= 2 * max_seq_len: not captured
        max_prefill_tokens=16,
    )
    assert graphs.sizes_by_q == {1: [1, 2, 4], 2: [1, 2, 4], 4: [1, 2, 4], 8: [1, 2]}
    assert graphs.prefill_sizes_by_q == {4: [1, 2, 4], 8: [1, 2]}
    gen = torch.Generator().manual_seed(1)

    def key(contexts, counts):
        """(graph a replay takes, graph the exact-q staging takes) of this step."""
        ids, _, meta = _step(owner, contexts, counts, gen)
        args = (len(counts), max(counts), sum(counts), 4, max(meta.seq_lens_cpu))
        rounded = graphs.graph_for(*args, round_up=True)
        assert graphs.can_run(meta, ids.shape[0]) == (rounded is not None)
        return rounded, graphs.graph_for(*args)

    assert key([2], [5]) == ((1, 8), None)  # rounds up; staging (exact q) does not take it
    assert key([2], [3]) == ((1, 4), None)
    assert key([2, 2], [4, 4]) == ((2, 4), (2, 4))  # a bucket's own q is exact
    assert key([2, 2], [2, 1]) == ((2, 2), (2, 2))  # exact q: no padding bound
    # q = 3 rounds to 4 at batch 3 -> 4: 16 rows for 5 tokens pads past twice the tokens + q
    assert key([2, 2, 2], [3, 1, 1]) == (None, None)
    assert key([2, 2, 2], [3, 3, 3]) == ((4, 4), None)  # 16 rows for 9 tokens
    assert key([1], [9]) == (None, None)  # past every bucket
    # padding may extend a context past max_seq_len (16) by up to its bucket's q - 1
    assert graphs.graph_for(1, 5, 5, 4, 16, round_up=True) == (1, 8)
    assert graphs.graph_for(1, 5, 5, 4, 17, round_up=True) is None
    assert graphs.graph_for(1, 2, 2, 4, 17) is None  # an exact q gets no such room
    monkeypatch.setattr(cuda_graphs, "PREFILL_MAX_PADDING", 2)  # (256 rows as shipped)
    assert key([2], [5]) == (None, None)  # 3 padding rows
    assert key([2], [6]) == ((1, 8), None)
