"""Routing policies on hand-built replica states: exact choices; RouterCore and hit tracking."""

from __future__ import annotations

import pytest

from rayfleet.router.closed_loop import CacheHitTracker, RouterCore
from rayfleet.router.policy import (
    MODES,
    PolicyWeights,
    ReplicaLoad,
    RoundRobin,
    RoutingMode,
    choose_replica,
    least_loaded,
    rendezvous_weight,
)

BS = 16
# Each term on its own, with round numbers: a miss costs only its prefill (no copy premium, no
# externality), decode and KV pressure on. The defaults' extra terms are tested below.
W = PolicyWeights(
    queue_weight=1.0,
    miss_weight=1.0,
    externality_weight=0.0,
    decode_weight=0.05,
    kv_pressure_tokens=4096.0,
    tie_tolerance_tokens=16.0,
)
D = PolicyWeights()  # the defaults
IDLE = ReplicaLoad()


def _idle(*names: str) -> dict[str, ReplicaLoad]:
    return {n: IDLE for n in names}


def test_longest_prefix_holder_wins_when_loads_equal() -> None:
    loads = {n: ReplicaLoad(queued_prefill_tokens=500) for n in "abc"}
    d = choose_replica({"a": 2, "b": 5}, loads, request_blocks=8, block_size=BS, weights=W)
    assert (d.replica, d.matched_blocks, d.predicted_cached_tokens) == ("b", 5, 80)
    assert d.reason == "prefix"
    assert d.scores == {"a": 6 * 16 + 500, "b": 3 * 16 + 500, "c": 8 * 16 + 500}


def test_overloaded_holder_loses_to_idle_then_wins_when_load_drops() -> None:
    # a holds all 100 blocks (1600 tokens of prefill saved) but has 5000 queued prefill tokens.
    match = {"a": 100}
    busy = {"a": ReplicaLoad(queued_prefill_tokens=5000), "b": IDLE}
    d = choose_replica(match, busy, request_blocks=100, block_size=BS, weights=W)
    assert (d.replica, d.reason, d.predicted_cached_tokens) == ("b", "load", 0)
    assert d.scores == {"a": 5000.0, "b": 1600.0}
    # Its queue drains below the prefill it saves: affinity wins again (decided per request).
    drained = {"a": ReplicaLoad(queued_prefill_tokens=1500), "b": IDLE}
    d = choose_replica(match, drained, request_blocks=100, block_size=BS, weights=W)
    assert (d.replica, d.reason, d.predicted_cached_tokens) == ("a", "prefix", 1600)


def test_hit_and_balance_decided_per_request_not_fleet_wide() -> None:
    # The fleet is imbalanced (a is overloaded), yet a request whose prefix c holds still goes to c.
    loads = {
        "a": ReplicaLoad(queued_prefill_tokens=50_000),
        "b": IDLE,
        "c": ReplicaLoad(queued_prefill_tokens=300),
    }
    d = choose_replica({"a": 64, "c": 64}, loads, request_blocks=64, block_size=BS, weights=W)
    assert d.replica == "c"


def test_miss_goes_to_least_loaded_in_tokens_not_requests() -> None:
    # a: 1 request of 8k prompt tokens queued; b: 3 requests of 100 tokens each.
    loads = {
        "a": ReplicaLoad(queued_prefill_tokens=8000),
        "b": ReplicaLoad(queued_prefill_tokens=300),
    }
    d = choose_replica({}, loads, request_blocks=10, block_size=BS, weights=W)
    assert (d.replica, d.reason) == ("b", "load")
    # Same with decode load: one 8k-context sequence vs three 100-token ones.
    loads = {
        "a": ReplicaLoad(decode_seqs=1, decode_tokens=8000),
        "b": ReplicaLoad(decode_seqs=3, decode_tokens=300),
    }
    assert choose_replica({}, loads, 10, BS, W).replica == "b"
    assert least_loaded({}, loads, 10, BS, W).replica == "b"


def test_kv_pressure_and_speed() -> None:
    loads = {"a": ReplicaLoad(kv_usage=1.0), "b": ReplicaLoad(kv_usage=0.5)}
    d = choose_replica({"a": 4}, loads, request_blocks=4, block_size=BS, weights=W)
    assert d.replica == "b"  # 4096 penalty > 64 tokens saved
    assert d.scores["a"] == pytest.approx(4096.0)
    # A replica twice as fast clears twice the queue in the same time.
    loads = {
        "fast": ReplicaLoad(queued_prefill_tokens=3000, speed=2.0),
        "slow": ReplicaLoad(queued_prefill_tokens=1600),
    }
    d = choose_replica({}, loads, request_blocks=10, block_size=BS, weights=W)
    assert d.scores == {"fast": 1580.0, "slow": 1760.0} and d.replica == "fast"


