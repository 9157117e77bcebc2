"""Draft-model speculative decoding: same output as without it, exact sampling distribution.

Greedy output with speculation equals greedy output without it, token for token, for drafts that
always agree (the target itself), never agree (another random model) and sometimes agree (the
target's first layer with its embeddings, final norm and lm_head), for k = 1, 3, 5; in batches
mixing speculating, non-speculating, greedy and sampled requests; under preemption, prefix hits,
chunked prefill, stops inside an accepted run, and aborts.

Distribution: on a 12-token vocabulary, 20,000 sampled continuations (temperature 0.9, top-k 9)
with 2 drafts per step from a disagreeing draft (46% acceptance at the first position) are
compared with the target's exact next-token distributions (transformers logits through the
sampler's own transform) by chi-square tests of the tokens at both draft positions, unseeded and
with a distinct seed per request. Observed p-values (deterministic: fixed engine seed):
unseeded t2|t1 0.53, t3|t1,t2 0.57, t2 0.50, t3 0.92; seeded 0.45, 0.27, 0.79, 0.45. The same
test on a verifier broken to accept every draft (u = 0) gives p = 0.0, 0.0, 6e-248, 0.0 with only
4,000 samples (``test_chi_square_catches_an_always_accepting_verifier``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rayfleet import LLM, SamplingParams
from rayfleet.replicas.engine.request import Request, RequestStatus, max_num_spec_tokens
from rayfleet.replicas.engine.scheduler import RunnerOutput, Scheduler
from rayfleet.replicas.sampler import Sampler, SamplerRow
from rayfleet.replicas.spec.adaptive import FixedSpecPolicy
from rayfleet.replicas.spec.rejection import RejectionSampler
from tests.model_factory import make_tiny_model

scipy_stats = pytest.importorskip("scipy.stats")

BS = 4
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    list(range(20, 57)),  # 37 tokens: crosses block boundaries
    [3],
    list(range(100, 116)),  # exactly four 4-token blocks
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


# ---- models
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    target = make_tiny_model(root / "target", "llama", num_kv_heads=2)
    other = make_tiny_model(root / "other", "llama", num_kv_heads=2, seed=7, layers=1)
    # Partial agreement: the target's first layer alone, with its embeddings, norm and lm_head.
    partial = root / "partial"
    shutil.copytree(target, partial)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    cfg = hf.config
    cfg.num_hidden_layers = 1
    small = LlamaForCausalLM(cfg)
    state = {k: v for k, v in hf.state_dict().items() if ".layers.1." not in k}
    small.load_state_dict(state)
    small.save_pretrained(str(partial))
    return {"target": target, "same": target, "other": other, "partial": partial}


def spec_llm(target: Path, draft: Path | None, k: int, policy=None, **kw) -> LLM:
    kw.setdefault("block_size", BS)
    if draft is None:
        return LLM(str(target), dtype="float32", **kw)
    llm = LLM(str(target), dtype="float32", draft_model=str(draft), num_speculative_tokens=k, **kw)
    llm.engine.runner.spec_policy = policy or FixedSpecPolicy(k)
    return llm


@pytest.fixture(scope="module")
def reference(models_dir) -> list[list[int]]:
    llm = spec_llm(models_dir["target"], None, 0)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def assert_pool_full(llm: LLM) -> None:
    sched = llm.engine.scheduler
    sched.check_integrity()
    assert sched.pool.num_free_blocks == sched.pool.num_usable_blocks


# ---- greedy equality
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft", ["same", "other", "partial"])
def test_greedy_equals_no_spec(models_dir, reference, draft: str, k: int) -> None:
    llm = spec_llm(models_dir["target"], models_dir[draft], k)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    rates = [o.spec.acceptance_rate for o in outs]
    if draft == "same":
        assert all(r == 1.0 for r in rates)
        assert all(o.spec.mean_accepted_length > min(k + 1, 3) - 1e-9 for o in outs)
    elif draft == "other":
        assert max(rates) < 0.5
    for o in outs:
        s = o.spec
        assert s.num_drafted == sum(s.drafted_by_position)
        assert s.num_accepted == sum(s.accepted_by_position)
        assert len(s.drafted_by_position) <= k
    assert_pool_full(llm)


def test_partial_draft_agrees_sometimes(models_dir) -> None:
    llm = spec_llm(models_dir["target"], models_dir["partial"], 3)
    outs = llm.generate(PROMPTS, GREEDY)
    total = sum(o.spec.num_drafted for o in outs)
    accepted = sum(o.spec.num_accepted for o in outs)
    assert 0 < accepted < total


def test_mixed_batch_per_request_k_greedy_and_sampled(models_dir, reference) -> None:
    """Speculating (k = 1..5), non-speculating (k = 0) and sampled requests in the same steps."""
    target = models_dir["target"]
    prompts = PROMPTS * 2
    sampled = SamplingParams(temperature=0.8, top_k=20, max_tokens=14, seed=11, ignore_eos=True)
    params = [GREEDY] * 4 + [sampled] * 4
    per_request = {f"req-{i}": k for i, k in enumerate([0, 1, 3, 5, 0, 2, 4, 5])}
    runs = []
    for _ in range(2):
        llm = spec_llm(target, models_dir["partial"], 5, FixedSpecPolicy(5, per_request))
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs[:4]] == reference
        assert outs[0].spec.num_drafted == 0 and outs[4].spec.num_drafted == 0
        assert all(o.spec.num_drafted > 0 for o in outs[1:4] + outs[5:])
        runs.append([o.token_ids for o in outs])
        assert_pool_full(llm)
    # Seeded sampled requests repeat exactly under the same speculation decisions.
    assert runs[0] == runs[1]
    # Non-speculating seeded requests sample exactly as without a draft.
    plain = spec_llm(target, None, 0).generate(prompts[4:5], sampled)[0]
    assert runs[0][4] == plain.token_ids


@pytest.mark.parametrize("graphs", [False, True])
def test_adaptive_policy_greedy_equal(models_dir, reference, graphs: bool) -> None:
    """The default (adaptive) policy: whatever it decides, greedy output is unchanged (with
    graphs, it plans for padded verification)."""
    for draft in ("same", "other"):
        llm = LLM(
            str(models_dir["target"]),
            dtype="float32",
            block_size=BS,
            draft_model=str(models_dir[draft]),
            num_speculative_tokens=4,
        )
        if graphs:
            emulate_graphs(llm)
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == reference
        assert_pool_full(llm)


def test_preemption_prefix_hits_chunked_prefill(models_dir, reference) -> None:
    # 16 usable blocks of 4 tokens: the batch cannot run at once (and lookahead needs room).
    llm = spec_llm(models_dir["target"], models_dir["partial"], 3, num_blocks=17)
    outs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert [o.token_ids for o in outs] == reference
    assert_pool_full(llm)
    chunked = spec_llm(models_dir["target"], models_dir["same"], 3, max_num_batched_tokens=6)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == reference
    assert_pool_full(chunked)


@pytest.mark.parametrize("first_k", [0, 3])
def test_prefix_hits_reuse_valid_draft_kv(models_dir, first_k: int) -> None:
    """Hit blocks carry the draft's KV only if the draft computed it; with the target as draft,
    any stale draft KV would show up as a rejection. first_k=0: the first request never runs the
    draft, so the second must recompute the draft KV of the blocks it hits."""
    target = models_dir["target"]
    shared = list(range(40, 61))  # 5 full blocks + 1
    policy = FixedSpecPolicy(3, {"req-0": first_k})
    llm = spec_llm(target, models_dir["same"], 3, policy)
    ref = spec_llm(target, None, 0)
    a = llm.generate([shared + [1, 2]], GREEDY)[0]
    b = llm.generate([shared + [3, 4, 5]], GREEDY)[0]
    assert b.num_cached_tokens == 20
    assert b.token_ids == ref.generate([shared + [3, 4, 5]], GREEDY)[0].token_ids
    assert b.spec.num_drafted > 0 and b.spec.acceptance_rate == 1.0
    if first_k:
        assert a.spec.acceptance_rate == 1.0
    assert_pool_full(llm)


class RandomSpecPolicy(FixedSpecPolicy):
    """A random k in [0, cap] per request per step: speculation switches on and off."""

    def __init__(self, seed: int) -> None:
        super().__init__(0)
        self.rng = random.Random(seed)

    def plan(self, candidates, *, num_requests, base_tokens, max_padded_k=0, **_steady):
        return {rid: self.rng.randint(0, cap) for rid, cap in candidates}


def emulate_graphs(llm: LLM, sizes: tuple[int, ...] = (1, 2, 4, 8)) -> Counter:
    """Give target and draft "CUDA graphs" that replay eagerly over the same static buffers and
    padded layouts (DecodeGraphs and ProposalGraphs emulate mode); returns a live count of
    replays per (model, query length), per ("proposal", k) for whole greedy proposals, and per
    ("chained", k) for those chained behind their verification."""
    eng = llm.engine
    k = eng.runner.num_speculative_tokens
    max_len = eng.max_model_len + k
    blocks = -(-max_len // BS) + 1
    # short prefills (prompts, the draft's catch-ups) round up to the q = 16 and 32 buckets
    eng.runner.enable_cuda_graphs(list(sizes), blocks, max_len, prefill_tokens=32, emulate=True)
    proposer = eng.runner.proposer
    proposer.enable_cuda_graphs(
        list(sizes), blocks, max_len, proposal_k=k, prefill_tokens=32, emulate=True
    )
    replays: Counter = Counter()
    # The wrappers reach the originals through weak references: an instance attribute holding
    # its own object's bound method is a reference cycle, which the engine's gc.freeze() makes
    # uncollectable (the engine, and its KV pools, would outlive the test).
    whole = proposer.proposal_graphs
    run = weakref.WeakMethod(whole.run)
    whole.run = lambda reqs, key: replays.update([("proposal", key[2])]) or run()(reqs, key)
    chained = weakref.WeakMethod(whole.run_chained)
    whole.run_chained = lambda reqs, key, *a: (
        replays.update([("chained", key[2])]) or chained()(reqs, key, *a)
    )
    for name, graphs in (("target", eng.runner.graphs), ("draft", eng.runner.proposer.graphs)):
        replay = weakref.WeakMethod(graphs._replay)

        def counted(size, q, seq_lens, name=name, replay=replay):
            replays[name, q] += 1
            return replay()(size, q, seq_lens)

        graphs._replay = counted
    return replays


@pytest.mark.parametrize("seed,graphs", [(0, False), (1, False), (0, True)])
def test_draft_kv_stays_valid_under_random_switching(models_dir, seed: int, graphs: bool) -> None:
    """With the target as its own draft every draft must be accepted; a stale draft KV entry
    (missed rollback, a prefix hit on blocks whose draft KV was never computed, preemption,
    chunked prefill) shows up as a rejection. Shared prefixes, a tight pool, random k. With
    ``graphs``, decode and verification steps run the padded uniform-query layouts of the CUDA
    graph path (emulated eagerly), where a padding row writing a real slot would show up too."""
    rng = random.Random(seed)
    target = models_dir["target"]
    stems = [[rng.randrange(3, 300) for _ in range(rng.randrange(5, 14))] for _ in range(3)]
    prompts = [
        rng.choice(stems) + [rng.randrange(3, 300) for _ in range(rng.randrange(0, 6))]
        for _ in range(10)
    ]
    llm = spec_llm(
        target,
        models_dir["same"],
        4,
        RandomSpecPolicy(seed),
        num_blocks=40,
        max_num_batched_tokens=24,
    )
    replays = emulate_graphs(llm) if graphs else None
    eng = llm.engine
    rids = []
    final = {}
    for i, p in enumerate(prompts):  # staggered arrivals: later ones hit earlier ones' blocks
        rids.append(eng.add_request(p, GREEDY))
        for _ in range(1 + (i % 3 == 2)):
            final.update((o.request_id, o) for o in eng.step() if o.finished)
            eng.scheduler.check_integrity()
    final.update(eng.run_to_completion())
    want = spec_llm(target, None, 0).generate(prompts, GREEDY)
    got = [final[r] for r in rids]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert sum(o.num_cached_tokens for o in got) > 0
    assert sum(o.spec.num_drafted for o in got) > 0
    assert all(o.spec.num_accepted == o.spec.num_drafted for o in got)
    assert_pool_full(llm)
    if replays is not None:  # padded verification (q > 1) and draft layouts were exercised
        assert replays["target", 1] and sum(replays[m, q] for m, q in replays if q > 1) > 10
        # eager proposals (a batch past 8, a catch-up) replay the draft's decode graphs, small
        # greedy ones a whole-proposal graph
        assert replays["draft", 1] and any(m == "proposal" for m, _ in replays)
        assert any(m == "chained" for m, _ in replays)
        # prompts and the draft's catch-ups after switched-off steps replay a prefill bucket
        assert replays["target", 16] and replays["draft", 16]


@pytest.mark.parametrize("graphs", [False, True])
def test_dropping_the_llm_frees_both_kv_pools(models_dir, graphs: bool) -> None:
    """The engine freezes the heap after start-up (gc.freeze(): no collection pauses in the
    middle of a step), so no collection ever frees a reference cycle through engine objects:
    the engine must hold none, or an LLM dropped in a long-lived process keeps its KV pools.
    Dropping the last reference frees the target's and the draft's KV tensors at once."""
    llm = LLM(
        str(models_dir["target"]),
        dtype="float32",
        block_size=BS,
        draft_model=str(models_dir["other"]),
        num_speculative_tokens=3,
    )  # (the adaptive policy)
    runner = llm.engine.runner
    if graphs:  # (emulated: the padded layouts and whole-proposal graphs, no wrappers)
        max_len = llm.engine.max_model_len + 3
        blocks = -(-max_len // BS) + 1
        runner.enable_cuda_graphs([1, 2, 4], blocks, max_len, prefill_tokens=32, emulate=True)
        runner.proposer.enable_cuda_graphs(
            [1, 2, 4], blocks, max_len, proposal_k=3, prefill_tokens=32, emulate=True
        )
    assert all(o.spec.num_drafted for o in llm.generate(PROMPTS, GREEDY))
    held = [weakref.ref(runner), weakref.ref(runner.kv_caches[0][0])]
    held.append(weakref.ref(runner.proposer.kv_caches[-1][1]))
    del runner, llm
    assert [r() for r in held] == [None, None, None]


def test_penalized_greedy_equals_no_spec(models_dir) -> None:
    """Repetition and frequency penalties read the drafts on the host every draft forward (the
    proposal's ids are on the host at once, not deferred): greedy output still equals plain
    decoding with the same penalties, and a draft equal to the target is always accepted."""
    target = models_dir["target"]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=14,
        ignore_eos=True,
        repetition_penalty=1.3,
        frequency_penalty=0.2,
    )
    want = [o.token_ids for o in spec_llm(target, None, 0).generate(PROMPTS, params)]
    outs = spec_llm(target, models_dir["same"], 3).generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == want
    assert all(o.spec.acceptance_rate == 1.0 for o in outs)


@pytest.mark.parametrize("graphs", [False, True])
def test_drafts_reach_the_next_verification_from_the_device(
    models_dir, reference, graphs: bool
) -> None:
    """A proposal's ids stay on the device until the next verification needs them on the host:
    after the step that drafted them the scheduler holds DRAFT_PLACEHOLDER for each draft, the
    runner has not read them, and the next step's inputs (eager, or staged into a graph) take
    them from the draft's tensor. Output is still plain greedy decoding's."""
    from rayfleet.replicas.runner import DRAFT_PLACEHOLDER

    llm = spec_llm(models_dir["target"], models_dir["partial"], 3)
    if graphs:
        emulate_graphs(llm)
    eng, runner = llm.engine, llm.engine.runner
    rids = [eng.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
    outs: dict[str, list[int]] = {}
    pending_steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
        for req in eng.scheduler.running:
            st = runner.requests[req.request_id]
            if st.pending is not None:
                pending_steps += 1
                assert not st.pending.resolved and st.spec_token_ids == []
                assert req.spec_token_ids == [DRAFT_PLACEHOLDER] * len(req.spec_token_ids)
                assert len(req.spec_token_ids) == st.pending.num_spec[req.request_id]
            else:
                assert DRAFT_PLACEHOLDER not in req.spec_token_ids
    assert pending_steps > 0
    assert [outs[r] for r in rids] == reference
    assert_pool_full(llm)


def test_greedy_proposals_replay_whole_proposal_graphs(models_dir, reference) -> None:
    """With graphs (emulated), a greedy batch of up to 64 requests drafts through one
    whole-proposal graph per step once the prompts are in the draft's cache (forward 1 feeds 1
    or 2 tokens), with per-request k mixing 1..4 (shorter rows write the null slot after their
    last draft); output equals plain greedy decoding. Chained (the runner's "chained
    proposals"), every proposal after the first verification runs behind its verification and
    finds the accepted tokens on the device: wherever a request reaches the same verified
    tokens in both runs, it verifies the same drafts (the chained plan may carry fewer near a
    request's end: it plans for every draft accepted)."""
    per_request = {f"req-{i}": k for i, k in enumerate([1, 4, 2, 3])}
    verified: list[dict] = []  # per run: (request, verified tokens) -> the drafts it verified
    for chain in (False, True):
        llm = spec_llm(
            models_dir["target"], models_dir["partial"], 4, FixedSpecPolicy(4, per_request)
        )
        runner = llm.engine.runner
        runner.chain_proposals = chain
        replays = emulate_graphs(llm)
        proposals = []
        propose = runner.proposer.propose
        runner.proposer.propose = lambda reqs, p=propose, log=proposals: log.append(reqs) or p(reqs)
        seen: dict = {}
        sample = runner._sample

        def recording(logits, rids, num_spec, out, *args, seen=seen, runner=runner, f=sample):
            for rid, k in zip(rids, num_spec):
                st = runner.requests[rid]
                if k:
                    seen[rid, tuple(st.token_ids)] = list(st.spec_token_ids[:k])
            return f(logits, rids, num_spec, out, *args)

        runner._sample = recording
        outs = llm.generate(PROMPTS[:4], GREEDY)
        assert [o.token_ids for o in outs] == reference[:4]
        assert_pool_full(llm)
        verified.append(seen)
        whole = sum(n for (m, _), n in replays.items() if m == "proposal")
        chained = sum(n for (m, _), n in replays.items() if m == "chained")
        steady = [r for r in proposals if max(x.end - x.start for x in r) <= 2]
        assert whole == len(steady)
        if chain:
            # the proposals after the prompts' steps (nothing verified yet) are the only others
            assert chained >= 8 and whole <= 2 and replays["chained", 4] > 0
        else:
            assert chained == 0 and whole >= 8 and replays["proposal", 4] > 0
    plain, chained_run = verified
    common = plain.keys() & chained_run.keys()
    assert len(common) >= 8
    for key in common:
        n = min(len(plain[key]), len(chained_run[key]))
        assert chained_run[key][:n] == plain[key][:n], key[0]


def test_greedy_and_seeded_equal_with_emulated_graphs(models_dir, reference) -> None:
    """The padded graph layouts (emulated) change nothing: greedy output equals no-spec, and
    seeded sampled requests repeat the eager speculative run exactly, with per-request k mixing
    0..5 drafts (so verification pads requests to the step's longest query) and 6 requests
    padded to a graph of 8."""
    target = models_dir["target"]
    prompts = PROMPTS[:3] * 2
    sampled = SamplingParams(temperature=0.8, top_k=20, max_tokens=14, seed=11, ignore_eos=True)
    params = [GREEDY] * 3 + [sampled] * 3
    per_request = {f"req-{i}": k for i, k in enumerate([0, 2, 5, 1, 4, 3])}
    runs = []
    for graphs in (False, True):
        llm = spec_llm(target, models_dir["partial"], 5, FixedSpecPolicy(5, per_request))
        replays = emulate_graphs(llm, sizes=(1, 2, 4, 8)) if graphs else None
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs[:3]] == reference[:3]
        runs.append([o.token_ids for o in outs])
        assert_pool_full(llm)
    assert runs[0] == runs[1]
    assert replays is not None and replays["target", 6] > 0 and replays["draft", 1] > 0


class RecordingPolicy(FixedSpecPolicy):
    """Fixed k per request; records what the runner tells a policy."""

    def __init__(self, k: int, per_request: dict[str, int]) -> None:
        super().__init__(k, per_request)
        self.plans: list[tuple[int, int, int]] = []  # (num_requests, base_tokens, max_padded_k)
        self.targets: list[int] = []
        self.drafts: list[int] = []

    def plan(self, candidates, *, num_requests, base_tokens, max_padded_k=0, **_steady):
        self.plans.append((num_requests, base_tokens, max_padded_k))
        return super().plan(candidates, num_requests=num_requests, base_tokens=base_tokens)

    def observe_target(self, num_tokens: int, seconds: float) -> None:
        assert seconds > 0
        self.targets.append(num_tokens)

    def observe_draft(self, num_tokens: int, seconds: float) -> None:
        assert seconds > 0
        self.drafts.append(num_tokens)


@pytest.mark.parametrize("graphs", [False, True])
def test_runner_reports_steady_state_costs_to_the_policy(models_dir, graphs: bool) -> None:
    """Only decode / verification steps are timed (not the prefill), at their padded size when
    a graph verifies them; the planner learns which k the graphs cover; draft timings come from
    steady-state proposals only (not the prompt catch-up of the first)."""
    policy = RecordingPolicy(3, {"req-0": 1, "req-1": 3, "req-2": 0})
    llm = spec_llm(models_dir["target"], models_dir["other"], 3, policy)
    if graphs:
        emulate_graphs(llm)
    proposer = llm.engine.runner.proposer
    proposals = []
    propose = proposer.propose
    proposer.propose = lambda reqs: proposals.append(reqs) or propose(reqs)
    llm.generate(PROMPTS[:3], GREEDY)
    assert policy.plans[0] == (3, 3, 3 if graphs else 0)
    # The first verification: 1 + 2 + 4 tokens, padded to 3 x 4 rows on the graph path.
    assert policy.targets[0] == (12 if graphs else 7)
    assert len(policy.targets) == len(policy.plans) - 1  # all but the prefill step
    # Two requests draft; every proposal but the first (a prompt catch-up) is timed.
    assert set(policy.drafts) == {2} and len(policy.drafts) == len(proposals) - 1


def test_stops_inside_an_accepted_run(models_dir, reference) -> None:
    """Stop ids, stop strings and max_tokens that fall inside a run of accepted drafts cut the
    output exactly where plain decoding stops."""
    target = models_dir["target"]
    plain = spec_llm(target, None, 0)
    spec = spec_llm(target, models_dir["same"], 5)
    ref = reference[1]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, stop_token_ids=[ref[4]]),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(
            temperature=0.0, max_tokens=14, ignore_eos=True, stop_token_ids=[ref[2]], min_tokens=5
        ),
    ]
    text = plain.generate([PROMPTS[1]], GREEDY)[0].text
    # Stop strings at several places, with max_tokens sometimes ending the same accepted run.
    for start in range(1, len(text) - 2, max(1, len(text) // 6)):
        for max_tokens in (9, 11, 14):
            stop = text[start : start + 2]
            cases.append(
                SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, stop=[stop])
            )
    for params in cases:
        want = plain.generate([PROMPTS[1]], params)[0]
        got = spec.generate([PROMPTS[1]], params)[0]
        assert got.token_ids == want.token_ids, params
        assert got.text == want.text and got.finish_reason == want.finish_reason
        assert got.stop_reason == want.stop_reason
    assert_pool_full(spec)


def test_eos_inside_an_accepted_run(models_dir, reference, tmp_path) -> None:
    eos = reference[0][5]
    dirs = []
    for name in ("target", "partial"):
        d = tmp_path / name
        shutil.copytree(models_dir[name], d)
        gen = json.loads((d / "generation_config.json").read_text())
        gen["eos_token_id"] = eos
        (d / "generation_config.json").write_text(json.dumps(gen))
        dirs.append(d)
    params = SamplingParams(temperature=0.0, max_tokens=14)
    want = spec_llm(dirs[0], None, 0).generate(PROMPTS, params)
    got = spec_llm(dirs[0], dirs[1], 4).generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got[0].token_ids[-1] == eos and got[0].finish_reason == "stop"


@pytest.mark.parametrize("draft", ["same", "partial"])
def test_chained_proposals_end_where_plain_decoding_does(models_dir, reference, draft) -> None:
    """Chained proposals (emulated graphs) are planned before the verification's result, for
    the worst case of every draft accepted: stop ids, stop strings, max_tokens and
    max_model_len falling inside or right after an accepted run still cut the output exactly
    where plain decoding does, with logprobs, and a request that finishes drops its chained
    drafts (the pool comes back whole)."""
    target = models_dir["target"]
    plain = spec_llm(target, None, 0, max_model_len=51)
    spec = spec_llm(target, models_dir[draft], 5, max_model_len=51)
    replays = emulate_graphs(spec)
    ref = reference[1]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, stop_token_ids=[ref[6]]),
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, stop_token_ids=[ref[9]]),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
    ]
    text = plain.generate([PROMPTS[1]], GREEDY)[0].text
    cases += [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, stop=[text[i : i + 2]])
        for i in range(4, len(text) - 2, max(1, len(text) // 4))
    ]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[3]]  # PROMPTS[1] + 14 tokens: max_model_len
    for params in cases:
        want = plain.generate(prompts, params)
        got = spec.generate(prompts, params)
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids, params
            assert g.text == w.text and g.finish_reason == w.finish_reason
            if params.logprobs:
                assert len(g.logprobs) == len(w.logprobs) == params.max_tokens
                for a, b in zip(g.logprobs, w.logprobs):
                    assert a.token_id == b.token_id and a.rank == b.rank
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert sum(n for (m, _), n in replays.items() if m == "chained") >= len(cases)
    if draft == "same":  # the target as its own draft: a chained proposal's KV must hold up
        assert all(o.spec.num_accepted == o.spec.num_drafted > 0 for o in got)
    assert_pool_full(spec)


