"""Where a speculative step's time goes, at one batch size and a fixed k: host phases and device
spans per forward.

The synthetic-agreement pair of bench/spec_decode.py (llama-3-8b-shaped target, llama-3.2-1b-shaped
draft, bf16; ``--draft-quantization fp8`` for the draft) with its draft noise calibrated on the
shared path to ``--acceptance`` (greedy: argmax agreement). ``--batch`` prompts of
``--input-len`` random tokens generate ``--output-len`` tokens with exactly ``--k`` drafts per
step, ``--repeats`` times, alternating with the same target without a draft (tok/s of both).

Then one more run with the engine's, scheduler's, runner's and proposer's methods wrapped: the
host wall time of each phase per step (medians; a phase that waits for the device includes the
wait). On CUDA, with greedy sampling, one more under torch.profiler: the kernels up to and
including each Triton argmax pick form one forward with its sampling (the verification, or one
draft forward); each forward's device time is split by kernel name, each kernel counted from the
previous kernel's end to its own end (launches that overlap under PDL are not counted twice),
and the device's idle time before the forward is reported apart.

    python bench/spec_step_profile.py --batch 1 --k 7          # GPU host, about 1.5 minutes
    python bench/spec_step_profile.py --tiny --device cpu      # smoke run (host phases only)

JSON to bench/results/spec-step-<gpu>-b<batch>-k<k>[-fp8].json; a table is printed last.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_decode as sd  # noqa: E402  (bench/spec_decode.py: the pair, engines and runs)
from kernels import result_path, run_header  # noqa: E402  (bench/kernels.py)
from profile_step import PhaseTimer  # noqa: E402  (bench/profile_step.py)

from rayfleet.replicas.spec.adaptive import FixedSpecPolicy  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--acceptance", type=float, default=0.885, help="shared-path level")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draft-quantization", choices=["fp8"], default=None)
    p.add_argument(
        "--no-chain",
        action="store_true",
        help="propose after each verification's result (ModelRunner.chain_proposals off)",
    )
    p.add_argument(
        "--ab-chain",
        action="store_true",
        help="also time --repeats runs each with chained proposals off and on, alternating",
    )
    p.add_argument(
        "--cuda-graph-prefill-tokens",
        type=int,
        default=1024,
        help="engine config: short prefills (the prompt, the draft's catch-up) replay CUDA graphs",
    )
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--output-json", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="one more run under cProfile: the N functions with most own host time",
    )
    return p.parse_args()


def pair_args(a: argparse.Namespace) -> argparse.Namespace:
    """The options spec_decode's build_pair / make_engine read."""
    return argparse.Namespace(
        device=a.device,
        tiny=a.tiny,
        seed=a.seed,
        input_len=a.input_len,
        output_len=a.output_len,
        tau=3.0,
        rank=256,
        draft_quantization=a.draft_quantization,
        cuda_graph_max_batch_size=256,
        cuda_graph_prefill_tokens=a.cuda_graph_prefill_tokens,
    )


def phase_summary(timer: PhaseTimer) -> dict[str, dict[str, float]]:
    """Calls, median and mean milliseconds per phase."""
    return {
        phase: {
            "calls": len(v),
            "median_ms": statistics.median(v) * 1e3,
            "mean_ms": statistics.mean(v) * 1e3,
        }
        for phase, v in timer.calls.items()
    }