def test_non_accepting_replicas_are_skipped_unless_none_accept() -> None:
    loads = {"a": ReplicaLoad(accepting=False), "b": ReplicaLoad(queued_prefill_tokens=10_000)}
    assert choose_replica({"a": 8}, loads, 8, BS, W).replica == "b"
    loads = {"a": ReplicaLoad(accepting=False)}
    assert choose_replica({}, loads, 8, BS, W).replica == "a"
    with pytest.raises(ValueError):
        choose_replica({}, {}, 8, BS, W)


def test_session_affinity_breaks_ties_stably() -> None:
    names = [f"r{i}" for i in range(8)]
    expected = max(names, key=lambda r: rendezvous_weight("user-42", r))
    d = choose_replica({}, _idle(*names), 8, BS, W, session_key="user-42")
    assert (d.replica, d.reason) == (expected, "session")
    # Stable across calls and across the order in which replicas are listed.
    assert choose_replica({}, _idle(*reversed(names)), 8, BS, W, "user-42").replica == expected
    # Removing another replica does not move the session.
    others = [n for n in names if n != expected][1:]
    assert choose_replica({}, _idle(expected, *others), 8, BS, W, "user-42").replica == expected
    # Different sessions spread over the fleet.
    chosen = {choose_replica({}, _idle(*names), 8, BS, W, f"s{i}").replica for i in range(200)}
    assert chosen == set(names)


def test_session_affinity_is_only_a_tie_breaker() -> None:
    names = ["r0", "r1"]
    fav = max(names, key=lambda r: rendezvous_weight("sess", r))
    other = "r1" if fav == "r0" else "r0"
    # Within tolerance (10 tokens apart): the session's replica wins.
    loads = {fav: ReplicaLoad(queued_prefill_tokens=10), other: IDLE}
    assert choose_replica({}, loads, 8, BS, W, "sess").replica == fav
    # A real cache hit elsewhere beats the session.
    assert choose_replica({other: 8}, _idle(*names), 8, BS, W, "sess").replica == other
    # Without a key, exact ties go to the first replica listed.
    assert choose_replica({}, _idle("x", "y", "z"), 8, BS, W).replica == "x"


def test_round_robin_cycles() -> None:
    rr = RoundRobin()
    loads = _idle("a", "b", "c")
    got = [rr({"c": 9}, loads, 9, BS, W).replica for _ in range(7)]
    assert got == ["a", "b", "c", "a", "b", "c", "a"]
    loads = {"a": IDLE, "b": ReplicaLoad(accepting=False), "c": IDLE}
    rr2 = RoundRobin()
    assert [rr2({}, loads, 1, BS).replica for _ in range(3)] == ["a", "c", "a"]


def test_least_loaded_ignores_cache() -> None:
    loads = {"a": ReplicaLoad(queued_prefill_tokens=100), "b": IDLE}
    d = least_loaded({"a": 50}, loads, 50, BS, W)
    assert (d.replica, d.predicted_cached_tokens) == ("b", 0)


def test_prefix_modes_share_the_policy_and_differ_in_data_source() -> None:
    approx, precise = MODES[RoutingMode.PREFIX_APPROX], MODES[RoutingMode.PREFIX_PRECISE]
    assert approx.make_policy() is precise.make_policy() is choose_replica
    assert (approx.applies_events, precise.applies_events) == (False, True)


def test_weights_validate() -> None:
    with pytest.raises(ValueError):
        PolicyWeights(queue_weight=-1.0)
    with pytest.raises(ValueError):
        PolicyWeights(kv_threshold=1.0)
    with pytest.raises(ValueError):
        PolicyWeights(miss_weight=0.5)
    with pytest.raises(ValueError):
        PolicyWeights(externality_weight=-1.0)


# ------------------------------------------------------------------ the defaults' miss cost
# A tenant prefix of 144 blocks + 8 blocks of query (2432 tokens): its holder misses 128 tokens.
TENANT = 152


def test_one_queued_cold_prompt_does_not_give_the_tenant_away() -> None:
    # The bench at 12 req/s: the holder just got another tenant's cold 2416-token prompt, the
    # others are idle. Its own latency is a tie (2416 + 128 vs 2432), but the miss would copy the
    # tenant's prefix: by prefill alone (W) it went to the idle replica, by the default cost not.
    loads = {"a": ReplicaLoad(queued_prefill_tokens=2416), "b": IDLE, "c": IDLE}
    assert choose_replica({"a": 144}, loads, TENANT, BS, W).replica == "b"
    d = choose_replica({"a": 144}, loads, TENANT, BS, D)
    assert (d.replica, d.reason, d.matched_blocks) == ("a", "prefix", 144)
    assert d.scores == pytest.approx({"a": 2416 + 128 * (3 + 2416 / 2432), "b": 7296, "c": 7296})


