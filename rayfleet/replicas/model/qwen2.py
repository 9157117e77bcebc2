"""Qwen2 / Qwen2.5: the Llama decoder with biases on q/k/v (``arch.qkv_bias``), usually tied
embeddings, and a sliding window only on layers >= max_window_layers when use_sliding_window."""

from __future__ import annotations

from rayfleet.replicas.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
