"""The Llama decoder, shared by every supported family through ``ModelArchConfig`` flags.

Llama 2/3/3.x and Mistral (``sliding_window``) are this model as is; Qwen2 adds q/k/v biases
(``qkv_bias``) and Qwen3 adds a per-head RMSNorm on q and k before RoPE (``qk_norm``). Module names
mirror the transformers checkpoints (``model.layers.{i}.self_attn.qkv_proj`` fuses q/k/v_proj,
``mlp.gate_up_proj`` fuses gate/up_proj) so the loader only has to map the fused names.
"""

from __future__ import annotations

import torch
from torch import nn

from rayfleet.replicas.model.arch import ModelArchConfig
from rayfleet.replicas.model.forward import ForwardBatch
from rayfleet.replicas.model.layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)
from rayfleet.replicas.model.rotary import RotaryEmbedding, apply_rotary


class DecoderAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer_idx: int, *, dtype: torch.dtype) -> None:
        super().__init__()
        d = arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, d, arch.num_heads, arch.num_kv_heads, bias=arch.qkv_bias, dtype=dtype
        )
        self.o_proj = RowParallelLinear(
            arch.q_size, arch.hidden_size, bias=arch.o_bias, dtype=dtype
        )
        self.q_norm = RMSNorm(d, arch.rms_norm_eps, dtype=dtype) if arch.qk_norm else None
        self.k_norm = RMSNorm(d, arch.rms_norm_eps, dtype=dtype) if arch.qk_norm else None
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.attn = Attention(
            layer_idx,
            self.num_heads,
            self.num_kv_heads,
            d,
            scale=d**-0.5,
            sliding_window=arch.layer_sliding_window(layer_idx),
        )

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, head_dim]
        sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, hidden]
        return self.o_proj(self.attend(self.qkv_proj(hidden), cos, sin, batch))

    def attend(
        self,
        qkv: torch.Tensor,  # [T, q_size + 2 * kv_size]: the qkv projection of this rank
        cos: torch.Tensor,  # [T, head_dim]
        sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, num_heads * head_dim], the input of o_proj
        t = qkv.shape[0]
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if batch.rope_and_write_kv is not None:
            out = self.attn.rope_and_attend(q, k, v, cos, sin, batch)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = self.attn(q, k, v, batch)  # [T, num_heads, head_dim]
        return out.reshape(t, self.num_heads * self.head_dim)


class DecoderMLP(nn.Module):
    def __init__(self, arch: ModelArchConfig, *, dtype: torch.dtype) -> None:
        super().__init__()
        i = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            arch.hidden_size, [i, i], bias=arch.mlp_bias, dtype=dtype
        )
        self.down_proj = RowParallelLinear(i, arch.hidden_size, bias=arch.mlp_bias, dtype=dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    # Steps of at most this many tokens run every linear as one GEMV with the norm / SiLU-mul in
    # front of it fused in (forward_gemv); 0 = never. Set by use_kernel_backend.
    gemv_max_tokens = 0

    def __init__(self, arch: ModelArchConfig, layer_idx: int, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(arch, layer_idx, dtype=dtype)
        self.mlp = DecoderMLP(arch, dtype=dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]: the previous sublayer's output
        residual: torch.Tensor | None,  # [T, hidden]: the residual stream before that output
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if 0 < hidden.shape[0] <= self.gemv_max_tokens:
            return self.forward_gemv(hidden, residual, cos, sin, batch)
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def forward_gemv(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() in four GEMVs, the norms and SiLU-mul fused into the one after them."""
        attn, mlp = self.self_attn, self.mlp
        if residual is None:
            qkv, _ = attn.qkv_proj.forward_gemv(hidden, "rms_norm", self.input_layernorm)
            residual = hidden
        else:
            qkv, residual = attn.qkv_proj.forward_gemv(
                hidden, "add_rms_norm", self.input_layernorm, residual
            )
        assert residual is not None
        hidden = attn.o_proj.forward_gemv(attn.attend(qkv, cos, sin, batch))
        gate_up, residual = mlp.gate_up_proj.forward_gemv(
            hidden, "add_rms_norm", self.post_attention_layernorm, residual
        )
        assert residual is not None
        return mlp.down_proj.forward_gemv(gate_up, "silu_and_mul"), residual


class DecoderModel(nn.Module):
    def __init__(
        self, arch: ModelArchConfig, *, dtype: torch.dtype, max_positions: int | None = None
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, dtype=dtype) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim,
            arch.rope_theta,
            arch.rope_scaling,
            arch.max_position_embeddings,
            max_positions=max_positions,
            dtype=dtype,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # The embedding opens the forward as a launch without PDL: nothing staged before it is
        # still being written once a layer's kernels run (the fused decode attention reads the
        # step's metadata and cached KV before its wait; see triton_attention).
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(positions, batch.meta)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """A causal LM over the paged KV cache.

    ``forward(input_ids [T], positions [T], batch) -> hidden [T, hidden]`` for the concatenated new
    tokens of all requests; ``compute_logits(hidden [N, hidden]) -> [N, vocab]`` in the model's
    dtype (greedy argmax reads them as they are; whatever computes with them upcasts to float32).
    ``max_positions`` sizes the RoPE table (default: the checkpoint's max_position_embeddings).
    """

    def __init__(
        self,
        arch: ModelArchConfig,
        *,
        dtype: torch.dtype,
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.model = DecoderModel(arch, dtype=dtype, max_positions=max_positions)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, dtype=dtype)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding attention window (``arch.sliding_window``) on every layer."""
