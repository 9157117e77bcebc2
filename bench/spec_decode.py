"""Speculative decoding benchmark (GPU host; one H100 run takes about 4-5 minutes, and
``--budget-s`` skips whatever would start after 390 s so it stays under 7).

Part 1, acceptance: the demo target/draft pair (``--demo-target`` / ``--demo-draft``, default the
bundled ``rayfleet/models/demo/{target,draft}``; skipped when absent) generates from a few Python
prompts with a fixed k = 1..8 drafts per step; reports acceptance rate, mean accepted length
(tokens per verifying step) and acceptance by draft position, greedy and at temperature 1.

Part 2, speed at a realistic cost ratio: an 8B-shaped target (``MODEL_SHAPES['llama-3-8b']``) with
a 1B-shaped draft (``['llama-3.2-1b']``, lm_head untied: same FLOPs), bf16, random weights built
so that agreement is controlled ("synthetic agreement" in the JSON):

    both models: embed[x] = sqrt(H) * A u_x          (A: H x r orthonormal columns, |u_x| = 1)
                 layers' o_proj / down_proj scaled by 1e-3 -> the residual stream ~= embed[x]
    target:      lm_head[y] = tau / sqrt(H_t) * A_t v_y                  -> logits ~= tau v_y.u_x
    draft:       lm_head[y] = tau / sqrt(H_d) * A_d (v_y + sigma e_y)    -> logits ~= tau (v+se).u_x

so every layer still does its full work, but next-token logits are (nearly) a function of the
current token, shared by both models, and the draft's noise sigma sets the acceptance rate: at
temperature 1 the sampled rate sum_y min(p, q), greedy the argmax agreement. Calibration: per
level and batch size, bisection on sigma for the acceptance measured through the engine on that
run's prompts (the shared path's own rate is higher: it leaves out bf16 rounding and the layers'
residual noise; both are reported). Levels: greedy at the demo pair's acceptance, and temperature 1
at ``--acceptance`` (per-token rates, one draft per step). The demo pair's greedy acceptance is
its mean accepted length at k = 8 (5.79 tokens per verification on the H100; its i.i.d. rate a,
1 + a + ... + a^8 = 5.79, is 0.885; ``--greedy-acceptance`` gives a when part 1 did not run), and
the greedy level matches that length at k = ``--num-speculative-tokens`` drafts per step. The
synthetic pair is not i.i.d. along one greedy path: matching its one-draft rate to a instead
(``--greedy-calibration k1``, every run before 2026-11-25) put that rate at 0.88, below the demo
pair's own one-draft rate (0.919), and gave 4.2-4.4 tokens per verification at batch 1 (one
128-token path) against the demo pair's 5.79. Matched on the length (H100, 2026-11-25: 5.73 at
k = 8), the batch-1 run's first-draft acceptance is 0.91, the demo pair's within noise.

For each level and batch size (``--batch-sizes``), output tokens/s (prefill included; the median
of ``--repeats`` runs, all of them in the JSON) with
speculation (the adaptive policy with at most ``--num-speculative-tokens`` drafts, and each fixed
k of ``--fixed-k``) and without (no draft loaded), and the speedup. One engine with the draft and
one without serve every run (CUDA graphs for decode, verification and draft steps are captured
once per engine); one adaptive policy serves every adaptive run, as a replica keeps its own: its
cost curves (learnt in a short warm-up pass), sync overhead and probe schedule carry over; its
per-request statistics and counters start fresh every run, its replica-wide acceptance rate at
the level's measured rate (``--cold-policy``: a fresh policy per run, exploration included).

``--draft-quantization fp8`` quantizes both pairs' drafts at load (engine option
``draft_quantization``; its calibration re-quantizes the draft's head in place): the targets and
the speculation-off baseline stay bf16.

JSON to ``bench/results/spec-<date>.json``; a PNG plot (speedup vs acceptance per batch size,
adaptive policy) beside it when matplotlib imports; a summary table is printed last. ``--tiny``
runs everything on small shapes (CPU smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rayfleet.config import EngineConfig
from rayfleet.replicas.llm_engine import Engine
from rayfleet.replicas.model import MODEL_SHAPES, build_random_model
from rayfleet.replicas.model.arch import ModelArchConfig
from rayfleet.replicas.spec.adaptive import (
    AcceptanceTracker,
    AdaptiveSpecPolicy,
    FixedSpecPolicy,
    PolicyStats,
)
from rayfleet.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n",
    "    for i, line in enumerate(lines):\n",
    "def read_config(path):\n    with open(path) as f:\n",
    "try:\n    import json\nexcept ImportError:\n",
    "    def __repr__(self):\n        return ",
    "def parse_args():\n    parser = argparse.ArgumentParser(",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--demo-target", default=str(REPO / "rayfleet/models/demo/target"))
    p.add_argument("--demo-draft", default=str(REPO / "rayfleet/models/demo/draft"))
    p.add_argument("--demo-max-k", type=int, default=8)
    p.add_argument("--demo-output-len", type=int, default=96)
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--acceptance", default="0.5,0.7,0.9", help="temperature-1 levels")
    p.add_argument(
        "--greedy-acceptance",
        type=float,
        default=0.885,
        help="greedy level when the demo part did not run (else the demo pair's rate; 0.885 "
        "on the H100, bench/results/spec-adaptive-H100.json)",
    )
    p.add_argument(
        "--greedy-calibration",
        choices=["accepted-length", "k1"],
        default="accepted-length",
        help="greedy level: match the demo pair's mean accepted length at "
        "--num-speculative-tokens drafts (the i.i.d. length of its rate), or the per-token rate "
        "at one draft per step (before 2026-11-25)",
    )
    p.add_argument(
        "--no-chain",
        action="store_true",
        help="propose after each verification's result (ModelRunner.chain_proposals off)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=8)
    p.add_argument("--fixed-k", default="2,4,8", help="fixed-k policies to compare ('' for none)")
    p.add_argument("--cold-policy", action="store_true", help="fresh cost curves every run")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per measurement (baseline and speculative alike); the median is reported",
    )
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tau", type=float, default=3.0, help="logit scale of the shared path")
    p.add_argument("--rank", type=int, default=256, help="dimension r of the shared path")
    p.add_argument("--budget-s", type=float, default=390.0, help="skip what would start later")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--parts", default="demo,speed", help="which parts to run: demo, speed")
    p.add_argument(
        "--cuda-graph-max-batch-size",
        type=int,
        default=256,
        help="engine config: CUDA graphs up to this batch (0 = eager)",
    )
    p.add_argument(
        "--cuda-graph-prefill-tokens",
        type=int,
        default=1024,
        help="engine config: short prefills (prompts, the draft's catch-up) replay CUDA graphs",
    )
    p.add_argument(
        "--draft-quantization",
        choices=["fp8"],
        default=None,
        help="quantize the draft's weights (engine option draft_quantization; target stays 16-bit)",
    )
    p.add_argument("--output-json", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _spec_summary(outs) -> dict[str, Any]:
    steps = sum(o.spec.num_steps for o in outs)
    drafted = sum(o.spec.num_drafted for o in outs)
    accepted = sum(o.spec.num_accepted for o in outs)
    width = max((len(o.spec.drafted_by_position) for o in outs), default=0)
    by_pos_d, by_pos_a = [0] * width, [0] * width
    for o in outs:
        for j, (d, acc) in enumerate(zip(o.spec.drafted_by_position, o.spec.accepted_by_position)):
            by_pos_d[j] += d
            by_pos_a[j] += acc
    return {
        "verify_steps": steps,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": (accepted + steps) / steps if steps else None,
        # Share of drafted j-th tokens accepted (drafts after a rejection count as drafted).
        "acceptance_by_position": [a / d if d else None for a, d in zip(by_pos_a, by_pos_d)],
        # P(j-th accepted | the j-1 before it accepted): the per-token rate alpha, position by
        # position (position 1 is the plain per-token acceptance; exact at a fixed k).
        "conditional_acceptance_by_position": [
            a / prev if prev else None
            for a, prev in zip(by_pos_a, [by_pos_d[0] if width else 0] + by_pos_a[:-1])
        ],
    }


# ---- part 1: the demo pair ---------------------------------------------------------------------
def bench_demo(a: argparse.Namespace) -> dict[str, Any] | None:
    target, draft = Path(a.demo_target), Path(a.demo_draft)
    if not (target / "config.json").exists() or not (draft / "config.json").exists():
        return {"skipped": f"demo pair not found at {target} / {draft}"}
    from rayfleet.llm import LLM

    results: dict[str, Any] = {"target": str(target), "draft": str(draft), "by_k": {}}
    llm = LLM(
        str(target),
        device=a.device,
        draft_model=str(draft),
        num_speculative_tokens=a.demo_max_k,
        max_model_len=1024,
        draft_quantization=a.draft_quantization,
    )
    for temperature in (0.0, 1.0):
        rows = {}
        for k in range(1, a.demo_max_k + 1):
            llm.engine.runner.spec_policy = FixedSpecPolicy(k)
            params = SamplingParams(
                temperature=temperature, max_tokens=a.demo_output_len, ignore_eos=True, seed=1
            )
            t0 = time.perf_counter()
            outs = llm.generate(DEMO_PROMPTS, params)
            rows[k] = {**_spec_summary(outs), "wall_s": time.perf_counter() - t0}
            print(
                f"demo T={temperature} k={k}: {rows[k]['acceptance_rate']:.3f} accepted, "
                f"{rows[k]['mean_accepted_length']:.2f} tokens/step"
            )
        results["by_k"][f"temperature={temperature}"] = rows
    del llm
    _free(a.device)
    return results


# ---- part 2: 8B + 1B with controlled agreement --------------------------------------------------
def shapes(tiny: bool) -> tuple[ModelArchConfig, ModelArchConfig]:
    t = MODEL_SHAPES["llama-3-8b"]
    d = dataclasses.replace(MODEL_SHAPES["llama-3.2-1b"], tie_word_embeddings=False)
    if tiny:
        small = dict(vocab_size=2048, max_position_embeddings=2048, sliding_window_layers=())
        t = dataclasses.replace(
            t,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            intermediate_size=512,
            **small,
        )
        d = dataclasses.replace(
            d,
            hidden_size=128,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=64,
            intermediate_size=256,
            rope_scaling=None,
            **small,
        )
    return t, d


@torch.no_grad()
def build_pair(a: argparse.Namespace, dtype: torch.dtype):
    """Target and draft sharing one token -> next-token path (module docstring); returns the
    models and a function sigma -> draft lm_head (applied in place)."""
    t_arch, d_arch = shapes(a.tiny)
    dev = torch.device(a.device)
    max_pos = a.input_len + a.output_len + 64
    target = build_random_model(t_arch, dtype, dev, seed=a.seed, max_positions=max_pos)
    draft = build_random_model(d_arch, dtype, dev, seed=a.seed + 1, max_positions=max_pos)
    gen = torch.Generator(device=dev)
    gen.manual_seed(a.seed + 2)
    vocab, r = t_arch.vocab_size, min(a.rank, d_arch.hidden_size)
    u = torch.randn(vocab, r, device=dev, generator=gen)
    u /= u.norm(dim=1, keepdim=True)  # |u_x| = 1
    v = torch.randn(vocab, r, device=dev, generator=gen)
    e = torch.randn(vocab, r, device=dev, generator=gen)
    bases = {}
    for name, m in (("target", target), ("draft", draft)):
        h = m.arch.hidden_size
        basis, _ = torch.linalg.qr(torch.randn(h, r, device=dev, generator=gen))  # [H, r]
        bases[name] = basis
        m.model.embed_tokens.weight.copy_((h**0.5) * u @ basis.T)
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-3)
            layer.mlp.down_proj.weight.mul_(1e-3)
    ht, hd = t_arch.hidden_size, d_arch.hidden_size
    target.lm_head.weight.copy_(a.tau / ht**0.5 * v @ bases["target"].T)

    def set_sigma(sigma: float) -> None:
        w = a.tau / hd**0.5 * (v + sigma * e) @ bases["draft"].T
        head = draft.lm_head
        if hasattr(head, "set_weight"):  # an FP8 draft (quant/fp8.py): re-quantized in place
            head.set_weight(w)
        else:
            head.weight.copy_(w)

    def acceptance(sigma: float, greedy: bool = False, n: int = 512) -> float:
        """On the shared path, averaged over n tokens: sum_y min(p, q) (temperature 1), or how
        often the argmaxes agree (greedy)."""
        xs = torch.randint(0, vocab, (n,), device=dev, generator=gen)
        lp = a.tau * u[xs] @ v.T
        lq = a.tau * u[xs] @ (v + sigma * e).T
        if greedy:
            return float((lp.argmax(-1) == lq.argmax(-1)).float().mean())
        return float(torch.minimum(lp.softmax(-1), lq.softmax(-1)).sum(-1).mean())

    return target, draft, set_sigma, acceptance


def calibrate(acceptance, want: float, greedy: bool) -> float:
    lo, hi = 0.0, 4.0
    for _ in range(25):
        mid = (lo + hi) / 2
        if acceptance(mid, greedy) > want:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def calibrate_on_engine(
    eng: Engine,
    prompts: list[list[int]],
    set_sigma,
    temperature: float,
    want: float,
    sigma_hi: float,
    output_len: int,
    device: str,
    steps: int = 6,
    k: int = 1,
) -> tuple[float, float]:
    """The draft noise sigma in [0, sigma_hi] whose acceptance, measured through the engine on
    these prompts, is closest to ``want`` (bisection; acceptance falls as sigma grows): with
    ``k = 1`` one draft per step, so the position-1 acceptance (the per-token rate); with
    k > 1, k drafts per step and ``want`` is the mean accepted length (tokens per verifying
    step). The shared-path calibration leaves out the models' bf16 rounding and residual noise,
    which cost agreement, and a greedy run visits one fixed path of tokens per prompt: measured
    on the run's own prompts, the level is the one the run sees. Returns (sigma, its measured
    acceptance)."""
    eng.runner.spec_policy = FixedSpecPolicy(k)
    stat = "acceptance_rate" if k == 1 else "mean_accepted_length"
    lo, hi = 0.0, sigma_hi
    best = (sigma_hi, 0.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        set_sigma(mid)
        outs, _ = run_engine(eng, prompts, output_len, device, temperature)
        rate = _spec_summary(outs)[stat] or 0.0
        if abs(rate - want) < abs(best[1] - want):
            best = (mid, rate)
        if rate > want:
            lo = mid
        else:
            hi = mid
    set_sigma(best[0])
    return best


def iid_length(rate: float, k: int) -> float:
    """The mean accepted length at k drafts of an i.i.d. per-draft rate: 1 + a + ... + a^k."""
    return sum(rate**j for j in range(k + 1))


def iid_rate(mean_accepted_length: float, k: int) -> float:
    """The per-draft rate a with 1 + a + ... + a^k = mean_accepted_length (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if iid_length(mid, k) < mean_accepted_length:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def run_engine(
    engine: Engine, prompts: list[list[int]], output_len: int, device: str, temperature: float
):
    params = SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True)
    _sync(device)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    outs = []
    steps = 0
    while engine.has_unfinished():
        outs.extend(o for o in engine.step() if o.finished)
        steps += 1
    _sync(device)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    return outs, {
        "wall_s": wall,
        "steps": steps,
        "output_tokens": n_out,
        "output_tok_s": n_out / wall,
    }


