"""What a model's forward receives besides token ids and positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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
