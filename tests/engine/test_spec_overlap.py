"""Overlapped scheduling with a draft model: steps overlap while the policy has speculation
paused and are synchronous (planning, drafting, verifying) otherwise. Greedy output equals the
output without a draft, token for token, across pauses and resumes; the draft's KV falls behind
during overlapped steps and catches up after; blocks the target wrote while paused are never
trusted as draft-valid by a prefix hit; aborts free both caches' blocks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from rayfleet import LLM, SamplingParams
from rayfleet.replicas.spec.adaptive import AdaptiveSpecPolicy, FixedSpecPolicy
from tests.model_factory import make_tiny_model

BS = 4
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    list(range(20, 57)),
    [3],
    list(range(100, 116)),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


class SwitchingPolicy(FixedSpecPolicy):
    """k drafts on ``on`` consecutive plans, then one plan without drafts followed by ``off``
    steps with speculation paused; then again. ``force`` pins it: True always drafts (never
    paused), False never drafts (always paused)."""

    def __init__(self, k: int, on: int, off: int) -> None:
        super().__init__(k)
        self.on, self.off = on, off
        self.force: bool | None = None
        self._on_left = on
        self._skipped: int | None = None  # None: the last plan drafted
        self.log: list[str] = []

    def plan(
        self,
        candidates: Sequence[tuple[str, int]],
        *,
        num_requests: int,
        base_tokens: int,
        max_padded_k: int = 0,
        steady_requests: int | None = None,
        steady_padded_k: int = 0,
        draft_lag: Sequence[tuple[int, int]] | None = None,
        chained: bool = False,
    ) -> dict[str, int]:
        on = self.force if self.force is not None else self._on_left > 0
        if on:
            self._on_left -= 1
            self._skipped = None
            self.log.append("on")
            return super().plan(
                candidates,
                num_requests=num_requests,
                base_tokens=base_tokens,
                max_padded_k=max_padded_k,
            )
        self._on_left = self.on
        self._skipped = 0
        self.log.append("off")
        return {rid: 0 for rid, _ in candidates}

    def speculation_paused(self, num_requests: int, *_: object) -> bool:
        if self.force is not None:
            return not self.force
        return self._skipped is not None and self._skipped < self.off

    def skip_plan(self) -> None:
        assert self.force is False or self._skipped is not None
        self._skipped = (self._skipped or 0) + 1
        self.log.append("skip")


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("spec_overlap"), "llama", num_kv_heads=2)


def spec_llm(target: Path, policy: FixedSpecPolicy | None, k: int = 3, **kw) -> LLM:
    kw.setdefault("block_size", BS)
    if policy is None:
        return LLM(str(target), dtype="float32", **kw)
    # The target as its own draft: every draft is accepted unless the draft's KV is wrong.
    llm = LLM(
        str(target),
        dtype="float32",
        draft_model=str(target),
        num_speculative_tokens=k,
        overlap_scheduling=True,
        **kw,
    )
    assert llm.engine.overlap
    llm.engine.runner.spec_policy = policy
    return llm


def assert_pool_full(llm: LLM) -> None:
    sched = llm.engine.scheduler
    sched.check_integrity()
    assert sched.pool.num_free_blocks == sched.pool.num_usable_blocks


def count_steps(llm: LLM) -> dict[str, int]:
    """Wrap the runner: counts of overlapped (launch) and synchronous (execute) steps, and of
    launched steps that carried pending tokens to the proposer (must stay 0)."""
    runner = llm.engine.runner
    counts = {"launch": 0, "execute": 0, "pending_to_proposer": 0}
    real_launch, real_execute, real_propose = runner.launch, runner.execute, runner.proposer.propose

    def launch(sched):
        counts["launch"] += 1
        return real_launch(sched)

    def execute(sched):
        counts["execute"] += 1
        return real_execute(sched)

    def propose(reqs):
        if any(runner.requests[r.request_id].num_pending for r in reqs):
            counts["pending_to_proposer"] += 1
        return real_propose(reqs)

    runner.launch, runner.execute, runner.proposer.propose = launch, execute, propose
    return counts


@pytest.mark.parametrize("on,off", [(2, 3), (1, 5), (3, 1)])
def test_greedy_equal_across_pauses_and_resumes(target: Path, on: int, off: int) -> None:
    reference = [o.token_ids for o in spec_llm(target, None).generate(PROMPTS, GREEDY)]
    policy = SwitchingPolicy(3, on=on, off=off)
    llm = spec_llm(target, policy)
    counts = count_steps(llm)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    # It switched several times, and the draft (catching up after every pause) stayed right.
    assert counts["launch"] >= 2 and counts["execute"] >= 3
    log = "".join(x[1] for x in policy.log)  # n(on), f(off), k(skip)
    assert log.count("fk") >= 2 and log.count("kn") >= 2
    assert counts["pending_to_proposer"] == 0
    assert all(o.spec.num_drafted > 0 and o.spec.acceptance_rate == 1.0 for o in outs)
    assert_pool_full(llm)


def test_draft_falls_behind_while_paused_and_catches_up(target: Path) -> None:
    policy = SwitchingPolicy(3, on=1, off=1)
    policy.force = False
    llm = spec_llm(target, policy)
    eng = llm.engine
    rid = eng.add_request(list(range(30, 40)), GREEDY)
    for _ in range(8):
        eng.step()
    st = eng.runner.requests[rid]
    assert eng._inflight is not None
    assert st.draft_num_computed == 0 and not st.spec_token_ids
    assert not any(eng.runner._draft_block_valid[b] for b in st.block_ids)
    policy.force = True
    out = eng.run_to_completion()[rid]
    assert out.spec.num_drafted > 0 and out.spec.acceptance_rate == 1.0
    ref = spec_llm(target, None).generate([list(range(30, 40))], GREEDY)[0]
    assert out.token_ids == ref.token_ids
    assert_pool_full(llm)


def test_prefix_hit_after_paused_steps_recomputes_the_draft_kv(target: Path) -> None:
    """A's output is generated in overlapped steps (the draft never runs); B's prompt is A's
    prompt and output, so it hits the blocks the target wrote while paused. Their draft KV was
    never written: trusting it shows up as rejections (the target is its own draft)."""
    prompt = list(range(60, 69))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    policy = SwitchingPolicy(3, on=1, off=1)
    llm = spec_llm(target, policy)
    counts = count_steps(llm)
    policy.force = False
    a = llm.generate([prompt], params)[0]
    assert counts["launch"] >= 10 and a.spec.num_drafted == 0
    policy.force = True
    b_prompt = prompt + a.token_ids
    b = llm.generate([b_prompt], params)[0]
    assert b.num_cached_tokens >= 20  # blocks 3-4 (positions 12-19) were written while paused
    ref = spec_llm(target, None).generate([b_prompt], params)[0]
    assert b.token_ids == ref.token_ids
    assert b.spec.num_drafted > 0 and b.spec.acceptance_rate == 1.0
    assert_pool_full(llm)


def test_abort_during_an_overlapped_step_frees_both_caches(target: Path) -> None:
    policy = SwitchingPolicy(3, on=2, off=4)
    llm = spec_llm(target, policy)
    eng = llm.engine
    pool = eng.scheduler.pool
    rids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    while eng._inflight is None:
        eng.step()
    held = {b for r in rids for b in eng.runner.requests[r].block_ids}
    assert held
    for r in rids[:2]:
        out = eng.abort(r)
        assert out is not None and out.finish_reason == "abort"
        eng.scheduler.check_integrity()
    eng.step()  # resolves the step in flight; the runner forgets the aborted requests
    assert set(eng.runner.requests) <= set(rids[2:])
    for r in rids[2:]:
        eng.abort(r)
    assert pool.num_free_blocks == pool.num_usable_blocks  # target and draft: same block ids
    while eng.has_unfinished() or eng._inflight is not None:
        eng.step()
    eng.step()
    assert not eng.runner.requests
    assert_pool_full(llm)


class TimedPolicy(FixedSpecPolicy):
    """Never drafts (so every decode step overlaps); records the target timings it is given."""

    def __init__(self) -> None:
        super().__init__(0)
        self.targets: list[tuple[int, float]] = []

    def observe_target(self, num_tokens: int, seconds: float) -> None:
        self.targets.append((num_tokens, seconds))


def test_overlapped_decode_steps_feed_the_target_cost_curve(target: Path) -> None:
    """While speculation is paused every decode step overlaps, and each one (no prefill chunk
    in it) reports its time at its batch size: T(n_base) stays measured without synchronous
    exploration steps. Steps that carry a prefill report nothing."""
    policy = TimedPolicy()
    llm = spec_llm(target, policy)
    counts = count_steps(llm)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm.generate(PROMPTS, params)
    assert counts["execute"] == 0 and counts["launch"] > 0
    sizes = [n for n, _ in policy.targets]
    # 4 requests prefill in the first step, then decode together until all have 12 tokens
    assert sizes == [4] * 11
    assert all(t > 0 for _, t in policy.targets)
    assert_pool_full(llm)


def test_a_shrinking_batch_stays_overlapped_while_speculation_is_priced_off(target: Path) -> None:
    """Four arrivals, then requests finishing at staggered steps move the batch through
    buckets 4, 3, 2, 1. With speculation priced off at every size (a draft forward measured at
    a second), the first step and each move are decided by dry plans over the requests: no
    synchronous step just to plan. Greedy output is unchanged and the pool is whole after."""
    policy = AdaptiveSpecPolicy(3)
    for n in (1, 1, 2, 2, 3, 3, 4, 4):
        policy.observe_target(n, 0.010)
    policy.observe_draft(1, 1.0)
    policy.observe_draft(1, 1.0)
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (8, 14, 20, 26)
    ]
    reference = [o.token_ids for o in spec_llm(target, None).generate(PROMPTS, params)]
    llm = spec_llm(target, policy)
    counts = count_steps(llm)
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == reference
    # Not one synchronous step: the first (a burst of 4 arrivals, nothing planned before it)
    # and each move to a smaller bucket are priced by dry plans.
    assert counts["execute"] == 0 and policy.stats.plans == 0
    assert policy.stats.dry_off == 4
    assert_pool_full(llm)
