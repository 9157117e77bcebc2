"""`rayfleet bench offline`: engine throughput and latency without the serving path.

Random prompts of ``--input-len`` token ids, ``--output-len`` tokens each (greedy, EOS ignored),
all submitted at once. Reports output and total tokens/s, TTFT and inter-token latency
percentiles, batch-1 decode speed when ``--num-requests 1``, and memory. With ``--compare-hf``
the same workload also runs through `transformers` (``generate`` at batch 1,
``generate_batch`` otherwise) in the same process, on the same weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch


def add_offline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-shape",
        default=None,
        help="random weights of a named real shape instead of --model",
    )
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also run transformers generate/generate_batch on the same workload",
    )
    p.add_argument("--output-json", default=None, help="default: bench/results/offline-*.json")
    p.add_argument("--seed", type=int, default=0, help="workload seed")


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    out = {}
    for p in ps:
        k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
        out[f"p{p}"] = s[k]
    out["mean"] = sum(s) / len(s)
    return out


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["copy_bandwidth_GBps"] = measure_copy_bandwidth()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def measure_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy, counting bytes read + written, median over ``iters``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def decode_step_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: all parameters but the input embedding table (unless
    it is tied to the LM head, which reads it whole)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    if model.lm_head.weight is embed:
        return total
    return total - embed.numel() * embed.element_size()


def make_workload(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(n)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_engine(engine, prompts: list[list[int]], output_len: int, device: str) -> dict[str, Any]:
    from rayfleet.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    _sync(device)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    itl: list[float] = []
    rids = [engine.add_request(p, params) for p in prompts]
    preempted0 = engine.scheduler.num_preemptions_total
    n_out = 0
    steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in outs:
            k = len(o.new_token_ids)
            n_out += k
            if o.request_id not in first:
                first[o.request_id] = now
            elif k:
                itl.append((now - last[o.request_id]) / k)
            last[o.request_id] = now
    _sync(device)
    wall = time.perf_counter() - t0
    n_in = sum(len(p) for p in prompts)
    ttft = [first[r] - t0 for r in rids]
    decode = [
        (output_len - 1) / (last[r] - first[r])
        for r in rids
        if output_len > 1 and last[r] > first[r]
    ]
    return {
        "wall_s": wall,
        "steps": steps,
        "output_tokens": n_out,
        "output_tok_s": n_out / wall,
        "total_tok_s": (n_out + n_in) / wall,
        "requests_s": len(prompts) / wall,
        "ttft_s": percentiles(ttft),
        "itl_s": percentiles(itl),
        "decode_tok_s_per_request": percentiles(decode),
        # requests sent back to waiting for KV blocks (their tokens are recomputed)
        "preemptions": engine.scheduler.num_preemptions_total - preempted0,
    }


def build_engine(a: argparse.Namespace):
    from rayfleet.cli import _engine_kwargs  # the CLI owns the flag -> config mapping
    from rayfleet.cluster.engine_factory import build_engine as build

    kwargs = _engine_kwargs(a)
    if not a.model_shape:
        kwargs["show_progress"] = False
    try:
        engine = build(a.model, kwargs, model_shape=a.model_shape, weights_seed=a.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return engine, engine.arch


def cmd_bench_offline(a: argparse.Namespace) -> int:
    engine, arch = build_engine(a)
    device = a.device
    info = machine_info(device)
    vocab = arch.vocab_size
    if a.warmup_requests:
        run_engine(engine, make_workload(a.warmup_requests, 16, vocab, a.seed + 1), 4, device)
    prompts = make_workload(a.num_requests, a.input_len, vocab, a.seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = run_engine(engine, prompts, a.output_len, device)
    result: dict[str, Any] = {
        "benchmark": "offline",
        "model": a.model_shape or a.model,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "device": device,
        "num_requests": a.num_requests,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "max_num_seqs": a.max_num_seqs,
        "max_num_batched_tokens": a.max_num_batched_tokens,
        "attention_backend": engine.attention_backend,
        "cuda_graphs": engine.runner.graphs is not None,
        "memory_report": engine.memory_report,
        "prefix_caching": not a.no_prefix_caching,
        "kv_cache_dtype": str(engine.kv_cache_dtype).replace("torch.", ""),
        "kv_cache_blocks": engine.num_blocks - 1,
        "kv_cache_tokens": (engine.num_blocks - 1) * a.block_size,
        "machine": info,
        "rayfleet": res,
    }
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        wbytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        result["weight_bytes"] = wbytes
        step_bytes = decode_step_weight_bytes(engine.model)
        result["decode_step_weight_bytes"] = step_bytes
        bw = info["copy_bandwidth_GBps"] * 1e9
        # Batch-1 decode reads every weight once per step, except the input embedding table (one
        # row per token); KV reads are small next to them.
        result["roofline_batch1_tok_s"] = bw / step_bytes
        if a.num_requests == 1:
            d = res["decode_tok_s_per_request"].get("p50", 0.0)
            result["batch1_decode_fraction_of_roofline"] = d / result["roofline_batch1_tok_s"]
    if a.compare_hf:
        from rayfleet.benchmarks.hf_baseline import run_hf

        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            result["transformers"] = run_hf(arch, prompts, a.output_len, device, a.seed, a.model)
        except Exception as e:  # report what failed rather than losing the rayfleet figures
            result["transformers"] = {"error": repr(e)}
    out = (
        Path(a.output_json)
        if a.output_json
        else Path("bench/results")
        / (
            f"offline-{(a.model_shape or Path(a.model).name)}-{a.num_requests}x{a.input_len}-"
            f"{a.output_len}-{info.get('gpu', device).replace(' ', '_')}.json"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    r = res
    line = (
        f"rayfleet: {r['output_tok_s']:.1f} out tok/s, {r['total_tok_s']:.1f} total tok/s, "
        f"TTFT p50 {r['ttft_s'].get('p50', 0) * 1e3:.1f} ms, "
        f"ITL p50 {r['itl_s'].get('p50', 0) * 1e3:.2f} ms"
    )
    print(line)
    hf = result.get("transformers")
    if hf and "output_tok_s" in hf:
        print(f"transformers ({hf['method']}): {hf['output_tok_s']:.1f} out tok/s")
    print(f"wrote {out}")
    return 0
