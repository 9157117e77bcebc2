"""`rayfleet bench serve`: load a running server over gRPC with Poisson arrivals.

For each ``--rate`` (requests/s; ``inf`` = all at once): ``--num-requests`` prompts of
``--input-len`` random token ids, each asking for exactly ``--output-len`` tokens (greedy, EOS
ignored), sent at exponential inter-arrival times by one asyncio client, every response streamed.
Reports TTFT, inter-token latency (per token, between chunks) and end-to-end latency percentiles,
request and output-token throughput, and errors by gRPC status. Writes JSON to
``bench/results/`` and, with several rates and matplotlib installed, a latency-vs-load plot.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC proxy")
    p.add_argument(
        "--rate",
        action="append",
        default=None,
        help="request rate per second (repeatable or comma-separated; inf = all at once)",
    )
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--output-json", default=None, help="default: bench/results/serve-*.json")
    p.add_argument("--no-plot", action="store_true")


def parse_rates(values: list[str] | None) -> list[float]:
    rates: list[float] = []
    for v in values or ["inf"]:
        for part in v.split(","):
            part = part.strip()
            if part:
                r = float(part)
                if not r > 0:
                    raise ValueError(f"--rate must be > 0; got {part}")
                rates.append(r)
    return rates


def percentiles(xs: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    from rayfleet.benchmarks.offline import percentiles as _p

    return _p(xs, ps)


def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Offsets (s) of ``n`` Poisson arrivals at ``rate``/s; all zero for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class RequestRecord:
    sent: float
    first: float | None = None
    done: float | None = None
    num_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


async def dispatch(
    offsets: list[float], items: list[Any], start: Callable[[Any], Awaitable[Any]]
) -> tuple[list[Any], float]:
    """Start ``start(item)`` at ``offsets[i]`` seconds after now for each item (open loop: a slow
    server does not slow the arrivals); returns the results in item order and the wall time."""
    t0 = time.perf_counter()
    tasks = []
    for off, item in zip(offsets, items):
        delay = t0 + off - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(start(item)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


def count_errors(records: list[Any]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return errors


async def _one(stub: Any, pb: Any, prompt: list[int], output_len: int, timeout: float):
    rec = RequestRecord(sent=time.perf_counter())
    req = pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True),
        output=pb.OUTPUT_MODE_TOKEN_IDS,
    )
    import grpc

    last = rec.sent
    try:
        async for msg in stub.Generate(req, timeout=timeout):
            now = time.perf_counter()
            n = len(msg.token_ids)
            if n:
                if rec.first is None:
                    rec.first = now
                else:
                    rec.itl.append((now - last) / n)
                last = now
                rec.num_tokens += n
        rec.done = time.perf_counter()
    except grpc.aio.AioRpcError as e:
        rec.error = e.code().name
    return rec


async def run_rate(
    target: str, rate: float, prompts: list[list[int]], output_len: int, timeout: float, seed: int
) -> dict[str, Any]:
    import grpc

    from rayfleet.protos_gen.v1 import generation_pb2 as pb
    from rayfleet.protos_gen.v1 import generation_pb2_grpc as pb_grpc

    offsets = arrival_times(len(prompts), rate, random.Random(seed))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        records, wall = await dispatch(
            offsets, prompts, lambda prompt: _one(stub, pb, prompt, output_len, timeout)
        )
    ok = [r for r in records if r.error is None]
    errors = count_errors(records)
    out_tokens = sum(r.num_tokens for r in ok)
    return {
        "rate": rate if not math.isinf(rate) else "inf",
        "num_requests": len(records),
        "completed": len(ok),
        "errors": errors,
        "duration_s": wall,
        "request_throughput": len(ok) / wall,
        "output_tok_s": out_tokens / wall,
        "ttft_s": percentiles([r.first - r.sent for r in ok if r.first is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "e2e_s": percentiles([r.done - r.sent for r in ok if r.done is not None]),
    }


def _plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [r["request_throughput"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(
        axes, ("ttft_s", "itl_s", "e2e_s"), ("TTFT", "inter-token latency", "end-to-end")
    ):
        for p in ("p50", "p90", "p99"):
            ax.plot(xs, [r[key].get(p, float("nan")) * 1e3 for r in results], "o-", label=p)
        ax.set_xlabel("achieved request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cmd_bench_serve(a: argparse.Namespace) -> int:
    import grpc

    from rayfleet.protos_gen.v1 import generation_pb2 as pb
    from rayfleet.protos_gen.v1 import generation_pb2_grpc as pb_grpc

    rates = parse_rates(a.rate)
    with grpc.insecure_channel(a.target) as channel:
        info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
    rng = random.Random(a.seed)
    vocab = info.vocab_size

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]

    if a.warmup_requests:
        asyncio.run(
            run_rate(a.target, math.inf, prompts(a.warmup_requests, 16), 4, a.timeout, a.seed)
        )
    results = []
    for rate in rates:
        res = asyncio.run(
            run_rate(
                a.target,
                rate,
                prompts(a.num_requests, a.input_len),
                a.output_len,
                a.timeout,
                a.seed,
            )
        )
        results.append(res)
        print(
            f"rate {res['rate']}: {res['request_throughput']:.2f} req/s, "
            f"{res['output_tok_s']:.1f} out tok/s, "
            f"TTFT p50 {res['ttft_s'].get('p50', 0) * 1e3:.1f} ms "
            f"p99 {res['ttft_s'].get('p99', 0) * 1e3:.1f} ms, "
            f"ITL p50 {res['itl_s'].get('p50', 0) * 1e3:.2f} ms, "
            f"e2e p50 {res['e2e_s'].get('p50', 0):.2f} s, errors {res['errors'] or 0}",
            flush=True,
        )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (
        Path(a.output_json)
        if a.output_json
        else Path("bench/results")
        / f"serve-{info.model_name}-{a.input_len}x{a.output_len}-{stamp}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "serve",
        "target": a.target,
        "model": info.model_name,
        "dtype": info.dtype,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "num_requests": a.num_requests,
        "client": {"host": platform.node(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    if len(results) > 1 and not a.no_plot:
        plot = _plot(results, out.with_suffix(".png"))
        if plot is not None:
            print(f"wrote {plot}")
    return 0
