"""Whole-proposal draft graphs (spec/proposal_graphs.py) on CPU, in emulate mode: the static
buffers and padded layout a replay runs, executed eagerly.

A tiny random Llama drafts for a few requests twice over the same paged cache: through the eager
loop of ``DraftProposer.propose``, and through ``ProposalGraphs``. Each request's drafts must be
identical, and the cache identical outside the null block (padding rows, and rows past their
last draft, write only there), for the torch reference attention and the Triton kernel
(interpreted on CPU).
"""

from __future__ import annotations

import pytest
import torch

from rayfleet.replicas.model.forward import AttentionKernels, ForwardBatch
from rayfleet.replicas.runner import build_attention_metadata, slot_mapping
from rayfleet.replicas.spec.proposal_graphs import MAX_BATCH, eligible
from rayfleet.replicas.spec.proposer import DraftProposer, DraftRequest
from rayfleet.sampling_params import SamplingParams

BS = 4
NUM_BLOCKS = 48
CPU = torch.device("cpu")
# Non-contiguous block ids; room for context + drafts.
TABLES = [[3, 17, 8, 30, 41], [11, 2, 25, 6, 44], [21, 9, 14, 33, 40]]
MAX_LEN = len(TABLES[0]) * BS
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@pytest.fixture(scope="module")
def model(tiny_llama) -> torch.nn.Module:
    return tiny_llama


def _proposer(model, backend: str) -> DraftProposer:
    p = DraftProposer(
        model,
        device=CPU,
        dtype=torch.float32,
        block_size=BS,
        attn_kernels=AttentionKernels.for_backend(backend),
        eos_token_ids=frozenset({1}),
    )
    p.allocate_kv_cache(NUM_BLOCKS)
    return p


def _requests(gen, contexts, fed, num_spec, params=GREEDY) -> list[DraftRequest]:
    """Request i: contexts[i] verified tokens, the draft's KV valid for all but the last fed[i]."""
    reqs = []
    for i, (c, n, k) in enumerate(zip(contexts, fed, num_spec)):
        tokens = torch.randint(2, 97, (c,), generator=gen).tolist()
        reqs.append(
            DraftRequest(
                request_id=f"r{i}",
                token_ids=tokens,
                num_prompt_tokens=c - 3,
                output_token_ids=tokens[c - 3 :],
                block_ids=TABLES[i],
                params=params,
                start=c - n,
                end=c,
                num_spec=k,
            )
        )
    return reqs


