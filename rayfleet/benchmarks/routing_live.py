"""`rayfleet bench routing`: the four routing modes on one live cluster, same workload.

Workload (seeded, ids only): ``--tenants`` tenants, each with a shared prefix of
``--prefix-len`` tokens (a system prompt); ``--users`` users per tenant, each with a
``--user-prefix-len`` context of their own; every request is tenant prefix + user context + a
fresh ``--query-len`` query, asks for ``--output-len`` tokens (greedy, EOS ignored), carries the
tenant (cache salt) and ``session_id`` = user, and arrives by a Poisson process at each ``--rate``.

Modes are switched per request with the gRPC metadata ``rayfleet-routing: MODE`` (the ingress
hands it to its PrefixAwareRequestRouter), so all modes run on the same replicas without a
redeploy (the app must not be deployed with ``routing: default``). Each (mode, rate) run salts
its tenants with the run's name: no run can hit blocks an earlier run left behind, which then
only take free KV space, as any cold cache's leftovers would.

Per run: output tok/s, TTFT p50/p90, requests per replica, and two hit rates:

* prefix hit rate = Σ usage.cached_tokens / Σ prompt tokens (what the engines served from cache);
* oracle hit rate = the same ratio for an ideal router with unbounded KV: a request hits every
  full block it shares with any earlier request of the run (same tenant), i.e. each tenant
  prefix and user context is computed exactly once, on the replica every later request of it
  goes to. Only full blocks of the first n - 1 prompt tokens count (the engine always computes
  the last one), exactly as the engine counts cached tokens. It ignores timing (a request
  arriving while the first of its prefix is still prefilling cannot hit in reality), so it is an
  upper bound.

Writes JSON (``--output-json``, default ``bench/results/routing-*.json``) and a plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayfleet.cluster.bench_client import (
    arrival_times,
    count_errors,
    dispatch,
    parse_rates,
    percentiles,
)
from rayfleet.hashing import hash_blocks

MODES = ("round_robin", "least_loaded", "prefix_approx", "prefix_precise")


def add_bench_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC proxy")
    p.add_argument("--application", default=None, help="Serve app name (several apps only)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated routing modes")
    p.add_argument("--rate", action="append", default=None, help="req/s (repeatable, a,b,c)")
    p.add_argument("--num-requests", type=int, default=200, help="per (mode, rate)")
    p.add_argument("--tenants", type=int, default=16)
    p.add_argument("--users", type=int, default=4, help="users per tenant")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared tokens per tenant")
    p.add_argument("--user-prefix-len", type=int, default=128, help="shared tokens per user")
    p.add_argument("--query-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    p.add_argument("--output-json", default=None)
    p.add_argument("--no-plot", action="store_true")


@dataclass
class WorkItem:
    tenant: str
    session: str
    prompt: list[int]


@dataclass
class Record:
    sent: float
    first: float | None = None
    done: float | None = None
    num_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str = ""
    error: str | None = None


def build_workload(a: argparse.Namespace, vocab: int, salt: str) -> list[WorkItem]:
    """``a.num_requests`` requests; token ids avoid 0..9 (specials in small vocabularies)."""
    rng = random.Random(a.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    prefixes = [ids(a.prefix_len) for _ in range(a.tenants)]
    users = [[ids(a.user_prefix_len) for _ in range(a.users)] for _ in range(a.tenants)]
    out = []
    for _ in range(a.num_requests):
        t, u = rng.randrange(a.tenants), rng.randrange(a.users)
        out.append(
            WorkItem(
                f"{salt}/t{t}", f"{salt}/t{t}/u{u}", prefixes[t] + users[t][u] + ids(a.query_len)
            )
        )
    return out


def oracle_cached_tokens(work: list[WorkItem], block_size: int) -> list[int]:
    """Per request, the tokens an ideal router with unbounded KV serves from cache (module doc)."""
    seen: set[int] = set()
    out = []
    for w in work:
        n = len(w.prompt)
        hashes = hash_blocks(w.prompt[: n - 1], block_size, tenant=w.tenant)
        hit = 0
        for h in hashes:
            if h not in seen:
                break
            hit += 1
        out.append(hit * block_size)
        # The engine caches every full prompt block it computed.
        seen.update(hash_blocks(w.prompt, block_size, tenant=w.tenant))
    return out


async def _one(stub: Any, pb: Any, w: WorkItem, a: argparse.Namespace, metadata: list) -> Record:
    import grpc

    rec = Record(sent=time.perf_counter())
    req = pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=w.prompt),
        sampling=pb.SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True),
        output=pb.OUTPUT_MODE_TOKEN_IDS,
        tenant=w.tenant,
        session_id=w.session,
    )
    try:
        async for msg in stub.Generate(req, timeout=a.timeout, metadata=metadata):
            n = len(msg.token_ids)
            if n and rec.first is None:
                rec.first = time.perf_counter()
            rec.num_tokens += n
            if msg.finish_reason:
                rec.prompt_tokens = msg.usage.prompt_tokens
                rec.cached_tokens = msg.usage.cached_tokens
                rec.replica = msg.replica_id
        rec.done = time.perf_counter()
    except grpc.aio.AioRpcError as e:
        rec.error = e.code().name
    return rec


async def run_one(
    a: argparse.Namespace, mode: str, rate: float, work: list[WorkItem], oracle: list[int]
) -> dict[str, Any]:
    import grpc

    from rayfleet.protos_gen.v1 import generation_pb2 as pb
    from rayfleet.protos_gen.v1 import generation_pb2_grpc as pb_grpc

    metadata = [("rayfleet-routing", mode)]
    if a.application:
        metadata.append(("application", a.application))
    offsets = arrival_times(len(work), rate, random.Random(a.seed + 1))
    async with grpc.aio.insecure_channel(a.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        records, wall = await dispatch(offsets, work, lambda w: _one(stub, pb, w, a, metadata))
    ok = [r for r in records if r.error is None]
    errors = count_errors(records)
    prompt = sum(r.prompt_tokens for r in ok)
    oracle_ok = sum(o for o, r in zip(oracle, records) if r.error is None)
    per_replica: dict[str, int] = {}
    for r in ok:
        per_replica[r.replica] = per_replica.get(r.replica, 0) + 1
    return {
        "mode": mode,
        "rate": rate if not math.isinf(rate) else "inf",
        "num_requests": len(records),
        "completed": len(ok),
        "errors": errors,
        "duration_s": wall,
        "request_throughput": len(ok) / wall,
        "output_tok_s": sum(r.num_tokens for r in ok) / wall,
        "ttft_s": percentiles([r.first - r.sent for r in ok if r.first is not None], (50, 90, 99)),
        "e2e_s": percentiles([r.done - r.sent for r in ok if r.done is not None], (50, 90)),
        "prompt_tokens": prompt,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "oracle_hit_rate": oracle_ok / prompt if prompt else 0.0,
        "requests_per_replica": dict(sorted(per_replica.items())),
    }


def saturated(res: dict[str, Any]) -> bool:
    """Offered load beyond what the replicas served: all at once, or under 90% of the rate."""
    rate = res["rate"]
    return rate == "inf" or res["request_throughput"] < 0.9 * float(rate)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rate: each mode's output tok/s, TTFT p90 and saturation, and prefix_precise against
    round_robin (throughput ratio, TTFT p90 ratio) where both ran."""
    rows = []
    for rate in dict.fromkeys(r["rate"] for r in results):
        by_mode = {r["mode"]: r for r in results if r["rate"] == rate}
        row: dict[str, Any] = {
            "rate": rate,
            "modes": {
                m: {
                    "output_tok_s": r["output_tok_s"],
                    "ttft_p90_s": r["ttft_s"].get("p90"),
                    "saturated": saturated(r),
                }
                for m, r in by_mode.items()
            },
        }
        pp, rr = by_mode.get("prefix_precise"), by_mode.get("round_robin")
        if pp and rr and rr["output_tok_s"] and pp["ttft_s"].get("p90"):
            row["precise_over_round_robin"] = {
                "throughput": pp["output_tok_s"] / rr["output_tok_s"],
                "ttft_p90_reduction": rr["ttft_s"].get("p90", 0.0) / pp["ttft_s"]["p90"],
            }
        rows.append(row)
    return rows


