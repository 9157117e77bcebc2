"""Prefix-aware routing on a real local Ray: a second application ("routing") with 3 CPU replicas
of the tiny model and a small KV pool, on the session's cluster, reached through the same gRPC
proxy (``application`` metadata) and, for the router's state, through the ingress handle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from ray import serve

from rayfleet.protos_gen.v1 import generation_pb2 as pb

from .conftest import Cluster

APP = "routing"
NUM_REPLICAS = 3
BS = 16
VOCAB = 300  # the tiny model has 320 ids


def ids_from(start: int, n: int) -> list[int]:
    return [10 + (start + k) % VOCAB for k in range(n)]


PREFIX = ids_from(200, 8 * BS)  # 8 full blocks shared by a "tenant's system prompt"


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> Iterator[Cluster]:
    from rayfleet.cluster.app import build_application

    cfg = replace(
        cluster.cfg,
        app_name=APP,
        route_prefix=f"/{APP}",
        autoscaling=None,
        num_replicas=NUM_REPLICAS,
        routing="prefix_precise",
        routing_stats_period_s=0.5,
        max_ongoing_requests=8,
        # 31 usable blocks (496 tokens): a few long prompts evict the shared prefix.
        engine={**cluster.cfg.engine, "num_blocks": 32},
    )
    serve.run(build_application(cfg), name=APP, route_prefix=cfg.route_prefix)
    routing = Cluster(cfg, cluster.model_dir, cluster.metrics_port)
    _wait_for_stats(routing)
    try:
        yield routing
    finally:
        serve.delete(APP)


def _debug(**kw: Any) -> dict[str, Any]:
    return serve.get_app_handle(APP).routing_debug.remote(**kw).result(timeout_s=30)


def _wait_for_stats(c: Cluster, timeout: float = 60.0) -> None:
    """Until the router has routed once and sees every replica's routing stats."""
    deadline = time.monotonic() + timeout
    _generate(c, [1, 2, 3], max_tokens=1)  # creates the router (lazily, on first use)
    while True:
        snap = _debug()["router"]
        if snap and len(snap["replicas_with_stats"]) == NUM_REPLICAS:
            return
        assert time.monotonic() < deadline, f"router never saw {NUM_REPLICAS} replicas: {snap}"
        time.sleep(0.25)


def _generate(
    c: Cluster, ids: list[int], *, max_tokens: int = 4, mode: str | None = None, **kw: Any
) -> pb.GenerateResponse:
    metadata = [("application", APP)]
    if mode is not None:
        metadata.append(("rayfleet-routing", mode))
    with c.channel() as ch:
        msgs = list(
            c.stub(ch).Generate(
                pb.GenerateRequest(
                    prompt_token_ids=pb.TokenIds(ids=ids),
                    sampling=pb.SamplingParams(
                        max_tokens=max_tokens, temperature=0, ignore_eos=True
                    ),
                    **kw,
                ),
                metadata=metadata,
                timeout=60,
            )
        )
    final = msgs[-1]
    assert final.finish_reason and final.replica_id
    return final


def test_shared_prefix_sticks_distinct_prefixes_spread(app: Cluster) -> None:
    homes = {_generate(app, PREFIX + [i, 9, 9], tenant="acme").replica_id for i in range(5)}
    assert len(homes) == 1, f"one prefix must keep one replica; got {homes}"
    follower = _generate(app, PREFIX + [42, 9, 9], tenant="acme")
    assert follower.usage.cached_tokens == len(PREFIX)

    # Distinct prefixes (other tenants: their chains are salted) spread over the replicas.
    spread = {_generate(app, PREFIX + [1, 2, 3], tenant=f"tenant-{t}").replica_id for t in range(9)}
    assert len(spread) >= 2, spread

    snap = _debug()["router"]["modes"]["prefix_precise"]
    assert snap["predicted_cached_tokens"] >= 5 * len(PREFIX)
    assert snap["actual_cached_tokens"] >= 5 * len(PREFIX)


def test_evicted_prefix_is_no_longer_predicted(app: Cluster) -> None:
    ids = PREFIX + [7, 7, 7]
    home = _generate(app, ids, tenant="evict").replica_id
    _generate(app, ids, tenant="evict")
    deadline = time.monotonic() + 10
    while _debug(prompt_token_ids=ids, tenant="evict")["match"].get(home, 0) < 8:
        assert time.monotonic() < deadline, "the replica's KV events never confirmed the prefix"
        time.sleep(0.2)
    # Long prompts that share only the first block (so they go to the same replica, which
    # also keeps that block hot) fill the 31-block pool and evict the rest of the prefix.
    for i in range(4):
        other = PREFIX[:BS] + ids_from(17 + 61 * i, 200)
        assert _generate(app, other, tenant="evict").replica_id == home
    # Within ~1 s the replica's eviction events reach the router's index.
    t0 = time.monotonic()
    while (matched := _debug(prompt_token_ids=ids, tenant="evict")["match"].get(home, 0)) > 1:
        assert time.monotonic() - t0 < 5, f"still predicting {matched} blocks on {home}"
        time.sleep(0.1)
    before = _debug()["router"]["modes"]["prefix_precise"]
    final = _generate(app, ids, tenant="evict")
    after = _debug()["router"]["modes"]["prefix_precise"]
    predicted = after["predicted_cached_tokens"] - before["predicted_cached_tokens"]
    actual = after["actual_cached_tokens"] - before["actual_cached_tokens"]
    assert predicted <= BS and actual == final.usage.cached_tokens <= BS
    snap = _debug()["router"]
    assert snap["events_applied"]["removed"] > 0 and snap["event_gaps"] == 0


def test_modes_each_route(app: Cluster) -> None:
    ids = [ids_from(50 * i, 40) for i in range(6)]
    rr = [_generate(app, p, mode="round_robin").replica_id for p in ids]
    assert len(set(rr[:3])) == 3 and rr[3:] == rr[:3], rr
    ll = [_generate(app, p, mode="least_loaded").replica_id for p in ids[:3]]
    assert all(ll)
    approx = {_generate(app, PREFIX + [i], mode="prefix_approx").replica_id for i in range(3)}
    assert len(approx) == 1
    modes = _debug()["router"]["modes"]
    assert {"round_robin", "least_loaded", "prefix_approx", "prefix_precise"} <= set(modes)
    assert modes["round_robin"]["requests"] == 6
    with pytest.raises(grpc.RpcError) as e:
        _generate(app, [1, 2, 3], mode="random")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_server_info_reports_the_mode(app: Cluster) -> None:
    with app.channel() as ch:
        info = app.stub(ch).GetServerInfo(
            pb.GetServerInfoRequest(), metadata=[("application", APP)], timeout=30
        )
    assert info.routing == "prefix_precise"
    assert len(info.replicas) == NUM_REPLICAS
