"""Discrete-event simulation of the router on engine-backed replicas.

What runs for real, unchanged:

* each replica's engine control plane: ``Scheduler`` (block pool with its free-queue eviction
  order, prefix-cache lookups at admission, chunked prefill, ``max_num_seqs``, KV-limited admission,
  preemption), the load it reports (``Scheduler.routing_load``) and its KV event batches
  (``KVEventLog``: netted per stats period, window of 3);
* the router's ``RoutingState``: every mode's ``RouterCore`` (policy, ``PrefixIndex`` with
  prediction TTL, hit tracking), ``PendingPrefill``, ``KVEventCursor``, per-request mode override.

What is modeled:

* the GPU: a step's work is ``gpu_base_s + tokens · gpu_s_per_token + Σ decode context ·
  gpu_s_per_ctx_token`` after ``step_cpu_s`` of host time; replicas on one GPU share it by
  processor sharing (fractional-GPU replicas time-slice). Constants fit the H100 llama-3-8b
  routing run (bench/results/routing-llama-3-8b-cuda-20261124T024841Z.json): round-robin's
  saturated throughput and hit rate, prefix_precise's at ``inf``;
* Serve: every replica's routing stats are taken every ``stats_period_s`` x U(0.9, 1.1) and seen
  by the router ``stats_delay_s`` later (controller loop + long poll); requests reach a replica,
  and its first token and end reach the ingress, ``net_delay_s`` after they happen;
* sampling: every sampled token is ``SAMPLED_TOKEN`` (outputs never end early).

Scenarios:

``bench``  a replay of ``bench/routing_gpu.sh`` as it ran on the H100: 3 llama-3-8b replicas on
           one GPU, 4 GiB (2048 blocks) of KV each, ``rayfleet bench routing``'s workload and
           oracle (``rayfleet.benchmarks.routing_live``: 32 tenants x 4 users, 2048 + 256 + 128
           prompt tokens, 64 output, 192 requests), its run order (for each rate, for each mode;
           each run salted with its name, so it starts cold on pools full of earlier runs' blocks)
           and its 2 s pauses. Every (rate, mode) run is repeated for ``--seeds`` seeds (workload
           and arrivals).
``chat``   Zipf(1) tenants (4 per replica) with multi-turn users (6k-token system prompt, 256-token
           queries, 64-token answers, chats restart after 4 turns), N replicas with a GPU each,
           4096 blocks of KV each; Poisson arrivals for ``duration_s`` at a rate per replica;
           requests arriving in the first ``warmup_frac`` are not measured. Hot tenants need
           several replicas: this is where too much affinity would pile them up.

Oracle hit rate (both): cached / prompt tokens of an ideal router with unbounded KV, where a
request hits every full block it shares with any earlier request (timing ignored: an upper bound).

    python bench/routing_sim.py                # bench replay (3 seeds) + chat grid + weight sweep
    python bench/routing_sim.py --quick        # bench replay, 1 seed, default weights only
    python bench/routing_sim.py --scenario bench --weight queue_weight=0.5 --seeds 1
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime as dt
import heapq
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rayfleet.benchmarks.routing_live import MODES, build_workload, oracle_cached_tokens
from rayfleet.cluster.bench_client import arrival_times
from rayfleet.hashing import hash_blocks
from rayfleet.replicas.engine.kv_events import KVEventLog
from rayfleet.replicas.engine.request import Request
from rayfleet.replicas.engine.scheduler import RunnerOutput, Scheduler
from rayfleet.router.policy import PolicyWeights
from rayfleet.router.routing_state import ReplicaView, RoutingHint, RoutingState

RESULTS = Path(__file__).parent / "results"
SAMPLED_TOKEN = 11


@dataclass(frozen=True)
class FleetConfig:
    replicas: int = 3
    gpus: int = 1  # replicas are spread over the GPUs round-robin; each GPU is shared fairly
    num_blocks: int = 2048  # KV blocks per replica (4 GiB of llama-3-8b KV = 2048 x 16 tokens)
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2560
    max_ongoing: int = 256  # Serve's max_ongoing_requests per replica
    step_cpu_s: float = 0.004
    gpu_base_s: float = 0.006
    gpu_s_per_token: float = 30e-6
    gpu_s_per_ctx_token: float = 40e-9
    stats_period_s: float = 0.5
    stats_delay_s: float = 0.1
    net_delay_s: float = 0.002
    prediction_ttl_s: float = 30.0
    seed: int = 0


@dataclass
class Item:
    """One request of a workload: what the ingress sees, and what happened to it."""

    rid: str
    tenant: str
    session: str
    prompt: list[int]
    chain: list[int]  # hashes of the prompt's full blocks (the engine's chain)
    mode: str
    max_tokens: int
    arrival: float = 0.0
    first: float = math.nan
    done: float = math.nan
    cached: int = 0
    replica: str = ""


def make_item(
    rid: str, tenant: str, session: str, prompt: list[int], mode: str, max_tokens: int, bs: int
) -> Item:
    chain = hash_blocks(prompt, bs, tenant=tenant)
    return Item(rid, tenant, session, prompt, chain, mode, max_tokens)


# ---------------------------------------------------------------------------- the fleet


class Replica:
    def __init__(self, name: str, gpu: int, cfg: FleetConfig) -> None:
        self.name = name
        self.gpu = gpu
        self.sched = Scheduler(
            num_blocks=cfg.num_blocks + 1,  # + the null block
            block_size=cfg.block_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=cfg.max_model_len,
        )
        self.events = KVEventLog(3)
        self.items: dict[str, Item] = {}
        self.ongoing = 0  # routed and not finished (Serve's queue length)
        self.busy = False
        self.step: Any = None  # the SchedulerOutput in flight
        self.work = 0.0  # GPU seconds left of the step in flight
        self.stats: dict[str, Any] = {}  # the latest snapshot the router has seen


class Fleet:
    """Replicas + GPUs + the router, driven by one event heap. Time only moves forward, so a
    scenario can run several workloads one after another on the same (warm) fleet."""

    ARRIVE, ADMIT, ON_GPU, GPU_DONE, STATS, STATS_SEEN, REPORT = range(7)

    def __init__(self, cfg: FleetConfig, weights: PolicyWeights) -> None:
        self.cfg = cfg
        self.now = 0.0
        self.rng = random.Random(cfg.seed + 7)
        self.router = RoutingState(
            "prefix_precise",
            weights=weights,
            prediction_ttl_s=cfg.prediction_ttl_s,
            clock=lambda: self.now,
        )
        self.replicas = {f"r{i}": Replica(f"r{i}", i % cfg.gpus, cfg) for i in range(cfg.replicas)}
        self.on_gpu: list[list[Replica]] = [[] for _ in range(cfg.gpus)]
        self.gpu_gen = [0] * cfg.gpus
        self.gpu_last = [0.0] * cfg.gpus
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.unfinished = 0
        for i, r in enumerate(self.replicas.values()):
            self.push(cfg.stats_period_s * (i + 1) / cfg.replicas, self.STATS, r)

    def push(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, payload))

    # ---- GPUs: processor sharing among the replicas with a step on them --------------------------
    def _gpu_advance(self, g: int) -> None:
        active = self.on_gpu[g]
        if active:
            dt_each = (self.now - self.gpu_last[g]) / len(active)
            for r in active:
                r.work -= dt_each
        self.gpu_last[g] = self.now

    def _gpu_reschedule(self, g: int) -> None:
        self.gpu_gen[g] += 1
        active = self.on_gpu[g]
        if active:
            r = min(active, key=lambda r: r.work)
            self.push(
                self.now + max(r.work, 0.0) * len(active), self.GPU_DONE, (g, self.gpu_gen[g], r)
            )

    # ---- replicas --------------------------------------------------------------------------------
    def start_step(self, rep: Replica) -> None:
        out = rep.sched.schedule()
        if out.is_empty:
            rep.busy = False
            return
        rep.busy = True
        rep.step = out
        cfg = self.cfg
        ctx = sum(
            r.num_computed_tokens
            for rid, r in out.requests.items()
            if out.num_scheduled_tokens[rid] == 1
        )
        rep.work = (
            cfg.gpu_base_s
            + out.total_num_scheduled_tokens * cfg.gpu_s_per_token
            + ctx * cfg.gpu_s_per_ctx_token
        )
        self.push(self.now + cfg.step_cpu_s, self.ON_GPU, rep)

    def end_step(self, rep: Replica) -> None:
        out, rep.step = rep.step, None
        sampled = {rid: [SAMPLED_TOKEN] for rid, r in out.requests.items() if r.num_pending_tokens}
        for req in rep.sched.update(out, RunnerOutput(sampled_token_ids=sampled)):
            it = rep.items[req.request_id]
            if math.isnan(it.first):
                it.first = self.now + self.cfg.net_delay_s
                self.push(it.first, self.REPORT, (it, False))
            if req.status.finished:
                it.done = self.now + self.cfg.net_delay_s
                it.cached = max(req.num_cached_tokens, 0)
                self.push(it.done, self.REPORT, (it, True))
                del rep.items[req.request_id]
                rep.ongoing -= 1
        self.start_step(rep)

    def snapshot(self, rep: Replica) -> dict[str, Any]:
        """What ``LLMReplica.record_routing_stats`` returns."""
        sched = rep.sched
        rep.events.drain(sched.pool)
        queued, decode = sched.routing_load()
        st = sched.stats()
        return {
            "time": self.now,
            "kv_usage": st.kv_usage,
            "num_running": st.num_running,
            "num_waiting": st.num_waiting,
            "queued_prefill_tokens": queued,
            "decode_tokens": decode,
            "num_kv_blocks": sched.pool.num_usable_blocks,
            "kv_events": rep.events.seal(),
        }

    def views(self) -> list[ReplicaView]:
        return [
            ReplicaView(r.name, r.stats, r.ongoing, self.cfg.max_ongoing)
            for r in self.replicas.values()
        ]

    def arrive(self, it: Item) -> None:
        bs = self.cfg.block_size
        hint = RoutingHint(
            it.rid,
            tuple(it.chain[: (len(it.prompt) - 1) // bs]),  # what the ingress hashes
            bs,
            len(it.prompt),
            session_key=it.session,
            mode=it.mode,
        )
        rep = self.replicas[self.router.decide(hint, self.views()).decision.replica]
        rep.ongoing += 1
        it.replica = rep.name
        self.push(self.now + self.cfg.net_delay_s, self.ADMIT, (rep, it))

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, items: Sequence[Item]) -> None:
        """Let ``items`` arrive (at ``item.arrival``, not before now) and run until all finished."""
        for it in items:
            self.push(max(it.arrival, self.now), self.ARRIVE, it)
        self.unfinished += len(items)
        while self.unfinished:
            self._next_event()

    def idle(self, seconds: float) -> None:
        """Let ``seconds`` pass (stats keep flowing)."""
        until = self.now + seconds
        while self.heap[0][0] <= until:
            self._next_event()
        self.now = until

    def _next_event(self) -> None:
        t, _, kind, p = heapq.heappop(self.heap)
        self.now = t
        if kind == self.ARRIVE:
            self.arrive(p)
        elif kind == self.ADMIT:
            rep, it = p
            req = Request(
                it.rid, it.prompt, it.max_tokens, tenant=it.tenant, block_hashes=list(it.chain)
            )
            rep.sched.add_request(req)
            rep.items[it.rid] = it
            if not rep.busy:
                self.start_step(rep)
        elif kind == self.ON_GPU:
            self._gpu_advance(p.gpu)
            self.on_gpu[p.gpu].append(p)
            self._gpu_reschedule(p.gpu)
        elif kind == self.GPU_DONE:
            g, gen, rep = p
            if gen == self.gpu_gen[g]:
                self._gpu_advance(g)
                self.on_gpu[g].remove(rep)
                self._gpu_reschedule(g)
                self.end_step(rep)
        elif kind == self.STATS:
            self.push(self.now + self.cfg.stats_delay_s, self.STATS_SEEN, (p, self.snapshot(p)))
            period = self.cfg.stats_period_s * self.rng.uniform(0.9, 1.1)
            self.push(self.now + period, self.STATS, p)
        elif kind == self.STATS_SEEN:
            rep, stats = p
            rep.stats = stats
            self.router.on_stats(self.views())
        else:  # REPORT: the ingress saw the first token / the end
            it, finished = p
            if finished:
                self.router.on_finished(it.rid, it.replica, it.cached)
                self.unfinished -= 1
            else:
                self.router.on_prefilled(it.rid)


# ---------------------------------------------------------------------------- measurements


def pctl(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def measure(items: Sequence[Item], oracle_tokens: int) -> dict[str, Any]:
    prompt = sum(len(it.prompt) for it in items)
    cached = sum(it.cached for it in items)
    per: dict[str, int] = {}
    for it in items:
        per[it.replica] = per.get(it.replica, 0) + 1
    return {
        "ttft_p50_s": pctl([it.first - it.arrival for it in items], 0.5),
        "ttft_p90_s": pctl([it.first - it.arrival for it in items], 0.9),
        "hit_rate": round(cached / prompt, 4),
        "oracle_hit_rate": round(oracle_tokens / prompt, 4),
        "hit_rate_vs_oracle": round(cached / oracle_tokens, 4) if oracle_tokens else None,
        "max_replica_share": round(max(per.values()) / len(items), 4),
    }


def drift(router: RoutingState, mode: str) -> float | None:
    """actual / predicted cached tokens of ``mode`` so far (1.0 = the router was exact)."""
    m = router.snapshot()["modes"].get(mode)
    if not m or not m["predicted_cached_tokens"]:
        return None
    return round(m["actual_cached_tokens"] / m["predicted_cached_tokens"], 4)


# ---------------------------------------------------------------------------- scenario: bench


@dataclass(frozen=True)
class BenchScenario:
    """``bench/routing_gpu.sh`` on the H100 (see the module docstring)."""

    rates: tuple[float, ...] = (12.0, 24.0, 48.0, math.inf)
    modes: tuple[str, ...] = MODES
    num_requests: int = 192
    tenants: int = 32
    users: int = 4
    prefix_len: int = 2048
    user_prefix_len: int = 256
    query_len: int = 128
    output_len: int = 64
    vocab: int = 128256
    pause_s: float = 2.0


def run_bench(job: tuple[BenchScenario, FleetConfig, PolicyWeights]) -> list[dict[str, Any]]:
    sc, cfg, weights = job
    t0 = time.perf_counter()
    bs = cfg.block_size
    fleet = Fleet(cfg, weights)
    a = SimpleNamespace(**dataclasses.asdict(sc), seed=cfg.seed)  # routing_live's arguments
    out = []
    for rate in sc.rates:
        for mode in sc.modes:
            salt = f"{mode}@{rate}"
            work = build_workload(a, sc.vocab, salt)
            oracle = sum(oracle_cached_tokens(work, bs))
            offsets = arrival_times(len(work), rate, random.Random(cfg.seed + 1))
            items = [
                make_item(f"{salt}#{i}", w.tenant, w.session, w.prompt, mode, sc.output_len, bs)
                for i, w in enumerate(work)
            ]
            start = fleet.now
            for it, off in zip(items, offsets):
                it.arrival = start + off
            fleet.run(items)
            wall = max(it.done for it in items) - start
            res = {
                "scenario": "bench",
                "mode": mode,
                "rate": rate if not math.isinf(rate) else "inf",
                "seed": cfg.seed,
                "request_throughput": round(len(items) / wall, 3),
                "output_tok_s": round(len(items) * sc.output_len / wall, 1),
                **measure(items, oracle),
                "weights": dataclasses.asdict(weights),
            }
            out.append(res)
            fleet.idle(sc.pause_s)
    for r in out:
        r["predicted_vs_actual"] = drift(fleet.router, r["mode"])
        r["sim_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------------------- scenario: chat


@dataclass(frozen=True)
class ChatScenario:
    """Zipf tenants, multi-turn users, a GPU per replica (see the module docstring)."""

    replicas: int = 8
    rate_per_replica: float = 8.0
    duration_s: float = 30.0
    warmup_frac: float = 0.3
    tenants_per_replica: int = 4
    users_per_tenant: int = 4
    max_turns: int = 4
    prefix_len: int = 6144
    query_len: int = 256
    output_len: int = 64
    num_blocks: int = 4096


def chat_workload(sc: ChatScenario, seed: int, mode: str, bs: int) -> list[Item]:
    rng = random.Random(seed)
    n_tenants = sc.tenants_per_replica * sc.replicas
    cum: list[float] = []
    acc = 0.0
    for i in range(n_tenants):
        acc += 1.0 / (i + 1)  # Zipf(1)
        cum.append(acc)
    tokens = lambda n: [rng.randrange(10, 32000) for _ in range(n)]  # noqa: E731
    prefixes = [tokens(sc.prefix_len) for _ in range(n_tenants)]
    answer = [SAMPLED_TOKEN] * sc.output_len  # what the simulated engine generates
    chats: dict[tuple[int, int], tuple[list[int], int]] = {}  # user -> (history, turns)
    items: list[Item] = []
    t = 0.0
    rate = sc.rate_per_replica * sc.replicas
    while True:
        t += rng.expovariate(rate)
        if t >= sc.duration_s:
            break
        tenant = bisect.bisect_left(cum, rng.random() * acc)
        user = rng.randrange(sc.users_per_tenant)
        history, turns = chats.get((tenant, user), (prefixes[tenant], 0))
        if turns >= sc.max_turns:
            history, turns = prefixes[tenant], 0
        prompt = history + tokens(sc.query_len)
        chats[(tenant, user)] = (prompt + answer, turns + 1)
        it = make_item(
            f"c{len(items)}", f"t{tenant}", f"t{tenant}/u{user}", prompt, mode, sc.output_len, bs
        )
        it.arrival = t
        items.append(it)
    return items


def chat_oracle(items: Sequence[Item], sc: ChatScenario, bs: int) -> list[int]:
    """Per request: cached tokens with unbounded KV (the engine caches prompt + output blocks)."""
    seen: set[int] = set()
    out = []
    for it in items:
        n = (len(it.prompt) - 1) // bs
        hit = 0
        for h in it.chain[:n]:
            if h not in seen:
                break
            hit += 1
        out.append(hit * bs)
        full = it.prompt + [SAMPLED_TOKEN] * sc.output_len
        seen.update(it.chain)
        seen.update(hash_blocks(full, bs, parent=it.chain[-1], start_block=len(it.chain)))
    return out


def run_chat(job: tuple[ChatScenario, FleetConfig, PolicyWeights, str, str]) -> dict[str, Any]:
    sc, cfg, weights, mode, tag = job
    t0 = time.perf_counter()
    fleet = Fleet(cfg, weights)
    items = chat_workload(sc, cfg.seed, mode, cfg.block_size)
    oracle = chat_oracle(items, sc, cfg.block_size)
    fleet.run(items)
    lo, hi = sc.warmup_frac * sc.duration_s, sc.duration_s
    meas = [(it, o) for it, o in zip(items, oracle) if it.arrival >= lo]
    done = sum(1 for it in items if lo <= it.done < hi)
    return {
        "scenario": "chat",
        "tag": tag,
        "mode": mode,
        "replicas": sc.replicas,
        "rate_per_replica": sc.rate_per_replica,
        "seed": cfg.seed,
        "offered_req_s": round(len(meas) / (hi - lo), 2),
        "throughput_req_s": round(done / (hi - lo), 2),
        **measure([it for it, _ in meas], sum(o for _, o in meas)),
        "predicted_vs_actual": drift(fleet.router, mode),
        "weights": dataclasses.asdict(weights),
        "sim_wall_s": round(time.perf_counter() - t0, 1),
        "requests": len(items),
    }


def chat_fleet(sc: ChatScenario, seed: int) -> FleetConfig:
    return FleetConfig(
        replicas=sc.replicas,
        gpus=sc.replicas,
        num_blocks=sc.num_blocks,
        max_model_len=sc.prefix_len + sc.max_turns * (sc.query_len + sc.output_len) + 64,
        seed=seed,
    )


# ---------------------------------------------------------------------------- driver

# One weight changed at a time around the defaults (prefix_precise only); miss_weight=1 with
# externality_weight=0 is the cost model before those two terms existed (the previous defaults).
SWEEP: list[dict[str, float]] = [
    {"miss_weight": 1.0},
    {"miss_weight": 2.0},
    {"miss_weight": 4.0},
    {"externality_weight": 0.0},
    {"miss_weight": 1.0, "externality_weight": 0.0},
    {"decode_weight": 0.0},
    {"decode_weight": 0.002},
    {"kv_pressure_tokens": 0.0},
]
BENCH_KEYS = (
    "request_throughput",
    "output_tok_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "hit_rate",
    "oracle_hit_rate",
    "hit_rate_vs_oracle",
    "max_replica_share",
    "predicted_vs_actual",
)
CHAT_KEYS = ("offered_req_s", "throughput_req_s", "requests", *BENCH_KEYS[2:])


def mean_over_seeds(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (everything but seed), ``keys`` averaged over the seeds (each seed's hit rate
    kept in ``hit_rate_per_seed``), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in keys and k not in ("seed", "sim_wall_s")}
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append(r)
    out = []
    for k, rs in groups.items():
        row = json.loads(k)
        for key in keys:
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = round(statistics.mean(vals), 4) if vals else None
        row["hit_rate_per_seed"] = [r["hit_rate"] for r in rs]
        out.append(row)
    return out


def run_job(job: tuple[str, Any]) -> list[dict[str, Any]]:
    kind, args = job
    return run_bench(args) if kind == "bench" else [run_chat(args)]


def parse_overrides(pairs: Sequence[str], base: PolicyWeights) -> PolicyWeights:
    for kv in pairs:
        k, v = kv.split("=", 1)
        base = dataclasses.replace(base, **{k: float(v)})
    return base


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scenario", choices=("all", "bench", "chat"), default="all")
    ap.add_argument("--quick", action="store_true", help="bench replay only, 1 seed, no sweep")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--weight", action="append", default=[], help="PolicyWeights FIELD=VALUE")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--output", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()
    weights = parse_overrides(args.weight, PolicyWeights())
    seeds = range(1 if args.quick else args.seeds)
    sweep = [] if args.quick or args.no_sweep else SWEEP
    do_bench = args.scenario in ("all", "bench") or args.quick
    do_chat = args.scenario in ("all", "chat") and not args.quick
    jobs: list[tuple[str, Any]] = []
    for s in seeds if do_bench else ():
        jobs.append(("bench", (BenchScenario(), FleetConfig(seed=s), weights)))
        for over in sweep:
            w = dataclasses.replace(weights, **over)
            precise = BenchScenario(modes=("prefix_precise",))
            jobs.append(("bench", (precise, FleetConfig(seed=s), w)))
    if do_chat:
        for n, dur in ((8, 30.0), (32, 15.0)):
            for rate in (4.0, 8.0, 14.0):
                sc = ChatScenario(replicas=n, rate_per_replica=rate, duration_s=dur)
                jobs += [("chat", (sc, chat_fleet(sc, 0), weights, m, "grid")) for m in MODES]
        cases = [(8, 14.0, 30.0), (32, 8.0, 15.0), (32, 14.0, 15.0)]
        for (n, rate, dur), s in ((c, s) for c in cases for s in seeds):
            sc = ChatScenario(replicas=n, rate_per_replica=rate, duration_s=dur)
            for w in [weights] + [dataclasses.replace(weights, **o) for o in sweep]:
                jobs.append(("chat", (sc, chat_fleet(sc, s), w, "prefix_precise", "sweep")))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with Pool(args.workers) as pool:
        for out in pool.imap_unordered(run_job, jobs):
            rows += out
            r = out[-1]
            print(
                f"[{time.perf_counter() - t0:6.1f}s] {r['scenario']} {r.get('tag', '')} "
                f"seed {r['seed']} {r['mode']} {r.get('replicas', '')} "
                f"{r.get('rate_per_replica', r.get('rate'))} hit {r['hit_rate']} "
                f"({r['sim_wall_s']}s)",
                flush=True,
            )
    default = dataclasses.asdict(weights)
    bench = mean_over_seeds([r for r in rows if r["scenario"] == "bench"], BENCH_KEYS)
    chat = [r for r in rows if r["scenario"] == "chat"]
    out = {
        "bench": "routing_sim",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count()},
        "command": " ".join(["python", "bench/routing_sim.py", *sys.argv[1:]]),
        "weights": default,
        "fleet": dataclasses.asdict(FleetConfig()),
        "bench_scenario": {**dataclasses.asdict(BenchScenario()), "seeds": len(seeds)},
        "chat_scenario": dataclasses.asdict(ChatScenario()),
        "wall_s": round(time.perf_counter() - t0, 1),
        "bench_replay": [r for r in bench if r["weights"] == default],
        "bench_weight_sweep": [r for r in bench if r["weights"] != default],
        "chat_grid": sorted(
            (r for r in chat if r["tag"] == "grid"),
            key=lambda r: (r["replicas"], r["rate_per_replica"], MODES.index(r["mode"])),
        ),
        "chat_weight_sweep": mean_over_seeds([r for r in chat if r["tag"] == "sweep"], CHAT_KEYS),
    }
    if args.output:
        path = Path(args.output)
    else:
        path = RESULTS / ("routing_sim-quick.json" if args.quick else "routing_sim.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print_tables(out)
    print(f"wrote {path} in {out['wall_s']}s")


def _changed(w: dict[str, float], default: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in w.items() if v != default[k]) or "defaults"


def print_tables(out: dict[str, Any]) -> None:
    default = out["weights"]
    if out["bench_replay"]:
        print("\nbench replay (mean over seeds)")
        print("| rate | mode | req/s | TTFT p50 s | TTFT p90 s | hit | oracle | vs oracle |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out["bench_replay"]:
            print(
                f"| {r['rate']} | {r['mode']} | {r['request_throughput']} | {r['ttft_p50_s']} | "
                f"{r['ttft_p90_s']} | {r['hit_rate']} | {r['oracle_hit_rate']} | "
                f"{r['hit_rate_vs_oracle']} |"
            )
    sweep = [r for r in out["bench_replay"] if r["mode"] == "prefix_precise"]
    sweep += out["bench_weight_sweep"]
    if out["bench_weight_sweep"]:
        print("\nbench sweep, prefix_precise: hit rate / TTFT p90 s per rate")
        by_w: dict[str, list[dict[str, Any]]] = {}
        for r in sweep:
            by_w.setdefault(_changed(r["weights"], default), []).append(r)
        for name, rs in by_w.items():
            cells = " | ".join(f"{r['hit_rate']} / {r['ttft_p90_s']}" for r in rs)
            print(f"| {name} | {cells} |")
    if out["chat_grid"]:
        print("\nchat grid (seed 0)")
        print("| R | rate/rep | mode | req/s | TTFT p50 s | TTFT p90 s | hit | vs oracle |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out["chat_grid"]:
            print(
                f"| {r['replicas']} | {r['rate_per_replica']} | {r['mode']} | "
                f"{r['throughput_req_s']} | {r['ttft_p50_s']} | {r['ttft_p90_s']} | "
                f"{r['hit_rate']} | {r['hit_rate_vs_oracle']} |"
            )
    if out["chat_weight_sweep"]:
        print("\nchat sweep, prefix_precise (mean over seeds): hit rate / TTFT p90 s")
        by_w = {}
        for r in out["chat_weight_sweep"]:
            by_w.setdefault(_changed(r["weights"], default), []).append(r)
        for name, rs in by_w.items():
            cells = " | ".join(
                f"{r['replicas']}x{r['rate_per_replica']:g}: {r['hit_rate']} / {r['ttft_p90_s']}"
                for r in rs
            )
            print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
