"""The small-M GEMV with its fused prologue (``triton_gemv.gemv``) against ``ops_ref.gemv``, the
reference against the unfused model layers, and the decoder's GEMV path against its normal one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from rayfleet import kernels  # noqa: E402
from rayfleet.kernels import ops_ref, triton_gemv  # noqa: E402
from rayfleet.replicas.model.layers import (  # noqa: E402
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    use_kernel_backend,
)

PROLOGUES = ["none", "rms_norm", "add_rms_norm", "silu_and_mul"]


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def inputs(gen, m, n, k, prologue, dtype, device, bias=True):
    width = 2 * k if prologue == "silu_and_mul" else k
    x = rand(gen, m, width, dtype=dtype, device=device)
    w = rand(gen, n, k, dtype=dtype, device=device) / k**0.5
    b = rand(gen, n, dtype=dtype, device=device) if bias else None
    kw = {}
    if prologue in ("rms_norm", "add_rms_norm"):
        kw = {"norm_weight": 1 + rand(gen, k, dtype=dtype, device=device) / 4, "eps": 1e-5}
    if prologue == "add_rms_norm":
        kw["residual"] = rand(gen, m, k, dtype=dtype, device=device)
    return x, w, b, kw


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def unrounded_input(x, prologue, kw, new_res) -> torch.Tensor:
    """The fp32 input of the kernel's product: the prologue's output, with the normalised input
    not rounded to the model dtype (see triton_gemv's docstring)."""
    if prologue == "none":
        return x.float()
    if prologue == "silu_and_mul":
        return ops_ref.silu_and_mul(x).float()
    h = (new_res if prologue == "add_rms_norm" else x).float()
    return kw["norm_weight"].float() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)


def assert_within_rounding(y, x, w, b, prologue, kw, new_res, *, input_rounded: bool) -> None:
    """y (16-bit) is within one rounding of the fp32 product of its unrounded input; where the
    input is rounded to the model dtype first (the MMA kernel, or the unfused ops), also within
    that rounding summed over the k products of size |a| |w|."""
    a = unrounded_input(x, prologue, kw, new_res)
    exact = F.linear(a, w.float(), _float(b))
    ulp = 2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-10
    bound = ulp * exact.abs() + 1e-3
    if input_rounded:
        bound = bound + ulp * (a.abs() @ w.float().abs().t())
    err = (y.float() - exact).abs()
    assert bool((err <= bound).all()), (err - bound).max()


def test_registered_beside_reference() -> None:
    assert kernels.backends("gemv")[0] == "torch"  # the reference stays the default
    assert kernels.get("gemv", "triton") is triton_gemv.gemv
    assert triton_gemv.MAX_M == 2 and triton_gemv.gemv.max_rows == 1
    assert triton_gemv.MMA_M == 16 and triton_gemv.gemv.max_rows_16bit == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_unfused_layers(dtype: torch.dtype, gen: torch.Generator) -> None:
    x, w, b, _ = inputs(gen, 3, 24, 40, "none", dtype, "cpu")
    r = rand(gen, 3, 40, dtype=dtype, device="cpu")
    norm = RMSNorm(40, 1e-6, dtype=dtype)
    norm.weight.data.copy_(rand(gen, 40, dtype=dtype, device="cpu"))
    ref = kernels.get("gemv", "torch")
    y, nr = ref(x, w, b, prologue="rms_norm", norm_weight=norm.weight, eps=1e-6)
    assert nr is None and torch.equal(y, F.linear(norm(x), w, b))
    y, nr = ref(x, w, b, prologue="add_rms_norm", norm_weight=norm.weight, eps=1e-6, residual=r)
    normed, new_res = norm(x, r)
    assert torch.equal(y, F.linear(normed, w, b)) and torch.equal(nr, new_res)
    gu = rand(gen, 3, 80, dtype=dtype, device="cpu")
    assert torch.equal(ref(gu, w, None, prologue="silu_and_mul")[0], F.linear(SiluAndMul()(gu), w))
    with pytest.raises(ValueError, match="prologue must be one of"):
        ref(x, w, prologue="gelu")