def _prefill(p: DraftProposer, reqs: list[DraftRequest]) -> None:
    """Draft KV for every request's positions < start; garbage in the null block."""
    ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
    for r in reqs:
        ids += r.token_ids[: r.start]
        pos += list(range(r.start))
        slots += slot_mapping(r.block_ids, 0, r.start, BS)
        qsl.append(qsl[-1] + r.start)
        seq_lens.append(r.start)
    meta, _ = build_attention_metadata(slots, qsl, seq_lens, [r.block_ids for r in reqs], CPU)
    batch = ForwardBatch(meta, p.kv_caches, p.attn_kernels.attention, p.attn_kernels.write_kv)
    p.model(torch.tensor(ids), torch.tensor(pos), batch)
    gen = torch.Generator().manual_seed(1)
    for k, v in p.kv_caches:
        k[0].normal_(generator=gen)
        v[0].normal_(generator=gen)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "contexts,fed,num_spec",
    [
        ([9], [1], [4]),  # batch 1 after a rejection: one graph of size 1, q 1
        ([7, 12, 5], [2, 1, 2], [3, 1, 2]),  # mixed q and k, padded to a graph of 4
        ([6, 10], [1, 1], [1, 1]),  # k = 1: forward 1 only
    ],
)
@torch.inference_mode()
def test_graph_proposal_equals_eager_loop(model, backend, contexts, fed, num_spec) -> None:
    gen = torch.Generator().manual_seed(sum(contexts))
    p = _proposer(model, backend)
    reqs = _requests(gen, contexts, fed, num_spec)
    _prefill(p, reqs)
    before = [(k.clone(), v.clone()) for k, v in p.kv_caches]
    want = p.propose(reqs)
    want.resolve()
    want_cache = [(k.clone(), v.clone()) for k, v in p.kv_caches]

    for (k, v), (k0, v0) in zip(p.kv_caches, before):
        k.copy_(k0)
        v.copy_(v0)
    p.enable_cuda_graphs([1, 2, 4, 8], len(TABLES[0]) + 1, MAX_LEN, proposal_k=4, emulate=True)
    graphs = p.proposal_graphs
    assert graphs is not None and eligible(reqs)
    key = graphs.key(reqs, max(num_spec))
    assert key == (1 if len(reqs) == 1 else (2 if len(reqs) == 2 else 4), max(fed), max(num_spec))
    # Stale static inputs, as an earlier replay leaves them: the replay must overwrite them.
    # (stale table entries past a request's blocks are read only by rows nobody reads)
    graphs.inputs.fill_(TABLES[2][3] * BS + 1)
    graphs.tables.fill_(TABLES[1][2])
    got = p.propose(reqs)
    got.resolve()
    assert got.token_ids == want.token_ids
    assert got.timings and got.timings[0][0] == len(reqs)
    for (k, v), (kw, vw) in zip(p.kv_caches, want_cache):
        for got_c, want_c in ((k, kw), (v, vw)):
            # Identical outside the null block, which padding rows write.
            torch.testing.assert_close(got_c[1:], want_c[1:], atol=1e-6, rtol=1e-6)


def test_proposal_graphs_up_to_the_configured_batch(model) -> None:
    """``proposal_max_batch`` (SpecConfig.proposal_graph_max_batch_size) keeps the capture sizes
    up to it; 0 captures no proposal graph, and the per-forward draft graphs stay."""
    p = _proposer(model, "torch")
    sizes = [1, 2, 4, 8]
    blocks = len(TABLES[0]) + 1
    p.enable_cuda_graphs(sizes, blocks, MAX_LEN, proposal_k=3, proposal_max_batch=3, emulate=True)
    assert p.proposal_graphs is not None and p.proposal_graphs.sizes == [1, 2]
    p.enable_cuda_graphs(sizes, blocks, MAX_LEN, proposal_k=3, proposal_max_batch=0, emulate=True)
    assert p.proposal_graphs is None and p.graphs is not None