def test_no_chained_plan_past_the_largest_proposal_graph(models_dir, reference) -> None:
    """A step whose batch no proposal graph covers is planned as unchained (the policy prices
    and samples H per kind), and proposes after its result; output equals plain decoding."""
    policy = RecordingPolicy(3, {})
    kinds: list[bool] = []
    plan = policy.plan

    def recording(candidates, *, chained=False, **kw):
        kinds.append(chained)
        return plan(candidates, **kw)

    policy.plan = recording  # type: ignore[method-assign]
    llm = spec_llm(models_dir["target"], models_dir["partial"], 3, policy)
    replays = emulate_graphs(llm, sizes=(1, 2))
    outs = llm.generate(PROMPTS[:3], GREEDY)  # 3 requests: past the largest graph, 2
    assert [o.token_ids for o in outs] == reference[:3]
    assert kinds and not any(kinds) and not any(m == "chained" for m, _ in replays)
    outs = llm.generate(PROMPTS[:2], GREEDY)
    assert [o.token_ids for o in outs] == reference[:2]
    assert any(kinds) and any(m == "chained" for m, _ in replays)


def test_max_model_len_and_logprobs(models_dir) -> None:
    target = models_dir["target"]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    prompt = PROMPTS[1][:20]
    want = spec_llm(target, None, 0, max_model_len=40).generate([prompt], params)[0]
    got = spec_llm(target, models_dir["same"], 5, max_model_len=40).generate([prompt], params)[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == 20
    assert got.spec.num_accepted > 0
    assert len(got.logprobs) == len(want.logprobs) == 20
    for a, b in zip(got.logprobs, want.logprobs):
        assert a.token_id == b.token_id and a.rank == b.rank
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_abort_mid_speculation_frees_both_caches(models_dir) -> None:
    llm = spec_llm(models_dir["target"], models_dir["partial"], 4)
    eng = llm.engine
    rids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    for _ in range(3):
        eng.step()
        eng.scheduler.check_integrity()
    assert any(eng.scheduler.requests[r].spec_token_ids for r in rids)
    for r in rids[:2]:
        out = eng.abort(r)
        assert out is not None and out.finish_reason == "abort"
        eng.scheduler.check_integrity()
    eng.step()  # the runner forgets the aborted requests (and their draft state)
    assert set(eng.runner.requests) == set(rids[2:])
    for r in rids[2:]:
        eng.abort(r)
    eng.step()
    assert_pool_full(llm)


def test_random_accept_patterns_keep_pool_integrity(models_dir) -> None:
    """Sampled requests with a disagreeing draft under a tiny pool: integrity after every step."""
    llm = spec_llm(models_dir["target"], models_dir["other"], 4, num_blocks=30)
    eng = llm.engine
    rng = random.Random(0)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    pending = [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 25))] for _ in range(12)]
    steps = 0
    while pending or eng.has_unfinished():
        if pending and rng.random() < 0.5:
            eng.add_request(pending.pop(), params)
        eng.step()
        steps += 1
        eng.scheduler.check_integrity()
        if steps % 7 == 0 and eng.scheduler.running:
            eng.abort(rng.choice(eng.scheduler.running).request_id)
            eng.scheduler.check_integrity()
    eng.step()
    assert_pool_full(llm)


