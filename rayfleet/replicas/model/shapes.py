"""Real architecture shapes of popular checkpoints, for benchmarks with random weights
(``build_random_model(MODEL_SHAPES["llama-3-8b"], ...)``) without downloading anything."""

from __future__ import annotations

import torch

from rayfleet.replicas.model.arch import ModelArchConfig

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}

MODEL_SHAPES: dict[str, ModelArchConfig] = {
    "llama-3-8b": ModelArchConfig(
        architecture="LlamaForCausalLM", hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0,
        torch_dtype=torch.bfloat16, bos_token_id=128000, eos_token_ids=(128001,),
    ),
    "llama-3.2-1b": ModelArchConfig(
        architecture="LlamaForCausalLM", hidden_size=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, torch_dtype=torch.bfloat16,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3.2-3b": ModelArchConfig(
        architecture="LlamaForCausalLM", hidden_size=3072, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, intermediate_size=8192, vocab_size=128256,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, torch_dtype=torch.bfloat16,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3.1-70b": ModelArchConfig(
        architecture="LlamaForCausalLM", hidden_size=8192, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, torch_dtype=torch.bfloat16,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "qwen2.5-7b": ModelArchConfig(
        architecture="Qwen2ForCausalLM", hidden_size=3584, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064,
        rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1000000.0,
        qkv_bias=True, torch_dtype=torch.bfloat16, bos_token_id=151643,
        eos_token_ids=(151643,),
    ),
    "qwen3-8b": ModelArchConfig(
        architecture="Qwen3ForCausalLM", hidden_size=4096, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
        rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0,
        qk_norm=True, torch_dtype=torch.bfloat16, bos_token_id=151643,
        eos_token_ids=(151645,),
    ),
    # Mistral-7B v0.2/v0.3: no sliding window (v0.1 had 4096), 32768-token vocab (v0.3).
    "mistral-7b": ModelArchConfig(
        architecture="MistralForCausalLM", hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32768,
        rms_norm_eps=1e-5, max_position_embeddings=32768, rope_theta=1000000.0,
        torch_dtype=torch.bfloat16, bos_token_id=1, eos_token_ids=(2,),
    ),
}