def paired_median(
    base: Engine,
    spec: Engine,
    prompts: list[list[int]],
    output_len: int,
    device: str,
    temperature: float,
    repeats: int,
):
    """Speculation off and on, run by turns (off, on, off, on, ...) so that drift in the
    device's speed (clocks, another engine's memory) cannot favour either: the off engine's
    median result, and the on engine's median run (its outputs and result)."""
    offs, ons = [], []
    for _ in range(repeats):
        offs.append(run_engine(base, prompts, output_len, device, temperature)[1])
        ons.append(run_engine(spec, prompts, output_len, device, temperature))
    offs.sort(key=lambda r: r["output_tok_s"])
    ons.sort(key=lambda r: r[1]["output_tok_s"])
    off = {**offs[len(offs) // 2], "runs_tok_s": [r["output_tok_s"] for r in offs]}
    outs, on = ons[len(ons) // 2]
    return off, outs, {**on, "runs_tok_s": [r[1]["output_tok_s"] for r in ons]}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_engine(a, target, draft, batch: int, k: int) -> Engine:
    per_seq = a.input_len + a.output_len + k + 16
    kw: dict[str, Any] = dict(
        dtype=str(next(target.parameters()).dtype).replace("torch.", ""),
        device=a.device,
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(8192, batch * (k + 1)),
        enable_prefix_caching=False,
        show_progress=False,
        num_blocks=batch * -(-per_seq // 16) + 8,
        # Within the RoPE tables build_pair made (input + output + 64 positions).
        max_model_len=a.input_len + a.output_len + 32,
    )
    if draft is not None:
        kw["num_speculative_tokens"] = k
        kw["draft_quantization"] = a.draft_quantization
    kw["cuda_graph_max_batch_size"] = a.cuda_graph_max_batch_size
    kw["cuda_graph_prefill_tokens"] = a.cuda_graph_prefill_tokens
    config = EngineConfig.from_kwargs("<random llama-3-8b>", **kw)
    return Engine(config, model=target, draft_model=draft)


def _graph_report(eng: Engine) -> dict[str, Any]:
    out: dict[str, Any] = {}
    proposer = eng.runner.proposer
    for name, g in (("target", eng.runner.graphs), ("draft", proposer and proposer.graphs)):
        if g is not None:
            out[name] = {
                "graphs": len(g.graphs),
                "query_lens": {str(q): sizes[-1] for q, sizes in g.sizes_by_q.items()},
                "memory_bytes": g.memory_bytes,
            }
    whole = proposer and proposer.proposal_graphs
    if whole is not None:
        out["draft_proposals"] = {
            "graphs": len(whole.graphs),
            "batch_sizes": whole.sizes,
            "max_k": whole.max_k,
            "memory_bytes": whole.memory_bytes,
        }
    return out


class Budget:
    def __init__(self, t_start: float, seconds: float) -> None:
        self.t_start, self.seconds = t_start, seconds

    def left(self) -> bool:
        return time.perf_counter() - self.t_start < self.seconds


def bench_speed(a: argparse.Namespace, demo_rate: float | None, budget: Budget) -> dict[str, Any]:
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    target, draft, set_sigma, acceptance = build_pair(a, dtype)
    vocab = target.arch.vocab_size
    batches = [int(b) for b in a.batch_sizes.split(",")]
    k_max = a.num_speculative_tokens
    fixed = [int(k) for k in a.fixed_k.split(",") if k.strip()]
    greedy_rate = round(demo_rate, 3) if demo_rate else a.greedy_acceptance
    # (temperature, target acceptance): greedy at the demo pair's rate first (the headline).
    levels = [(0.0, greedy_rate)] + [(1.0, float(x)) for x in a.acceptance.split(",")]
    temps = sorted({t for t, _ in levels})
    rng = random.Random(a.seed)
    prompts = {
        b: [[rng.randrange(vocab) for _ in range(a.input_len)] for _ in range(b)] for b in batches
    }
    out: dict[str, Any] = {
        "pair": "synthetic agreement: llama-3-8b-shaped target, llama-3.2-1b-shaped draft "
        "(lm_head untied), random weights with a shared token->next-token path",
        "tiny_shapes": a.tiny,
        "dtype": str(dtype).replace("torch.", ""),
        "tau": a.tau,
        "rank": a.rank,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "num_speculative_tokens": k_max,
        "draft_quantization": a.draft_quantization,
        "policy": "adaptive" + (" (fresh per run)" if a.cold_policy else " (warm cost curves)"),
        "fixed_k": fixed,
        "cuda_graph_max_batch_size": a.cuda_graph_max_batch_size,
        "cuda_graph_prefill_tokens": a.cuda_graph_prefill_tokens,
        "baseline": {},  # temperature 1, by batch (as in earlier results)
        "baseline_by_temperature": {},
        "spec": [],
        "skipped": [],
    }
    big = max(batches)
    # Speculation off: no draft loaded. One engine for every batch size, kept beside the
    # speculating one (they share the target's weights): each row's off runs alternate with its
    # on runs (paired_median).
    t0 = time.perf_counter()
    base_eng = make_engine(a, target, None, big, 0)
    out["baseline_engine"] = {
        "build_s": time.perf_counter() - t0,
        "cuda_graphs": _graph_report(base_eng),
    }
    run_engine(base_eng, prompts[batches[0]][:2], 16, a.device, 1.0)  # warm-up
    for temp in temps:  # graph and allocator warm-up at every batch size
        for b in batches:
            run_engine(base_eng, prompts[b], min(32, a.output_len), a.device, temp)

    t0 = time.perf_counter()
    eng = make_engine(a, target, draft, big, k_max)
    eng.runner.chain_proposals = not a.no_chain
    out["spec_engine"] = {"build_s": time.perf_counter() - t0, "cuda_graphs": _graph_report(eng)}
    print(f"spec engine: {out['spec_engine']}")
    learnt = AdaptiveSpecPolicy(k_max)  # one policy for the adaptive runs, as a replica keeps

    def adaptive(rate: float | None = None) -> AdaptiveSpecPolicy:
        """The replica's policy (cost curves, sync overhead and probe schedule kept) with fresh
        per-request statistics and counters, its replica-wide acceptance rate at ``rate`` (what
        a replica serving this traffic has learnt: the level's measured rate); with
        --cold-policy a new policy."""
        if a.cold_policy:
            return AdaptiveSpecPolicy(k_max)
        learnt.tracker = AcceptanceTracker() if rate is None else AcceptanceTracker(prior=rate)
        learnt.stats = PolicyStats()
        return learnt

    set_sigma(calibrate(acceptance, levels[0][1], levels[0][0] == 0.0))
    if not a.cold_policy:  # warm-up: learn the cost curves at every batch size
        for b in batches:
            eng.runner.spec_policy = adaptive()
            run_engine(eng, prompts[b], min(32, a.output_len), a.device, levels[0][0])
        out["warmup_s"] = time.perf_counter() - t0 - out["spec_engine"]["build_s"]
    for temp, want in levels:
        greedy = temp == 0.0
        # Measured acceptance is below the shared path's: search below its sigma.
        sigma_hi = calibrate(acceptance, want, greedy)
        for b in batches:
            if not budget.left():
                out["skipped"].append({"batch": b, "acceptance": want, "what": "calibration"})
                continue
            calib_len = a.output_len if b <= 8 else min(32, a.output_len)
            # greedy (the headline level): the demo pair's mean accepted length at k_max, what
            # the demo pair's rate was derived from (--greedy-calibration)
            by_length = greedy and a.greedy_calibration == "accepted-length"
            ck = k_max if by_length else 1
            target = iid_length(want, k_max) if by_length else want
            sigma, measured = calibrate_on_engine(
                eng, prompts[b], set_sigma, temp, target, sigma_hi, calib_len, a.device, k=ck
            )
            # the replica-wide rate the adaptive policy starts from
            rate = iid_rate(measured, k_max) if by_length else measured
            calibration = {
                "method": f"k={ck} " + ("mean accepted length" if by_length else "acceptance"),
                "target": target,
                "measured": measured,
            }
            print(f"T={temp} want {want} batch={b}: sigma {sigma:.4f}, {calibration}")
            policies = [("adaptive", k_max)] + [("fixed", k) for k in fixed]
            for kind, k in policies:
                if not budget.left():
                    out["skipped"].append({"batch": b, "acceptance": want, "policy": kind, "k": k})
                    continue
                policy = adaptive(rate) if kind == "adaptive" else FixedSpecPolicy(k)
                eng.runner.spec_policy = policy
                base, outs, res = paired_median(
                    base_eng, eng, prompts[b], a.output_len, a.device, temp, a.repeats
                )
                by_temp = out["baseline_by_temperature"].setdefault(str(temp), {})
                by_temp.setdefault(b, base)  # (the first row's; each row keeps its own)
                print(f"baseline T={temp} batch={b}: {base['output_tok_s']:.1f} tok/s")
                spec = _spec_summary(outs)
                row = {
                    "target_acceptance": want,
                    "temperature": temp,
                    "sigma": sigma,
                    "shared_path_acceptance": acceptance(sigma, greedy),
                    "calibration": calibration,
                    "batch": b,
                    "policy": kind,
                    "k": k,
                    **res,
                    **spec,
                    "baseline_paired": base,
                    "speedup": res["output_tok_s"] / base["output_tok_s"],
                }
                if isinstance(policy, AdaptiveSpecPolicy):
                    row["policy_stats"] = dataclasses.asdict(policy.stats)
                    row["cost_model"] = {
                        "target_s": {f"{n:.0f}": t for n, t in policy.target.points()},
                        "draft_s": {f"{n:.0f}": t for n, t in policy.draft.points()},
                        "sync_overhead_s": {f"{n:.0f}": t for n, t in policy.overhead.points()},
                        "sync_overhead_chained_s": {
                            f"{n:.0f}": t for n, t in policy.overhead_chained.points()
                        },
                        "catchup_s": {f"{n:.0f}": t for n, t in policy.catchup.points()},
                        # realized tokens/s of full speculating steps per batch bucket
                        "realized_tok_s": {
                            str(b): sum(n for n, _ in w) / sum(t for _, t in w)
                            for b, w in policy.realized.items()
                            if w
                        },
                    }
                out["spec"].append(row)
                print(
                    f"spec T={temp} acc={want} batch={b} {kind} k={k}: "
                    f"{res['output_tok_s']:.1f} tok/s, speedup {row['speedup']:.2f}, "
                    f"measured acceptance {spec['acceptance_rate']}, "
                    f"{spec['verify_steps']} verify steps"
                )
    out["baseline"] = out["baseline_by_temperature"].get("1.0", {})
    del eng, base_eng
    _free(a.device)
    return out


def summary_table(result: dict[str, Any]) -> str:
    """One line per (level, batch): speculation-off tok/s, then each policy's speedup."""
    speed = result.get("speed")
    if not speed or not speed.get("spec"):
        return "(no speed results)"
    cols = ["adaptive"] + [f"k={k}" for k in speed.get("fixed_k", [])]
    lines = [
        f"{'level':<14}{'batch':>6}{'off tok/s':>11}"
        + "".join(f"{c:>10}" for c in cols)
        + f"{'accept':>8}{'spec steps':>12}"
    ]
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in speed["spec"]:
        key = (r["temperature"], r["target_acceptance"], r["batch"])
        name = "adaptive" if r["policy"] == "adaptive" else f"k={r['k']}"
        by_key.setdefault(key, {})[name] = r
    for (temp, want, b), rows in by_key.items():
        first = rows.get("adaptive") or next(iter(rows.values()))
        paired = first.get("baseline_paired")  # (results before pairing: one per temperature)
        base = (paired or speed["baseline_by_temperature"][str(temp)][b])["output_tok_s"]
        level = f"{'greedy' if temp == 0.0 else 'T=1'} a={want:g}"
        cells = "".join(f"{rows[c]['speedup']:>9.2f}x" if c in rows else f"{'-':>10}" for c in cols)
        ad = rows.get("adaptive", {})
        acc = ad.get("acceptance_rate")
        stats = ad.get("policy_stats")
        frac = f"{stats['speculating']}/{stats['plans']}" if stats else "-"
        lines.append(
            f"{level:<14}{b:>6}{base:>11.1f}{cells}"
            + (f"{acc:>8.2f}" if acc is not None else f"{'-':>8}")
            + f"{frac:>12}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in result["speed"]["spec"] if r.get("policy", "adaptive") == "adaptive"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted({r["batch"] for r in rows}):
        for temp, marker, style in ((1.0, "o", "-"), (0.0, "*", "")):
            pts = sorted(
                ((r["acceptance_by_position"] or [0.0])[0] or 0.0, r["speedup"])
                for r in rows
                if r["batch"] == b and r.get("temperature", 1.0) == temp
            )
            if pts:
                label = f"batch {b}" if temp == 1.0 else f"batch {b}, greedy"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("measured per-token acceptance (first draft position)")
    ax.set_ylabel("output tok/s: speculative / plain")
    ax.set_title("8B-shaped target + 1B-shaped draft (synthetic agreement), adaptive k")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    a = parse_args()
    t_start = time.perf_counter()
    budget = Budget(t_start, a.budget_s)
    result: dict[str, Any] = {
        "benchmark": "spec_decode",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": torch.__version__,
        "device": a.device,
        "argv": sys.argv[1:],
    }
    if a.device == "cuda":
        result["gpu"] = torch.cuda.get_device_properties(0).name
    parts = set(a.parts.split(","))
    demo = bench_demo(a) if "demo" in parts and not a.tiny else {"skipped": "not run"}
    result["demo"] = demo
    demo_rate = None
    if demo and "by_k" in demo:
        # The greedy level: the i.i.d. per-draft rate matching the demo pair's greedy mean
        # accepted length at its largest k (its acceptance falls with the draft position much
        # like i.i.d. acceptance does).
        k = a.demo_max_k
        row = demo["by_k"]["temperature=0.0"][k]
        demo_rate = iid_rate(row["mean_accepted_length"], k)
        result["demo_acceptance_used"] = {"greedy_iid_rate": demo_rate, "from_k": k}
    if "speed" in parts:
        result["speed"] = bench_speed(a, demo_rate, budget)
    result["wall_s"] = time.perf_counter() - t_start
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(a.output_json or REPO / f"bench/results/spec-{stamp}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    if "speed" in result:
        plot(result, path.with_suffix(".png"))
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    print(summary_table(result))


if __name__ == "__main__":
    main()