def test_draft_tokenizer_must_match(models_dir, tmp_path) -> None:
    other_tok = make_tiny_model(tmp_path / "meta", "llama", tokenizer="metaspace")
    with pytest.raises(ValueError, match="tokenizer") as e:
        LLM(str(models_dir["target"]), draft_model=str(other_tok), num_speculative_tokens=2)
    assert str(models_dir["target"]) in str(e.value) and str(other_tok) in str(e.value)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(str(models_dir["target"]), draft_model=str(models_dir["same"]))


# ---- scheduler alone
def test_scheduler_rollback_and_lookahead_under_random_verification() -> None:
    """Pure scheduler with a stand-in runner that accepts a random prefix of the drafts."""
    rng = random.Random(1)
    k_max = 3
    sched = Scheduler(
        num_blocks=24,
        block_size=BS,
        max_num_batched_tokens=20,
        max_num_seqs=6,
        max_model_len=64,
        num_lookahead_tokens=k_max,
    )
    for i in range(10):
        sched.add_request(
            Request(
                request_id=f"r{i}",
                prompt_token_ids=[rng.randrange(100) for _ in range(rng.randrange(1, 20))],
                max_tokens=rng.randrange(1, 30),
                eos_token_ids=frozenset({0}),
            )
        )
    while sched.has_unfinished():
        so = sched.schedule()
        out = RunnerOutput()
        before = {}
        for rid in so.num_scheduled_tokens:
            req = sched.requests[rid]
            blocks = sched.kv.req_blocks[rid]
            # Lookahead: room for the draft's KV past this step's tokens.
            need = req.num_computed_tokens + (
                min(k_max, req.num_prompt_tokens + req.max_tokens - req.num_computed_tokens)
                if req.num_computed_tokens >= req.num_tokens
                else 0
            )
            assert len(blocks) * BS >= min(need, 64)
            if req.num_computed_tokens < req.num_tokens:
                continue  # partial prefill chunk
            d = req.num_computed_tokens - req.num_tokens
            a = rng.randrange(d + 1)
            out.sampled_token_ids[rid] = [rng.randrange(1, 100) for _ in range(a + 1)]
            out.spec_token_ids[rid] = [
                rng.randrange(1, 100) for _ in range(rng.randrange(k_max + 1))
            ]
            before[rid] = (req.num_tokens, a)
        sched.update(so, out)
        sched.check_integrity()
        for rid, (n_before, a) in before.items():
            req = sched.requests.get(rid)
            if req is None:
                continue
            assert req.num_computed_tokens == n_before + a
            assert req.num_computed_tokens == req.num_tokens - 1
            limit = max_num_spec_tokens(req.num_tokens, req.num_output_tokens, req.max_tokens, 64)
            assert len(req.spec_token_ids) <= limit
    assert sched.pool.num_free_blocks == sched.pool.num_usable_blocks


