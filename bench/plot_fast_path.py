"""Issue 3 figures from bench/results JSON: per-step host vs GPU time (synchronous vs overlapped
scheduling) and offline throughput against each workload's roofline.

Workload roofline (llama-3-8b shape, bf16, one GPU): decode reads the step's weights once per step
(batch = ``max_num_seqs``) plus every request's KV at every step; prefill is compute bound at the
spec-sheet dense bf16 rate. Bandwidth is the copy bandwidth measured in the same run.

    python bench/plot_fast_path.py   # writes bench/results/fast-path-H100.{png,json}
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
H100_DENSE_BF16_FLOPS = 989e12  # spec sheet (SXM), for the prefill part only
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x (k, v) x kv heads x head_dim x bf16
PARAMS_NO_EMBED = 7.50e9  # llama-3-8b parameters without the input embedding (FLOPs per token / 2)


def workload_roofline(d: dict) -> dict:
    n, lin, lout = d["num_requests"], d["input_len"], d["output_len"]
    bw = d["machine"]["copy_bandwidth_GBps"] * 1e9
    step_bytes = d.get("decode_step_weight_bytes") or 15.01e9
    batch = min(d["max_num_seqs"], n)
    steps = n * lout / batch
    kv_bytes = n * sum(lin + i for i in range(lout)) * KV_BYTES_PER_TOKEN
    decode_s = (steps * step_bytes + kv_bytes) / bw
    attn_flops = n * 4 * 32 * 4096 * lin * lin / 2
    prefill_s = (2 * PARAMS_NO_EMBED * n * lin + attn_flops) / H100_DENSE_BF16_FLOPS
    total = decode_s + prefill_s
    return {
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "roofline_output_tok_s": n * lout / total,
    }


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary: dict = {"profiles": {}, "throughput": {}}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.2
    for k, (name, label) in enumerate(
        [
            ("profile-step-sync-H100.json", "synchronous"),
            ("profile-step-overlap-H100.json", "overlap"),
        ]
    ):
        rows = json.loads((RESULTS / name).read_text())["rows"]
        xs = list(range(len(rows)))
        ax1.bar(
            [x + (2 * k - 1) * width for x in xs],
            [r["step_ms_mean"] for r in rows],
            width,
            label=f"{label}: step wall",
        )
        ax1.bar(
            [x + (2 * k) * width - width for x in xs],
            [r["gpu_kernel_ms_per_step"] for r in rows],
            width / 2,
            label=f"{label}: GPU kernels",
            alpha=0.6,
        )
        ax1.set_xticks(xs, [f"batch {r['batch']}\nctx {r['context']}" for r in rows])
        summary["profiles"][label] = [
            {
                k2: r[k2]
                for k2 in ("batch", "running", "context", "step_ms_mean", "gpu_kernel_ms_per_step")
                if k2 in r
            }
            for r in rows
        ]
    ax1.set_ylabel("ms per decode step")
    ax1.set_title("llama-3-8b bf16 decode step, H100: wall vs GPU kernel time")
    ax1.legend(fontsize=7)

    labels, got, roof = [], [], []
    for name in (
        "fast-llama-3-8b-batch1.json",
        "fast-llama-3-8b-1000x128-128.json",
        "fast-llama-3-8b-1000x1000-1000.json",
    ):
        d = json.loads((RESULTS / name).read_text())
        r = d["rayfleet"]
        if d["num_requests"] == 1:
            tok_s = r["decode_tok_s_per_request"]["p50"]
            bw = d["machine"]["copy_bandwidth_GBps"] * 1e9
            ceiling = bw / (d.get("decode_step_weight_bytes") or 15.01e9)
            labels.append("batch-1 decode")
        else:
            tok_s = r["output_tok_s"]
            ceiling = workload_roofline(d)["roofline_output_tok_s"]
            labels.append(f"{d['num_requests']} x {d['input_len']}/{d['output_len']}")
        got.append(tok_s)
        roof.append(ceiling)
        summary["throughput"][labels[-1]] = {
            "measured_tok_s": tok_s,
            "roofline_tok_s": ceiling,
            "fraction": tok_s / ceiling,
        }
    xs = list(range(len(labels)))
    ax2.bar([x - 0.2 for x in xs], got, 0.4, label="rayfleet (measured)")
    ax2.bar([x + 0.2 for x in xs], roof, 0.4, label="roofline", alpha=0.5)
    for x, g, c in zip(xs, got, roof):
        ax2.text(x - 0.2, g, f"{g:,.0f}\n{g / c:.0%}", ha="center", va="bottom", fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xticks(xs, labels)
    ax2.set_ylabel("output tok/s")
    ax2.set_title("offline throughput vs roofline (H100, bf16)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "fast-path-H100.png", dpi=110)
    (RESULTS / "fast-path-H100.json").write_text(json.dumps(summary, indent=2))
    for k, v in summary["throughput"].items():
        print(
            f"{k:24s} {v['measured_tok_s']:9.1f} tok/s  roofline {v['roofline_tok_s']:9.1f}  "
            f"{v['fraction']:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
