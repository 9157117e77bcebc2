"""Tensor-parallel-ready building blocks of the decoder models.

Every parameter carries ``weight_loader(param, loaded, shard_id=None)``, which copies this TP rank's
slice of a full checkpoint tensor into it. Sharding (TP rank r of n):

    ColumnParallelLinear / Merged / QKV   weight [out / n, in]   rows of the output dim
    RowParallelLinear                     weight [out, in / n]   all-reduce after the matmul
    VocabParallelEmbedding / LMHead       weight [ceil(V / n), hidden]  a contiguous vocab range

Parameters are allocated with ``torch.empty`` (no init) on the current default device, so a model
built under ``with torch.device("cuda")`` holds exactly one copy of its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rayfleet import kernels
from rayfleet.replicas import parallel
from rayfleet.replicas.model.forward import ForwardBatch

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "str | int | None"], None]


def _param(shape: Sequence[int], dtype: torch.dtype, loader: Callable[..., None]) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"{what}: checkpoint shape {tuple(src.shape)} != expected {tuple(dst.shape)}"
        )
    dst.copy_(src)


def default_weight_loader(
    param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
) -> None:
    """A replicated parameter: every rank holds the full tensor."""
    _copy(param.data, loaded, "replicated parameter")


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what}={a} is not divisible by the tensor-parallel size {b}")
    return a // b


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across TP ranks; output stays sharded."""

    gemv_backend = kernels.REFERENCE  # the "gemv" of forward_gemv, swapped by use_kernel_backend
    # Per-output-row scale of a quantized weight (quant/fp8.py swaps it in); None: plain weight.
    weight_scale: torch.Tensor | None = None

    def __init__(
        self, input_size: int, output_size: int, *, bias: bool = False, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = parallel.get_tp_rank(), parallel.get_tp_size()
        self.input_size = input_size
        self.output_size_per_rank = _divide(output_size, self.tp_size, "output_size")
        self.weight = _param((self.output_size_per_rank, input_size), dtype, self.weight_loader)
        self.bias = (
            _param((self.output_size_per_rank,), dtype, self.weight_loader) if bias else None
        )

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        n = self.output_size_per_rank
        _copy(param.data, loaded.narrow(0, self.tp_rank * n, n), "column-parallel weight")

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T + b for inputs the GEMV path does not take (a quantized layer overrides it)."""
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def forward_gemv(
        self,
        x: torch.Tensor,  # [M <= gemv max_rows, in]
        prologue: str = "none",
        norm: RMSNorm | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward(prologue(x))`` as one small-M GEMV (see ``kernels/triton_gemv.py``); returns
        (y, the new residual stream for "add_rms_norm" else None)."""
        return _gemv(self, x, self.bias, prologue, norm, residual)


def _gemv(
    layer: ColumnParallelLinear | RowParallelLinear | ParallelLMHead,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    prologue: str,
    norm: RMSNorm | None,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return kernels.get("gemv", layer.gemv_backend)(
        x,
        layer.weight,
        bias,
        prologue=prologue,
        norm_weight=norm.weight if norm is not None else None,
        eps=norm.eps if norm is not None else 0.0,
        residual=residual,
        weight_scale=layer.weight_scale,
    )


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears of the same input fused along the output dim (gate_up).

    Checkpoint tensor ``shard_id=i`` is the i-th of ``output_sizes``; on each rank the fused weight
    is [shard 0 of this rank; shard 1 of this rank; ...].
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        bias: bool = False,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype)
        self.output_sizes = list(output_sizes)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"merged linear needs shard_id in 0..{len(self.output_sizes) - 1}")
        sizes = [_divide(s, self.tp_size, "output_size") for s in self.output_sizes]
        offset, n = sum(sizes[:shard_id]), sizes[shard_id]
        src = loaded.narrow(0, self.tp_rank * n, n)
        _copy(param.data.narrow(0, offset, n), src, f"merged linear shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused: per rank [q heads of this rank; its kv heads; its kv heads].

    With fewer KV heads than TP ranks, each KV head is replicated on tp_size / num_kv_heads ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool = False,
        dtype: torch.dtype,
    ) -> None:
        tp_size = parallel.get_tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_kv_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, num_kv_heads, "tp_size / num_kv_heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias=bias, dtype=dtype)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if shard_id == "q":
            offset, n, src_rank = 0, self.q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            n, src_rank = self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"qkv linear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        src = loaded.narrow(0, src_rank * n, n)
        _copy(param.data.narrow(0, offset, n), src, f"qkv shard {shard_id}")

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b with W's input columns split across TP ranks."""

    gemv_backend = kernels.REFERENCE
    weight_scale: torch.Tensor | None = None  # as ColumnParallelLinear's

    def __init__(
        self, input_size: int, output_size: int, *, bias: bool = False, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = parallel.get_tp_rank(), parallel.get_tp_size()
        self.input_size_per_rank = _divide(input_size, self.tp_size, "input_size")
        self.output_size = output_size
        self.weight = _param((output_size, self.input_size_per_rank), dtype, self.weight_loader)
        self.bias = _param((output_size,), dtype, default_weight_loader) if bias else None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        n = self.input_size_per_rank
        _copy(param.data, loaded.narrow(1, self.tp_rank * n, n), "row-parallel weight")

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's partial x W^T (+ b), before the all-reduce (quantized layers override)."""
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins on rank 0 only, so the all-reduce adds it exactly once.
        bias = self.bias if self.tp_rank == 0 else None
        return parallel.all_reduce(self._linear(x, bias))

    def forward_gemv(self, x: torch.Tensor, prologue: str = "none") -> torch.Tensor:
        """``forward(prologue(x))`` as one small-M GEMV; the prologue ("silu_and_mul") is
        elementwise, so it runs on this rank's input shard as it is."""
        bias = self.bias if self.tp_rank == 0 else None
        y, _ = _gemv(self, x, bias, prologue, None, None)
        return parallel.all_reduce(y)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split into contiguous vocab ranges, padded so every rank's range is equal."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = parallel.get_tp_rank(), parallel.get_tp_size()
        self.vocab_size = vocab_size
        self.vocab_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.vocab_per_rank
        self.weight = _param((self.vocab_per_rank, hidden_size), dtype, self.weight_loader)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"vocab of checkpoint {loaded.shape[0]} != config {self.vocab_size}")
        end = min(self.vocab_start + self.vocab_per_rank, self.vocab_size)
        n = max(0, end - self.vocab_start)
        param.data[n:].zero_()
        _copy(param.data[:n], loaded[self.vocab_start : self.vocab_start + n], "embedding")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; may share its weight with the input embedding."""

    gemv_backend = kernels.REFERENCE
    gemv_max_rows = 0  # rows up to this go through the backend's "gemv" (use_kernel_backend)
    weight_scale: torch.Tensor | None = None  # as ColumnParallelLinear's

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        if 0 < hidden.shape[0] <= self.gemv_max_rows:
            y, _ = _gemv(self, hidden, None, "none", None, None)
        else:
            y = self._linear(hidden, None)
        logits = parallel.all_gather(y, dim=-1)
        if logits.shape[-1] == self.vocab_size:
            return logits
        # (padded ranks: a copy, since samplers mask the logits in place through flat views)
        return logits[..., : self.vocab_size].contiguous()


class RMSNorm(nn.Module):
    """RMSNorm with transformers' numerics (the "rms_norm" kernel op; see kernels/ops_ref.py).

    ``forward(x, residual)`` is the fused pre-norm form: it returns ``(norm(x + residual), x +
    residual)`` with the add done in the model dtype, as the unfused decoder layer does it.
    """

    kernel_backend = kernels.REFERENCE  # swapped per instance by use_kernel_backend()

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param((hidden_size,), dtype, default_weight_loader)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return kernels.get("rms_norm", self.kernel_backend)(x, self.weight, self.eps)
        return kernels.get("fused_add_rms_norm", self.kernel_backend)(
            x, residual, self.weight, self.eps
        )


class SiluAndMul(nn.Module):
    kernel_backend = kernels.REFERENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * d] -> [T, d]
        return kernels.get("silu_and_mul", self.kernel_backend)(x)


# Classes whose GEMV path (forward_gemv, or the LM head's small-M forward) runs the "gemv" op;
# quant/fp8.py adds its swapped classes. Exact classes only: a layer of another class keeps its
# own forward, and a decoder layer takes its GEMV path only when every linear in it is one of
# these.
GEMV_LINEARS: set[type[nn.Module]] = {
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
}
GEMV_LM_HEADS: set[type[nn.Module]] = {ParallelLMHead}


def use_kernel_backend(model: nn.Module, backend: str) -> list[str]:
    """Swap every kernel-backed layer of ``model`` to ``backend`` where it has the op.

    Returns the ops swapped. Layers whose op the backend lacks keep the reference.
    """
    swapped = set()
    ops = {RMSNorm: ("rms_norm", "fused_add_rms_norm"), SiluAndMul: ("silu_and_mul",)}
    for module in model.modules():
        names = ops.get(type(module))
        if names and all(backend in kernels.backends(op) for op in names):
            module.kernel_backend = backend
            swapped.update(names)
    if backend != kernels.REFERENCE and backend in kernels.backends("gemv"):
        gemv = kernels.get("gemv", backend)

        def rows(m: nn.Module) -> int:  # the most rows m's GEMV path takes
            if m.weight_scale is not None:
                return gemv.max_rows_quantized
            if m.weight.dtype in (torch.bfloat16, torch.float16):
                return getattr(gemv, "max_rows_16bit", gemv.max_rows)
            return gemv.max_rows

        for module in model.modules():
            if type(module) in GEMV_LINEARS:
                module.gemv_backend = backend
            elif type(module) in GEMV_LM_HEADS:
                module.gemv_backend, module.gemv_max_rows = backend, rows(module)
                beside = getattr(gemv, "rows_beside_scaled_mm", None)
                if beside and getattr(module, "fp8_backend", None) == "scaled_mm":
                    # an FP8 head with FP8 tensor cores beside it: the GEMV only where faster
                    module.gemv_max_rows = min(module.gemv_max_rows, beside(module.weight.shape[0]))
            elif hasattr(module, "gemv_max_tokens"):
                linears = [
                    m
                    for m in module.modules()
                    if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
                ]
                if linears and all(type(m) in GEMV_LINEARS for m in linears):
                    module.gemv_max_tokens = min(rows(m) for m in linears)
        swapped.add("gemv")
    return sorted(swapped)


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends over the cache."""

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        batch.write_kv(k, v, k_cache, v_cache, batch.meta.slot_mapping)
        return batch.attention(q, k_cache, v_cache, batch.meta, self.scale, self.sliding_window)

    def rope_and_attend(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], not yet rotated
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], not yet rotated
        v: torch.Tensor,
        cos: torch.Tensor,  # [num_tokens, head_dim]
        sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """forward() with RoPE fused into the KV write (``batch.rope_and_write_kv``)."""
        assert batch.rope_and_write_kv is not None
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        if batch.rope_write_kv_attention is not None:
            return batch.rope_write_kv_attention(
                q, k, v, cos, sin, k_cache, v_cache, batch.meta, self.scale, self.sliding_window
            )
        q = batch.rope_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, batch.meta.slot_mapping)
        return batch.attention(q, k_cache, v_cache, batch.meta, self.scale, self.sliding_window)
