"""Overlapped scheduling (step N+1 scheduled and launched before step N's tokens reach the host)
changes when outputs arrive, never what they are: the same requests give the same tokens, text,
finish reasons and cached-token counts as synchronous steps, and the KV pool ends full."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayfleet import SamplingParams
from rayfleet.config import EngineConfig
from rayfleet.replicas.llm_engine import Engine
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("overlap"), "llama", num_kv_heads=2)


def _engine(model_dir: Path, overlap: bool, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    return Engine(
        EngineConfig.from_kwargs(
            str(model_dir), dtype="float32", show_progress=False, overlap_scheduling=overlap, **kw
        )
    )


def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> dict:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, request_id=f"r{i}")
    final = engine.run_to_completion()
    engine.scheduler.check_integrity()
    assert engine.scheduler.pool.num_free_blocks == engine.scheduler.pool.num_usable_blocks
    return {
        rid: (o.token_ids, o.text, o.finish_reason, o.stop_reason, o.num_cached_tokens)
        for rid, o in final.items()
    }


def _mixed_workload(eos: int) -> list[tuple[list[int], SamplingParams]]:
    shared = list(range(10, 30))  # a prefix several requests share (prefix-cache hits)
    return [
        (shared + [3, 4], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
        (shared + [5], SamplingParams(temperature=0.9, seed=7, max_tokens=9, ignore_eos=True)),
        (list(range(40, 47)), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)),
        (shared, SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=15, min_tokens=4)),
        ([1, 2, 3], SamplingParams(temperature=0, max_tokens=20, stop=["a", "e"])),
        (shared + [6, 7], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[eos])),
        (list(range(60, 90)), SamplingParams(temperature=1.0, seed=11, max_tokens=14, top_p=0.9)),
    ]


def test_overlap_equals_synchronous_steps(model_dir: Path) -> None:
    sync = _engine(model_dir, overlap=False)
    work = _mixed_workload(eos=min(sync.eos_token_ids) if sync.eos_token_ids else 0)
    expected = _run(sync, work)
    over = _engine(model_dir, overlap=True)
    assert over.overlap
    assert _run(over, work) == expected


def test_overlap_through_graph_inputs_equals_synchronous_steps(model_dir: Path) -> None:
    """Decode steps that replay a graph are staged into its static inputs by one kernel, which
    takes the ids still on the device from the previous step (graphs emulated eagerly on CPU)."""
    sync = _engine(model_dir, overlap=False)
    work = _mixed_workload(eos=min(sync.eos_token_ids) if sync.eos_token_ids else 0)
    expected = _run(sync, work)
    over = _engine(model_dir, overlap=True)
    max_len = over.max_model_len
    over.runner.enable_cuda_graphs([1, 2, 4, 8], -(-max_len // 4) + 1, max_len, emulate=True)
    graphs = over.runner.graphs
    assert graphs is not None
    stage, filled = graphs.stage, []

    def counted(src, q, fill=None, prev=None):
        filled.append(fill is not None and bool((fill >= 0).any()))
        return stage(src, q, fill, prev)

    graphs.stage = counted  # type: ignore[method-assign]
    assert _run(over, work) == expected
    assert sum(filled) >= 10  # graph steps whose ids came from the step before, on the device


def test_overlap_with_preemption_equals_synchronous_steps(model_dir: Path) -> None:
    # 24 usable blocks of 4 tokens: seven requests growing to ~40 tokens must preempt.
    work = [
        (list(range(5 + i, 25 + i)), SamplingParams(temperature=0, max_tokens=18, ignore_eos=True))
        for i in range(7)
    ]
    sync = _engine(model_dir, overlap=False, num_blocks=25)
    expected = _run(sync, work)
    assert sync.scheduler.num_preemptions_total > 0
    over = _engine(model_dir, overlap=True, num_blocks=25)
    assert _run(over, work) == expected
    assert over.scheduler.num_preemptions_total > 0


def test_logprob_requests_switch_to_synchronous_steps(model_dir: Path) -> None:
    """Penalties and logprobs read a request's generated ids on the host: while such a request
    runs, steps are synchronous; outputs still equal the all-synchronous run."""
    work = [
        ([4, 5, 6], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)),
        ([7, 8], SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)),
        ([9, 10, 11], SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3)),
    ]
    expected = _run(_engine(model_dir, overlap=False), work)
    over = _engine(model_dir, overlap=True)
    assert _run(over, work) == expected
    assert not over._history_readers


def test_request_id_reused_while_a_step_is_in_flight(model_dir: Path) -> None:
    """A request stopped by a token leaves one step in flight that computed a token for it;
    a new request taking its id at once must not receive that token."""
    ref = _engine(model_dir, overlap=False)
    probe = ref.add_request(
        [3, 1, 4, 1, 5], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    tokens = ref.run_to_completion()[probe].token_ids
    stop_at = tokens[2]
    first = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True)
    second_prompt = [9, 2, 6, 5, 3, 5]
    second = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref.add_request(second_prompt, second, request_id="again")
    expected_second = ref.run_to_completion()["again"].token_ids

    eng = _engine(model_dir, overlap=True)
    eng.add_request([3, 1, 4, 1, 5], first, request_id="x")
    done = None
    while done is None:
        done = next((o for o in eng.step() if o.request_id == "x" and o.finished), None)
    assert done.token_ids == tokens[: tokens.index(stop_at) + 1]
    assert eng._inflight is not None  # the step that computed one token too many for "x"
    eng.add_request(second_prompt, second, request_id="x")
    assert eng.run_to_completion()["x"].token_ids == expected_second
    assert eng.scheduler.pool.num_free_blocks == eng.scheduler.pool.num_usable_blocks


def test_abort_during_overlap_frees_blocks_at_once(model_dir: Path) -> None:
    eng = _engine(model_dir, overlap=True)
    pool = eng.scheduler.pool
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a = eng.add_request(list(range(1, 30)), params)
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    out = eng.abort(a)
    assert out is not None and out.finish_reason == "abort"
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert not eng.has_unfinished()
    assert eng.step() == []
    eng.scheduler.check_integrity()


def test_overlap_accepts_a_draft_model(model_dir: Path) -> None:
    eng = _engine(model_dir, overlap=True, draft_model=str(model_dir), num_speculative_tokens=2)
    assert eng.overlap and eng.runner.proposer is not None


def test_overlapped_decode_steps_compute_one_token_per_request(model_dir: Path) -> None:
    """With a step in flight, the next step computes each decoding request's pending token and
    nothing else (no recomputation): decode steps stay single-token, as CUDA graphs need."""
    eng = _engine(model_dir, overlap=True)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for prompt in ([1, 2, 3, 4, 5], list(range(10, 31)), [7, 8]):
        eng.add_request(prompt, params)
    seen = []
    real_launch = eng.runner.launch

    def launch(sched):
        seen.append(dict(sched.num_scheduled_tokens))
        return real_launch(sched)

    eng.runner.launch = launch
    eng.run_to_completion()
    decode_steps = [s for s in seen[1:] if s]  # the first step prefills all three prompts
    assert decode_steps and all(set(s.values()) == {1} for s in decode_steps)
    assert sum(sum(s.values()) for s in decode_steps) == 3 * 11  # tokens 2..12 of each
