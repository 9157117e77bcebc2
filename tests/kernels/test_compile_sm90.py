"""The Triton kernels compile for an H100 (sm90) on this CPU: triton lowers to PTX and runs its
bundled ptxas without a GPU. The interpreter that runs the other kernel tests skips the
compiler's checks (a kernel reading a non-constexpr global compiles nowhere but runs there), so
the fp8 KV-cache and PDL variants, which no CPU test otherwise compiles, are compiled here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: under TRITON_INTERPRET (set for the test session) kernels are
# interpreted functions that cannot be compiled.
SCRIPT = textwrap.dedent(
    """
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rayfleet.kernels import triton_attention as A, triton_gemv as G, triton_ops as T

    def compile_(kernel, types, consts):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        consts = {(names.index(k),): v for k, v in consts.items()}
        triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32))
        print("compiled", kernel.fn.__name__)

    f8, bf = "*fp8e4nv", "*bf16"
    compile_(T._write_kv_kernel, {"k_ptr": bf, "v_ptr": bf, "k_cache_ptr": f8, "v_cache_ptr": f8,
             "slot_ptr": "*i64"}, {"PAGE": 16, "BLOCK_H": 8, "BLOCK_D": 128})
    rope = {n: bf for n in ("q_ptr", "q_out_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr")}
    compile_(T._rope_write_kv_kernel, {**rope, "k_cache_ptr": f8, "v_cache_ptr": f8,
             "slot_ptr": "*i64"}, {"PAGE": 16, "HALF": 64, "BLOCK_HQ": 32, "BLOCK_HKV": 8,
             "BLOCK_HALF": 64, "PDL": True})
    # (SPLIT, ROPE, PRELOAD): prefill tiles, split + combine kernel, the fused decode variants
    # (split: reading the first KV tile before the PDL wait for small batches, or not)
    for split, rope, preload in ((False, False, False), (True, False, False), (True, True, True),
                                 (True, True, False), (False, True, False)):
        compile_(A._paged_attention_kernel, {"q_ptr": bf, "k_cache_ptr": f8, "v_cache_ptr": f8,
                 "out_ptr": bf, "ws_acc_ptr": "*fp32", "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32",
                 "k_new_ptr": bf, "v_new_ptr": bf, "cos_ptr": bf,
                 "sin_ptr": bf, "slot_ptr": "*i64", "query_start_loc_ptr": "*i32",
                 "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "qk_scale": "fp32"},
                 {"GROUP": 4, "GROUP_P": 4, "BLOCK_Q": 16 if not rope else 4,
                  "BLOCK_M": 64 if not rope else 16, "BLOCK_N": 64, "HEAD_DIM": 128,
                  "PAGE": 16, "SPLIT": split, "ROPE": rope, "PRELOAD": preload,
                  "USE_WINDOW": False,
                  "DOT_PRECISION": "tf32", "DOT_FP32": False, "PDL": True})
    compile_(A._combine_kernel, {"out_ptr": bf, "ws_acc_ptr": "*fp32", "ws_m_ptr": "*fp32",
             "ws_l_ptr": "*fp32"}, {"BLOCK_S": 32, "HEAD_DIM": 128, "PDL": True})
    compile_(T._rms_norm_kernel, {"x_ptr": bf, "res_ptr": bf, "w_ptr": bf, "out_ptr": bf,
             "new_res_ptr": bf, "eps": "fp32"}, {"HAS_RESIDUAL": True, "BLOCK": 4096, "PDL": True})
    gemv = {n: bf for n in ("x_ptr", "res_ptr", "g_ptr", "w_ptr", "b_ptr", "y_ptr", "new_res_ptr")}
    gemv["s_ptr"] = "*fp32"
    for prologue in range(4):
        for w in (bf, f8):  # FP8 weights (quant/fp8.py) with their row scales
            compile_(G._gemv_kernel, {**gemv, "w_ptr": w, "eps": "fp32"}, {"PROLOGUE": prologue,
                     "HAS_BIAS": True, "HAS_SCALE": w == f8, "BLOCK_M": 1, "BLOCK_N": 8,
                     "BLOCK_K": 1024, "PDL": True, "MMA": False, "EMULATE": False})
    for prologue in (0, 1, 2):  # on tensor cores: 16-bit and FP8 weights
        for w in (bf, f8):
            compile_(G._gemv_kernel, {**gemv, "w_ptr": w, "eps": "fp32"},
                     {"PROLOGUE": prologue, "HAS_BIAS": True, "HAS_SCALE": w == f8,
                      "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "PDL": True, "MMA": True,
                      "EMULATE": False})
    compile_(T._quantize_rows_fp8_kernel, {"x_ptr": bf, "q_ptr": f8, "s_ptr": "*fp32"},
             {"BLOCK": 4096})
    """
)


def test_fp8_and_pdl_kernels_compile_for_sm90(tmp_path: Path) -> None:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cache hit would skip the checks
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 24
