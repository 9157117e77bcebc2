"""FP8 weight quantization (``quantization="fp8"``, ``draft_quantization="fp8"``).

A model loaded in its own dtype has each linear's weight W [N, K] (this TP rank's shard) replaced
by

    q = fp8_e4m3(W / scale[:, None]),  scale[n] = max_k |W[n, k]| / 448   (fp32, one per row)

a byte per weight, with the layer's class swapped for its FP8 twin (same sharding, same
``split`` and loaders). Every linear of the decoder layers is quantized, and the LM head when it
is not tied to the embedding; embeddings, norms and a tied head keep the model dtype. Row scales
keep TP exact: a column-parallel shard owns whole rows, and a row-parallel shard's partial
products are scaled before the all-reduce sums them.

Forward: rows up to the "gemv" op's ``max_rows_quantized`` run the Triton GEMV, which reads q as
stored and keeps the input in the model dtype (weight-only); more rows run ``fp8_linear``: FP8
tensor cores with the input quantized per token ("scaled_mm": bf16 models on CUDA sm89+), else
the fp32 reference. So with "scaled_mm" a token's logits depend on how many rows its step has:
greedy output of an FP8 target with speculation (verification: k + 1 rows a request) matches it
without speculation up to that input rounding, not token for token as in 16 bits.

Measured on an H100 (bench/gemv.py --fp8): a llama-3.2-1b layer's GEMVs at one row take 35 us
instead of 51 in bf16, and its LM head 96 us (the GEMV's tensor-core kernel) instead of 168; at
2-16 rows cuBLAS' FP8 kernels lose to bf16 on the small matrices (qkv, o, down) and win on
gate_up and the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayfleet import kernels
from rayfleet.kernels import fp8_linear
from rayfleet.kernels.attention_ref import FP8_MAX, to_cache_dtype
from rayfleet.replicas.model.layers import (
    GEMV_LINEARS,
    GEMV_LM_HEADS,
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

METHODS = ("fp8",)
FP8 = torch.float8_e4m3fn


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] float8_e4m3fn, scale [N] float32) with w ~= q * scale[:, None]; an all-zero
    row gets scale 1."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return to_cache_dtype(wf / scale[:, None], FP8), scale  # (saturating at +-FP8_MAX)


class _Fp8Weight:
    """The FP8 half of a swapped linear: ``weight`` is q, ``weight_scale`` its row scales."""

    weight: nn.Parameter
    weight_scale: torch.Tensor | None
    fp8_backend = kernels.REFERENCE  # of "fp8_linear", for rows the GEMV path does not take

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        assert self.weight_scale is not None
        return kernels.get("fp8_linear", self.fp8_backend)(x, self.weight, self.weight_scale, bias)

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize ``w`` [N, K] into this layer: in place once quantized (CUDA graphs keep
        pointing at the same tensors), else replacing the 16-bit parameter."""
        q, scale = quantize_weight(w)
        if self.weight.dtype == FP8 and self.weight_scale is not None:
            self.weight.data.copy_(q)
            self.weight_scale.copy_(scale)
        else:
            self.weight = nn.Parameter(q, requires_grad=False)
            self.weight_scale = scale


class Fp8ColumnParallelLinear(_Fp8Weight, ColumnParallelLinear):
    pass


class Fp8MergedColumnParallelLinear(_Fp8Weight, MergedColumnParallelLinear):
    pass


class Fp8QKVParallelLinear(_Fp8Weight, QKVParallelLinear):
    pass


class Fp8RowParallelLinear(_Fp8Weight, RowParallelLinear):
    pass


class Fp8LMHead(_Fp8Weight, ParallelLMHead):
    pass


SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    ColumnParallelLinear: Fp8ColumnParallelLinear,
    MergedColumnParallelLinear: Fp8MergedColumnParallelLinear,
    QKVParallelLinear: Fp8QKVParallelLinear,
    RowParallelLinear: Fp8RowParallelLinear,
    ParallelLMHead: Fp8LMHead,
}
GEMV_LINEARS.update(c for c in SWAPS.values() if c is not Fp8LMHead)
GEMV_LM_HEADS.add(Fp8LMHead)


@dataclass(frozen=True)
class QuantReport:
    method: str
    layers: int  # linears quantized
    bytes_before: int  # of those layers' weights
    bytes_after: int  # q and scales
    backend: str  # of fp8_linear (rows the GEMV does not take; a misaligned layer: the reference)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> QuantReport:
    """Swap every linear of ``model`` (loaded, on its device) for its ``method`` twin, layer by
    layer, so the peak memory is the 16-bit model plus one layer's quantized weight."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(METHODS)}; got {method!r}")
    param = next(model.parameters())
    # FP8 tensor cores for bf16 models (cuBLAS' row-wise scaled matmul writes bf16 only on some
    # versions); other dtypes keep their inputs unquantized (weight-only, the reference).
    fast = param.dtype == torch.bfloat16 and fp8_linear.supported(param.device)
    backend = "scaled_mm" if fast else kernels.REFERENCE
    tied = {
        id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding
    }  # a head sharing the embedding's table keeps it
    layers = before = after = 0
    for module in list(model.modules()):
        twin = SWAPS.get(type(module))
        if twin is None or id(module.weight) in tied:
            continue
        w = module.weight.data
        before += w.numel() * w.element_size()
        module.__class__ = twin
        module.set_weight(w)
        # cuBLAS FP8 takes K and N in multiples of 16 (an odd vocabulary, say): else the reference
        aligned = w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
        module.fp8_backend = backend if aligned else kernels.REFERENCE
        after += module.weight.numel() + module.weight_scale.numel() * 4
        layers += 1
        del w
    return QuantReport(method, layers, before, after, backend)
