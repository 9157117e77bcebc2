"""Qwen3 (dense): the Llama decoder plus a per-head RMSNorm on q and k before RoPE
(``arch.qk_norm``), and an explicit head_dim that need not equal hidden_size / num_heads."""

from __future__ import annotations

from rayfleet.replicas.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
