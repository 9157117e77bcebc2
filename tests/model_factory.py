"""Tiny random transformers checkpoints (Llama, Mistral, Qwen2, Qwen3) saved as HF directories.

Weights are scaled up (initializer_range 0.2) and norm weights / biases are randomized, so logits
are far from flat and a mis-loaded norm or bias changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.tokenizer_factory import make_bytelevel_tokenizer, make_metaspace_tokenizer

_FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    num_kv_heads: int = 2,
    num_heads: int = 4,
    hidden: int = 64,
    layers: int = 2,
    rope_scaling: dict[str, Any] | None = None,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    sharded: bool = False,
    tokenizer: str = "bytelevel",
    seed: int = 0,
    max_position_embeddings: int = 256,
    sliding_window: int | None = None,
    head_dim: int | None = None,
    attention_bias: bool = False,
    intermediate: int | None = None,
) -> Path:
    """Save a random ``arch`` model with its tokenizer to ``out_dir`` and return the directory.

    For qwen2/qwen3, ``sliding_window`` turns on use_sliding_window from layer 1 on
    (max_window_layers=1), so layer 0 stays full attention.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bytelevel":
        tok = make_bytelevel_tokenizer(out)
    elif tokenizer == "metaspace":
        tok = make_metaspace_tokenizer(out)
    else:
        raise ValueError(f"unknown tokenizer style {tokenizer!r}")

    config_cls, model_cls = _FAMILIES[arch]
    rope: dict[str, Any] = {
        "rope_type": "default",
        **(rope_scaling or {}),
        "rope_theta": rope_theta,
    }
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Explicit, since some config classes default to 128 whatever hidden_size is.
    kwargs["head_dim"] = head_dim or hidden // num_heads
    if arch in ("llama", "qwen3"):
        kwargs["attention_bias"] = attention_bias
    if arch == "mistral":
        kwargs["sliding_window"] = sliding_window
    elif arch in ("qwen2", "qwen3") and sliding_window is not None:
        kwargs.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]

    torch.manual_seed(seed)
    model: PreTrainedModel = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(str(out), max_shard_size="40KB" if sharded else "10GB")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
