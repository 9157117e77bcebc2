"""rayfleet_* metrics are exported on Ray's metrics endpoint."""

from __future__ import annotations

import time
import urllib.request

from rayfleet.protos_gen.v1 import generation_pb2 as pb

from .conftest import Cluster

EXPECTED = (
    "rayfleet_requests",
    "rayfleet_time_to_first_token_seconds",
    "rayfleet_inter_token_latency_seconds",
    "rayfleet_e2e_request_latency_seconds",
    "rayfleet_prompt_tokens",
    "rayfleet_generation_tokens",
    "rayfleet_cached_prompt_tokens",
    "rayfleet_num_requests_running",
    "rayfleet_num_requests_waiting",
    "rayfleet_kv_cache_usage_ratio",
    "rayfleet_aborted_requests",
    # The prefix-aware router's closed loop (the app routes prefix_precise by default).
    "rayfleet_router_predicted_cached_tokens_total",
    "rayfleet_router_actual_cached_tokens_total",
    "rayfleet_router_decision_latency_seconds",
)
# Counters appear once first incremented; preemptions need a full KV pool, so not checked here.


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_metrics_endpoint(cluster: Cluster) -> None:
    with cluster.channel() as ch:
        stub = cluster.stub(ch)
        # The same 40-token prompt twice on one replica: the second hits the prefix cache.
        prompt = pb.TokenIds(ids=list(range(10, 50)))
        cached = 0
        for _ in range(6):
            msgs = list(
                stub.Generate(
                    pb.GenerateRequest(
                        prompt_token_ids=prompt,
                        sampling=pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                    ),
                    timeout=60,
                )
            )
            cached += msgs[-1].usage.cached_tokens
        assert cached > 0
        # One aborted request, for rayfleet_aborted_requests.
        stream = stub.Generate(
            pb.GenerateRequest(
                prompt_text="x",
                sampling=pb.SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
            ),
            timeout=60,
        )
        next(stream)
        stream.cancel()
    deadline = time.monotonic() + 40
    missing: list[str] = list(EXPECTED)
    while missing and time.monotonic() < deadline:
        text = _scrape(cluster.metrics_port)
        missing = [m for m in EXPECTED if m not in text]
        time.sleep(1.0)
    assert not missing, f"not exported: {missing}"
    ok = [
        line
        for line in text.splitlines()
        if "rayfleet_requests" in line and 'status="ok"' in line and not line.startswith("#")
    ]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 2
