"""Where a step's time goes: host phases vs GPU kernel time, for the engine's steady-state decode.

For each scenario (batch size b, context c): b requests of c random prompt tokens are prefilled,
then ``--steps`` decode steps are timed with the phases of Engine.step separated (schedule,
runner.execute, scheduler.update + outputs), and ``--profile-steps`` more run under
torch.profiler to get the GPU kernel time per step. GPU busy fraction = kernel time / wall time.

    python bench/profile_step.py --model-shape llama-3-8b --scenarios 1x512,64x1024,256x1024

Writes JSON (``--output-json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rayfleet.benchmarks.offline import machine_info
from rayfleet.cluster.engine_factory import build_engine
from rayfleet.sampling_params import SamplingParams


class PhaseTimer:
    """Wraps methods of objects; records the wall seconds of each call per phase name while
    ``enabled``."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}
        self.enabled = False

    @property
    def totals(self) -> dict[str, float]:
        return {phase: sum(v) for phase, v in self.calls.items()}

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.setdefault(phase, []).append(time.perf_counter() - t)

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.calls = {}


def gpu_kernel_seconds(engine, steps: int, table_path: Path | None) -> float:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    if table_path is not None:
        table_path.write_text(prof.key_averages().table(sort_by="device_time_total", row_limit=25))
    total_us = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total_us += evt.device_time
    return total_us / 1e6


def run_scenario(
    engine, timer: PhaseTimer, batch: int, ctx: int, steps: int, prof_steps: int, trace_dir
):
    vocab = engine.arch.vocab_size
    g = torch.Generator().manual_seed(batch * 7919 + ctx)
    # Long enough that no request finishes while measured (early ones decode during the others'
    # prefill); all are aborted afterwards.
    max_len = engine.max_model_len
    params = SamplingParams(temperature=0.0, max_tokens=max_len - ctx - 1, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, vocab, (ctx,), generator=g).tolist(), params)
    # Prefill until every request decodes.
    reqs = engine.scheduler.requests.values()
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in reqs
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    timer.reset()
    timer.enabled = True
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    timer.enabled = False
    running = len(engine.scheduler.running)
    phases = {k: v / steps * 1e3 for k, v in timer.totals.items()}
    t = time.perf_counter()
    table = Path(trace_dir) / f"kernels-{batch}x{ctx}.txt" if trace_dir else None
    kernel_s = gpu_kernel_seconds(engine, prof_steps, table)
    prof_wall = time.perf_counter() - t
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    return {
        "running": running,
        "batch": batch,
        "context": ctx,
        "step_ms_p50": statistics.median(walls) * 1e3,
        "step_ms_mean": statistics.fmean(walls) * 1e3,
        "phases_ms": phases,
        "gpu_kernel_ms_per_step": kernel_s / prof_steps * 1e3,
        "gpu_busy_fraction": kernel_s / prof_wall,
        "tok_s": batch / statistics.fmean(walls),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-shape", default="llama-3-8b")
    p.add_argument("--scenarios", default="1x512,64x1024,256x1024")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--cuda-graph-max-batch-size", type=int, default=256)
    p.add_argument("--overlap", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--trace-dir", default=None, help="write per-scenario kernel tables here")
    p.add_argument("--output-json", default="bench/results/profile-step.json")
    a = p.parse_args()
    engine = build_engine(
        None,
        dict(
            device="cuda",
            dtype="bfloat16",
            max_model_len=a.max_model_len,
            max_num_seqs=a.max_num_seqs,
            kv_cache_dtype=a.kv_cache_dtype,
            cuda_graph_max_batch_size=a.cuda_graph_max_batch_size,
            overlap_scheduling={"auto": None, "on": True, "off": False}[a.overlap],
        ),
        model_shape=a.model_shape,
    )
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "execute", "execute")
    timer.wrap(engine.scheduler, "update", "update")
    timer.wrap(engine.runner, "launch", "launch")
    timer.wrap(engine.runner, "resolve", "resolve")
    timer.wrap(engine, "_process", "process")
    rows = []
    for sc in a.scenarios.split(","):
        b, c = (int(x) for x in sc.split("x"))
        rows.append(run_scenario(engine, timer, b, c, a.steps, a.profile_steps, a.trace_dir))
    result = {
        "benchmark": "profile_step",
        "model": a.model_shape,
        "overlap": getattr(engine, "overlap", None),
        "kv_cache_dtype": str(engine.kv_cache_dtype).replace("torch.", ""),
        "cuda_graph_max_batch_size": a.cuda_graph_max_batch_size,
        "machine": machine_info("cuda"),
        "rows": rows,
    }
    Path(a.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output_json).write_text(json.dumps(result, indent=2))
    print(
        f"{'batch':>5} {'run':>4} {'ctx':>5} {'step ms':>8} {'gpu ms':>7} {'busy':>5} "
        f"{'tok/s':>8}  phases ms"
    )
    for r in rows:
        ph = " ".join(f"{k}={v:.2f}" for k, v in r["phases_ms"].items())
        print(
            f"{r['batch']:5d} {r['running']:4d} {r['context']:5d} {r['step_ms_mean']:8.2f} "
            f"{r['gpu_kernel_ms_per_step']:7.2f} {r['gpu_busy_fraction']:5.2f} "
            f"{r['tok_s']:8.1f}  {ph}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
