"""The `transformers` side of `rayfleet bench offline --compare-hf`: same shapes, same workload."""

from __future__ import annotations

import time
from typing import Any

import torch


def hf_config_for(arch):
    """A transformers LlamaConfig with the shapes of a rayfleet ModelArchConfig."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _build(arch, device: str, seed: int, model_dir: str | None):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model_dir:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config_for(arch)).to(dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_hf(
    arch, prompts: list[list[int]], output_len: int, device: str, seed: int, model_dir: str | None
) -> dict[str, Any]:
    from transformers import GenerationConfig

    # No inference_mode here: generate_batch works on a background thread outside it and must
    # be able to update tensors created during set-up.
    with torch.no_grad():
        model = _build(arch, device, seed, model_dir)
    if len(prompts) == 1:
        ids = torch.tensor(prompts, device=device)
        kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync(device)
        wall = time.perf_counter() - t0
        n = out.shape[1] - ids.shape[1]
        return {"method": "generate", "wall_s": wall, "output_tokens": n, "output_tok_s": n / wall}
    gen = GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    model.generate_batch(inputs=prompts[:2], generation_config=gen, progress_bar=False)
    _sync(device)
    t0 = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    _sync(device)
    wall = time.perf_counter() - t0
    n = sum(len(o.generated_tokens) for o in outs.values())
    n_in = sum(len(p) for p in prompts)
    return {
        "method": "generate_batch",
        "wall_s": wall,
        "output_tokens": n,
        "output_tok_s": n / wall,
        "total_tok_s": (n + n_in) / wall,
        "num_outputs": len(outs),
    }