@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("m", [1, 2, 3, 9, 16])  # FMA, MMA (16-bit) or unfused rows
@pytest.mark.parametrize(
    "n,k",
    [(1, 1), (5, 130), (33, 1025), (64, 2048)],  # a 1-wide weight, odd sizes, BLOCK_K + 1, 2 chunks
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(
    prologue: str, m: int, n: int, k: int, dtype: torch.dtype, gen: torch.Generator, device: str
) -> None:
    """y against the reference; the new residual bit-equal. In 16 bits the MMA kernel and the
    unfused ops round the product's input to the model dtype first (for the RMS prologues the
    FMA and MMA kernels take g * h, before the rstd)."""
    x, w, b, kw = inputs(gen, m, n, k, prologue, dtype, device, bias=(n % 2 == 1))
    saved = [t.clone() for t in (x, w, *kw.values()) if isinstance(t, torch.Tensor)]
    y, new_res = triton_gemv.gemv(x, w, b, prologue=prologue, **kw)
    ref_y, ref_res = ops_ref.gemv(x, w, b, prologue=prologue, **kw)
    assert y.shape == (m, n) and y.dtype == dtype
    # The new residual is rounded as the layer rounds it, so it is bit-equal; in fp32 y differs
    # from the reference only by summation order.
    if prologue == "add_rms_norm":
        assert torch.equal(new_res, ref_res)
    else:
        assert new_res is None
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    else:
        kernel = triton_gemv.kernel_for(m, n, triton_gemv._PROLOGUE_IDS[prologue], dtype, False)
        assert_within_rounding(y, x, w, b, prologue, kw, ref_res, input_rounded=kernel != "fma")
    assert all(
        torch.equal(s, t)
        for s, t in zip(saved, [t for t in (x, w, *kw.values()) if isinstance(t, torch.Tensor)])
    )


@pytest.mark.parametrize(
    "m,dtype,fp8,kernel",
    [
        (1, torch.bfloat16, False, "fma"),  # one row: the FMA kernel is faster for 16 bits
        (2, torch.bfloat16, False, "mma"),
        (9, torch.float16, False, "mma"),  # a verification of 8 drafts
        (16, torch.bfloat16, False, "mma"),
        (2, torch.float32, False, "fma"),  # fp32: the FMA kernel only, up to MAX_M rows
        (3, torch.float32, False, "unfused"),
        (1, torch.bfloat16, True, "mma"),  # an FP8 weight of a wide layer (MMA_MIN_N_FP8)
        (2, torch.float16, True, "mma"),
        (5, torch.bfloat16, True, "mma"),
    ],
)
def test_which_kernel_takes_the_rows(
    m: int, dtype: torch.dtype, fp8: bool, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton_gemv, "MMA_MIN_N_FP8", 48)
    add_rms, silu = triton_gemv.ADD_RMS, triton_gemv.SILU_MUL
    assert triton_gemv.kernel_for(m, 48, add_rms, dtype, fp8) == kernel
    # a SiLU-and-mul prologue never takes the MMA kernel: 16-bit rows past one run unfused
    half = dtype != torch.float32
    with_silu = "fma" if m == 1 or (m <= 2 and (fp8 or not half)) else "unfused"
    assert triton_gemv.kernel_for(m, 48, silu, dtype, fp8) == with_silu
    # nor does a narrow FP8 weight
    narrow = triton_gemv.kernel_for(m, 47, add_rms, dtype, True)
    assert narrow == ("fma" if m <= triton_gemv.MAX_M else "unfused")


# (fp8 weight, model dtype, input magnitude, prologue): every fp16 operand, i.e. FP8 weights in
# either model dtype and 16-bit weights of an fp16 model (a bf16 operand is never scaled); no
# fp16 output past 65504 (large inputs of an fp16 model go through a norm, with g * h past it)
MAGNITUDE_CASES = [
    (fp8, dtype, magnitude, prologue)
    for fp8, dtype in ((True, torch.bfloat16), (True, torch.float16), (False, torch.float16))
    for magnitude in (1e-4, 1.0, 300.0)
    for prologue in ("none", "rms_norm", "add_rms_norm")
    if not (dtype == torch.float16 and magnitude > 1 and prologue == "none")
]


@pytest.mark.parametrize("fp8,dtype,magnitude,prologue", MAGNITUDE_CASES)
@pytest.mark.parametrize("m", [1, 2, 7])
def test_mma_fp16_operand_keeps_precision_at_any_magnitude(
    prologue: str,
    m: int,
    dtype: torch.dtype,
    magnitude: float,
    fp8: bool,
    gen: torch.Generator,
    device: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MMA rows with an fp16 operand (an FP8 weight widened exactly, or an fp16 model's own): the
    input is rounded once to fp16 at full precision whatever its magnitude, from un-normalised
    residuals of 1e-4 (a fixed scale into fp16's range lost 20x the precision there) to g * h
    past 65504 in an fp16 model; the product is scaled back exactly."""
    from rayfleet.replicas.quant.fp8 import quantize_weight

    n, k = 96, 520
    monkeypatch.setattr(triton_gemv, "MMA_MIN_N_FP8", n)
    x, w, b, kw = inputs(gen, m, n, k, prologue, dtype, device, bias=True)
    x = (x.float() * magnitude).to(dtype)
    if prologue == "add_rms_norm":
        kw["residual"] = (kw["residual"].float() * magnitude).to(dtype)
    if prologue != "none" and dtype == torch.float16 and magnitude > 1:
        kw["norm_weight"] = kw["norm_weight"] * 200  # g * h past 65504
    q, scale = quantize_weight(w * (1 + torch.arange(n, device=device)[:, None]))
    if not fp8:
        q, scale = (q.float() * scale[:, None]).to(dtype), None
    y, new_res = triton_gemv.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    ref_y, ref_res = ops_ref.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    if prologue == "add_rms_norm":
        assert torch.equal(new_res, ref_res)
    # an absolute slack at the scale of the outputs (normalised for the RMS prologues;
    # proportional to the input for "none")
    slack = 1e-3 * (magnitude if prologue == "none" else 1.0)
    assert_within_fp16_input_rounding(y, x, q, scale, b, prologue, kw, ref_res, slack=slack)


def assert_within_fp16_input_rounding(
    y, x, q, scale, b, prologue, kw, new_res, *, slack: float = 1e-3
) -> None:
    """An MMA result with an fp16 operand (an FP8 weight, ``scale`` its row scales, or an fp16
    model's own, ``scale`` None) within y's own rounding, the input's fp16 rounding (2^-11
    relative, summed over the products) and an absolute ``slack``; finite."""
    s = 1 if scale is None else scale
    a = unrounded_input(x, prologue, kw, new_res)
    exact = F.linear(a, q.float()) * s + (0 if b is None else b.float())
    ulp = 2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-10
    products = (a.abs() @ q.float().abs().t()) * s
    bound = ulp * exact.abs() + 2.0**-10 * products + slack
    err = (y.float() - exact).abs()
    assert torch.isfinite(y).all() and bool((err <= bound).all()), (err - bound).max()


# (n, fp8) -> every (BLOCK_N, BLOCK_K, warps, stages) _mma_config ships, with a weight of its kind
SHIPPED_MMA = {
    triton_gemv._mma_config(n, fp8): fp8 for n in (2048, 16384, 65536) for fp8 in (False, True)
}


@pytest.mark.parametrize("config", sorted(SHIPPED_MMA))
@pytest.mark.parametrize("prologue", ["none", "add_rms_norm"])
def test_every_shipped_mma_config(
    config: tuple[int, int, int, int],
    prologue: str,
    gen: torch.Generator,
    device: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each (BLOCK_N, BLOCK_K, warps, stages) that _mma_config ships, with the weight kind it
    ships for (FP8, or bf16), on a small ragged weight: the LM head's and the 16384-65535-row
    configs otherwise run only at those widths. (The interpreter ignores warps and stages: on
    the CPU the FP8 configs of 3 and 4 stages are one run; the GPU host tells them apart.)"""
    from rayfleet.replicas.quant.fp8 import quantize_weight

    fp8 = SHIPPED_MMA[config]
    monkeypatch.setattr(triton_gemv, "MMA_MIN_N_FP8", 1)
    monkeypatch.setattr(triton_gemv, "_MMA_CONFIG_OVERRIDE", config)
    m, n, k = 2, 97, 600
    x, w, b, kw = inputs(gen, m, n, k, prologue, torch.bfloat16, device, bias=True)
    assert triton_gemv.kernel_for(m, n, triton_gemv.ADD_RMS, torch.bfloat16, fp8) == "mma"
    if not fp8:
        y, new_res = triton_gemv.gemv(x, w, b, prologue=prologue, **kw)
        _, ref_res = ops_ref.gemv(x, w, b, prologue=prologue, **kw)
        assert_within_rounding(y, x, w, b, prologue, kw, ref_res, input_rounded=True)
        return
    q, scale = quantize_weight(w)
    y, new_res = triton_gemv.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    _, ref_res = ops_ref.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    assert_within_fp16_input_rounding(y, x, q, scale, b, prologue, kw, ref_res)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "m,n,k,prologue",
    [
        (1, 128256, 2048, "none"),  # llama-3.2-1b LM head (FP8 draft), one row
        (2, 128256, 2048, "none"),  # its first forward after a full acceptance
        (1, 16384, 2048, "add_rms_norm"),  # its gate_up
        (2, 16384, 2048, "add_rms_norm"),  # (FP8 layers take the GEMV up to 2 rows)
        (1, 28672, 4096, "add_rms_norm"),  # an FP8 llama-3-8b gate_up at batch 1
    ],
)
def test_fp8_model_shapes_gpu(m: int, n: int, k: int, prologue: str, gen: torch.Generator) -> None:
    """FP8 weights at the shapes the engine runs, through whichever kernel kernel_for picks."""
    from rayfleet.replicas.quant.fp8 import quantize_weight

    x, w, b, kw = inputs(gen, m, n, k, prologue, torch.bfloat16, "cuda", bias=False)
    q, scale = quantize_weight(w)
    y, new_res = triton_gemv.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    _, ref_res = ops_ref.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    if prologue == "add_rms_norm":
        assert torch.equal(new_res, ref_res)
    assert_within_fp16_input_rounding(y, x, q, scale, b, prologue, kw, ref_res)


def test_rejects_what_it_does_not_take(gen: torch.Generator, device: str) -> None:
    w = rand(gen, 8, 16, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="1..16 rows"):
        triton_gemv.gemv(rand(gen, 17, 16, dtype=torch.float32, device=device), w)
    with pytest.raises(ValueError, match="does not fit weight"):
        triton_gemv.gemv(
            rand(gen, 1, 16, dtype=torch.float32, device=device), w, prologue="silu_and_mul"
        )
    with pytest.raises(ValueError, match="dtype"):
        triton_gemv.gemv(rand(gen, 1, 16, dtype=torch.bfloat16, device=device), w)


def test_backend_swap_routes_small_steps_through_gemv(tmp_path) -> None:
    from rayfleet.replicas.model.llama import DecoderLayer
    from rayfleet.replicas.model.loader import load_model
    from tests.model_factory import make_tiny_model

    model = load_model(
        make_tiny_model(tmp_path / "m", "llama"),
        dtype=torch.float32,
        device="cpu",
        show_progress=False,
    )
    assert "gemv" in use_kernel_backend(model, "triton")
    linears = [
        m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
    ]
    assert linears and all(m.gemv_backend == "triton" for m in linears)
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    assert layers and all(m.gemv_max_tokens == 1 for m in layers)
    assert isinstance(model.lm_head, ParallelLMHead) and model.lm_head.gemv_max_rows == 1


def test_layer_with_a_swapped_linear_keeps_its_own_forward(tmp_path) -> None:
    """A linear of another class (a quantized one, say) would be bypassed by the GEMV path, so
    its decoder layer never takes that path; the other layers still do."""
    from rayfleet.replicas.model.layers import QKVParallelLinear
    from rayfleet.replicas.model.llama import DecoderLayer
    from rayfleet.replicas.model.loader import load_model
    from tests.model_factory import make_tiny_model

    class OtherQKV(QKVParallelLinear):
        pass

    model = load_model(
        make_tiny_model(tmp_path / "m", "llama"),
        dtype=torch.float32,
        device="cpu",
        show_progress=False,
    )
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    layers[0].self_attn.qkv_proj.__class__ = OtherQKV
    use_kernel_backend(model, "triton")
    assert [m.gemv_max_tokens for m in layers] == [0] + [1] * (len(layers) - 1)
    assert layers[0].self_attn.qkv_proj.gemv_backend == "torch"


@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k", [(1, 16), (33, 1025), (64, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weight_matches_reference(
    prologue: str, m: int, n: int, k: int, dtype: torch.dtype, gen: torch.Generator, device: str
) -> None:
    """An FP8 weight with per-row scales (quant/fp8.py) is read as stored: y is the fp32
    product with the dequantized weight, scaled per row, rounded once to the input's dtype."""
    from rayfleet.replicas.quant.fp8 import quantize_weight

    x, w, b, kw = inputs(gen, m, n, k, prologue, dtype, device, bias=(n % 2 == 1))
    q, scale = quantize_weight(w * (1 + torch.arange(n, device=device)[:, None]))  # row scales
    y, new_res = triton_gemv.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    ref_y, ref_res = ops_ref.gemv(x, q, b, prologue=prologue, weight_scale=scale, **kw)
    assert y.shape == (m, n) and y.dtype == dtype
    if prologue == "add_rms_norm":
        assert torch.equal(new_res, ref_res)
    if dtype == torch.float32:  # summation order only (weights up to n times larger here)
        torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
    else:  # within one rounding of the fp32 product of its unrounded input
        a = unrounded_input(x, prologue, kw, ref_res)
        exact = F.linear(a, q.float()) * scale + (0 if b is None else b.float())
        err = (y.float() - exact).abs()
        assert bool((err <= 2.0**-7 * exact.abs() + 1e-3 * scale.max() * k**0.5).all()), err.max()


@pytest.mark.parametrize("m", [1, 2])
def test_fp8_weight_widens_every_code_exactly(m: int, device: str) -> None:
    """The FMA kernel's widening of FP8 bytes: every e4m3fn code but NaN (both signs,
    subnormals, zeros, the largest 448), as row i's only weight, comes out as torch's
    conversion of it."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    w = torch.zeros(codes.numel(), 16, dtype=torch.uint8)
    w[:, 3] = codes
    w = w.view(torch.float8_e4m3fn).to(device)
    x = torch.zeros(m, 16, device=device)
    x[:, 3] = 1.0
    scale = torch.ones(codes.numel(), device=device)
    assert triton_gemv.kernel_for(m, codes.numel(), triton_gemv.NONE, x.dtype, fp8=True) == "fma"
    y, _ = triton_gemv.gemv(x, w, weight_scale=scale)
    want = codes.view(torch.float8_e4m3fn).float().to(device)
    assert torch.equal(y, want.expand(m, -1))


def test_fp8_weight_needs_its_scales(gen: torch.Generator, device: str) -> None:
    from rayfleet.replicas.quant.fp8 import quantize_weight

    q, scale = quantize_weight(rand(gen, 8, 16, dtype=torch.float32, device=device))
    x = rand(gen, 1, 16, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="one scale per row"):
        triton_gemv.gemv(x, q, weight_scale=scale[:4])
    with pytest.raises(ValueError, match="dtype"):
        triton_gemv.gemv(x, q)


def test_fp8_layers_take_the_gemv_path_up_to_its_row_limit(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapped FP8 linears run the GEMV (reading the FP8 bytes) for up to MAX_M rows, where the
    alternative would quantize the input; their layers and the LM head route accordingly."""
    from rayfleet.replicas.model.llama import DecoderLayer
    from rayfleet.replicas.model.loader import load_model
    from rayfleet.replicas.quant.fp8 import Fp8LMHead, quantize_model
    from tests.model_factory import make_tiny_model

    model = load_model(
        make_tiny_model(tmp_path / "m", "llama"),
        dtype=torch.float32,
        device="cpu",
        show_progress=False,
    )
    report = quantize_model(model, "fp8")
    assert report.layers == 2 * 4 + 1 and report.backend == "torch"  # 4 linears a layer + head
    assert report.bytes_after < report.bytes_before / 3  # fp32 -> 1 byte + a scale per row
    use_kernel_backend(model, "triton")
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    assert [m.gemv_max_tokens for m in layers] == [triton_gemv.MAX_M] * len(layers)
    assert type(model.lm_head) is Fp8LMHead and model.lm_head.gemv_max_rows == triton_gemv.MAX_M
    assert model.lm_head.gemv_backend == "triton"
    # With FP8 tensor cores beside it, a narrow head (this tiny vocabulary) skips the GEMV: the
    # FMA kernel would read it (slower than the input's quantization + cuBLAS); a head as wide
    # as the MMA kernel's takes it.
    model.lm_head.fp8_backend = "scaled_mm"
    use_kernel_backend(model, "triton")
    assert model.lm_head.gemv_max_rows == 0
    assert [m.gemv_max_tokens for m in layers] == [triton_gemv.MAX_M] * len(layers)
    monkeypatch.setattr(triton_gemv, "MMA_MIN_N_FP8", model.lm_head.weight.shape[0])
    use_kernel_backend(model, "triton")
    assert model.lm_head.gemv_max_rows == triton_gemv.MAX_M


def test_device_context_keeps_the_real_factories(tmp_path) -> None:
    """The kernels tier patches torch.empty (conftest.poison_empty); torch's device context
    keeps the set of factories it places, built once: it must hold the real ones, or models
    loaded later in the same process (tests/gpu after this tier) land on the CPU."""
    from torch.utils import _device

    if not hasattr(_device, "_device_constructors"):
        pytest.skip("this torch has no cached factory set (torch.utils._device)")
    from rayfleet.replicas.model.loader import load_model
    from tests.model_factory import make_tiny_model

    load_model(make_tiny_model(tmp_path / "m", "llama"), dtype=torch.float32, device="cpu")
    made = _device._device_constructors()
    assert not [f for f in made if f.__module__.startswith(("tests", "conftest"))]
