"""Scheduler with a pure-Python stand-in runner: budgets, chunking, preemption order, aborts."""

from __future__ import annotations

from rayfleet.replicas.engine.request import Request, RequestStatus
from rayfleet.replicas.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput

BS = 4


def make_sched(**kw) -> Scheduler:
    args = dict(
        num_blocks=65, block_size=BS, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128
    )
    args.update(kw)
    return Scheduler(**args)


def req(rid: str, n_prompt: int, max_tokens: int = 4, base: int = 0) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=[base + i for i in range(n_prompt)],
        max_tokens=max_tokens,
        eos_token_ids=frozenset({999}),
    )


class EchoRunner:
    """Samples token = (position of the sampled token) for every request at its last token."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        for rid, _n in so.num_scheduled_tokens.items():
            r = self.sched.requests[rid]
            if r.num_computed_tokens >= r.num_tokens:
                out.sampled_token_ids[rid] = [r.num_tokens]
        return out


def run_step(s: Scheduler) -> SchedulerOutput:
    so = s.schedule()
    s.update(so, EchoRunner(s).execute(so))
    s.check_integrity()
    return so


def test_prefill_then_decode_in_one_rule():
    s = make_sched()
    s.add_request(req("a", 10))
    so = run_step(s)
    assert so.num_scheduled_tokens == {"a": 10}
    assert so.new_requests[0].block_ids == [1, 2, 3]
    assert s.requests["a"].output_token_ids == [10]
    so = run_step(s)
    assert so.num_scheduled_tokens == {"a": 1} and so.cached_requests[0].new_block_ids == []
    so = run_step(s)  # position 11 -> block 3 still; 12 -> new block
    so = run_step(s)
    assert so.cached_requests[0].new_block_ids == [4]
    assert s.requests == {}  # max_tokens=4 reached
    assert s.pool.num_free_blocks == 64


def test_chunked_prefill_under_budget_while_others_decode():
    s = make_sched(max_num_batched_tokens=8)
    s.add_request(req("a", 3))
    run_step(s)
    s.add_request(req("b", 20, base=100))
    so = run_step(s)
    assert so.num_scheduled_tokens == {"a": 1, "b": 7}
    so = run_step(s)
    assert so.num_scheduled_tokens == {"a": 1, "b": 7}
    assert "b" not in {r for r in s.requests if s.requests[r].output_token_ids}
    so = run_step(s)  # a finishes (4 tokens), b gets its last 6 prompt tokens
    assert so.num_scheduled_tokens == {"a": 1, "b": 6}
    assert s.requests["b"].output_token_ids == [20]


def test_max_num_seqs_limits_running():
    s = make_sched(max_num_seqs=2)
    for r in "abc":
        s.add_request(req(r, 2))
    so = run_step(s)
    assert list(so.num_scheduled_tokens) == ["a", "b"]


def test_preemption_takes_newest_and_resumes_with_prefix_hits():
    # 6 usable blocks of 4 tokens; two 11-token prompts take 3 blocks each, and each needs a
    # 4th block to compute position 12.
    s = make_sched(num_blocks=7)
    s.add_request(req("a", 11, max_tokens=6))
    s.add_request(req("b", 11, max_tokens=6, base=50))
    run_step(s)  # both prefilled: 3 blocks each, pool full
    assert s.pool.num_free_blocks == 0
    so = run_step(s)  # position 11 still fits block 3
    assert so.num_scheduled_tokens == {"a": 1, "b": 1}
    so = run_step(s)  # position 12 needs a 4th block each: b (newest) is preempted for a
    assert so.preempted_request_ids == {"b"}
    assert list(so.num_scheduled_tokens) == ["a"]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b and b.output_token_ids == [11, 12]
    while "a" in s.requests:
        run_step(s)
    # b freed its blocks tail-first (6, 5, 4); a took block 6 for positions 12-15, so b's first
    # two blocks (8 tokens) are still cached and b recomputes the other 5 of its 13 tokens.
    so = run_step(s)
    assert so.new_requests[0].request_id == "b"
    assert so.new_requests[0].num_computed_tokens == 8
    assert so.new_requests[0].block_ids[:2] == [4, 5]
    assert so.num_scheduled_tokens == {"b": 5}
    assert b.num_cached_tokens == 0  # first-scheduling figure is kept
    while s.has_unfinished():
        run_step(s)
    assert b.output_token_ids == [11, 12, 13, 14, 15, 16]
    assert s.num_preemptions_total == 1


def test_abort_frees_blocks_at_once_and_tells_runner():
    s = make_sched()
    s.add_request(req("a", 10))
    run_step(s)
    assert s.pool.num_free_blocks == 61
    s.finish("a", RequestStatus.FINISHED_ABORTED)
    assert s.pool.num_free_blocks == 64
    so = s.schedule()
    assert so.finished_request_ids == {"a"} and so.is_empty


def test_abort_waiting_request():
    s = make_sched(max_num_seqs=1)
    s.add_request(req("a", 2))
    s.add_request(req("b", 2))
    run_step(s)
    s.finish("b", RequestStatus.FINISHED_ABORTED)
    assert not s.waiting
    s.check_integrity()


def test_eos_and_stop_ids_and_min_tokens():
    s = make_sched()
    r = req("a", 3, max_tokens=10)
    r.min_tokens = 1
    r.stop_token_ids = frozenset({5})
    s.add_request(r)
    run_step(s)  # samples 3
    run_step(s)  # samples 4
    run_step(s)  # samples 5 -> stop id
    assert r.status == RequestStatus.FINISHED_STOPPED and r.output_token_ids == [3, 4, 5]


def test_prompt_larger_than_pool_is_rejected():
    s = make_sched(num_blocks=3)
    import pytest

    with pytest.raises(ValueError, match="pool holds only 8"):
        s.add_request(req("a", 20))


def test_routing_load_counts_waiting_requests_net_of_their_cache_hits():
    # Room for one request at a time: the others wait behind it.
    s = make_sched(max_num_seqs=1)
    s.add_request(req("a", 33))
    run_step(s)  # a's 8 full blocks are cached; a decodes
    b = req("b", 37)
    b.prompt_token_ids[32:] = [900, 901, 902, 903, 904]
    s.add_request(b)  # shares a's first 32 tokens, then 5 of its own
    s.add_request(req("c", 10, base=500))  # nothing cached
    assert [r.request_id for r in s.waiting] == ["b", "c"]
    # b: 37 - 32 cached; c: all 10; a decodes with 34 KV tokens computed.
    assert s.routing_load() == (5 + 10, 33)
    # Nothing was touched by the lookup: b still gets its hit when it runs.
    while "a" in s.requests:
        run_step(s)
    run_step(s)
    assert s.requests["b"].num_cached_tokens == 32


def test_output_names_the_batch_a_prefill_is_growing_into():
    """Requests running or waiting after scheduling, capped at max_num_seqs: what the
    speculation policy plans prefill steps for."""
    s = make_sched(max_num_seqs=3, max_num_batched_tokens=16)
    for i in range(5):
        s.add_request(req(f"r{i}", 12))
    so = run_step(s)  # r0 whole, r1 a 4-token chunk; 3 still wait
    assert so.num_scheduled_tokens == {"r0": 12, "r1": 4}
    assert so.num_active_requests == 3
    for _ in range(40):
        run_step(s)
    assert s.schedule().num_active_requests == 0
