"""Small-M GEMV microbenchmark: the fused ``triton_gemv.gemv`` against what it replaces.

For each linear of a llama-3-8b and a llama-3.2-1b decoder layer (and the LM head), at M = 1 and 2
rows (``--rows``: up to 16), with the op the decoder runs in front of it (add + RMSNorm before qkv
and gate_up, SiLU-and-mul before down):

- unfused: the Triton norm / SiLU kernel, then ``F.linear`` (cuBLAS), as the model runs past the
  GEMV's rows;
- gemv: one ``triton_gemv.gemv`` call with the op fused in, run by the kernel it picks (``kernel``:
  the FMA or the tensor-core MMA kernel, or "unfused" where neither takes the rows), with the
  shipped configs (or, with ``--sweep``, the best of that kernel's config grid, which is how
  ``triton_gemv._CONFIGS`` and ``_mma_config`` were chosen);
  launched with programmatic dependent launch where the GPU has it (Hopper), as the engine does,
  and once more without (``gemv_no_pdl_us``). Back-to-back launches on different weights are
  what a decode step does, so PDL's overlap of one launch's tail with the next one's weight
  reads shows in the per-call time.

Weights are bf16, or with ``--fp8`` float8_e4m3fn with per-row scales (quant/fp8.py; "unfused"
is then the norm / SiLU kernel and ``fp8_linear``'s FP8 tensor-core path, the gemv reads the FP8
bytes; ``--models`` picks the model shapes). Each timed call cycles through enough weight
copies (> 200 MB) that none is in L2. Times are ``triton.testing.do_bench_cudagraph`` medians
(per call, launch overhead captured away as in the engine's decode graphs). GB/s counts weight
bytes. Writes bench/results/gemv-<gpu>[-fp8].json and prints a table last.

    python bench/gemv.py            # on the GPU host, ~1 minute (--sweep: ~4)
    python bench/gemv.py --smoke    # tiny shapes through Triton's CPU interpreter
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the smoke run: kernels go through the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from kernels import copy_bandwidth, result_path, run_header, write_result  # noqa: E402  (bench/kernels.py)

from rayfleet import kernels  # noqa: E402
from rayfleet.kernels import fp8_linear, triton_gemv, triton_ops  # noqa: E402
from rayfleet.replicas.quant.fp8 import quantize_weight  # noqa: E402

DTYPE = torch.bfloat16
# (model, layer, N, K, prologue)
SHAPES = [
    (model, layer, n, k, pro)
    for model, h, inter, q_kv in (("8b", 4096, 14336, 6144), ("1b", 2048, 8192, 3072))
    for layer, n, k, pro in (
        ("qkv", q_kv, h, "add_rms_norm"),
        ("o", h, h, "none"),
        ("gate_up", 2 * inter, h, "add_rms_norm"),
        ("down", h, inter, "silu_and_mul"),
        ("lm_head", 128256, h, "none"),
    )
]
SMOKE_SHAPES = [("tiny", "qkv", 48, 64, "add_rms_norm"), ("tiny", "down", 32, 96, "silu_and_mul")]
SWEEP = list(itertools.product([2, 4, 8, 16], [512, 1024, 2048], [4, 8], [2, 4]))
SWEEP_MMA = [
    *itertools.product([32, 64, 128], [128, 256, 512], [4], [3, 4]),
    (128, 256, 8, 3),
    (128, 128, 8, 4),
    (16, 512, 4, 4),
    (16, 256, 4, 6),
]


def timed_ms(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def one(
    model: str,
    layer: str,
    n: int,
    k: int,
    pro: str,
    m: int,
    device: str,
    sweep: bool,
    fp8: bool = False,
) -> dict[str, Any]:
    itemsize = 1 if fp8 else DTYPE.itemsize
    copies = max(1, int(200e6 // (n * k * itemsize)) + 1) if device == "cuda" else 1
    ws = [torch.randn(n, k, dtype=DTYPE, device=device) / k**0.5 for _ in range(copies)]
    scales: list[torch.Tensor | None] = [None] * copies
    if fp8:
        ws, scales = map(list, zip(*(quantize_weight(w) for w in ws)))  # type: ignore[assignment]
    fast = fp8_linear.supported(torch.device(device))
    linear = kernels.get("fp8_linear", "scaled_mm" if fast else kernels.REFERENCE)
    x = torch.randn(m, 2 * k if pro == "silu_and_mul" else k, dtype=DTYPE, device=device)
    r = torch.randn(m, k, dtype=DTYPE, device=device)
    g = torch.randn(k, dtype=DTYPE, device=device)
    kw: dict[str, Any] = (
        {"norm_weight": g, "eps": 1e-5, "residual": r} if pro == "add_rms_norm" else {}
    )

    def unfused() -> None:
        for w, s in zip(ws, scales):
            a = x
            if pro == "add_rms_norm":
                a, _ = triton_ops.fused_add_rms_norm(x, r, g, 1e-5)
            elif pro == "silu_and_mul":
                a = triton_ops.silu_and_mul(x)
            if s is None:
                F.linear(a, w)
            else:
                linear(a, w, s)

    def fused() -> None:
        for w, s in zip(ws, scales):
            triton_gemv.gemv(x, w, prologue=pro, weight_scale=s, **kw)

    unfused_ms = timed_ms(unfused, device) / copies
    triton_ops._pdl_device.cache_clear()
    os.environ["RAYFLEET_PDL"] = "0"
    no_pdl_ms = timed_ms(fused, device) / copies
    del os.environ["RAYFLEET_PDL"]
    triton_ops._pdl_device.cache_clear()
    kernel = triton_gemv.kernel_for(m, n, triton_gemv._PROLOGUE_IDS[pro], DTYPE, fp8)
    configs: list[Any] = [None]
    if sweep and kernel == "fma":
        configs = [c for c in SWEEP if c[0] * c[1] * m <= 32768]
    elif sweep and kernel == "mma":
        configs = SWEEP_MMA
    best: tuple[float, Any] | None = None
    for cfg in configs:
        triton_gemv._CONFIG_OVERRIDE = cfg if kernel == "fma" else None
        triton_gemv._MMA_CONFIG_OVERRIDE = cfg if kernel == "mma" else None
        try:
            ms = timed_ms(fused, device) / copies
        except triton.runtime.errors.OutOfResources:  # a config past the SM's shared memory
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    triton_gemv._CONFIG_OVERRIDE = triton_gemv._MMA_CONFIG_OVERRIDE = None
    assert best is not None
    nbytes = n * k * itemsize
    return {
        "model": model,
        "weight_dtype": "fp8_e4m3" if fp8 else "bf16",
        "layer": layer,
        "m": m,
        "n": n,
        "k": k,
        "prologue": pro,
        "kernel": kernel,
        "weight_mb": nbytes / 1e6,
        "unfused_us": unfused_ms * 1e3,
        "gemv_us": best[0] * 1e3,
        "gemv_no_pdl_us": no_pdl_ms * 1e3,
        "gemv_gb_per_s": nbytes / best[0] / 1e6,
        "unfused_gb_per_s": nbytes / unfused_ms / 1e6,
        "config": best[1] if sweep else "shipped",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    ap.add_argument("--sweep", action="store_true", help="best of a config grid per shape")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/)")
    ap.add_argument("--fp8", action="store_true", help="FP8 weights with per-row scales")
    ap.add_argument("--models", default="8b,1b", help="model shapes to run (8b, 1b)")
    ap.add_argument("--rows", default="1,2", help="row counts M to run (1-16)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA GPU: run with --smoke (tiny sizes through the Triton interpreter)")
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    copy_gbs = copy_bandwidth(device, 1 << 30 if device == "cuda" else 1 << 20)
    models = set(args.models.split(","))
    shapes = SMOKE_SHAPES if args.smoke else [s for s in SHAPES if s[0] in models]
    ms = [int(m) for m in args.rows.split(",")]
    rows = [one(*shape, m, device, args.sweep, args.fp8) for m in ms for shape in shapes]
    per_layer = {}
    for model in sorted({r["model"] for r in rows}):
        for m in ms:
            sel = [r for r in rows if r["model"] == model and r["m"] == m]
            per_layer[f"{model}-m{m}"] = {
                key: sum(r[key] for r in sel if r["layer"] != "lm_head")
                for key in ("unfused_us", "gemv_us")
            }
    result = {
        **run_header(gpu, args.smoke),
        "copy_gb_per_s": copy_gbs,
        "rows": rows,
        "decoder_layer_linears_us": per_layer,
    }
    tag = ("-fp8" if args.fp8 else "") + ("-sweep" if args.sweep else "")
    tag += "" if args.rows == "1,2" else "-rows" + args.rows.replace(",", "-")
    out = args.out or result_path("gemv", gpu, args.smoke, tag)
    write_result(out, result, gpu, copy_gbs)
    print(
        "model layer   M      N      K  prologue     kernel  unfused us  no-PDL us  gemv us  GB/s"
        "  %copy"
    )
    for r in rows:
        print(
            f"{r['model']:5} {r['layer']:8} {r['m']:2d} {r['n']:6d} {r['k']:6d}  "
            f"{r['prologue']:12} {r['kernel']:7} {r['unfused_us']:10.1f} "
            f"{r['gemv_no_pdl_us']:10.1f} "
            f"{r['gemv_us']:8.1f} {r['gemv_gb_per_s']:5.0f} "
            f"{100 * r['gemv_gb_per_s'] / copy_gbs:6.1f}  {r['config']}"
        )
    for key, v in per_layer.items():
        print(
            f"decoder layer linears {key}: unfused {v['unfused_us']:.1f} us, "
            f"gemv {v['gemv_us']:.1f} us"
        )


if __name__ == "__main__":
    main()
