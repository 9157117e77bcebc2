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
           requests arriving in the first ``warmup_frac`` (30 %) are not measured. Hot tenants
           need several replicas: this is where too much affinity would pile them up (the hottest
           of 32 tenants on 8 replicas asks for 25 % of the load, 2 replicas' worth; the hottest
           of 1024 on 256 replicas for 13 %, 34 replicas' worth).

           The grid (``CHAT_GRID``, ``CHAT_RATES``): 8, 32, 64 and 256 replicas x 4, 8 and 14
           req/s per replica x every mode, seed 0. At 4 every mode about keeps up; at 8 the modes
           that ignore the cache (round_robin, least_loaded: 0.18-0.53 hit rate) are past their
           capacity, at 14 far past it, while the prefix modes keep up at every size. Each run
           pushes about replicas x rate x duration requests through the Schedulers and the router
           (whose cost per request grows with the fleet), so the large fleets simulate less time:
           30 / 15 / 10 / 10 s at 8 / 32 / 64 / 256 replicas (256 x 14 is 35k requests: 94-153 s
           per mode on one core, 3 GB). 3 s of warm-up does not quite reach the steady state; the
           short runs are pessimistic for the prefix modes: with 20 s instead of 10 s,
           prefix_precise at 64 x 8 serves 517 instead of 538 req/s of 505 offered (warm-up
           requests the cold start delayed finish in the window), with TTFT p90 0.085 instead of
           0.126 s and hit rate 0.953 instead of 0.940; at 256 x 4, 0.126 instead of 0.172 s and
           0.943 instead of 0.916 (the Zipf tail's first requests, cold for any router, fall
           inside a short window: oracle 0.951 instead of 0.923). A saturated mode's queue grows
           as long as requests arrive, so its TTFT p90 (8-37 s) says how far behind it is after
           ``duration_s``, not a steady state (round_robin at 64 x 8: 8.0 s at 10 s, 15.9 s at 20).
           The weight sweep (``CHAT_SWEEP_CASES``): prefix_precise at 8 x 14, 32 x 8 and 32 x 14
           for ``--seeds`` seeds, one weight changed at a time (``SWEEP``).

Oracle hit rate (both): cached / prompt tokens of an ideal router with unbounded KV, where a
request hits every full block it shares with any earlier request (timing ignored: an upper bound).
It is a bound on the hit rate only; there is no oracle routing mode.

Cost: every (scenario, seed) workload is built once and replayed on a fresh fleet per mode /
weights; a chat prompt's hash chain extends its previous turn's (the same hashes as hashing the
whole prompt); a replica's snapshot reaches ``RoutingState.on_stats`` alone (the other replicas' are
unchanged, so the router ends in the same state as with Serve's full broadcast). None of this
changes a result: the bench replay, both sweeps and the 8 and 32 replica grid rows are identical
to those of the version before the 64 and 256 replica grid (commit 4d98223).

    python bench/routing_sim.py                # everything: bench replay (3 seeds) + sweep, chat
                                               # grid (8-256 replicas) + sweep; JSON and the
                                               # grid's PNG in bench/results; ~12 min, 2 workers
    python bench/routing_sim.py --scenario chat --no-sweep --seeds 1 --replicas 64,256 \\
        --output /tmp/scale.json               # the scale grid only (+ the 3 sweep cases' defaults)
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
    rid: str,
    tenant: str,
    session: str,
    prompt: list[int],
    mode: str,
    max_tokens: int,
    bs: int,
    chain: list[int] | None = None,
) -> Item:
    """``chain``: the prompt's block hashes when the caller already has them."""
    if chain is None:
        chain = hash_blocks(prompt, bs, tenant=tenant)
    return Item(rid, tenant, session, prompt, chain, mode, max_tokens)


