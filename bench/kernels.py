"""Kernel microbenchmarks for the GPU host: Triton paged attention and the fused elementwise ops.

- copy bandwidth: one large device-to-device copy, bytes read + written (the roofline below).
- paged decode attention (bf16, Llama-3-8B heads: 32 q / 8 kv, head_dim 128, block 16): achieved
  GB/s (KV bytes read / time) at batch 1/32/256 x context 512/4k/32k; configs whose KV cache
  exceeds ``--kv-cap-gb`` are skipped. Block ids are shuffled, so reads are scattered by block.
- prefill attention: one causal full prefill, TFLOP/s of the Triton kernel vs
  ``scaled_dot_product_attention`` on the flash backend (K/V pre-expanded to 32 heads, untimed).
- RMSNorm / fused add + RMSNorm / SiLU-and-mul: GB/s (bytes read + written).

Times are ``triton.testing.do_bench`` medians. Writes bench/results/kernels-<gpu name>.json and
prints a table last.

    python bench/kernels.py            # on the GPU host, < 2 minutes
    python bench/kernels.py --smoke    # tiny sizes through Triton's CPU interpreter
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # the smoke run: kernels go through the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from rayfleet.kernels import attention_ref, ops_ref, triton_attention, triton_ops  # noqa: E402
from rayfleet.kernels.attention_ref import AttentionMetadata  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def timed_ms(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()  # the interpreter: one warm-up, one timed call
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_header(gpu: str, smoke: bool) -> dict[str, Any]:
    return {
        "gpu": gpu,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "smoke": smoke,
    }


def result_path(name: str, gpu: str, smoke: bool, suffix: str = "") -> Path:
    """bench/results/<name>-<gpu>[-smoke]<suffix>.json"""
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    smoke_tag = "-smoke" if smoke else ""
    return Path(__file__).parent / "results" / f"{name}-{tag}{smoke_tag}{suffix}.json"


def write_result(out: Path, result: dict[str, Any], gpu: str, copy_gbs: float) -> None:
    """Write a microbenchmark's JSON and print the header of its table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{gpu}  torch {torch.__version__}  triton {triton.__version__}  -> {out}")
    print(f"copy bandwidth (read + write): {copy_gbs:8.1f} GB/s")


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def decode_batch(
    batch: int, ctx: int, device: str, gen: torch.Generator, new: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    blocks_per = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per + 1
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device=device)
    v_cache = torch.randn(shape, dtype=DTYPE, device=device)
    ids = torch.randperm(num_blocks - 1, generator=gen).to(device) + 1
    tables = ids.view(batch, blocks_per).to(torch.int32)  # [B, blocks_per], shuffled ids
    qsl = [i * new for i in range(batch + 1)]
    q = torch.randn(batch * new, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch * new, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
        block_tables=tables,
        max_query_len=new,
        max_seq_len=ctx,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=[ctx] * batch,
    )
    return q, k_cache, v_cache, meta


def attention_fn(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> Callable[[], torch.Tensor]:
    return functools.partial(triton_attention.paged_attention, q, k_cache, v_cache, meta, 0.088)


def decode_one(batch: int, ctx: int, device: str, gen: torch.Generator) -> dict[str, Any]:
    q, k_cache, v_cache, meta = decode_batch(batch, ctx, device, gen)
    fn = attention_fn(q, k_cache, v_cache, meta)
    ms = timed_ms(fn, device)
    if device != "cuda":  # smoke: the numbers mean nothing, the result must be right
        ref = attention_ref.paged_attention(q, k_cache, v_cache, meta, 0.088)
        torch.testing.assert_close(fn().float(), ref.float(), atol=2e-2, rtol=2e-2)
    elt = q.element_size()
    kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * elt
    splits = triton_attention.choose_num_splits(
        batch, 1, NUM_KV_HEADS, 1, ctx, triton_attention._num_sms(q.device)
    )
    return {
        "batch": batch,
        "context": ctx,
        "kv_bytes": kv_bytes,
        "num_splits": splits,
        "ms": ms,
        "gb_per_s": (kv_bytes + 2 * q.numel() * elt) / ms / 1e6,
    }


def bench_decode(
    device: str, batches: list[int], ctxs: list[int], cap_bytes: int, gen: torch.Generator
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    elt = torch.empty((), dtype=DTYPE).element_size()
    for batch in batches:
        for ctx in ctxs:
            kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * elt
            if kv_bytes > cap_bytes:
                skipped = f"KV cache over {cap_bytes / 1e9:.1f} GB cap"
                rows.append({"batch": batch, "context": ctx, "skipped": skipped})
                continue
            rows.append(decode_one(batch, ctx, device, gen))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def expand_dense(
    cache: torch.Tensor, blocks: torch.Tensor, n: int
) -> torch.Tensor:  # [1, Hq, n, D], K or V of one request with its heads repeated per group
    x = cache[blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n]
    x = x.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=1)
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def prefill_one(n: int, device: str, gen: torch.Generator) -> dict[str, Any]:
    q, k_cache, v_cache, meta = decode_batch(1, n, device, gen, new=n)
    ms = timed_ms(attention_fn(q, k_cache, v_cache, meta), device)
    flops = 4 * NUM_HEADS * HEAD_DIM * n * n / 2  # QK^T and PV, causal half
    row: dict[str, Any] = {"length": n, "ms": ms, "tflops": flops / ms / 1e9}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        blocks = meta.block_tables[0].long()
        qd = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, n, D]
        kd, vd = expand_dense(k_cache, blocks, n), expand_dense(v_cache, blocks, n)
        sdpa = functools.partial(
            torch.nn.functional.scaled_dot_product_attention,
            qd,
            kd,
            vd,
            is_causal=True,
            scale=0.088,
        )
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_ms = timed_ms(sdpa, device)
        row["sdpa_flash_ms"] = sdpa_ms
        row["sdpa_flash_tflops"] = flops / sdpa_ms / 1e9
    return row


