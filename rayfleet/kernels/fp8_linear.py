"""``fp8_linear`` on FP8 tensor cores (backend "scaled_mm", CUDA sm89+): the rows the GEMV does
not take (prefill, verification, large decode batches).

The input is quantized per row (token) to float8_e4m3fn with its own scale, absmax / 448, and
multiplied by the FP8 weight through ``torch._scaled_mm`` with the row scales of both operands:

    y[m, n] = (xq[m] . q[n]) * x_scale[m] * weight_scale[n] (+ b[n])

so it differs from the weight-only reference (``ops_ref.fp8_linear``) by the input's rounding to
FP8 (relative error about 2^-4 per element, averaging out over K).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from rayfleet import kernels
from rayfleet.kernels import register


@functools.cache
def _quantize() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One Triton launch where it is registered (a chain of small torch kernels otherwise)."""
    fast = "triton" in kernels.backends("quantize_rows_fp8")
    return kernels.get("quantize_rows_fp8", "triton" if fast else kernels.REFERENCE)


def supported(device: torch.device) -> bool:
    """FP8 tensor-core matmuls: CUDA compute capability 8.9 (Ada) and newer."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


@register("fp8_linear", "scaled_mm")
def fp8_linear(
    x: torch.Tensor,  # [..., K] model dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn, K and N multiples of 16
    weight_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] x.dtype
    lead = x.shape[:-1]
    xq, x_scale = _quantize()(x.reshape(-1, x.shape[-1]))  # [M, K] fp8, [M, 1] fp32
    y = torch._scaled_mm(
        xq,
        weight.t(),  # [K, N] column-major, as cuBLAS takes the second operand
        scale_a=x_scale,
        scale_b=weight_scale.view(1, -1),
        out_dtype=x.dtype,
    )
    if bias is not None:
        y = y + bias
    return y.view(*lead, weight.shape[0])