def test_under_load_a_hit_is_given_away_only_to_a_fraction_of_its_holders_queue() -> None:
    # Every replica busy: the holder's queue is 8k tokens longer than the other's (about the
    # staleness of a snapshot), which by prefill alone gives the hit away.
    loads = {
        "a": ReplicaLoad(queued_prefill_tokens=20_000),
        "b": ReplicaLoad(queued_prefill_tokens=12_000),
    }
    assert choose_replica({"a": 144}, loads, TENANT, BS, W).replica == "b"
    d = choose_replica({"a": 144}, loads, TENANT, BS, D)
    assert d.replica == "a"
    # b's miss also delays the ~12000/2432 requests that will queue behind it there.
    assert d.scores["b"] == pytest.approx(12_000 + 2432 * (3 + 12_000 / 2432))
    # Once the holder's queue is about 2.5 times the other's, the hit goes (per request).
    loads["a"] = ReplicaLoad(queued_prefill_tokens=30_000)
    assert choose_replica({"a": 144}, loads, TENANT, BS, D).replica == "b"


def test_an_idle_replica_still_takes_a_hot_tenants_overflow() -> None:
    # The holder's queue is 3 prompts long and the other replica idle: spread the tenant.
    loads = {"a": ReplicaLoad(queued_prefill_tokens=3 * 2432 + 100), "b": IDLE}
    d = choose_replica({"a": 144}, loads, TENANT, BS, D)
    assert (d.replica, d.reason) == ("b", "load")
    assert d.scores["b"] == 3 * 2432
    # One prompt less and it stays.
    loads = {"a": ReplicaLoad(queued_prefill_tokens=2 * 2432 + 100), "b": IDLE}
    assert choose_replica({"a": 144}, loads, TENANT, BS, D).replica == "a"


def test_default_miss_everywhere_is_still_least_loaded_in_tokens() -> None:
    loads = {
        "a": ReplicaLoad(queued_prefill_tokens=8000),
        "b": ReplicaLoad(queued_prefill_tokens=300),
        "c": ReplicaLoad(queued_prefill_tokens=301),
    }
    d = choose_replica({}, loads, 10, BS, D)
    assert (d.replica, d.reason) == ("b", "load")
    assert sorted(d.scores, key=d.scores.get) == ["b", "c", "a"]


# ------------------------------------------------------------------ RouterCore / closed loop


def test_router_core_precise_reconciles_with_events() -> None:
    core = RouterCore("prefix_precise", block_size=BS, weights=W, prediction_ttl_s=5.0)
    loads = _idle("a", "b")
    chain = [11, 12, 13, 14]
    d1 = core.route("q1", chain, loads, now=0.0)
    assert d1.replica == "a" and d1.predicted_cached_tokens == 0
    # A second request with the same prefix follows the prediction before any event arrived.
    d2 = core.route("q2", chain, loads, now=0.1)
    assert (d2.replica, d2.predicted_cached_tokens) == ("a", 64)
    # The engine only cached two blocks, then evicted one: the index follows the events.
    core.on_kv_events("a", [11, 12], [], now=0.2)
    core.on_kv_events("a", [], [12], now=0.3)
    assert core.index is not None
    assert core.index.match(chain, now=6.0) == {"a": 1}  # unconfirmed 13, 14 expired
    core.on_finished("q1", cached_tokens=0)
    core.on_finished("q2", cached_tokens=32)
    t = core.tracker
    assert (t.requests, t.predicted_tokens, t.actual_tokens) == (2, 64, 32)
    assert t.drift_ratio == 0.5 and t.over_prediction_ratio == 0.5


def test_router_core_approx_ignores_events() -> None:
    core = RouterCore(RoutingMode.PREFIX_APPROX, block_size=BS, weights=W)
    core.route("q1", [1, 2], _idle("a", "b"), now=0.0)
    core.on_kv_events("a", [], [1, 2], now=1.0)
    assert core.index is not None and core.index.match([1, 2], now=1e6) == {"a": 2}


def test_router_core_baselines_have_no_index() -> None:
    core = RouterCore("round_robin", block_size=BS)
    assert core.index is None
    got = [core.route(i, [1], _idle("a", "b"), now=0.0).replica for i in range(3)]
    assert got == ["a", "b", "a"]


def test_hit_tracker_counts_and_bounds() -> None:
    t = CacheHitTracker(max_outstanding=2)
    t.record("x", "a", 100)
    t.record("y", "b", 0)
    t.record("z", "a", 50)  # pushes out x
    assert t.dropped == 1 and t.outstanding == 2
    assert t.finish("x", 100) is None
    assert t.finish("y", 16) == 0
    assert t.finish("z", 10) == 50
    assert (t.over_predicted_tokens, t.under_predicted_tokens) == (40, 16)
    assert (t.predicted_hit_requests, t.missed_hit_requests) == (1, 1)
    assert t.per_replica["a"].actual_tokens == 10
    t.record("w", "a", 5)
    t.discard("w")
    assert t.outstanding == 0
