"""Engine / AsyncEngine / LLM / CLI behaviour a user depends on (tiny random model, CPU)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayfleet import LLM, SamplingParams
from rayfleet.config import EngineConfig
from rayfleet.replicas.llm_engine import AsyncEngine, Engine, EngineDeadError
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("api"), "llama", num_kv_heads=2)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", block_size=4)


def test_request_output_fields(llm: LLM) -> None:
    out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.prompt == "def fibonacci(n):"
    assert out.prompt_token_ids == llm.tokenizer.encode("def fibonacci(n):")
    assert out.finished and out.finish_reason in ("stop", "length")
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.request_id


def test_seeded_sampling_repeats_and_differs_by_seed(llm: LLM) -> None:
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]

    def run(seed):
        p = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=12, ignore_eos=True)
        return [o.token_ids for o in llm.generate(prompts, p)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    # The same seeded request alone and inside a batch gives the same tokens.
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    solo = llm.generate([prompts[1]], p)[0].token_ids
    mixed = llm.generate([prompts[0], prompts[1], [1, 2]], p)[1].token_ids
    assert solo == mixed


def test_stop_string_truncates_text_and_stop_token_ids(llm: LLM) -> None:
    base = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    text = base[0].text
    ids = base[0].token_ids
    # Stop on the text of the 4th token: generation ends there and the stop string is cut.
    stop_tok = ids[3]
    out = llm.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_tok]),
    )[0]
    assert out.token_ids == ids[: ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    if needle.strip() and "\ufffd" not in needle:
        out = llm.generate(
            [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=needle)
        )[0]
        assert out.finish_reason == "stop" and out.stop_reason == needle
        assert out.text == text[: text.index(needle)]


def test_eos_and_min_tokens(llm: LLM) -> None:
    (eos,) = llm.engine.eos_token_ids
    # Find a prompt whose greedy continuation emits EOS, then check min_tokens holds it back.
    free = SamplingParams(temperature=0, max_tokens=30)
    for start in range(1, 200):
        out = llm.generate([[start, start + 1]], free)[0]
        if out.finish_reason == "stop":
            break
    else:
        pytest.skip("no prompt of this random model reaches EOS")
    assert out.token_ids[-1] == eos and out.stop_reason == eos
    n = len(out.token_ids)
    held = llm.generate(
        [[start, start + 1]], SamplingParams(temperature=0, max_tokens=30, min_tokens=n + 2)
    )[0]
    assert eos not in held.token_ids[: n + 2] and len(held.token_ids) >= n + 2


def test_logprobs_top_n(llm: LLM) -> None:
    out = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.rank == 1  # greedy picks the top token
        assert len(lp.top) == 3 and lp.top[0][0] == tok
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


@pytest.mark.parametrize(
    "params, prompt, match",
    [
        (dict(max_tokens=300), [1, 2, 3], r"prompt has 3 tokens and max_tokens is 300.*256"),
        (dict(), [], "at least one token"),
        (dict(), [1, 10**6], r"prompt_token_ids must be in \[0, \d+\); got 1000000"),
        (dict(stop_token_ids=[10**6]), [1], "stop_token_ids must be in"),
    ],
)
def test_invalid_requests_rejected_before_scheduling(llm: LLM, params, prompt, match) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], SamplingParams(**params))
    assert not llm.engine.has_unfinished()


def test_abort_mid_generation_returns_pool_to_full(model_dir: Path) -> None:
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))
    pool = engine.scheduler.pool
    full = pool.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    a = engine.add_request(list(range(1, 40)), params)
    b = engine.add_request(list(range(3, 30)), params)
    for _ in range(3):
        engine.step()
    assert pool.num_free_blocks < full
    out = engine.abort(a)
    assert out.finished and out.finish_reason == "abort" and len(out.token_ids) == 3
    engine.abort(b)
    assert pool.num_free_blocks == full
    engine.scheduler.check_integrity()
    assert not engine.has_unfinished()
    assert engine.step() == []


def test_async_engine_streams_and_cancellation_frees_blocks(model_dir: Path) -> None:
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))
    aeng = AsyncEngine(engine)
    pool = engine.scheduler.pool
    full = pool.num_free_blocks

    async def main():
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        chunks = [o async for o in aeng.generate([5, 6, 7], params)]
        # One chunk per step, or fewer when outputs queued up and were merged.
        assert 1 <= len(chunks) <= 8 and all(c.new_token_ids for c in chunks)
        assert chunks[-1].finished and chunks[-1].token_ids == sum(
            (c.new_token_ids for c in chunks), []
        )
        text = "".join(c.new_text for c in chunks)
        assert text == chunks[-1].text

        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        gen = aeng.generate(list(range(1, 30)), long)
        async for out in gen:
            if len(out.token_ids) >= 3:
                break
        await gen.aclose()  # client went away
        for _ in range(100):
            if pool.num_free_blocks == full:
                break
            await asyncio.sleep(0.02)
        assert pool.num_free_blocks == full

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_async_engine_fault_fails_requests(model_dir: Path) -> None:
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))

    def boom(_):
        raise RuntimeError("device lost")

    engine.runner.execute = boom
    engine.runner.launch = boom  # the overlapped path (default on CUDA)
    aeng = AsyncEngine(engine)

    async def main():
        with pytest.raises(RuntimeError, match="device lost"):
            async for _ in aeng.generate([1, 2, 3], SamplingParams(max_tokens=4)):
                pass

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=10))
    finally:
        aeng.shutdown()


def test_cli_generate_json(model_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "rayfleet.cli",
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "def f(x):",
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--json",
        "--ignore-eos",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert len(lines) == 2
    assert lines[1]["num_prompt_tokens"] == 3 and len(lines[1]["token_ids"]) == 4
    for rec in lines:
        assert set(rec) >= {
            "text",
            "token_ids",
            "finish_reason",
            "num_prompt_tokens",
            "num_cached_tokens",
        }
    bad = subprocess.run(cmd + ["--top-p", "1.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "top_p" in bad.stderr


def test_slow_consumer_gets_merged_outputs(model_dir: Path) -> None:
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))
    aeng = AsyncEngine(engine)

    async def main():
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        chunks = []
        async for o in aeng.generate([5, 6, 7], params):
            chunks.append(o)
            await asyncio.sleep(0.3)  # the engine runs ahead while we are away
        assert len(chunks) < 12
        assert sum((c.new_token_ids for c in chunks), []) == chunks[-1].token_ids
        assert "".join(c.new_text for c in chunks) == chunks[-1].text
        assert len(chunks[-1].token_ids) == 12

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_paced_stream_merges_steps_but_not_the_first_token(model_dir: Path) -> None:
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))
    step = engine.step

    def slow_step():  # a known step time, so the pacing interval spans several steps
        time.sleep(0.01)
        return step()

    engine.step = slow_step
    # One stream at 5 messages/s: after the first output, at most one output per 0.2 s.
    aeng = AsyncEngine(engine, max_stream_messages_per_s=5.0)

    async def main():
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        t0 = time.monotonic()
        chunks, times = [], []
        async for o in aeng.generate([5, 6, 7], params):
            chunks.append(o)
            times.append(time.monotonic() - t0)
        assert times[0] < 0.15  # the first token is never held back
        assert len(chunks[0].new_token_ids) == 1
        assert 2 <= len(chunks) <= 5  # ~0.4 s of steps in 0.2 s messages, final one at once
        assert sum((c.new_token_ids for c in chunks), []) == chunks[-1].token_ids
        assert "".join(c.new_text for c in chunks) == chunks[-1].text
        assert chunks[-1].finished and len(chunks[-1].token_ids) == 40
        gaps = [b - a for a, b in zip(times, times[1:-1])]
        assert all(g > 0.15 for g in gaps)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=30))
    finally:
        aeng.shutdown()


def test_admission_never_waits_for_a_step_and_rejections_raise(model_dir: Path) -> None:
    """A step holds the engine lock; adding or aborting a request meanwhile must not block the
    caller's event loop (other streams are served from it). Bad requests still raise
    ValueError from generate() before any output."""
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))
    step = engine.step

    def slow_step():
        time.sleep(0.3)
        return step()

    engine.step = slow_step
    aeng = AsyncEngine(engine)

    async def main():
        long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        first = aeng.generate(list(range(1, 20)), long, request_id="a")
        await first.__anext__()  # the engine is now stepping, 0.3 s per step
        gaps: list[float] = []

        async def ticker():
            last = time.monotonic()
            for _ in range(40):
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        with pytest.raises(ValueError, match="already in use"):
            async for _ in aeng.generate([1, 2, 3], SamplingParams(max_tokens=2), request_id="a"):
                pass
        with pytest.raises(ValueError, match="at least one token"):
            async for _ in aeng.generate([], SamplingParams(max_tokens=2)):
                pass
        second = aeng.generate([4, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
        out = await second.__anext__()
        assert out.new_token_ids
        await second.aclose()
        await first.aclose()
        await tick
        assert max(gaps) < 0.15, gaps
        for _ in range(100):
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        assert not engine.has_unfinished()

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=30))
    finally:
        aeng.shutdown()


def test_consumer_loop_closed_mid_stream_does_not_kill_the_engine(model_dir: Path) -> None:
    """A caller whose event loop is gone (its asyncio.run() ended while its request still ran)
    must not take the engine thread down with it: later requests are served."""
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))
    aeng = AsyncEngine(engine)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def leave_early():
        gen = aeng.generate(list(range(1, 20)), long)
        await gen.__anext__()  # one output, then the loop closes with the request running

    async def later():
        outs = [o async for o in aeng.generate([5, 6, 7], SamplingParams(max_tokens=3))]
        return outs[-1]

    try:
        asyncio.run(leave_early())
        last = asyncio.run(asyncio.wait_for(later(), timeout=30))
        assert last.finished and aeng.failure is None
        for _ in range(100):  # the orphaned request is aborted and its blocks freed
            if not engine.has_unfinished():
                break
            time.sleep(0.05)
        assert not engine.has_unfinished()
    finally:
        aeng.shutdown()


def test_shutdown_fails_waiting_streams_and_new_requests(model_dir: Path) -> None:
    engine = Engine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", show_progress=False))
    aeng = AsyncEngine(engine)

    async def main():
        gen = aeng.generate(list(range(1, 20)), SamplingParams(max_tokens=200, ignore_eos=True))
        await gen.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in aeng.generate([1, 2], SamplingParams(max_tokens=2)):
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_stop_string_on_the_last_allowed_token_reports_stop(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for start in range(1, 60):
        base = llm.generate([[start, start + 1]], greedy)[0]
        before = llm.tokenizer.decode(base.token_ids[:5])
        last = base.text[len(before) :]
        if (
            base.text.startswith(before)
            and last.strip()
            and "\ufffd" not in last
            and last not in before
        ):
            break
    else:
        pytest.skip("no continuation with a clean last token")
    out = llm.generate(
        [[start, start + 1]],
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[last]),
    )[0]
    assert out.token_ids == base.token_ids
    assert out.finish_reason == "stop" and out.stop_reason == last
    assert out.text == before
