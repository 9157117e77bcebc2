"""The engine end to end on the Triton backends (attention, KV write, RMSNorm, SiLU-mul, small-M
GEMV) equals transformers greedy, token for token. On CPU this runs under Triton's interpreter."""

from __future__ import annotations

from pathlib import Path

from rayfleet import LLM, SamplingParams
from rayfleet.replicas.model.layers import RMSNorm, SiluAndMul
from rayfleet.replicas.model.llama import DecoderLayer
from tests.engine.test_engine_vs_transformers import hf_greedy
from tests.model_factory import make_tiny_model


def test_engine_on_triton_matches_transformers(tmp_path: Path, device: str) -> None:
    model_dir = make_tiny_model(tmp_path / "m", "qwen2", num_kv_heads=2, head_dim=16)
    prompts = [[5, 6, 7, 8, 9], list(range(20, 41))]
    ref = hf_greedy(model_dir, prompts, 4, device)
    llm = LLM(
        str(model_dir),
        dtype="float32",
        device=device,
        attention_backend="triton",
        block_size=8,
        gpu_memory_utilization=0.2,
    )
    assert llm.engine.attention_backend == "triton"
    swapped = [m for m in llm.engine.model.modules() if isinstance(m, (RMSNorm, SiluAndMul))]
    assert swapped and all(m.kernel_backend == "triton" for m in swapped)
    # single-token decode steps run each layer as four GEMVs with the norms / SiLU fused in
    layers = [m for m in llm.engine.model.modules() if isinstance(m, DecoderLayer)]
    assert layers and all(m.gemv_max_tokens == 1 for m in layers)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == ref
    # one request alone: its decode steps take the GEMV path
    assert [o.token_ids for o in llm.generate(prompts[1:], params)] == ref[1:]