def extend_chain(chain: list[int], tokens: list[int], bs: int, tenant: str) -> list[int]:
    """The chain of ``tokens`` given ``chain``, the chain of a prefix of them: only the blocks
    past ``chain`` are hashed (the same hashes as ``hash_blocks(tokens, bs, tenant=tenant)``)."""
    if not chain:
        return hash_blocks(tokens, bs, tenant=tenant)
    return chain + hash_blocks(tokens, bs, parent=chain[-1], start_block=len(chain))


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
        self._views: dict[str, ReplicaView] = {}  # what Serve shows the router, kept current
        for r in self.replicas.values():
            self.view(r)
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
                self.view(rep)
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

    def view(self, r: Replica) -> ReplicaView:
        """Refresh ``r``'s candidate entry (after its stats or queue length changed)."""
        v = self._views[r.name] = ReplicaView(r.name, r.stats, r.ongoing, self.cfg.max_ongoing)
        return v

    def views(self) -> list[ReplicaView]:
        return list(self._views.values())

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
        self.view(rep)
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
            # Only this replica's snapshot changed: passing the others too (as Serve's broadcast
            # does) leaves the router in the same state, at O(replicas) per snapshot.
            self.router.on_stats([self.view(rep)])
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
    prefix_chains: dict[int, list[int]] = {}  # hashed when the tenant first shows up
    answer = [SAMPLED_TOKEN] * sc.output_len  # what the simulated engine generates
    # user -> (history, its chain, turns); chains are extended, not rehashed (same hashes)
    chats: dict[tuple[int, int], tuple[list[int], list[int], int]] = {}
    items: list[Item] = []
    t = 0.0
    rate = sc.rate_per_replica * sc.replicas
    while True:
        t += rng.expovariate(rate)
        if t >= sc.duration_s:
            break
        tenant = bisect.bisect_left(cum, rng.random() * acc)
        user = rng.randrange(sc.users_per_tenant)
        name = f"t{tenant}"
        history, chain, turns = chats.get((tenant, user), (prefixes[tenant], [], 0))
        if turns >= sc.max_turns or not chain:
            if tenant not in prefix_chains:
                prefix_chains[tenant] = hash_blocks(prefixes[tenant], bs, tenant=name)
            history, chain, turns = prefixes[tenant], prefix_chains[tenant], 0
        prompt = history + tokens(sc.query_len)
        chain = extend_chain(chain, prompt, bs, name)
        full = prompt + answer
        chats[(tenant, user)] = (full, extend_chain(chain, full, bs, name), turns + 1)
        it = make_item(
            f"c{len(items)}", name, f"{name}/u{user}", prompt, mode, sc.output_len, bs, chain
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


# A chat run: (weights, mode, tags); one row per tag ("grid", "sweep"), one run for all of them.
ChatVariant = tuple[PolicyWeights, str, tuple[str, ...]]


def run_chat(job: tuple[ChatScenario, FleetConfig, list[ChatVariant]]) -> list[dict[str, Any]]:
    """One workload (and its oracle), replayed on a fresh fleet for each variant."""
    sc, cfg, variants = job
    t0 = time.perf_counter()
    workload = chat_workload(sc, cfg.seed, "", cfg.block_size)
    oracle = chat_oracle(workload, sc, cfg.block_size)
    workload_s = time.perf_counter() - t0
    lo, hi = sc.warmup_frac * sc.duration_s, sc.duration_s
    out = []
    for weights, mode, tags in variants:
        t1 = time.perf_counter()
        fleet = Fleet(cfg, weights)
        items = [dataclasses.replace(it, mode=mode) for it in workload]
        fleet.run(items)
        meas = [(it, o) for it, o in zip(items, oracle) if it.arrival >= lo]
        done = sum(1 for it in items if lo <= it.done < hi)
        row = {
            "scenario": "chat",
            "mode": mode,
            "replicas": sc.replicas,
            "rate_per_replica": sc.rate_per_replica,
            "duration_s": sc.duration_s,
            "seed": cfg.seed,
            "offered_req_s": round(len(meas) / (hi - lo), 2),
            "throughput_req_s": round(done / (hi - lo), 2),
            **measure([it for it, _ in meas], sum(o for _, o in meas)),
            "predicted_vs_actual": drift(fleet.router, mode),
            "weights": dataclasses.asdict(weights),
            "sim_wall_s": round(time.perf_counter() - t1 + workload_s / len(variants), 1),
            "requests": len(items),
        }
        out += [{"tag": tag, **row} for tag in tags]
        del fleet, items
    return out


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
# Chat grid: fleet size -> duration_s (all modes, every rate, seed 0). A run costs about
# replicas x rate x duration requests through the Schedulers and the router (whose cost per
# request grows with the fleet), so the large fleets run shorter; at 10 s (3 s warm-up) some of
# the start-up transient is left in the window, against the prefix modes (module docstring).
CHAT_GRID: dict[int, float] = {8: 30.0, 32: 15.0, 64: 10.0, 256: 10.0}
CHAT_RATES = (4.0, 8.0, 14.0)
CHAT_SWEEP_CASES = ((8, 14.0), (32, 8.0), (32, 14.0))  # (replicas, rate) of the weight sweep


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
    return run_bench(args) if kind == "bench" else run_chat(args)


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
    ap.add_argument(
        "--replicas",
        default=",".join(map(str, CHAT_GRID)),
        help="chat grid fleet sizes, comma-separated (durations from CHAT_GRID, else 10 s)",
    )
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--output", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()
    weights = parse_overrides(args.weight, PolicyWeights())
    seeds = range(1 if args.quick else args.seeds)
    sweep = [] if args.quick or args.no_sweep else SWEEP
    do_bench = args.scenario in ("all", "bench") or args.quick
    do_chat = args.scenario in ("all", "chat") and not args.quick
    grid_sizes = [int(n) for n in args.replicas.split(",") if n] if do_chat else []
    jobs: list[tuple[str, Any]] = []
    for s in seeds if do_bench else ():
        jobs.append(("bench", (BenchScenario(), FleetConfig(seed=s), weights)))
        for over in sweep:
            w = dataclasses.replace(weights, **over)
            precise = BenchScenario(modes=("prefix_precise",))
            jobs.append(("bench", (precise, FleetConfig(seed=s), w)))
    if do_chat:
        chat: dict[tuple[ChatScenario, int], dict[tuple[PolicyWeights, str], list[str]]] = {}
        for n in grid_sizes:
            for rate in CHAT_RATES:
                dur = CHAT_GRID.get(n, 10.0)
                sc = ChatScenario(replicas=n, rate_per_replica=rate, duration_s=dur)
                for m in MODES:
                    chat.setdefault((sc, 0), {}).setdefault((weights, m), []).append("grid")
        for (n, rate), s in ((c, s) for c in CHAT_SWEEP_CASES for s in seeds):
            sc = ChatScenario(replicas=n, rate_per_replica=rate, duration_s=CHAT_GRID.get(n, 10.0))
            for w in [weights] + [dataclasses.replace(weights, **o) for o in sweep]:
                runs = chat.setdefault((sc, s), {})
                runs.setdefault((w, "prefix_precise"), []).append("sweep")
        # one job per workload (its variants share it); the costliest first, to balance workers
        chat_jobs = [
            (sc, chat_fleet(sc, s), [(w, m, tuple(tags)) for (w, m), tags in runs.items()])
            for (sc, s), runs in chat.items()
        ]
        chat_jobs.sort(
            key=lambda j: -j[0].replicas * j[0].rate_per_replica * j[0].duration_s * len(j[2])
        )
        jobs = [("chat", j) for j in chat_jobs] + jobs
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with Pool(args.workers) as pool:
        for out in pool.imap_unordered(run_job, jobs):
            rows += out
            for r in out if out[0]["scenario"] == "chat" else out[-1:]:
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
        "chat_grid_duration_s": {str(n): CHAT_GRID.get(n, 10.0) for n in grid_sizes},
        "chat_rates_per_replica": list(CHAT_RATES),
        "wall_s": round(time.perf_counter() - t0, 1),
        "bench_replay": [r for r in bench if r["weights"] == default],
        "bench_weight_sweep": [r for r in bench if r["weights"] != default],
        "chat_grid": sorted(
            (r for r in chat if r["tag"] == "grid"),
            key=lambda r: (r["replicas"], r["rate_per_replica"], MODES.index(r["mode"])),
        ),
        "chat_weight_sweep": sorted(  # per case, the weights in SWEEP order (defaults first)
            mean_over_seeds([r for r in chat if r["tag"] == "sweep"], CHAT_KEYS),
            key=lambda r: (r["replicas"], r["rate_per_replica"]),
        ),
    }
    if args.output:
        path = Path(args.output)
    else:
        path = RESULTS / ("routing_sim-quick.json" if args.quick else "routing_sim.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print_tables(out)
    print(f"wrote {path} in {out['wall_s']}s")
    if out["chat_grid"]:
        plot(out["chat_grid"], path.with_suffix(".png"))


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


STYLE: dict[str, dict[str, Any]] = {  # prefix_approx often lies on prefix_precise: dashed on top
    "round_robin": {"marker": "o"},
    "least_loaded": {"marker": "s"},
    "prefix_approx": {"marker": "^", "linestyle": "--", "zorder": 3},
    "prefix_precise": {"marker": "o", "linewidth": 2.5},
}


def plot(grid: list[dict[str, Any]], path: Path) -> None:
    """The chat grid: throughput, TTFT p90 and hit rate vs offered load, a column per fleet size,
    a line per mode (dashed grey: the oracle hit rate; dotted: served = offered)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    sizes = sorted({r["replicas"] for r in grid})
    metrics = (
        ("throughput_req_s", "served (req/s)"),
        ("ttft_p90_s", "TTFT p90 (s)"),
        ("hit_rate", "prefix hit rate"),
    )
    fig, axes = plt.subplots(len(metrics), len(sizes), figsize=(4 * len(sizes), 9), squeeze=False)
    for j, n in enumerate(sizes):
        rows = [r for r in grid if r["replicas"] == n]
        dur = rows[0]["duration_s"]
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for mode in MODES:
                pts = [
                    (r["offered_req_s"], r[key])
                    for r in rows
                    if r["mode"] == mode and r[key] is not None
                ]
                if pts:
                    ax.plot(*zip(*sorted(pts)), label=mode, **STYLE.get(mode, {}))
            oracle = sorted(
                {(r["offered_req_s"], r["oracle_hit_rate"]) for r in rows if r["mode"] == MODES[0]}
            )
            if key == "throughput_req_s":
                xs = [x for x, _ in oracle]
                ax.plot(xs, xs, ":", color="grey", label="offered")
            if key == "hit_rate":
                ax.plot(*zip(*oracle), "--", color="grey", label="oracle")
                ax.set_ylim(0, 1)
            if key == "ttft_p90_s":
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"{n} replicas ({dur:g} s)")
            if i == len(metrics) - 1:
                ax.set_xlabel("offered load (req/s)")
            if j == 0:
                ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[-1][0].legend(fontsize=7)
    fig.suptitle("routing sim, chat grid (engine Scheduler per replica, real RoutingState)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
