"""Speculative decoding benchmark (GPU host; meant to finish in < 4 minutes on one H100:
``--budget-s`` skips whatever would start after 200 s).

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
current token, shared by both models, and the draft's noise sigma sets the sampled acceptance
rate sum_y min(p, q) (calibrated by bisection on the shared path; the measured rate is reported).
For each acceptance level (``--acceptance``, plus the demo pair's temperature-1 per-token rate
when part 1 ran) and batch size (``--batch-sizes``): output tokens/s at temperature 1 with
speculation (adaptive policy, ``--num-speculative-tokens`` at most) and without (no draft
loaded), and the speedup.

JSON to ``bench/results/spec-<date>.json``; a PNG plot (speedup vs acceptance per batch size)
beside it when matplotlib imports. ``--tiny`` runs everything on small shapes (CPU smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from rayfleet.config import EngineConfig
from rayfleet.replicas.llm_engine import Engine
from rayfleet.replicas.model import MODEL_SHAPES, build_random_model
from rayfleet.replicas.model.arch import ModelArchConfig
from rayfleet.replicas.spec.adaptive import AdaptiveSpecPolicy, FixedSpecPolicy
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
    p.add_argument("--acceptance", default="0.5,0.7,0.9")
    p.add_argument("--num-speculative-tokens", type=int, default=5)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tau", type=float, default=3.0, help="logit scale of the shared path")
    p.add_argument("--rank", type=int, default=256, help="dimension r of the shared path")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip what would run past this")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--parts", default="demo,speed", help="which parts to run: demo, speed")
    p.add_argument(
        "--cuda-graph-max-batch-size",
        type=int,
        default=256,
        help="engine config: decode CUDA graphs up to this batch (0 = eager)",
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
    gc.collect()
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
        draft.lm_head.weight.copy_(a.tau / hd**0.5 * (v + sigma * e) @ bases["draft"].T)

    def acceptance(sigma: float, n: int = 512) -> float:
        """sum_y min(p, q) on the shared path, averaged over n tokens."""
        xs = torch.randint(0, vocab, (n,), device=dev, generator=gen)
        p = (a.tau * u[xs] @ v.T).softmax(-1)
        q = (a.tau * u[xs] @ (v + sigma * e).T).softmax(-1)
        return float(torch.minimum(p, q).sum(-1).mean())

    return target, draft, set_sigma, acceptance


def calibrate(acceptance, want: float) -> float:
    lo, hi = 0.0, 4.0
    for _ in range(25):
        mid = (lo + hi) / 2
        if acceptance(mid) > want:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def run_engine(engine: Engine, prompts: list[list[int]], output_len: int, device: str):
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
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
    kw["cuda_graph_max_batch_size"] = a.cuda_graph_max_batch_size
    config = EngineConfig.from_kwargs("<random llama-3-8b>", **kw)
    return Engine(config, model=target, draft_model=draft)


def bench_speed(a: argparse.Namespace, extra_rates: list[float], t_start: float) -> dict[str, Any]:
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    target, draft, set_sigma, acceptance = build_pair(a, dtype)
    vocab = target.arch.vocab_size
    batches = [int(b) for b in a.batch_sizes.split(",")]
    rates = [float(x) for x in a.acceptance.split(",")] + extra_rates
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
        "num_speculative_tokens": a.num_speculative_tokens,
        "policy": "adaptive",
        "cuda_graph_max_batch_size": a.cuda_graph_max_batch_size,
        "baseline": {},
        "spec": [],
        "skipped": [],
    }
    # Warm up kernels (autotuning, allocator) once with and once without the draft.
    set_sigma(0.5)
    for d in (draft, None):
        warm = make_engine(a, target, d, 8, a.num_speculative_tokens if d is not None else 0)
        run_engine(warm, prompts[batches[0]][:2], 16, a.device)
        del warm
        _free(a.device)
    for b in batches:
        if time.perf_counter() - t_start > a.budget_s:
            out["skipped"].append({"batch": b, "what": "baseline"})
            continue
        eng = make_engine(a, target, None, b, 0)
        _, res = run_engine(eng, prompts[b], a.output_len, a.device)
        out["baseline"][b] = res
        print(f"baseline batch={b}: {res['output_tok_s']:.1f} tok/s")
        del eng
        _free(a.device)
    for want in rates:
        sigma = calibrate(acceptance, want)
        set_sigma(sigma)
        for b in batches:
            if time.perf_counter() - t_start > a.budget_s or b not in out["baseline"]:
                out["skipped"].append({"batch": b, "acceptance": want})
                continue
            eng = make_engine(a, target, draft, b, a.num_speculative_tokens)
            assert isinstance(eng.runner.spec_policy, AdaptiveSpecPolicy)
            outs, res = run_engine(eng, prompts[b], a.output_len, a.device)
            spec = _spec_summary(outs)
            policy = eng.runner.spec_policy
            proposer = eng.runner.proposer
            row = {
                "target_acceptance": want,
                "sigma": sigma,
                "shared_path_acceptance": acceptance(sigma),
                "batch": b,
                **res,
                **spec,
                "speedup": res["output_tok_s"] / out["baseline"][b]["output_tok_s"],
                "draft_cuda_graphs": proposer is not None and proposer.graphs is not None,
                "cost_model": {
                    "target_s": {str(n): policy.target(n) for n in (b, b * 2, b * 4, b * 6)},
                    "draft_s": {str(n): policy.draft(n) for n in (b,)},
                },
            }
            out["spec"].append(row)
            print(
                f"spec acc={want} batch={b}: {res['output_tok_s']:.1f} tok/s, speedup "
                f"{row['speedup']:.2f}, measured acceptance {spec['acceptance_rate']}, "
                f"{spec['verify_steps']} verify steps"
            )
            del eng
            _free(a.device)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["speed"]["spec"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted({r["batch"] for r in rows}):
        pts = sorted(
            ((r["acceptance_by_position"] or [0.0])[0] or 0.0, r["speedup"])
            for r in rows
            if r["batch"] == b
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {b}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("measured per-token acceptance (first draft position)")
    ax.set_ylabel("output tok/s: speculative / plain")
    ax.set_title("8B-shaped target + 1B-shaped draft (synthetic agreement), adaptive k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    a = parse_args()
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "spec_decode",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": torch.__version__,
        "device": a.device,
    }
    if a.device == "cuda":
        result["gpu"] = torch.cuda.get_device_properties(0).name
    parts = set(a.parts.split(","))
    demo = bench_demo(a) if "demo" in parts and not a.tiny else {"skipped": "not run"}
    result["demo"] = demo
    extra = []
    if demo and "by_k" in demo:
        # Part 2 samples at temperature 1: the demo pair's per-token rate there.
        rate = demo["by_k"]["temperature=1.0"][1]["acceptance_by_position"][0]
        if rate:
            extra.append(round(rate, 3))
            result["demo_acceptance_used"] = rate
    if "speed" in parts:
        result["speed"] = bench_speed(a, extra, t_start)
    result["wall_s"] = time.perf_counter() - t_start
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(a.output_json or REPO / f"bench/results/spec-{stamp}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    if "speed" in result:
        plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
