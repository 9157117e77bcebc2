"""What a model's forward receives besides token ids and positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayfleet import kernels
from rayfleet.kernels.attention_ref import AttentionMetadata


@dataclass
class ForwardBatch:
    """One step's attention inputs, passed explicitly down the model (no module-global context).

    kv_caches[i] is layer i's (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads,
    head_dim]. Every attention layer first writes its new (rotated) K/V with ``write_kv`` at
    ``meta.slot_mapping`` (or with ``rope_and_write_kv``, fused with the rotation), then calls
    ``attention`` over the paged cache.
    """

    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    attention: Callable[..., torch.Tensor]  # kernels "paged_attention" signature
    write_kv: Callable[..., None]  # kernels "write_kv" signature
    # kernels "rope_and_write_kv": RoPE on q and k plus the KV write in one launch; where set,
    # attention layers use it instead of the separate rotary ops + write_kv.
    rope_and_write_kv: Callable[..., torch.Tensor] | None = None
    # kernels "rope_write_kv_attention": all of the above in one launch for decode batches;
    # where set, attention layers use it instead of rope_and_write_kv + attention.
    rope_write_kv_attention: Callable[..., torch.Tensor] | None = None


@dataclass(frozen=True)
class AttentionKernels:
    """The kernels of one attention backend that a forward's attention layers call, looked up
    once (by the runner, the draft proposer and the CUDA graphs over either)."""

    attention: Callable[..., torch.Tensor]
    write_kv: Callable[..., None]
    rope_and_write_kv: Callable[..., torch.Tensor] | None = None
    rope_write_kv_attention: Callable[..., torch.Tensor] | None = None

    @classmethod
    def for_backend(cls, backend: str | None) -> AttentionKernels:
        return cls(
            attention=kernels.get("paged_attention", backend),
            write_kv=kernels.get_or_default("write_kv", backend),
            rope_and_write_kv=kernels.get_fused("rope_and_write_kv", backend),
            rope_write_kv_attention=kernels.get_fused("rope_write_kv_attention", backend),
        )

    def batch(
        self, meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> ForwardBatch:
        return ForwardBatch(
            meta=meta,
            kv_caches=kv_caches,
            attention=self.attention,
            write_kv=self.write_kv,
            rope_and_write_kv=self.rope_and_write_kv,
            rope_write_kv_attention=self.rope_write_kv_attention,
        )