def test_scheduler_drops_tokens_after_a_stop_in_a_run() -> None:
    sched = Scheduler(
        num_blocks=20,
        block_size=BS,
        max_num_batched_tokens=64,
        max_num_seqs=4,
        max_model_len=64,
        num_lookahead_tokens=4,
    )
    req = Request("a", [1, 2, 3], max_tokens=10, eos_token_ids=frozenset({9}))
    sched.add_request(req)
    so = sched.schedule()
    sched.update(so, RunnerOutput(sampled_token_ids={"a": [5]}, spec_token_ids={"a": [6, 9, 7]}))
    assert req.spec_token_ids == [6, 9, 7]
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": 4} and so.spec_token_ids == {"a": [6, 9, 7]}
    sched.update(so, RunnerOutput(sampled_token_ids={"a": [6, 9, 7, 8]}))
    assert req.output_token_ids == [5, 6, 9] and req.status == RequestStatus.FINISHED_STOPPED
    sched.check_integrity()
    assert sched.pool.num_free_blocks == sched.pool.num_usable_blocks


# ---- the verifier alone
def test_rejection_sampler_greedy_rule() -> None:
    v = 6
    logits = torch.full((4, v), -5.0)
    for row, best in enumerate([2, 4, 1, 3]):
        logits[row, best] = 5.0
    from rayfleet.replicas.spec.rejection import SpecRow

    row = SpecRow(
        params=SamplingParams(temperature=0.0),
        prompt_token_ids=[0],
        output_token_ids=[],
        eos_token_ids=frozenset(),
        draft_token_ids=[2, 4, 5],
    )
    out = RejectionSampler()(logits, [row])
    assert out.token_ids == [[2, 4, 1]] and out.num_accepted == [2]
    row.draft_token_ids = [2, 4, 1]
    out = RejectionSampler()(logits, [row])
    assert out.token_ids == [[2, 4, 1, 3]] and out.num_accepted == [3]


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_verification_reads_the_device_once(seeded: bool, monkeypatch) -> None:
    """Unseeded sampled requests are verified with one device-to-host read (accepted counts and
    the correction/bonus tokens together); a seeded one needs its count first (its resample
    stream is named by the output position), so two. Tokens and counts agree either way."""
    from rayfleet.replicas.spec.rejection import SpecRow

    gen = torch.Generator().manual_seed(0)
    v, ks = 9, [3, 1, 4]
    logits = torch.randn(sum(k + 1 for k in ks), v, generator=gen)
    rows = [
        SpecRow(
            params=SamplingParams(temperature=1.0, seed=7 if seeded and i == 1 else None),
            prompt_token_ids=[0],
            output_token_ids=[1, 2],
            eos_token_ids=frozenset(),
            draft_token_ids=torch.randint(0, v, (k,), generator=gen).tolist(),
        )
        for i, k in enumerate(ks)
    ]
    q = torch.softmax(torch.randn(sum(ks), v, generator=gen), -1)
    reads = []
    real = torch.Tensor.tolist

    def tolist(t: torch.Tensor) -> list:
        if t.dtype != torch.float32:  # the float ones are the uniforms, drawn on the host
            reads.append(t.shape)
        return real(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    out = RejectionSampler(seed=3)(logits, rows, q)
    assert len(reads) == (2 if seeded else 1)
    for r, toks, a in zip(rows, out.token_ids, out.num_accepted):
        assert 0 <= a <= len(r.draft_token_ids) and toks[:a] == r.draft_token_ids[:a]
        assert len(toks) == a + 1 and 0 <= toks[-1] < v


@pytest.mark.parametrize("ks", [[0], [0, 0], [0, 2], [2, 0, 1]])
def test_sampled_requests_without_drafts_sample_their_bonus_row(ks: list[int]) -> None:
    """A sampled request verified with no drafts (k = 0) emits one token from the target's row,
    also when no request in the step drafted (no draft distributions at all)."""
    from rayfleet.replicas.spec.rejection import SpecRow

    gen = torch.Generator().manual_seed(1)
    v = 7
    logits = torch.full((sum(k + 1 for k in ks), v), -30.0)
    logits[:, 3] = 30.0  # every target row is (numerically) one-hot on token 3
    rows = [SpecRow(SamplingParams(temperature=1.0), [0], [1], frozenset(), [3] * k) for k in ks]
    q = torch.softmax(torch.randn(sum(ks), v, generator=gen), -1)
    out = RejectionSampler(seed=0)(logits, rows, q)
    assert out.num_accepted == ks  # drafts of token 3 are always accepted
    assert out.token_ids == [[3] * (k + 1) for k in ks]


# ---- distribution
VOCAB = 12


def make_tiny_vocab_model(out: Path, seed: int, tokenizer_src: Path | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_src is None:
        words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
        fast.save_pretrained(str(out))
    else:
        for f in tokenizer_src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, out / f.name)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return out


def chi_square(counts: dict, expected_probs: dict, n: int) -> tuple[float, int]:
    """Pearson chi-square of ``counts`` against ``n * expected_probs``; cells expected < 5 are
    pooled into one. Returns (statistic, degrees of freedom)."""
    obs, exp = [], []
    pool_o = pool_e = 0.0
    for cell, prob in expected_probs.items():
        e = n * prob
        if e < 5:
            pool_o += counts.get(cell, 0)
            pool_e += e
        else:
            obs.append(counts.get(cell, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return stat, len(obs) - 1


def pooled_conditional_p(groups: dict, cond_probs) -> float:
    """Chi-square over prefixes: for each observed prefix h (seen >= 50 times) the next-token
    counts against count(h) * p(. | h); statistics and degrees of freedom add up."""
    stat, dof = 0.0, 0
    for h, counts in groups.items():
        n = sum(counts.values())
        if n < 50:
            continue
        s, d = chi_square(counts, {t: float(cond_probs(h)[t]) for t in range(VOCAB)}, n)
        stat += s
        dof += d
    return float(scipy_stats.chi2.sf(stat, dof))


def exact_distributions(model_dir: Path, prompt: list[int], params: SamplingParams):
    """p(t1), p(t2 | t1), p(t3 | t1, t2) of the target, through the sampler's transform."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def probs(seqs: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor(seqs)).logits[:, -1].float()
        rows = [SamplerRow(params, prompt, s[len(prompt) :], frozenset({2})) for s in seqs]
        return Sampler.sampling_probs(Sampler.apply_penalties(logits, rows), rows).double()

    p1 = probs([prompt])[0]
    p2 = probs([prompt + [a] for a in range(VOCAB)])  # [t1, t2]
    p3 = probs([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(
        VOCAB, VOCAB, VOCAB
    )
    return p1, p2, p3


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vocab12")
    target = make_tiny_vocab_model(root / "target", seed=3)
    draft = make_tiny_vocab_model(root / "draft", seed=4, tokenizer_src=target)
    return target, draft


DIST_PROMPT = [1, 5, 7]
# max_tokens=4: after the prefill's t1, the first speculative step may carry 2 drafts (t2, t3).
DIST_PARAMS = SamplingParams(temperature=0.9, top_k=9, max_tokens=4, ignore_eos=True)
NUM_SAMPLES = 20_000


def sample_continuations(
    target: Path, draft: Path, n: int, seeded: bool = False
) -> tuple[list[list[int]], list[int], list[int]]:
    """n sampled continuations (2,000 requests per batch) with 2 drafts per step; also the
    drafted / accepted counts by draft position. ``seeded``: every request its own seed, so
    the per-request random streams (accept / resample / draft) are what is tested."""
    llm = LLM(
        str(target),
        dtype="float32",
        block_size=BS,
        draft_model=str(draft),
        num_speculative_tokens=2,
        max_num_seqs=2000,
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
    )
    llm.engine.runner.spec_policy = FixedSpecPolicy(2)
    outs = []
    drafted, accepted = [0, 0], [0, 0]
    for b in range(n // 2000):
        params = (
            [dataclasses.replace(DIST_PARAMS, seed=b * 2000 + i) for i in range(2000)]
            if seeded
            else DIST_PARAMS
        )
        for o in llm.generate([DIST_PROMPT] * 2000, params):
            outs.append(o.token_ids)
            for j, (d, a) in enumerate(
                zip(o.spec.drafted_by_position, o.spec.accepted_by_position)
            ):
                drafted[j] += d
                accepted[j] += a
    return outs, drafted, accepted


def distribution_p_values(target: Path, samples: list[list[int]]) -> dict[str, float]:
    """Chi-square p-values of the speculative tokens (t2 at the first draft position, t3 at the
    second) against the target: the conditionals p(t2 | t1) and p(t3 | t1, t2) pooled over the
    observed prefixes, and the marginals of t2 and t3 (t1 is the prefill step's plain sample)."""
    p1, p2, p3 = exact_distributions(target, DIST_PROMPT, DIST_PARAMS)
    n = len(samples)
    by_t1: dict[int, dict[int, int]] = {}
    by_t12: dict[tuple[int, int], dict[int, int]] = {}
    m2_counts: dict[int, int] = {}
    m3_counts: dict[int, int] = {}
    for t1, t2, t3, *_ in samples:
        g = by_t1.setdefault(t1, {})
        g[t2] = g.get(t2, 0) + 1
        g = by_t12.setdefault((t1, t2), {})
        g[t3] = g.get(t3, 0) + 1
        m2_counts[t2] = m2_counts.get(t2, 0) + 1
        m3_counts[t3] = m3_counts.get(t3, 0) + 1
    m2 = (p1.unsqueeze(1) * p2).sum(0)
    m3 = (p1.view(-1, 1, 1) * p2.unsqueeze(2) * p3).sum((0, 1))
    out = {
        "t2|t1": pooled_conditional_p(by_t1, lambda h: p2[h]),
        "t3|t1,t2": pooled_conditional_p(by_t12, lambda h: p3[h[0], h[1]]),
    }
    for name, counts, m in (("t2", m2_counts, m2), ("t3", m3_counts, m3)):
        stat, dof = chi_square(counts, {t: float(m[t]) for t in range(VOCAB)}, n)
        out[name] = float(scipy_stats.chi2.sf(stat, dof))
    return out


@pytest.mark.parametrize("seeded", [False, True])
def test_spec_sampling_matches_target_distribution(tiny_vocab, seeded: bool) -> None:
    target, draft = tiny_vocab
    samples, drafted, accepted = sample_continuations(target, draft, NUM_SAMPLES, seeded)
    assert len(samples) == NUM_SAMPLES and all(len(s) == 4 for s in samples)
    # Both draft positions were verified often, and rejected often enough to test the residual.
    assert drafted[0] >= NUM_SAMPLES and drafted[1] > NUM_SAMPLES // 10
    assert 0.2 < accepted[0] / drafted[0] < 0.9
    pvals = distribution_p_values(target, samples)
    print("drafted", drafted, "accepted", accepted, "chi-square p-values:", pvals)
    assert all(p > 1e-3 for p in pvals.values()), pvals


def test_chi_square_catches_an_always_accepting_verifier(tiny_vocab, monkeypatch) -> None:
    target, draft = tiny_vocab
    # u = 0 accepts every draft the target gives any probability: the draft's distribution leaks.
    monkeypatch.setattr(
        RejectionSampler,
        "_uniforms",
        lambda self, rows, ks, sampled: torch.zeros(sum(ks[i] for i in sampled)),
    )
    samples, _, _ = sample_continuations(target, draft, 4000)
    pvals = distribution_p_values(target, samples)
    print("broken verifier p-values:", pvals)
    assert min(pvals.values()) < 1e-6


def test_same_step_prefix_hit_does_not_trust_a_reused_blocks_old_draft_flags(models_dir) -> None:
    """A and B share a prompt and arrive together: B hits the blocks A allocates in that same
    step (they are registered at scheduling). Those blocks are reused from an earlier request
    whose draft KV they held, and A (k=0) never writes draft KV into them, so B must recompute
    the draft's KV; with the target as its own draft, trusting the old flags shows up as
    rejections."""
    target = models_dir["target"]
    policy = FixedSpecPolicy(3, {"req-2": 0})  # req-0, req-1 = warm-ups, req-2 = A, req-3 = B
    # 12 usable blocks of 4 tokens. The long warm-up drafts over (and flags) blocks 1-10 and
    # frees tail-first, so the queue starts 12, 11, 10, ...; the short one takes 12, 11 back
    # to the tail, leaving flagged blocks 10, 9, 8, ... at the head for A.
    llm = spec_llm(target, models_dir["same"], 3, policy, num_blocks=13)
    llm.generate(
        [list(range(100, 125))], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    )
    llm.generate(
        [[7, 8, 9, 10, 11]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    )
    assert [b.block_id for b in llm.engine.scheduler.pool.free_queue][:5] == [10, 9, 8, 7, 6]
    assert all(llm.engine.runner._draft_block_valid[i] for i in (10, 9, 8, 7, 6))
    shared = list(range(40, 61))  # 5 full blocks + 1
    short = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    a, b = llm.generate([shared + [1], shared + [2]], short)
    assert b.num_cached_tokens == 20
    ref = spec_llm(target, None, 0).generate([shared + [2]], short)[0]
    assert b.token_ids == ref.token_ids
    assert b.spec.num_drafted > 0 and b.spec.acceptance_rate == 1.0
    assert_pool_full(llm)


@pytest.mark.parametrize("bound", [8, 0])
def test_proposal_graph_bound_reaches_the_draft(models_dir, bound: int) -> None:
    """``proposal_graph_max_batch_size`` is what the engine's draft-graph capture (CUDA only)
    hands the proposer (which capture sizes that keeps: test_proposal_graphs.py)."""
    llm = spec_llm(models_dir["target"], models_dir["same"], 3, proposal_graph_max_batch_size=bound)
    eng = llm.engine
    proposer = eng.runner.proposer
    calls = []
    proposer.enable_cuda_graphs = lambda *a, **kw: calls.append(kw)
    eng._capture_draft_graphs(proposer, 3)
    assert [(kw["proposal_k"], kw["proposal_max_batch"]) for kw in calls] == [(3, bound)]