def test_only_greedy_small_proposals_take_a_graph(model) -> None:
    gen = torch.Generator().manual_seed(0)
    p = _proposer(model, "torch")
    sizes = [1, 2, MAX_BATCH, 2 * MAX_BATCH]
    p.enable_cuda_graphs(sizes, len(TABLES[0]) + 1, MAX_LEN, proposal_k=3, emulate=True)
    graphs = p.proposal_graphs
    assert graphs is not None and graphs.sizes == sizes[:3]
    reqs = _requests(gen, [9, 9], [1, 2], [3, 2])
    assert eligible(reqs) and graphs.key(reqs, 3) == (2, 2, 3)
    assert graphs.key(_requests(gen, [9, 9, 9], [1, 1, 1], [2, 2, 2]), 2) == (MAX_BATCH, 1, 2)
    assert graphs.key(reqs, 4) is None  # more drafts than captured
    assert graphs.key(_requests(gen, [9], [3], [2]), 2) is None  # forward 1 feeds 3 tokens
    assert graphs.key(_requests(gen, [MAX_LEN - 1], [1], [3]), 3) is None  # past max_seq_len
    sampled = SamplingParams(temperature=0.7, max_tokens=64)
    assert not eligible(_requests(gen, [9], [1], [2], sampled))
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert not eligible(_requests(gen, [9], [1], [2], penalized))
    for min_tokens, ok in ((5, False), (3, True)):  # 3 outputs: min_tokens=3 masks nothing
        params = SamplingParams(temperature=0.0, min_tokens=min_tokens)
        assert eligible(_requests(gen, [9], [1], [2], params)) == ok
    assert not eligible(_requests(gen, [9, 9], [1, 1], [2, 0]))  # one only fills KV


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "contexts,verified,accepted,num_spec",
    [
        ([9], [3], [1], [4]),  # batch 1, a rejection inside the run
        ([9], [3], [3], [2]),  # every draft accepted: forward 1 feeds d_k and the bonus token
        ([7, 11, 6], [2, 4, 1], [0, 4, 1], [3, 1, 2]),  # mixed, padded to a graph of 4
    ],
)
@torch.inference_mode()
def test_chained_proposal_equals_proposing_after_the_result(
    model, backend, contexts, verified, accepted, num_spec
) -> None:
    """A chained proposal (run_chained: queued before the verification's result, its inputs
    found on the device from the target's argmax and the verified drafts) draws the drafts a
    proposal made after the result draws (run, on the verified tokens), and leaves the same
    cache outside the null block: the draft's KV of the accepted run is not rewritten (forward
    1's first row writes the null slot unless every draft was accepted)."""
    gen = torch.Generator().manual_seed(sum(contexts) + sum(accepted))
    p = _proposer(model, backend)
    p.enable_cuda_graphs([1, 2, 4, 8], len(TABLES[0]) + 1, MAX_LEN, proposal_k=4, emulate=True)
    graphs = p.proposal_graphs
    assert graphs is not None
    before, after, chain, best, drafts = [], [], [], [], []
    for i, (c, kv, a, k) in enumerate(zip(contexts, verified, accepted, num_spec)):
        tokens = torch.randint(2, 97, (c,), generator=gen).tolist()
        target = torch.randint(2, 97, (kv + 1,), generator=gen).tolist()  # argmax per row
        d = target[:kv]
        if a < kv:
            d[a] = target[a] % 96 + 2 if target[a] % 96 + 2 != target[a] else 3
        # Before the verification the draft fed x_{L-1} and d_1..d_{kv-1} (valid < L + kv - 1).
        seq = tokens + d[: kv - 1]
        before.append(
            DraftRequest(
                f"r{i}", seq, c - 3, seq[c - 3 :], TABLES[i], GREEDY, c + kv - 1, c + kv - 1, 0
            )
        )
        chain.append((tokens[-1], len(best), len(drafts), kv))
        best += target
        drafts += d
        new = tokens + d[:a] + [target[a]]  # the verified tokens after it
        start = min(c + kv - 1, c + a)
        after.append(
            DraftRequest(f"r{i}", new, c - 3, new[c - 3 :], TABLES[i], GREEDY, start, len(new), k)
        )
    _prefill(p, before)
    base = [(kc.clone(), vc.clone()) for kc, vc in p.kv_caches]

    key = graphs.key(after, max(num_spec))
    assert key is not None
    want = graphs.run(after, key)
    want_cache = [(kc.clone(), vc.clone()) for kc, vc in p.kv_caches]
    for (kc, vc), (k0, v0) in zip(p.kv_caches, base):
        kc.copy_(k0)
        vc.copy_(v0)
    graphs.inputs.fill_(TABLES[2][3] * BS + 1)  # stale static inputs
    chained = [
        DraftRequest(
            r.request_id, b.token_ids[:c], c - 3, [], r.block_ids, GREEDY, c - 1, c + 1, r.num_spec
        )
        for r, b, c in zip(after, before, contexts)
    ]
    ckey = (key[0], 2, key[2])
    got = graphs.run_chained(chained, ckey, chain, torch.tensor(best), torch.tensor(drafts))
    assert got.tolist() == want.tolist()
    for (kc, vc), (kw, vw) in zip(p.kv_caches, want_cache):
        for got_c, want_c in ((kc, kw), (vc, vw)):
            torch.testing.assert_close(got_c[1:], want_c[1:], atol=1e-6, rtol=1e-6)
