"""On the GPU host: FP8 weights through FP8 tensor cores, and the engine with FP8 target / draft
weights on CUDA (Triton GEMV for decode)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayfleet import LLM, SamplingParams, kernels
from rayfleet.kernels import fp8_linear, ops_ref
from rayfleet.replicas.quant.fp8 import quantize_weight
from rayfleet.replicas.spec.adaptive import FixedSpecPolicy
from tests.engine.test_engine_vs_transformers import PROMPTS, hf_greedy
from tests.engine.test_fp8_weights import dequantized_copy
from tests.model_factory import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.skipif(
    torch.cuda.is_available() and not fp8_linear.supported(torch.device("cuda")),
    reason="FP8 tensor cores need sm89+",
)
@pytest.mark.parametrize("m", [3, 37, 256])
@pytest.mark.parametrize("n,k", [(6144, 4096), (2048, 8192)])
def test_scaled_mm_matches_reference_within_input_rounding(m: int, n: int, k: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    q, scale = quantize_weight(w * torch.rand(n, 1, device="cuda", generator=gen))
    b = torch.randn(n, device="cuda", generator=gen).bfloat16()
    y = kernels.get("fp8_linear", "scaled_mm")(x, q, scale, b)
    ref = ops_ref.fp8_linear(x, q, scale, b)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    # the input's FP8 rounding: about 2^-4 relative per element, averaging over K
    rel = (y.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 0.04, rel


def test_fp32_fp8_engine_on_cuda_matches_transformers_dequantized(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "m", "llama", num_kv_heads=2)
    ref = hf_greedy(dequantized_copy(src, tmp_path / "deq"), PROMPTS, 12, device="cuda")
    llm = LLM(
        str(src), dtype="float32", device="cuda", quantization="fp8", gpu_memory_utilization=0.2
    )
    assert llm.engine.model.model.layers[0].gemv_max_tokens == 2  # decode reads the FP8 bytes
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref


def test_fp8_draft_on_cuda_keeps_greedy_speculation_exact(tmp_path: Path) -> None:
    target = make_tiny_model(tmp_path / "t", "llama", num_kv_heads=2)
    kw = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.2, block_size=16)
    ref = [o.token_ids for o in LLM(str(target), **kw).generate(PROMPTS, GREEDY)]
    llm = LLM(
        str(target),
        draft_model=str(target),
        num_speculative_tokens=4,
        draft_quantization="fp8",
        **kw,
    )
    llm.engine.runner.spec_policy = FixedSpecPolicy(4)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert sum(o.spec.num_accepted for o in outs) > 0
