"""What the fused GEMV's inner loop costs per weight, read from its PTX, without a GPU.

Triton lowers a kernel to PTX for an H100 (sm90) on any machine (``triton.compile`` with a
``GPUTarget``; no driver needed). This compiles ``triton_gemv._gemv_kernel`` for one
configuration, finds its K loop (the longest backward branch in the PTX) and counts the loop's
instructions by opcode, per weight the loop reads: how this repo found that the FMA kernel
spends two conversions per FP8 weight (``cvt.rn.f16x2.e4m3x2`` for two, ``cvt.f32.f16`` for
each), which capped it at 1.57 T weights/s on the H100, and that the MMA path spends half of one.

    python bench/ptx_stats.py --fp8                   # the FMA kernel, one row, FP8 weights
    python bench/ptx_stats.py --fp8 --mma --block-n 64 --block-k 256 --stages 3

Prints the opcodes by count (per weight) and the kernel's shared memory; ``--json`` writes them.
Run without TRITON_INTERPRET (interpreted kernels do not compile).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from typing import Any

OPCODE = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", re.M)
LABEL = re.compile(r"^(\$L__\w+):", re.M)
BRANCH = re.compile(r"bra(?:\.uni)?\s+(\$L__\w+);")


def loop_body(ptx: str) -> str:
    """The PTX between the label of the longest backward branch and that branch: the K loop."""
    labels = {m.group(1): m.end() for m in LABEL.finditer(ptx)}
    best = ""
    for m in BRANCH.finditer(ptx):
        start = labels.get(m.group(1))
        if start is not None and start < m.start() and m.start() - start > len(best):
            best = ptx[start : m.start()]
    if not best:
        raise ValueError("no loop in this PTX")
    return best


def compile_gemv(
    *,
    prologue: int,
    fp8: bool,
    mma: bool,
    block_m: int,
    block_n: int,
    block_k: int,
    warps: int,
    stages: int,
) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rayfleet.kernels import triton_gemv

    kernel = triton_gemv._gemv_kernel
    bf = "*bf16"
    sig = dict.fromkeys(("x_ptr", "res_ptr", "g_ptr", "b_ptr", "y_ptr", "new_res_ptr"), bf)
    sig |= {"w_ptr": "*fp8e4nv" if fp8 else bf, "s_ptr": "*fp32", "eps": "fp32"}
    consts = {
        "PROLOGUE": prologue,
        "HAS_BIAS": False,
        "HAS_SCALE": fp8,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "PDL": True,
        "MMA": mma,
        "EMULATE": False,
    }
    names = kernel.arg_names
    signature = {n: "constexpr" if n in consts else sig.get(n, "i32") for n in names}
    # As the JIT specializes them at launch: pointers, sizes and strides divisible by 16.
    aligned = [n for n in names if n.endswith("_ptr") or n in ("N", "K") or n.startswith("stride")]
    src = ASTSource(
        kernel,
        signature,
        {(names.index(k),): v for k, v in consts.items()},
        {(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )


def loop_stats(args: argparse.Namespace) -> dict[str, Any]:
    """Opcode counts of the K loop, and per weight it reads (BLOCK_N x BLOCK_K per iteration,
    spread over the program's threads)."""
    block_m = 16 if args.mma else args.rows
    compiled = compile_gemv(
        prologue=args.prologue,
        fp8=args.fp8,
        mma=args.mma,
        block_m=block_m,
        block_n=args.block_n,
        block_k=args.block_k,
        warps=args.warps,
        stages=args.stages,
    )
    counts = collections.Counter(OPCODE.findall(loop_body(compiled.asm["ptx"])))
    weights_per_thread = args.block_n * args.block_k / (32 * args.warps)
    return {
        "config": vars(args) | {"block_m": block_m},
        "shared_bytes": compiled.metadata.shared,
        "weights_per_thread_per_iteration": weights_per_thread,
        "loop_opcodes": dict(counts.most_common()),
        "per_weight": {op: n / weights_per_thread for op, n in counts.most_common()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prologue", type=int, default=0, help="0 none, 1 rms, 2 add_rms, 3 silu")
    p.add_argument("--fp8", action="store_true", help="FP8 weights with row scales")
    p.add_argument("--mma", action="store_true", help="the tensor-core path (rows padded to 16)")
    p.add_argument("--rows", type=int, default=1, help="BLOCK_M of the FMA path (1 or 2)")
    p.add_argument("--block-n", type=int, default=4)
    p.add_argument("--block-k", type=int, default=2048)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--top", type=int, default=16, help="opcodes to print")
    p.add_argument("--json", type=Path, default=None, help="write the stats here")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    top, out = args.top, args.json
    del args.top, args.json
    stats = loop_stats(args)
    if out is not None:
        out.write_text(json.dumps(stats, indent=1, default=str))
    print(
        f"K loop: {stats['weights_per_thread_per_iteration']:g} weights per thread per "
        f"iteration; shared memory {stats['shared_bytes']} bytes"
    )
    print(f"{'opcode':48} {'count':>6} {'per weight':>10}")
    for op, n in list(stats["loop_opcodes"].items())[:top]:
        print(f"{op:48} {n:6d} {stats['per_weight'][op]:10.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
