"""Routing decision overhead: PrefixIndex.match + choose_replica on a full-size index.

16 replicas × 100k cached blocks each (1.6M (hash, replica) pairs, shared prompts included),
requests of 2k tokens (128 blocks of 16), paced at 1,000 decisions/s. Each decision is followed,
outside the timed part, by the router's bookkeeping (predict) and one KV-event batch from a
replica (128 stored, 128 removed), so the index stays at steady state; those are timed separately.

Cached chains are random 128-bit ints (what blake2b digests look like to a dict); request chains are
drawn from them (full hits, partial hits with a new suffix, misses). Prints p50/p99 and writes
bench/results/routing_overhead-<machine>.json.

    python bench/routing_overhead.py [--decisions 5000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import re
import resource
import statistics
import time
from pathlib import Path

from rayfleet.router.policy import PolicyWeights, ReplicaLoad, choose_replica
from rayfleet.router.prefix_index import PrefixIndex

BLOCK_SIZE = 16
CHAIN_BLOCKS = 128  # 2k-token prompts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{platform.node()}-{cpu_model()}").strip("-")[:80]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--blocks-per-replica", type=int, default=100_000)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=1000.0, help="decisions per second")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rand = lambda: rng.getrandbits(128)

    replicas = [f"replica-{i}" for i in range(args.replicas)]
    chains_per_replica = args.blocks_per_replica // CHAIN_BLOCKS
    shared = [[rand() for _ in range(CHAIN_BLOCKS)] for _ in range(chains_per_replica)]
    held: dict[str, list[list[int]]] = {}
    idx = PrefixIndex(max_entries=args.replicas * args.blocks_per_replica, prediction_ttl_s=30.0)
    t0 = time.perf_counter()
    for r in replicas:
        # 30% of a replica's chains are popular prompts other replicas hold too
        n_shared = int(0.3 * chains_per_replica)
        chains = rng.sample(shared, n_shared)
        for _ in range(chains_per_replica - n_shared):
            chains.append([rand() for _ in range(CHAIN_BLOCKS)])
        for c in chains:
            idx.apply_events(r, c, [], now=0.0)
        held[r] = chains
    build_s = time.perf_counter() - t0
    st = idx.stats()
    per = st.blocks_per_replica.values()
    print(f"index: {st.entries} entries, build {build_s:.1f}s, "
          f"blocks/replica {min(per)}-{max(per)}")

    def request_chain() -> list[int]:
        u = rng.random()
        if u < 0.2:
            return [rand() for _ in range(CHAIN_BLOCKS)]  # miss
        base = rng.choice(held[rng.choice(replicas)])
        if u < 0.5:
            return list(base)  # full hit
        k = rng.randrange(8, CHAIN_BLOCKS)
        return base[:k] + [rand() for _ in range(CHAIN_BLOCKS - k)]  # shared prefix, new suffix

    weights = PolicyWeights()
    decide_us: list[float] = []
    match_us: list[float] = []
    predict_us: list[float] = []
    events_us: list[float] = []
    period = 1.0 / args.rate
    now = 1.0
    start = time.perf_counter()
    late = 0
    for i in range(args.decisions):
        target = start + i * period
        while (t := time.perf_counter()) < target:
            if target - t > 2e-4:
                time.sleep(target - t - 1.5e-4)
        if t - target > period:
            late += 1
        now = 1.0 + i * period
        hashes = request_chain()
        loads = {
            r: ReplicaLoad(queued_prefill_tokens=rng.randrange(0, 20_000),
                           decode_seqs=rng.randrange(0, 64),
                           decode_tokens=rng.randrange(0, 200_000),
                           kv_usage=rng.random())
            for r in replicas
        }  # built outside the timed part: the Serve router keeps these up to date
        t1 = time.perf_counter_ns()
        match = idx.match(hashes, now)
        t2 = time.perf_counter_ns()
        d = choose_replica(match, loads, len(hashes), BLOCK_SIZE, weights)
        t3 = time.perf_counter_ns()
        idx.predict(d.replica, hashes, now)
        t4 = time.perf_counter_ns()
        r = rng.choice(replicas)
        evicted = held[r].pop(0)
        new = request_chain()
        held[r].append(new)
        idx.apply_events(r, new, evicted, now)
        t5 = time.perf_counter_ns()
        match_us.append((t2 - t1) / 1e3)
        decide_us.append((t3 - t1) / 1e3)
        predict_us.append((t4 - t3) / 1e3)
        events_us.append((t5 - t4) / 1e3)
    wall = time.perf_counter() - start

    def summary(xs: list[float]) -> dict[str, float]:
        return {"p50_us": round(pct(xs, 0.5), 1), "p99_us": round(pct(xs, 0.99), 1),
                "mean_us": round(statistics.fmean(xs), 1), "max_us": round(max(xs), 1)}

    result = {
        "bench": "routing_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpu": cpu_model(),
                    "python": platform.python_version()},
        "config": {"replicas": args.replicas, "blocks_per_replica": args.blocks_per_replica,
                   "block_size": BLOCK_SIZE, "request_blocks": CHAIN_BLOCKS,
                   "decisions": args.decisions, "target_rate_per_s": args.rate},
        "index": {"entries": st.entries, "build_s": round(build_s, 2),
                  "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "achieved_rate_per_s": round(args.decisions / wall, 1),
        "late_decisions": late,
        "decision (match + policy)": summary(decide_us),
        "match": summary(match_us),
        "predict (after decision)": summary(predict_us),
        "kv_event_batch (128 stored + 128 removed)": summary(events_us),
        "goal_p50_us": 1000.0,
    }
    d_sum = result["decision (match + policy)"]
    print(f"decision p50 {d_sum['p50_us']} us, p99 {d_sum['p99_us']} us "
          f"(match p50 {result['match']['p50_us']} us); predict p50 "
          f"{result['predict (after decision)']['p50_us']} us; events p50 "
          f"{result['kv_event_batch (128 stored + 128 removed)']['p50_us']} us; "
          f"rate {result['achieved_rate_per_s']}/s")
    out = Path(__file__).parent / "results" / f"routing_overhead-{machine_tag()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
