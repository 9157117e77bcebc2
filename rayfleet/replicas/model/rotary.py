"""Rotary position embeddings with the numerics of transformers' Llama-family rotary module.

Inverse frequencies and the attention scaling factor come from
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (linear, dynamic, llama3, yarn) or the
plain formula (default). As in transformers: ``freqs = position.float() * inv_freq`` in float32,
``emb = cat(freqs, freqs)``, ``cos = emb.cos() * attention_scaling`` (likewise sin), then a cast to
the model dtype; q/k are rotated in the model dtype with the rotate-half convention.

``dynamic`` (NTK) semantics. transformers recomputes inv_freq from the current sequence length
``max(position_ids) + 1`` whenever it exceeds ``max_position_embeddings``. Here the sequence length
is taken per request: the request's context length after this step (``meta.seq_lens``). So every
new token of a request whose context exceeds the original length is rotated with
``inv_freq(seq_len=context_len)``; requests within the original length use the precomputed table.
This equals transformers for (a) a prompt prefilled in one forward on a fresh model, and (b) each
later step with a KV cache (chunked prefill or decode), whose cached keys keep the rotation they
were written with. Not reproduced: transformers' per-batch maximum (one length for a whole padded
batch) and its stateful "keep the largest length seen until a short sequence resets it".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rayfleet.kernels.attention_ref import AttentionMetadata


def _hf_rope_config(
    head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None, max_positions: int
) -> Any:
    """A minimal transformers config carrying exactly what ROPE_INIT_FUNCTIONS read."""
    from transformers import LlamaConfig

    params: dict[str, Any] = dict(rope_scaling or {"rope_type": "default"})
    params["rope_theta"] = rope_theta
    return LlamaConfig(
        hidden_size=head_dim,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_parameters=params,
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


class RotaryEmbedding(nn.Module):
    """A cos/sin table for positions [0, max_positions), indexed by each token's position.

    ``max_position_embeddings`` is the checkpoint's (the reference length of ``dynamic``);
    ``max_positions`` is how many positions to tabulate (the serving max_model_len).
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        rope_scaling: dict[str, Any] | None,
        max_position_embeddings: int,
        *,
        max_positions: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_type = (rope_scaling or {}).get("rope_type", "default")
        self.max_position_embeddings = max_position_embeddings
        self.dtype = dtype
        self._hf_config = _hf_rope_config(
            head_dim, rope_theta, rope_scaling, max_position_embeddings
        )
        if self.rope_type == "default":
            # Computed on the CPU, as transformers does at model init.
            arange = torch.arange(0, head_dim, 2, dtype=torch.float)
            inv_freq = 1.0 / (rope_theta ** (arange / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self._hf_config, None)
        self.attention_scaling = float(scaling)
        device = torch.device(device) if device is not None else torch.get_default_device()
        n = max_positions or max_position_embeddings
        positions = torch.arange(n, device=device)
        cos, sin = self._cos_sin(positions, inv_freq.to(device))
        self.cos_cache: torch.Tensor
        self.sin_cache: torch.Tensor
        self.register_buffer("cos_cache", cos, persistent=False)  # [max_positions, head_dim]
        self.register_buffer("sin_cache", sin, persistent=False)

    def _cos_sin(
        self, positions: torch.Tensor, inv_freq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * inv_freq.float()[None, :]  # [n, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, head_dim]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(self.dtype), sin.to(self.dtype)

    def forward(
        self, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin: [num_tokens, head_dim] in the model dtype
        if self.rope_type != "dynamic":
            cos = self.cos_cache.index_select(0, positions)
            sin = self.sin_cache.index_select(0, positions)
            return cos, sin
        # Positions past the table belong to requests longer than max_position_embeddings, whose
        # rows are recomputed below; clamping only keeps the lookup in range.
        table_pos = positions.clamp(max=self.cos_cache.shape[0] - 1)
        cos = self.cos_cache.index_select(0, table_pos)
        sin = self.sin_cache.index_select(0, table_pos)
        return self._dynamic_override(positions, meta, cos, sin)

    def _dynamic_override(
        self,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        long = [s for s, ctx in enumerate(meta.seq_lens_cpu) if ctx > self.max_position_embeddings]
        if not long:
            return cos, sin
        qsl = meta.query_start_loc_cpu
        for s in long:
            start, end = qsl[s], qsl[s + 1]
            if start == end:
                continue
            # transformers passes the length as an int64 tensor; so do we, for identical float math.
            seq_len = torch.tensor(meta.seq_lens_cpu[s], dtype=torch.int64, device=positions.device)
            inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](
                self._hf_config, positions.device, seq_len=seq_len
            )
            cos[start:end], sin[start:end] = self._cos_sin(positions[start:end], inv_freq)
        return cos, sin
