"""Decode-step A/B on the GPU host: one engine, its decode CUDA graph recaptured per variant.

For each variant and each of ``--prompt-lens``: ``--batch`` requests of that many random
tokens decode ``--output-len`` tokens together (greedy); the steady-state step time (wall, mean
over the steps after the first ``--skip``, best of ``--repeats`` runs) and the decode graph's
replay time (CUDA events: the model forward without LM head and sampling, over the last step's
inputs) are recorded. Variants:

- ``fused``: the shipped kernels; a decode batch's RoPE + KV write run inside the paged-attention
  launch (``rope_write_kv_attention``);
- ``unfused``: ``rope_and_write_kv``, then ``paged_attention`` (two launches per layer).

    python bench/decode_ab.py --batch 1 --prompt-lens 512,3072

Writes bench/results/decode-ab-<gpu>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from rayfleet.benchmarks.offline import machine_info
from rayfleet.cluster.engine_factory import build_engine
from rayfleet.sampling_params import SamplingParams


def decode_step_s(engine, batch: int, prompt_len: int, output_len: int, skip: int) -> float:
    vocab = engine.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for r in range(batch):
        engine.add_request([(i * 7919 + r * 104729) % vocab for i in range(prompt_len)], params)
    stamps = []
    while engine.has_unfinished():
        engine.step()
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :])]
    return statistics.fmean(steps)


def graph_replay_s(runner, batch: int, replays: int = 200) -> float:
    graph = runner.graphs.graphs[batch, 1]
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-shape", default="llama-3-8b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-lens", default="512,3072")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--skip", type=int, default=20, help="decode steps left out at the start")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    engine = build_engine(
        None,
        dict(device="cuda", dtype="bfloat16", max_num_seqs=max(a.batch, 4)),
        model_shape=a.model_shape,
    )
    runner = engine.runner
    max_blocks, max_seq_len = runner.graphs.max_blocks, runner.graphs.max_seq_len
    fused = runner.attn_kernels
    variants = {
        "fused": fused,
        "unfused": dataclasses.replace(fused, rope_write_kv_attention=None),
    }
    rows = []
    for name, kernels in variants.items():
        runner.attn_kernels = kernels
        runner.graphs = None
        torch.cuda.empty_cache()
        runner.enable_cuda_graphs([a.batch], max_blocks, max_seq_len)
        row: dict[str, object] = {"variant": name}
        for n in (int(x) for x in a.prompt_lens.split(",")):
            best = min(
                decode_step_s(engine, a.batch, n, a.output_len, a.skip) for _ in range(a.repeats)
            )
            row[f"step_ms@{n}"] = best * 1e3
            row[f"tok_s@{n}"] = a.batch / best
            # the graph's inputs still hold the last step's batch (context n + output_len)
            row[f"graph_ms@{n}"] = graph_replay_s(runner, a.batch) * 1e3
        rows.append(row)
        print(row, flush=True)
    machine = machine_info("cuda")
    out = Path(a.output_json or f"bench/results/decode-ab-{machine['gpu'].split()[1]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "decode_ab",
                "model": a.model_shape,
                "batch": a.batch,
                "output_len": a.output_len,
                "graph_max_seq_len": max_seq_len,
                "machine": machine,
                "rows": rows,
            },
            indent=2,
        )
    )
    keys = [k for k in rows[0] if k != "variant"]
    print(f"{'variant':10s} " + " ".join(f"{k:>14s}" for k in keys))
    for r in rows:
        print(f"{r['variant']:10s} " + " ".join(f"{r[k]:14.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