def _plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        xs = [r["request_throughput"] for r in rs]
        (line,) = axes[0].plot(xs, [r["output_tok_s"] for r in rs], "o-", label=mode)
        axes[1].plot(xs, [r["ttft_s"].get("p90", math.nan) * 1e3 for r in rs], "o-", label=mode)
        axes[2].plot(xs, [r["hit_rate"] for r in rs], "o-", color=line.get_color(), label=mode)
        axes[2].plot(
            xs, [r["oracle_hit_rate"] for r in rs], "--", color=line.get_color(), alpha=0.5
        )
    for ax, title, unit in zip(
        axes,
        ("output throughput", "TTFT p90", "prefix hit rate (dashed: oracle)"),
        ("tok/s", "ms", "cached / prompt tokens"),
    ):
        ax.set_title(title)
        ax.set_xlabel("achieved request rate (req/s)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cmd_bench_routing(a: argparse.Namespace) -> int:
    import grpc

    from rayfleet.protos_gen.v1 import generation_pb2 as pb
    from rayfleet.protos_gen.v1 import generation_pb2_grpc as pb_grpc

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"error: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
        return 2
    rates = parse_rates(a.rate or ["4"])
    metadata = [("application", a.application)] if a.application else []
    with grpc.insecure_channel(a.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=metadata)
        server = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60, metadata=metadata)
    if server.routing == "default":
        print("error: the app routes with Serve's default router; deploy with --routing MODE")
        return 2
    block_size = info.block_size or 16
    results = []
    for rate in rates:
        for mode in modes:
            salt = f"{mode}@{rate}"
            work = build_workload(a, info.vocab_size, salt)
            oracle = oracle_cached_tokens(work, block_size)
            res = asyncio.run(run_one(a, mode, rate, work, oracle))
            results.append(res)
            print(
                f"{mode:>15} rate {res['rate']}: {res['output_tok_s']:.1f} out tok/s, "
                f"TTFT p50 {res['ttft_s'].get('p50', 0) * 1e3:.1f} ms "
                f"p90 {res['ttft_s'].get('p90', 0) * 1e3:.1f} ms, hit rate "
                f"{res['hit_rate']:.3f} (oracle {res['oracle_hit_rate']:.3f}), "
                f"per replica {list(res['requests_per_replica'].values())}, "
                f"errors {res['errors'] or 0}",
                flush=True,
            )
            time.sleep(a.pause)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (
        Path(a.output_json)
        if a.output_json
        else Path("bench/results") / f"routing-{info.model_name}-{stamp}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "routing",
        "target": a.target,
        "model": info.model_name,
        "dtype": info.dtype,
        "block_size": block_size,
        "default_routing": server.routing,
        "num_replicas": len(server.replicas),
        "replica_devices": sorted({r.device for r in server.replicas}),
        "workload": {
            k: getattr(a, k)
            for k in (
                "num_requests",
                "tenants",
                "users",
                "prefix_len",
                "user_prefix_len",
                "query_len",
                "output_len",
                "seed",
            )
        },
        "oracle_definition": "full blocks shared with any earlier request of the run (same "
        "tenant), unbounded KV, timing ignored: an upper bound",
        "client": {"host": platform.node(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": summarize(results),
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2))
    for row in doc["summary"]:
        vs = row.get("precise_over_round_robin")
        if vs:
            sat = ", ".join(m for m, v in row["modes"].items() if v["saturated"]) or "none"
            print(
                f"rate {row['rate']}: prefix_precise / round_robin throughput "
                f"{vs['throughput']:.2f}x, TTFT p90 {vs['ttft_p90_reduction']:.1f}x lower "
                f"(saturated: {sat})"
            )
    print(f"wrote {out}")
    if not a.no_plot:
        plot = _plot(results, out.with_suffix(".png"))
        if plot is not None:
            print(f"wrote {plot}")
    return 0
