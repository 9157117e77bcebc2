"""Discrete-event simulation of the router on modeled replicas.

Drives the REAL ``RouterCore`` (``PrefixIndex`` + policy + hit tracking) with modeled replicas:

* replica = continuous-batching engine with a token budget per step (chunked prefill, FIFO);
  step time = base + prefill_tokens·a + decode_seqs·b + decode_context_tokens·c (H100/8B-like);
* prefix cache = LRU of ``cache_blocks`` blocks keyed by the real ``rayfleet.hashing`` chain; the
  cached prefix of a request is looked up when its prefill starts; computed prompt blocks are stored
  at the end of each step, output blocks when the request finishes; the stored/evicted hashes are
  sent to the router as KV events ``event_delay_s`` later;
* the router sees each replica's load exactly (queued prefill tokens, decode sequences and context
  tokens, KV usage) — load reporting lag is not modeled.

Workload: ``tenants_per_replica × replicas`` tenants with Zipf(1) popularity, each with a shared
system prompt (6k tokens by default, tenant-salted hashes) and ``users_per_tenant`` users holding
multi-turn chats (prompt = system prompt + history + new query; history = previous queries and
outputs; a chat restarts after ``max_turns``); Poisson arrivals; the user id is the session key.

Modes: round_robin, least_loaded, prefix_approx, prefix_precise, and oracle (the same policy fed
by an index that receives every cache change instantly and is never capped: it knows the caches).

Outputs per (replicas, rate, mode): throughput (completed req/s and output tok/s in the measured
window), TTFT p50/p90, cache hit rate (cached / prompt tokens) and its ratio to the oracle's,
prefill tokens computed, and the router's predicted-vs-actual drift. JSON + PNG under bench/results.

    python bench/routing_sim.py                 # full grid (8/64/256 replicas) + weight sweep
    python bench/routing_sim.py --quick         # 8 replicas only
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime as dt
import functools
import heapq
import json
import math
import os
import platform
import random
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

from rayfleet.hashing import hash_blocks
from rayfleet.router.closed_loop import RouterCore
from rayfleet.router.policy import PolicyWeights, ReplicaLoad

MODES = ["round_robin", "least_loaded", "prefix_approx", "prefix_precise", "oracle"]
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 8
    rate_per_replica: float = 4.0  # requests/s per replica (offered load)
    duration_s: float = 60.0  # arrivals happen in [0, duration_s)
    warmup_frac: float = 0.3  # requests arriving before warmup_frac·duration are not measured
    drain_s: float = 10.0  # stop this long after the last arrival
    block_size: int = 16
    prefix_tokens: int = 6144  # tenant system prompt
    query_tokens: int = 256
    output_tokens: int = 64
    tenants_per_replica: int = 4
    users_per_tenant: int = 4
    max_turns: int = 4
    cache_blocks: int = 4096  # prefix-cache capacity of one replica (65k tokens)
    kv_capacity_tokens: int = 500_000  # for the kv_usage the replica reports
    token_budget: int = 2048  # tokens per step (prefill chunks + one per decoding sequence)
    step_base_s: float = 0.006
    prefill_s_per_token: float = 35e-6
    decode_s_per_seq: float = 20e-6
    decode_s_per_ctx_token: float = 0.04e-6
    event_delay_s: float = 0.05
    prediction_ttl_s: float = 10.0
    index_max_entries: int = 1 << 22
    max_decode_macro_steps: int = 16  # decode-only steps merged into one event (cut by arrivals)
    seed: int = 0


@dataclass
class Req:
    rid: int
    arrival: float
    session: str
    prompt_len: int
    prompt_hashes: list[int]
    full_hashes: list[int]  # prompt + output blocks (stored when the request finishes)
    computed: int = 0
    cached: int = -1  # set when prefill starts
    est_queued: int = 0
    ttft: float = math.nan
    done: float = math.nan
    replica: int = -1


def build_workload(cfg: SimConfig) -> list[Req]:
    """Fresh (mutable) requests of the workload; the hashing is cached per config."""
    return [Req(i, *raw) for i, raw in enumerate(_workload(cfg))]


@functools.lru_cache(maxsize=2)
def _workload(cfg: SimConfig) -> list[tuple[float, str, int, list[int], list[int]]]:
    rng = random.Random(cfg.seed)
    tokens = lambda n: list(rng.randbytes(n))  # token ids 0..255: only their hashes matter
    bs = cfg.block_size
    n_tenants = cfg.tenants_per_replica * cfg.replicas
    weights = [1.0 / (i + 1) for i in range(n_tenants)]  # Zipf(1)
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    prefixes: list[tuple[list[int], list[int]]] = []
    for t in range(n_tenants):
        toks = tokens(cfg.prefix_tokens)
        prefixes.append((toks, hash_blocks(toks, bs, tenant=f"t{t}")))
    # user state: (tokens, chain of full blocks, turns)
    users: dict[tuple[int, int], tuple[list[int], list[int], int]] = {}
    reqs: list[tuple[float, str, int, list[int], list[int]]] = []
    t = 0.0
    rate = cfg.rate_per_replica * cfg.replicas
    while True:
        t += rng.expovariate(rate)
        if t >= cfg.duration_s:
            break
        tenant = bisect.bisect_left(cum, rng.random() * acc)
        user = rng.randrange(cfg.users_per_tenant)
        key = (tenant, user)
        st = users.get(key)
        if st is None or st[2] >= cfg.max_turns:
            toks, chain = prefixes[tenant]
            st = (list(toks), list(chain), 0)
        toks, chain, turns = st
        toks = toks + tokens(cfg.query_tokens)
        chain = chain + _extend(toks, chain, bs)
        prompt_len = len(toks)
        prompt_hashes = chain[: prompt_len // bs]
        toks = toks + tokens(cfg.output_tokens)
        chain = chain + _extend(toks, chain, bs)
        users[key] = (toks, chain, turns + 1)
        reqs.append((t, f"t{tenant}/u{user}", prompt_len, prompt_hashes, chain))
    return reqs


def _extend(toks: list[int], chain: list[int], bs: int) -> list[int]:
    n = len(chain)
    if len(toks) // bs <= n:
        return []
    return hash_blocks(toks, bs, parent=chain[-1], start_block=n)


class Replica:
    def __init__(self, idx: int, cfg: SimConfig) -> None:
        self.idx = idx
        self.cfg = cfg
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.waiting: deque[Req] = deque()
        self.decoding: list[tuple[int, int, Req]] = []  # heap of (finish_step, rid, req)
        self.decode_ctx = 0
        self.step_no = 0
        self.queued_tokens = 0
        self.busy = False
        self.gen = 0  # invalidates a scheduled step end
        self.step_start = 0.0
        self.step_dur = 0.0
        self.step_k = 1
        self.running: list[tuple[Req, int, int]] = []  # (req, old_computed, new_computed)
        self.stored: list[int] = []
        self.removed: list[int] = []
        self._load: ReplicaLoad | None = None

    def load(self) -> ReplicaLoad:
        if self._load is None:
            kv = (self.decode_ctx + self.queued_tokens) / self.cfg.kv_capacity_tokens
            self._load = ReplicaLoad(
                queued_prefill_tokens=self.queued_tokens,
                decode_seqs=len(self.decoding),
                decode_tokens=self.decode_ctx,
                kv_usage=min(1.0, kv),
            )
        return self._load

    def cached_prefix(self, hashes: Sequence[int], touch: bool) -> int:
        n = 0
        cache = self.cache
        for h in hashes:
            if h not in cache:
                break
            n += 1
        if touch:
            for i in range(n - 1, -1, -1):
                cache.move_to_end(hashes[i])
        return n

    def store(self, hashes: Sequence[int]) -> None:
        cache = self.cache
        for h in reversed(hashes):
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                self.stored.append(h)
        while len(cache) > self.cfg.cache_blocks:
            h, _ = cache.popitem(last=False)
            self.removed.append(h)

    def enqueue(self, req: Req) -> None:
        est = req.prompt_len - self.cached_prefix(req.prompt_hashes, False) * self.cfg.block_size
        req.est_queued = est
        self.queued_tokens += est
        self.waiting.append(req)
        self._load = None


class Sim:
    def __init__(self, cfg: SimConfig, mode: str, weights: PolicyWeights) -> None:
        self.cfg = cfg
        self.mode = mode
        oracle = mode == "oracle"
        self.core = RouterCore(
            "prefix_precise" if oracle else mode,
            block_size=cfg.block_size,
            weights=weights,
            max_entries=(1 << 40) if oracle else cfg.index_max_entries,
            prediction_ttl_s=cfg.prediction_ttl_s,
        )
        self.event_delay = 0.0 if oracle else cfg.event_delay_s
        self.replicas = [Replica(i, cfg) for i in range(cfg.replicas)]
        self.names = [f"r{i}" for i in range(cfg.replicas)]
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.now = 0.0
        self.prefill_tokens = 0

    def push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, payload))

    # kinds
    ARRIVAL, STEP_END, KV_EVENT = 0, 1, 2

    def run(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.push(r.arrival, self.ARRIVAL, r)
        stop = self.cfg.duration_s + self.cfg.drain_s
        while self.heap:
            t, _, kind, payload = heapq.heappop(self.heap)
            if t > stop:
                break
            self.now = t
            if kind == self.ARRIVAL:
                self.on_arrival(payload)  # type: ignore[arg-type]
            elif kind == self.STEP_END:
                rep, gen = payload  # type: ignore[misc]
                if gen == rep.gen:
                    self.on_step_end(rep)
            else:
                ridx, stored, removed = payload  # type: ignore[misc]
                self.core.on_kv_events(self.names[ridx], stored, removed, t)

    def on_arrival(self, req: Req) -> None:
        loads = {self.names[i]: rep.load() for i, rep in enumerate(self.replicas)}
        d = self.core.route(req.rid, req.prompt_hashes, loads, self.now, session_key=req.session)
        rep = self.replicas[int(str(d.replica)[1:])]
        req.replica = rep.idx
        rep.enqueue(req)
        if not rep.busy:
            self.start_step(rep)
        elif not rep.running and rep.step_k > 1:
            # decode-only macro step in flight: cut it at the next step boundary
            done = max(1, math.ceil((self.now - rep.step_start) / rep.step_dur - 1e-9))
            if done < rep.step_k:
                rep.step_k = done
                rep.gen += 1
                self.push(rep.step_start + done * rep.step_dur, self.STEP_END, (rep, rep.gen))

    def start_step(self, rep: Replica) -> None:
        cfg = self.cfg
        budget = cfg.token_budget - len(rep.decoding)
        running = []
        prefill = 0
        for req in rep.waiting:
            if budget <= 0:
                break
            if req.cached < 0:  # prefill starts: the engine's own prefix-cache lookup
                hit = rep.cached_prefix(req.prompt_hashes, True) * cfg.block_size
                req.cached = min(hit, req.prompt_len - 1)
                req.computed = req.cached
                rep.queued_tokens += (req.prompt_len - req.computed) - req.est_queued
            take = min(req.prompt_len - req.computed, budget)
            budget -= take
            prefill += take
            running.append((req, req.computed, req.computed + take))
        n_dec = len(rep.decoding)
        if not running and not n_dec:
            rep.busy = False
            return
        dur = (cfg.step_base_s + prefill * cfg.prefill_s_per_token + n_dec * cfg.decode_s_per_seq
               + rep.decode_ctx * cfg.decode_s_per_ctx_token)
        k = 1
        if not running:
            k = min(cfg.max_decode_macro_steps, rep.decoding[0][0] - rep.step_no)
            k = max(1, k)
        rep.busy = True
        rep.running = running
        rep.step_start, rep.step_dur, rep.step_k = self.now, dur, k
        rep.gen += 1
        self.prefill_tokens += prefill
        self.push(self.now + k * dur, self.STEP_END, (rep, rep.gen))

    def on_step_end(self, rep: Replica) -> None:
        cfg, bs = self.cfg, self.cfg.block_size
        k = rep.step_k
        n_dec = len(rep.decoding)
        rep.step_no += k
        rep.decode_ctx += k * n_dec
        for req, old, new in rep.running:
            rep.queued_tokens -= new - old
            req.computed = new
            if new // bs > old // bs:
                rep.store(req.prompt_hashes[old // bs : new // bs])
            if new == req.prompt_len:
                rep.waiting.popleft()  # FIFO: only the head can finish first
                req.ttft = self.now - req.arrival
                rep.decode_ctx += req.prompt_len
                heapq.heappush(rep.decoding, (rep.step_no + cfg.output_tokens - 1, req.rid, req))
        while rep.decoding and rep.decoding[0][0] <= rep.step_no:
            _, _, req = heapq.heappop(rep.decoding)
            req.done = self.now
            rep.decode_ctx -= req.prompt_len + cfg.output_tokens - 1
            rep.store(req.full_hashes)
            self.core.on_finished(req.rid, req.cached)
        if rep.stored or rep.removed:
            ev = (rep.idx, rep.stored, rep.removed)
            rep.stored, rep.removed = [], []
            if self.event_delay == 0.0:
                self.core.on_kv_events(self.names[ev[0]], ev[1], ev[2], self.now)
            else:
                self.push(self.now + self.event_delay, self.KV_EVENT, ev)
        rep.running = []
        rep._load = None
        self.start_step(rep)


def pctl(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_one(job: tuple[SimConfig, str, PolicyWeights, str]) -> dict:
    cfg, mode, weights, tag = job
    t0 = time.perf_counter()
    reqs = build_workload(cfg)
    sim = Sim(cfg, mode, weights)
    sim.run(reqs)
    lo, hi = cfg.warmup_frac * cfg.duration_s, cfg.duration_s
    meas = [r for r in reqs if r.arrival >= lo]
    ttfts = [r.ttft if not math.isnan(r.ttft) else math.inf for r in meas]
    done_in_window = sum(1 for r in reqs if lo <= r.done < hi)
    hit = sum(max(r.cached, 0) for r in meas if r.cached >= 0)
    prompt = sum(r.prompt_len for r in meas if r.cached >= 0)
    unfinished = sum(1 for r in meas if math.isnan(r.done))
    tr = sim.core.tracker
    per_rep = [0] * cfg.replicas
    for r in meas:
        per_rep[r.replica] += 1
    return {
        "tag": tag,
        "mode": mode,
        "replicas": cfg.replicas,
        "rate_per_replica": cfg.rate_per_replica,
        "offered_req_s": round(len(meas) / (hi - lo), 2),
        "throughput_req_s": round(done_in_window / (hi - lo), 2),
        "throughput_tok_s": round(done_in_window * cfg.output_tokens / (hi - lo), 1),
        "ttft_p50_s": _r(pctl(ttfts, 0.5)),
        "ttft_p90_s": _r(pctl(ttfts, 0.9)),
        "hit_rate": round(hit / prompt, 4) if prompt else None,
        "prefill_tokens": sim.prefill_tokens,
        "unfinished": unfinished,
        "max_replica_share": round(max(per_rep) / max(1, len(meas)), 4),
        "predicted_vs_actual": round(tr.drift_ratio, 4),
        "weights": dataclasses.asdict(weights),
        "sim_wall_s": round(time.perf_counter() - t0, 1),
        "requests": len(reqs),
    }


def _r(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 4)


@dataclass
class Plan:
    sizes: list[int] = field(default_factory=lambda: [8, 64, 256])
    rates: list[float] = field(default_factory=lambda: [4.0, 8.0, 14.0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    plan = Plan(sizes=[8]) if args.quick else Plan()
    durations = {8: 60.0, 64: 20.0, 256: 5.0}
    default = PolicyWeights()
    jobs: list[tuple[SimConfig, str, PolicyWeights, str]] = []
    for n in plan.sizes:
        for rate in plan.rates:
            cfg = SimConfig(replicas=n, rate_per_replica=rate, duration_s=durations.get(n, 20.0))
            jobs += [(cfg, m, default, "grid") for m in MODES]
    if not args.no_sweep:
        for n, rate in ((8, 14.0), (64, 14.0)):
            cfg = SimConfig(replicas=n, rate_per_replica=rate, duration_s=durations[n])
            for qw in (0.25, 0.5, 1.0, 2.0, 4.0):
                w = dataclasses.replace(default, queue_weight=qw)
                jobs.append((cfg, "prefix_precise", w, "weight_sweep"))
            for dw in (0.0, 0.2):
                w = dataclasses.replace(default, decode_weight=dw)
                jobs.append((cfg, "prefix_precise", w, "weight_sweep"))
    jobs.sort(key=lambda j: -j[0].replicas * j[0].rate_per_replica * j[0].duration_s)
    t0 = time.perf_counter()
    with Pool(args.workers) as pool:
        results = []
        for res in pool.imap_unordered(run_one, jobs):
            results.append(res)
            print(f"[{time.perf_counter() - t0:6.1f}s] {res['tag']:12s} R={res['replicas']:3d} "
                  f"rate={res['rate_per_replica']:4.1f} {res['mode']:15s} "
                  f"qw={res['weights']['queue_weight']} dw={res['weights']['decode_weight']} "
                  f"thr={res['throughput_req_s']:8.1f} ttft50={res['ttft_p50_s']} "
                  f"ttft90={res['ttft_p90_s']} hit={res['hit_rate']} ({res['sim_wall_s']}s)",
                  flush=True)
    grid = [r for r in results if r["tag"] == "grid"]
    for r in grid:
        ref = next(o for o in grid if o["mode"] == "oracle" and o["replicas"] == r["replicas"]
                   and o["rate_per_replica"] == r["rate_per_replica"])
        r["hit_rate_vs_oracle"] = (round(r["hit_rate"] / ref["hit_rate"], 4)
                                   if r["hit_rate"] and ref["hit_rate"] else None)
    key = lambda r: (r["replicas"], r["rate_per_replica"], MODES.index(r["mode"]))
    grid.sort(key=key)
    sweep = sorted((r for r in results if r["tag"] == "weight_sweep"),
                   key=lambda r: (r["replicas"], r["weights"]["queue_weight"],
                                  r["weights"]["decode_weight"]))
    out = {
        "bench": "routing_sim",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count()},
        "config": dataclasses.asdict(SimConfig()),
        "durations_s": durations,
        "wall_s": round(time.perf_counter() - t0, 1),
        "grid": grid,
        "weight_sweep": sweep,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "routing_sim-quick" if args.quick else "routing_sim"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print_tables(grid, sweep)
    plot(grid, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.json')} and .png in {out['wall_s']}s")


def print_tables(grid: list[dict], sweep: list[dict]) -> None:
    print("\n| R | rate/rep | mode | thr req/s | TTFT p50 s | TTFT p90 s | hit | vs oracle |")
    print("|---|---|---|---|---|---|---|---|")
    for r in grid:
        print(f"| {r['replicas']} | {r['rate_per_replica']} | {r['mode']} | "
              f"{r['throughput_req_s']} | {r['ttft_p50_s']} | {r['ttft_p90_s']} | "
              f"{r['hit_rate']} | {r.get('hit_rate_vs_oracle')} |")
    if sweep:
        print("\n| R | queue_w | decode_w | thr req/s | TTFT p50 | TTFT p90 | hit |")
        print("|---|---|---|---|---|---|---|")
        for r in sweep:
            w = r["weights"]
            print(f"| {r['replicas']} | {w['queue_weight']} | {w['decode_weight']} | "
                  f"{r['throughput_req_s']} | {r['ttft_p50_s']} | {r['ttft_p90_s']} | "
                  f"{r['hit_rate']} |")


def plot(grid: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return
    sizes = sorted({r["replicas"] for r in grid})
    metrics = [("throughput_req_s", "throughput (req/s)"), ("ttft_p90_s", "TTFT p90 (s)"),
               ("hit_rate", "cache hit rate")]
    fig, axes = plt.subplots(len(metrics), len(sizes), figsize=(4.5 * len(sizes), 9),
                             squeeze=False)
    for j, n in enumerate(sizes):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for m in MODES:
                pts = [(r["rate_per_replica"] * n, r[key]) for r in grid
                       if r["replicas"] == n and r["mode"] == m and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xlabel("offered load (req/s)")
            ax.set_ylabel(label)
            if key == "ttft_p90_s":
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"{n} replicas")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
