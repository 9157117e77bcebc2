"""On the GPU host: engine greedy output in fp32 on CUDA equals transformers fp32 on CUDA."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayfleet import LLM, SamplingParams
from tests.engine.test_engine_vs_transformers import hf_greedy
from tests.model_factory import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 57)), [3], list(range(100, 116))]


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("llama", {"num_kv_heads": 2}),
        ("mistral", {"sliding_window": 8}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 32}),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
def test_greedy_fp32_cuda_matches_transformers(tmp_path: Path, arch, kw, backend) -> None:
    model_dir = make_tiny_model(tmp_path / arch, arch, **kw)
    ref = hf_greedy(model_dir, PROMPTS, 10, device="cuda")
    llm = LLM(
        str(model_dir),
        dtype="float32",
        device="cuda",
        attention_backend=backend,
        gpu_memory_utilization=0.2,
    )
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref


def test_overlapped_scheduling_on_cuda_equals_synchronous(tmp_path: Path) -> None:
    """On CUDA (Triton backend, decode graphs) overlapped steps give the outputs of synchronous
    ones, for greedy, seeded sampling, stop strings, prefix hits and preemption."""
    from rayfleet.config import EngineConfig
    from rayfleet.replicas.llm_engine import Engine
    from tests.engine.test_overlap import _mixed_workload, _run

    model_dir = make_tiny_model(tmp_path / "m", "llama", num_kv_heads=2)

    def engine(overlap: bool, **kw) -> Engine:
        return Engine(
            EngineConfig.from_kwargs(
                str(model_dir),
                dtype="float32",
                device="cuda",
                attention_backend="triton",
                block_size=4,
                show_progress=False,
                overlap_scheduling=overlap,
                **{"num_blocks": 400, **kw},
            )
        )

    sync = engine(False)
    work = _mixed_workload(eos=min(sync.eos_token_ids) if sync.eos_token_ids else 0)
    work += [
        (list(range(5 + i, 25 + i)), SamplingParams(temperature=0, max_tokens=18, ignore_eos=True))
        for i in range(7)
    ]
    expected = _run(sync, work)
    over = engine(True)
    assert over.overlap and over.runner.graphs is not None
    assert _run(over, work) == expected
    small = [engine(o, num_blocks=25) for o in (False, True)]
    assert _run(small[1], work[-7:]) == _run(small[0], work[-7:])
    assert small[1].scheduler.num_preemptions_total > 0


def test_whole_proposal_graphs_keep_self_speculation_exact(tmp_path: Path) -> None:
    """On CUDA the draft's greedy proposals at batch <= 64 replay captured whole-proposal graphs;
    with the target as its own draft every draft is accepted (a K/V write to a wrong slot, or a
    stale static input, shows up as a rejection), and output equals plain greedy decoding."""
    from rayfleet.replicas.spec.adaptive import FixedSpecPolicy

    target = make_tiny_model(tmp_path / "t", "llama", num_kv_heads=2)
    kw = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.2, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = [o.token_ids for o in LLM(str(target), **kw).generate(PROMPTS, params)]
    llm = LLM(str(target), draft_model=str(target), num_speculative_tokens=5, **kw)
    graphs = llm.engine.runner.proposer.proposal_graphs
    assert graphs is not None and graphs.sizes[0] == 1 and graphs.sizes[-1] == 64
    assert len(graphs.graphs) == len(graphs.sizes) * 2 * 5  # q 1/2, k 1..5
    assert llm.engine.memory_report["draft_cuda_graph_bytes"] > 0
    runs = []
    # (weak: a cycle through the engine would keep its KV pool, tests/engine/test_spec_decode.py)
    run, run_chained = weakref.WeakMethod(graphs.run), weakref.WeakMethod(graphs.run_chained)
    graphs.run = lambda reqs, key: runs.append(key) or run()(reqs, key)
    graphs.run_chained = lambda reqs, key, *a: runs.append(key) or run_chained()(reqs, key, *a)
    # k varies per request (the shorter rows' forwards past their last draft write the null slot)
    llm.engine.runner.spec_policy = FixedSpecPolicy(
        5, {f"req-{i}": k for i, k in enumerate([5, 2, 4, 1])}
    )
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == ref
    assert all(o.spec.num_drafted > 0 and o.spec.acceptance_rate == 1.0 for o in outs)
    assert len(runs) > 5 and 5 in {k for _, _, k in runs}
    assert sum(q == 2 for _, q, _ in runs) > 5  # (chained proposals: q = 2)


def test_chained_proposals_on_cuda_draft_what_proposing_after_the_result_does(
    tmp_path: Path,
) -> None:
    """Chained proposals (the runner's section comment) take each request's accepted count on
    the device: with a draft that agrees only sometimes (the target's first layer), output
    equals plain greedy decoding with chaining on and off, and wherever a request reaches the
    same verified tokens in both runs it verifies the same drafts."""
    from rayfleet.replicas.spec.adaptive import FixedSpecPolicy

    target = make_tiny_model(tmp_path / "t", "llama", num_kv_heads=2)
    shutil.copytree(target, tmp_path / "p")  # (its tokenizer; the weights are replaced)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    hf.config.num_hidden_layers = 1
    partial = type(hf)(hf.config)
    partial.load_state_dict({k: v for k, v in hf.state_dict().items() if ".layers.1." not in k})
    partial.save_pretrained(str(tmp_path / "p"))
    kw = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.2, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = [o.token_ids for o in LLM(str(target), **kw).generate(PROMPTS, params)]
    llm = LLM(str(target), draft_model=str(tmp_path / "p"), num_speculative_tokens=4, **kw)
    runner = llm.engine.runner
    chained = []
    graphs = runner.proposer.proposal_graphs
    # (weak references: a cycle through the engine would keep its KV pool)
    run_chained = weakref.WeakMethod(graphs.run_chained)
    graphs.run_chained = lambda reqs, key, *a: chained.append(key) or run_chained()(reqs, key, *a)
    sample = weakref.WeakMethod(runner._sample)
    verified: list[dict] = []

    def recording(logits, rids, num_spec, out, *args):
        requests = sample().__self__.requests
        for rid, k in zip(rids, num_spec):
            st = requests[rid]
            if k:
                # (keyed by the tokens alone: the second run's requests get new ids)
                verified[-1][tuple(st.token_ids)] = list(st.spec_token_ids[:k])
        return sample()(logits, rids, num_spec, out, *args)

    runner._sample = recording
    for chain in (False, True):
        verified.append({})
        runner.chain_proposals = chain
        runner.spec_policy = FixedSpecPolicy(4)
        outs = llm.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == ref
        assert bool(chained) == chain
    assert 0 < sum(o.spec.num_accepted for o in outs) < sum(o.spec.num_drafted for o in outs)
    # wherever a request reaches the same verified tokens, it verifies the same drafts (a
    # chained plan may carry fewer near the end: it plans for every draft accepted)
    common = verified[0].keys() & verified[1].keys()
    assert len(common) >= 8
    for key in common:
        n = min(len(verified[0][key]), len(verified[1][key]))
        assert verified[1][key][:n] == verified[0][key][:n], len(key)
