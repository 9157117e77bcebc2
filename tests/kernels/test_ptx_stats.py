"""bench/ptx_stats.py reads the GEMV's K loop from PTX compiled for sm90 on this CPU: the FMA
kernel converts each FP8 weight twice on its way to an fp32 multiply-add, the MMA path once per
two weights into wgmma (triton_gemv's docstring rests on these counts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

REPO = Path(__file__).resolve().parents[2]


def stats(tmp_path: Path, *args: str) -> dict:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    out = tmp_path / "stats.json"
    # a fresh interpreter without TRITON_INTERPRET (interpreted kernels do not compile)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ptx_stats.py"), *args, "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_fma_loop_converts_each_fp8_weight_twice(tmp_path: Path) -> None:
    s = stats(tmp_path, "--fp8", "--block-n", "4", "--block-k", "2048")
    per = s["per_weight"]
    assert s["weights_per_thread_per_iteration"] == 64
    assert per["cvt.rn.f16x2.e4m3x2"] == 0.5 and per["cvt.f32.f16"] == 1.0
    assert per["fma.rn.f32"] == 1.0


def test_mma_loop_converts_once_per_two_weights_into_wgmma(tmp_path: Path) -> None:
    s = stats(tmp_path, "--fp8", "--mma", "--prologue", "2", "--block-n", "64", "--block-k", "256")
    per = s["per_weight"]
    assert per["cvt.rn.f16x2.e4m3x2"] == 0.5 and "cvt.f32.f16" not in per
    # the products are wgmma's; fp32 multiply-adds left are the prologue's (16 rows a chunk)
    assert per.get("fma.rn.f32", 0.0) < 0.5
    assert any(op.startswith("wgmma.mma_async") for op in per)
