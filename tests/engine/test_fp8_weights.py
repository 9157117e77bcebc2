"""FP8 weights (``quantization="fp8"``): the engine equals transformers running the
dequantized checkpoint, token for token (fp32, CPU); a quantized draft keeps greedy speculation
equal to the target alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayfleet import LLM, SamplingParams
from rayfleet.replicas.quant.fp8 import Fp8LMHead, Fp8QKVParallelLinear, quantize_weight
from rayfleet.replicas.spec.adaptive import FixedSpecPolicy
from tests.engine.test_engine_vs_transformers import PROMPTS, hf_greedy
from tests.model_factory import make_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def dequantized_copy(src: Path, dst: Path) -> Path:
    """``src`` with every linear weight of the decoder layers (and an untied LM head) replaced
    by q * scale, the weight the FP8 model computes with. Quantizing q_proj, k_proj and v_proj
    apart equals quantizing their fused rows: the scales are per output row."""
    shutil.copytree(src, dst)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    linears = [m for m in hf.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    if not hf.config.tie_word_embeddings:
        linears.append(hf.lm_head)
    with torch.no_grad():
        for m in linears:
            q, scale = quantize_weight(m.weight)
            m.weight.copy_(q.float() * scale[:, None])
    hf.save_pretrained(dst)
    return dst


def test_quantized_weight_is_within_fp8_rounding() -> None:
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,) and scale[3] == 1.0
    deq = q.float() * scale[:, None]
    # e4m3: 3 mantissa bits (half an ulp = 2^-4 relative); below 2^-6 the grid is 2^-9 apart
    bound = 2.0**-4 * w.abs() + 2.0**-10 * scale[:, None]
    assert bool(((deq - w).abs() <= bound).all())
    # each row's largest weight maps to the top of the FP8 range
    assert bool((q.float().abs().amax(dim=1)[scale != 1.0] == 448.0).all())


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-tied-bias"])
def test_greedy_matches_transformers_on_the_dequantized_checkpoint(
    tmp_path: Path, variant: str
) -> None:
    if variant == "llama-gqa":
        src = make_tiny_model(tmp_path / "m", "llama", num_kv_heads=2)
    else:  # qwen2: q/k/v biases; a head tied to the embedding keeps the model dtype
        src = make_tiny_model(tmp_path / "m", "qwen2", tie_word_embeddings=True)
    ref = hf_greedy(dequantized_copy(src, tmp_path / "deq"), PROMPTS, GREEDY.max_tokens)
    llm = LLM(str(src), dtype="float32", quantization="fp8")
    model = llm.engine.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is Fp8QKVParallelLinear and qkv.weight.dtype == torch.float8_e4m3fn
    assert (type(model.lm_head) is Fp8LMHead) == (variant == "llama-gqa")
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == ref
    # ...and the quantization changed something: the 16-bit model's output differs.
    plain = LLM(str(src), dtype="float32").generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in plain] != ref


@pytest.mark.parametrize("k", [2, 4])
def test_fp8_draft_keeps_greedy_speculation_exact(tmp_path: Path, k: int) -> None:
    target = make_tiny_model(tmp_path / "t", "llama", num_kv_heads=2)
    ref = [
        o.token_ids
        for o in LLM(str(target), dtype="float32", block_size=4).generate(PROMPTS, GREEDY)
    ]
    llm = LLM(
        str(target),
        dtype="float32",
        block_size=4,
        draft_model=str(target),
        num_speculative_tokens=k,
        draft_quantization="fp8",
    )
    llm.engine.runner.spec_policy = FixedSpecPolicy(k)
    draft = llm.engine.draft_model
    assert draft.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert llm.engine.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == ref
    # The draft is the target rounded to FP8: both accepting and rejecting paths ran.
    rate = sum(o.spec.num_accepted for o in outs) / sum(o.spec.num_drafted for o in outs)
    assert 0.2 < rate < 1.0


def test_bad_quantization_is_named(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        LLM(str(src), dtype="float32", quantization="int3")
    with pytest.raises(ValueError, match="draft_quantization needs a draft model"):
        LLM(str(src), dtype="float32", draft_quantization="fp8")


def test_fp8_tensor_cores_only_for_bf16_layers_they_can_take(tmp_path: Path, monkeypatch) -> None:
    """Where FP8 tensor cores exist, a bf16 model's layers use them for the rows the GEMV does
    not take, except a layer whose K or N is not a multiple of 16 (cuBLAS FP8's constraint),
    which keeps the reference; fp16 and fp32 models keep the reference everywhere."""
    from rayfleet.kernels import fp8_linear
    from rayfleet.replicas.model.loader import load_model
    from rayfleet.replicas.quant.fp8 import quantize_model

    monkeypatch.setattr(fp8_linear, "supported", lambda device: True)
    src = make_tiny_model(tmp_path / "m", "llama", hidden=64, intermediate=40)
    backends = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        model = load_model(src, dtype=dtype, device="cpu", show_progress=False)
        assert quantize_model(model, "fp8").backend == (
            "scaled_mm" if dtype == torch.bfloat16 else "torch"
        )
        mlp = model.model.layers[0].mlp
        backends[dtype] = (mlp.gate_up_proj.fp8_backend, mlp.down_proj.fp8_backend)
    assert backends[torch.bfloat16] == ("scaled_mm", "torch")  # down: K = 40
    assert backends[torch.float16] == backends[torch.float32] == ("torch", "torch")