def host_profile(run: Callable[[], object], top: int) -> list[dict[str, Any]]:
    """cProfile over ``run()``: the ``top`` functions by own time (ms per call of the run,
    cumulative ms, calls). cProfile slows the host, so shares matter, not absolute times."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "calls": nc,
            "own_ms": round(tt * 1e3, 2),
            "cumulative_ms": round(ct * 1e3, 2),
        }
        for (file, line, name), (_cc, nc, tt, ct, _callers) in rows
    ]


def forward_spans(events: list[Any], target_layers: int) -> list[dict[str, Any]]:
    """Kernels (profiler events, by start) cut after each argmax pick into forwards: each with
    its kind (verification when it has the target's number of attention launches), device time
    split by kernel name (from the previous kernel's end), the idle time before it, and its
    timeline: (name, idle before the kernel, the kernel's own duration) per kernel, in order."""
    out: list[dict[str, Any]] = []
    prev_end: float | None = None
    cur: dict[str, float] = collections.defaultdict(float)
    timeline: list[tuple[str, float, float]] = []
    attention = 0
    idle = 0.0
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        if prev_end is None:
            prev_end = start
        gap = max(start - prev_end, 0.0)  # the device's idle time before this kernel
        if not cur:  # a forward's first kernel: the device was idle until it started
            idle = gap
            prev_end = max(prev_end, start)
        cur[e.name[:48]] += max(end - prev_end, 0.0)
        timeline.append((e.name[:48], round(gap, 1), round(end - start, 1)))
        prev_end = max(prev_end, end)
        attention += "paged_attention" in e.name
        if "argmax_pick" in e.name:
            kind = "verify" if attention >= target_layers else "draft"
            out.append(
                {
                    "kind": kind,
                    "device_us": sum(cur.values()),
                    "idle_before_us": idle,
                    "by_kernel_us": dict(cur),
                    "timeline": timeline,
                }
            )
            cur, attention, idle = collections.defaultdict(float), 0, 0.0
            timeline = []
    return out


def summarize(forwards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind of forward (and the first draft forward after a verification, which holds the
    host's work between the two): count, median device and idle microseconds, the median
    microseconds per kernel name (the 12 largest; a kernel absent from a forward counts 0 there,
    so a warm-up or prefill forward does not set it) and the kernel sequence of the lower-median
    forward by device time: (name, device idle before it, its own duration) in microseconds."""
    kinds: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for i, f in enumerate(forwards):
        kinds[f["kind"]].append(f)
        if f["kind"] == "draft" and i and forwards[i - 1]["kind"] == "verify":
            kinds["first draft after a verification"].append(f)
    out: dict[str, dict[str, Any]] = {}
    for kind, sel in kinds.items():
        names = {name for f in sel for name in f["by_kernel_us"]}
        per_kernel = {
            name: statistics.median(f["by_kernel_us"].get(name, 0.0) for f in sel) for name in names
        }
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
        median_forward = sorted(sel, key=lambda f: f["device_us"])[(len(sel) - 1) // 2]
        out[kind] = {
            "forwards": len(sel),
            "median_device_us": statistics.median(f["device_us"] for f in sel),
            "median_idle_before_us": statistics.median(f["idle_before_us"] for f in sel),
            "median_us_by_kernel": {name: round(us, 1) for name, us in top},
            "median_forward_timeline": median_forward["timeline"],
        }
    return out


def main() -> None:
    a = parse_args()
    pa = pair_args(a)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    target, draft, set_sigma, acceptance = sd.build_pair(pa, dtype)
    greedy = a.temperature == 0.0
    set_sigma(sd.calibrate(acceptance, a.acceptance, greedy))
    rng = random.Random(a.seed)
    vocab = target.arch.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(a.input_len)] for _ in range(a.batch)]
    base = sd.make_engine(pa, target, None, a.batch, 0)
    eng = sd.make_engine(pa, target, draft, a.batch, a.k)
    eng.runner.spec_policy = FixedSpecPolicy(a.k)
    eng.runner.chain_proposals = not a.no_chain
    for e in (base, eng):  # warm-up: graphs, allocator, compiled kernels
        sd.run_engine(e, prompts, min(32, a.output_len), a.device, a.temperature)
    off, on, outs = [], [], []
    for _ in range(a.repeats):
        off.append(sd.run_engine(base, prompts, a.output_len, a.device, a.temperature)[1])
        outs, res = sd.run_engine(eng, prompts, a.output_len, a.device, a.temperature)
        on.append(res)
    spec = sd._spec_summary(outs)
    chain_ab = None
    if a.ab_chain:  # same engine, same prompts: only ModelRunner.chain_proposals differs
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(a.repeats):
            for arm in ("off", "on"):
                eng.runner.chain_proposals = arm == "on"
                res = sd.run_engine(eng, prompts, a.output_len, a.device, a.temperature)[1]
                runs[arm].append(res["output_tok_s"])
        eng.runner.chain_proposals = not a.no_chain
        chain_ab = {
            "off_tok_s": runs["off"],
            "on_tok_s": runs["on"],
            "on_over_off": statistics.median(runs["on"]) / statistics.median(runs["off"]),
        }

    profiled = []
    if a.host_profile:
        profiled = host_profile(
            lambda: sd.run_engine(eng, prompts, a.output_len, a.device, a.temperature),
            a.host_profile,
        )

    phases = PhaseTimer()
    phases.enabled = True
    r = eng.runner
    for obj, name, phase in (
        (eng, "step", "engine.step"),
        (eng.scheduler, "schedule", "scheduler.schedule"),
        (eng.scheduler, "update", "scheduler.update"),
        (eng, "_process", "engine._process (update + outputs)"),
        (r, "execute", "runner.execute"),
        (r, "_prepare", "runner._prepare"),
        (r, "_forward", "runner._forward (launch)"),
        (r, "_sample", "runner._sample (waits for the verification)"),
        (r, "_speculate", "runner._speculate"),
        (r, "_chain", "runner._chain (plans, queues the chained proposal)"),
        (r.proposer, "propose_chained", "proposer.propose_chained"),
        (r.proposer, "propose", "proposer.propose"),
        (r.proposer, "_first_forward", "proposer._first_forward"),
        (r, "rejection_sampler", "runner.rejection_sampler (waits for the verification)"),
        (r, "_resolve_drafts", "runner._resolve_drafts (waits for the draft ids)"),
        (r, "_refresh_draft_flags", "runner._refresh_draft_flags"),
        (r, "_draft_request", "runner._draft_request"),
    ):
        phases.wrap(obj, name, phase)
    if r.proposer.proposal_graphs is not None:
        phases.wrap(r.proposer.proposal_graphs, "run", "proposal_graphs.run")
    sd.run_engine(eng, prompts, a.output_len, a.device, a.temperature)

    forwards: list[dict[str, Any]] = []
    if a.device == "cuda" and greedy:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            sd.run_engine(eng, prompts, a.output_len, a.device, a.temperature)
            torch.cuda.synchronize()
        kernels = sorted(
            (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
            key=lambda e: e.time_range.start,
        )
        forwards = forward_spans(kernels, target.arch.num_layers)

    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    by_kind = summarize(forwards)
    result = {
        **run_header(gpu, a.tiny),
        "benchmark": "spec_step_profile",
        "argv": sys.argv[1:],
        "pair": "synthetic agreement (bench/spec_decode.py): llama-3-8b-shaped target, "
        "llama-3.2-1b-shaped draft",
        "batch": a.batch,
        "k": a.k,
        "temperature": a.temperature,
        "draft_quantization": a.draft_quantization,
        "off_tok_s": [x["output_tok_s"] for x in off],
        "spec_tok_s": [x["output_tok_s"] for x in on],
        "speedup_median": statistics.median(x["output_tok_s"] for x in on)
        / statistics.median(x["output_tok_s"] for x in off),
        "chain_proposals": not a.no_chain,
        "chain_ab": chain_ab,
        **spec,
        "host_phases": phase_summary(phases),
        "host_profile": profiled,
        "forwards_by_kind": by_kind,
        # each forward in order: kind, device us, idle us before it
        "forwards": [
            [f["kind"], round(f["device_us"], 1), round(f["idle_before_us"], 1)] for f in forwards
        ],
    }
    tag = f"-b{a.batch}-k{a.k}" + ("-fp8" if a.draft_quantization else "")
    out = a.output_json or result_path("spec-step", gpu, a.tiny, tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{gpu} -> {out}")
    print(
        f"batch {a.batch}, k {a.k}, T {a.temperature}: speculation {result['speedup_median']:.2f}x "
        f"(acceptance {spec['acceptance_rate']}, mean accepted length "
        f"{spec['mean_accepted_length']})"
    )
    if chain_ab is not None:
        print(
            f"chained proposals on / off: {chain_ab['on_over_off']:.3f}x "
            f"(on {chain_ab['on_tok_s']}, off {chain_ab['off_tok_s']} tok/s)"
        )
    for phase, v in result["host_phases"].items():
        print(f"  host {phase:44s} {v['median_ms']:8.3f} ms median ({v['calls']} calls)")
    for row in profiled[:25]:
        print(
            f"  cProfile {row['function'][:60]:60s} own {row['own_ms']:8.2f} ms "
            f"cum {row['cumulative_ms']:8.2f} ms ({row['calls']} calls)"
        )
    for kind, v in by_kind.items():
        print(
            f"  device {kind:33s} {v['median_device_us']:8.1f} us median, "
            f"idle before it {v['median_idle_before_us']:6.1f} us ({v['forwards']} forwards)"
        )


if __name__ == "__main__":
    main()