def bench_prefill(device: str, lengths: list[int], gen: torch.Generator) -> list[dict[str, Any]]:
    return [prefill_one(n, device, gen) for n in lengths]


def bench_ops(device: str, tokens: int, hidden: int, inter: int) -> list[dict[str, Any]]:
    x = torch.randn(tokens, hidden, dtype=DTYPE, device=device)
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=DTYPE, device=device)
    gu = torch.randn(tokens, 2 * inter, dtype=DTYPE, device=device)
    elt = x.element_size()
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], int]] = [
        (
            "rms_norm",
            lambda: triton_ops.rms_norm(x, w, 1e-5),
            lambda: ops_ref.rms_norm(x, w, 1e-5),
            2 * x.numel() * elt,
        ),
        (
            "fused_add_rms_norm",
            lambda: triton_ops.fused_add_rms_norm(x, r, w, 1e-5),
            lambda: ops_ref.fused_add_rms_norm(x, r, w, 1e-5),
            4 * x.numel() * elt,
        ),
        (
            "silu_and_mul",
            lambda: triton_ops.silu_and_mul(gu),
            lambda: ops_ref.silu_and_mul(gu),
            gu.numel() * elt * 3 // 2,
        ),
    ]
    rows = []
    for name, fn, ref, nbytes in cases:
        ms, ref_ms = timed_ms(fn, device), timed_ms(ref, device)
        rows.append(
            {
                "op": name,
                "tokens": tokens,
                "ms": ms,
                "gb_per_s": nbytes / ms / 1e6,
                "torch_ms": ref_ms,
                "torch_gb_per_s": nbytes / ref_ms / 1e6,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter)")
    ap.add_argument("--kv-cap-gb", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA GPU: run with --smoke (tiny sizes through the Triton interpreter)")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if args.smoke:
        batches, ctxs, lengths = [1, 3], [17, 40], [33]
        copy_bytes, ops_shape = 1 << 20, (8, 256, 512)
    else:
        batches, ctxs, lengths = [1, 32, 256], [512, 4096, 32768], [512, 2048, 8192]
        copy_bytes, ops_shape = 1 << 30, (4096, 4096, 14336)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"

    copy_gbs = copy_bandwidth(device, copy_bytes)
    decode = bench_decode(device, batches, ctxs, int(args.kv_cap_gb * 1e9), gen)
    prefill = bench_prefill(device, lengths, gen)
    ops = bench_ops(device, *ops_shape)
    result = {
        **run_header(gpu, args.smoke),
        "shape": {
            "num_heads": NUM_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
            "dtype": str(DTYPE),
        },
        "copy_gb_per_s": copy_gbs,
        "decode": decode,
        "prefill": prefill,
        "ops": ops,
    }
    write_result(args.out or result_path("kernels", gpu, args.smoke), result, gpu, copy_gbs)
    print("decode attention   batch  context  splits      ms     GB/s  % of copy")
    for r in decode:
        if "skipped" in r:
            print(f"{'':18} {r['batch']:5d} {r['context']:8d}  skipped: {r['skipped']}")
            continue
        print(
            f"{'':18} {r['batch']:5d} {r['context']:8d} {r['num_splits']:7d} {r['ms']:7.3f}"
            f" {r['gb_per_s']:8.1f} {100 * r['gb_per_s'] / copy_gbs:9.1f}"
        )
    print("prefill attention  length      ms  TFLOP/s  sdpa-flash ms  TFLOP/s")
    for r in prefill:
        sd = (
            f"{r['sdpa_flash_ms']:14.3f} {r['sdpa_flash_tflops']:8.1f}"
            if "sdpa_flash_ms" in r
            else "             -        -"
        )
        print(f"{'':18} {r['length']:6d} {r['ms']:7.3f} {r['tflops']:8.1f} {sd}")
    print("elementwise ops            ms     GB/s   torch ms  torch GB/s")
    for r in ops:
        print(
            f"{r['op']:22} {r['ms']:9.3f} {r['gb_per_s']:8.1f} {r['torch_ms']:10.3f}"
            f" {r['torch_gb_per_s']:11.1f}"
        )


if __name__ == "__main__":
    main()
