"""The Serve router's pure glue: Serve's replicas + routing stats -> ReplicaLoads -> Decision,
KV event batches over the lossy broadcast, the closed loop. No Ray (fake clock, plain dicts)."""

from __future__ import annotations

import pickle

import pytest

from rayfleet.cluster.request_codec import GenerationJob
from rayfleet.hashing import hash_blocks
from rayfleet.router.policy import Decision, ReplicaLoad
from rayfleet.router.routing_state import (
    KVEventCursor,
    PendingPrefill,
    ReplicaView,
    RoutingHint,
    RoutingState,
    rank_replicas,
    replica_loads,
    routing_hint_of,
)
from rayfleet.sampling_params import SamplingParams

BS = 16


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def hint(rid: str, ids: list[int], *, tenant: str | None = None, **kw) -> RoutingHint:
    hashes = hash_blocks(ids[: len(ids) - 1], BS, tenant=tenant)
    return RoutingHint(rid, tuple(hashes), BS, len(ids), **kw)


def views(*ids: str, **stats) -> list[ReplicaView]:
    return [ReplicaView(r, stats.get(r, {})) for r in ids]


def fresh(clock: Clock, *ids: str) -> list[ReplicaView]:
    """Snapshots taken now (the replicas already counted everything sent before)."""
    clock.t += 1.0
    return views(*ids, **{r: {"time": clock.t} for r in ids})


PREFIX = list(range(100, 100 + 8 * BS))  # 8 full blocks


def test_replica_loads_from_stats_and_queue_cache() -> None:
    vs = [
        ReplicaView(
            "a",
            {
                "queued_prefill_tokens": 100,
                "num_running": 3,
                "decode_tokens": 900,
                "kv_usage": 0.5,
            },
            queue_len=2,
            max_ongoing_requests=4,
        ),
        ReplicaView("b", {}, queue_len=4, max_ongoing_requests=4),  # full: not accepting
        ReplicaView("c"),  # no stats yet, queue unknown
    ]
    loads = replica_loads(vs, pending={"a": 50})
    assert list(loads) == ["a", "b", "c"]
    assert loads["a"] == ReplicaLoad(150, 3, 900, 0.5, 1.0, True)
    assert loads["b"].accepting is False
    assert loads["c"] == ReplicaLoad()


def test_rank_puts_decision_first_then_by_cost() -> None:
    d = Decision("b", 2, 32, {"a": 30.0, "b": 10.0, "c": 20.0})
    assert rank_replicas(d, ["a", "b", "c", "d"]) == [["b"], ["c", "a", "d"]]
    assert rank_replicas(Decision("a", 0, 0, {}), ["a"]) == [["a"]]


def test_hint_rides_on_the_job_but_is_never_pickled() -> None:
    h = hint("r1", PREFIX)
    job = GenerationJob("r1", PREFIX, SamplingParams(), routing=h)
    assert routing_hint_of([job], {}) is h
    assert routing_hint_of([], {"job": job}) is h
    assert routing_hint_of(["x"], {}) is None
    sent = pickle.loads(pickle.dumps(job))
    assert sent.routing is None and sent.prompt_token_ids == PREFIX
    assert job.routing is h  # the ingress's copy keeps it


def test_hint_blocks_stop_before_the_last_prompt_token() -> None:
    # A block-aligned prompt: the engine recomputes its last block, so it is not matched.
    assert len(hint("r", PREFIX).block_hashes) == 7
    assert len(hint("r", PREFIX + [1]).block_hashes) == 8


def test_shared_prefix_sticks_and_distinct_prefixes_spread() -> None:
    clock = Clock()
    st = RoutingState("prefix_precise", clock=clock)

    def idle() -> list[ReplicaView]:  # fresh snapshots: every replica done with what we sent
        clock.t += 1.0
        return views("a", "b", "c", **{r: {"time": clock.t} for r in "abc"})

    first = st.decide(hint("r0", PREFIX + [1, 2, 3]), idle())
    for i in range(1, 5):
        r = st.decide(hint(f"r{i}", PREFIX + [i, 7, 7]), idle())
        assert r.decision.replica == first.decision.replica
        assert r.decision.reason == "prefix" and r.decision.matched_blocks == 8
        assert r.ranks[0] == [first.decision.replica]
    # While the stats are stale, a burst of the same prefix does not pile onto one replica
    # beyond what its queued prefill is worth (the router counts what it sent since).
    reps = views("a", "b", "c")
    burst = [st.decide(hint(f"b{i}", PREFIX + [i]), reps).decision for i in range(3)]
    assert burst[0].replica == first.decision.replica and burst[0].matched_blocks == 8
    # Other tenants' copies of the same tokens hash differently: no match, and the prefill the
    # router just sent pushes each new tenant to another replica.
    chosen = {
        st.decide(hint(f"t{i}", PREFIX + [1], tenant=f"t{i}"), reps).decision.replica
        for i in range(3)
    }
    assert len(chosen) >= 2


def test_kv_events_reconcile_and_evictions_stop_predictions() -> None:
    clock = Clock()
    st = RoutingState("prefix_precise", clock=clock, prediction_ttl_s=30.0)
    h = hint("r0", PREFIX + [1])
    routed = st.decide(h, views("a", "b"))
    a = routed.decision.replica
    st.on_finished("r0", a, 0)
    # The replica confirms the blocks (batch 1), then evicts the first one (batch 2).
    stored = list(h.block_hashes)
    st.on_stats([ReplicaView(a, {"time": clock.t, "kv_events": [(1, stored, [])]})])
    assert st.match(h.block_hashes) == {a: 8}
    clock.t += 60  # past the prediction TTL: only confirmed blocks remain
    assert st.match(h.block_hashes) == {a: 8}
    st.on_stats(
        [ReplicaView(a, {"kv_events": [(1, stored, []), (2, [], [stored[0]])]})]
    )  # batch 1 repeated in the window: applied once
    assert st.match(h.block_hashes) == {}
    snap = st.snapshot()
    assert snap["event_batches_applied"] == 2 and snap["event_gaps"] == 0
    r = st.decide(hint("r1", PREFIX + [2]), views("a", "b"))
    assert r.decision.predicted_cached_tokens == 0


def test_approx_ignores_events() -> None:
    st = RoutingState("prefix_approx", clock=Clock())
    h = hint("r0", PREFIX + [1])
    a = st.decide(h, views("a", "b")).decision.replica
    st.on_stats([ReplicaView(a, {"kv_events": [(1, [], list(h.block_hashes))]})])
    assert st.match(h.block_hashes) == {a: 8}  # the prediction stands


def test_event_cursor_window_and_gap() -> None:
    c = KVEventCursor()
    fresh, gap = c.new_batches("a", [(3, [1], []), (4, [2], [])])  # first sight: no gap
    assert [b[0] for b in fresh] == [3, 4] and not gap
    assert c.new_batches("a", [(3, [1], []), (4, [2], [])]) == ([], False)
    fresh, gap = c.new_batches("a", [(4, [2], []), (5, [3], [])])
    assert [b[0] for b in fresh] == [5] and not gap
    fresh, gap = c.new_batches("a", [(8, [9], [])])  # 6 and 7 fell out of the window
    assert [b[0] for b in fresh] == [8] and gap and c.gaps == 1


def test_gap_forgets_the_replica() -> None:
    st = RoutingState("prefix_precise", clock=Clock())
    h = hint("r0", PREFIX + [1])
    st.on_stats([ReplicaView("a", {"kv_events": [(1, list(h.block_hashes), [])]})])
    assert st.match(h.block_hashes) == {}  # no core yet: the first decide creates it
    st.decide(hint("x", [1, 2]), views("a"))
    st.on_stats([ReplicaView("a", {"kv_events": [(2, list(h.block_hashes), [])]})])
    assert st.match(h.block_hashes) == {"a": 8}
    st.on_stats([ReplicaView("a", {"kv_events": [(5, [], [])]})])  # missed 3, 4
    assert st.match(h.block_hashes) == {}


def test_pending_prefill_corrects_stale_snapshots() -> None:
    p = PendingPrefill(ttl_s=5.0)
    p.add("a", "r1", 100, now=10.0)
    p.add("a", "r2", 50, now=11.0)
    p.add("a", "r3", 20, now=11.2)
    assert p.tokens("a", snapshot_time=9.0, now=11.5) == 170  # none in the snapshot yet
    assert p.tokens("a", snapshot_time=10.5, now=11.5) == 70  # r1 is in it
    p.done("r3", now=11.3)  # first token: prefill done, before any snapshot saw it
    assert p.tokens("a", snapshot_time=10.5, now=11.5) == 50
    p.done("r1", now=11.4)  # the 10.5 snapshot still counts r1 as queued: subtract it
    assert p.tokens("a", snapshot_time=10.5, now=11.5) == 50 - 100
    assert p.tokens("a", snapshot_time=11.45, now=11.5) == 0  # a snapshot after all of it
    assert p.tokens("a", snapshot_time=None, now=20.0) == 0  # expired
    assert p.tokens("b", None, 0.0) == 0


def test_prefilled_requests_stop_loading_their_replica() -> None:
    st = RoutingState("least_loaded", clock=Clock())
    reps = views("a", "b")
    r0 = st.decide(hint("r0", list(range(300))), reps).decision.replica
    r1 = st.decide(hint("r1", list(range(1000, 1300))), reps).decision.replica
    assert r1 != r0  # r0's prompt is still queued on its replica
    st.on_prefilled("r0")
    st.on_prefilled("r1")
    assert st.snapshot()["inflight"] == 2


def test_closed_loop_and_fallback() -> None:
    clock = Clock()
    st = RoutingState("prefix_precise", clock=clock)
    st.decide(hint("r0", PREFIX + [1]), fresh(clock, "a", "b"))
    st.on_finished("r0", "a", 0)
    r1 = st.decide(hint("r1", PREFIX + [2]), fresh(clock, "a", "b"))
    assert r1.decision.predicted_cached_tokens == 8 * BS
    mode, predicted = st.on_finished("r1", r1.decision.replica, 8 * BS)
    assert mode.value == "prefix_precise" and predicted == 8 * BS
    # Serve fell back to the other replica (chosen one full): the prediction moves with it.
    r2 = st.decide(hint("r2", PREFIX + [3]), fresh(clock, "a", "b"))
    other = "b" if r2.decision.replica == "a" else "a"
    st.on_routed("r2", other)
    assert st.on_finished("r2", other, 0) == (mode, 0)
    snap = st.snapshot()
    m = snap["modes"]["prefix_precise"]
    assert m["predicted_cached_tokens"] == 8 * BS and m["actual_cached_tokens"] == 8 * BS
    assert snap["fallbacks"] == 1 and snap["inflight"] == 0
    st.decide(hint("r3", PREFIX), fresh(clock, "a", "b"))
    st.on_aborted("r3")
    assert st.on_finished("r3", "a", 5) is None


def test_modes_per_request_and_round_robin_cycles() -> None:
    st = RoutingState("prefix_precise", clock=Clock())
    reps = views("a", "b", "c")
    got = [
        st.decide(hint(f"r{i}", PREFIX, mode="round_robin"), reps).decision.replica
        for i in range(6)
    ]
    assert got == ["a", "b", "c", "a", "b", "c"]
    ll = st.decide(
        hint("x", PREFIX, mode="least_loaded"),
        views("a", "b", "c", a={"queued_prefill_tokens": 500}, b={"queued_prefill_tokens": 100}),
    )
    assert ll.decision.replica == "c" and ll.mode.value == "least_loaded"
    assert set(st.snapshot()["modes"]) == {"round_robin", "least_loaded"}


def test_session_key_breaks_ties_stably() -> None:
    st = RoutingState("least_loaded", clock=Clock())
    reps = views("a", "b", "c")
    picks = {
        st.decide(hint(f"r{i}", [i, 1, 2], session_key="user-7"), reps).decision.replica
        for i in range(5)
    }
    assert len(picks) == 1


def test_removed_replicas_leave_the_index() -> None:
    st = RoutingState("prefix_precise", clock=Clock())
    h = hint("r0", PREFIX + [1])
    a = st.decide(h, views("a", "b")).decision.replica
    assert st.match(h.block_hashes) == {a: 8}
    st.remove_replicas([a])
    assert st.match(h.block_hashes) == {}


def test_block_size_mismatch_is_an_error() -> None:
    st = RoutingState("prefix_precise", clock=Clock())
    st.decide(hint("r0", PREFIX), views("a"))
    with pytest.raises(ValueError, match="block_size"):
        st.decide(RoutingHint("r1", (), 32, 10), views("a"))


def test_a_cold_prompt_just_sent_to_the_holder_does_not_move_its_tenant() -> None:
    # Two replicas: a holds tenant t's 8-block prefix (confirmed), b has 100 tokens queued.
    # Another tenant's cold 300-token prompt goes to a (less loaded) after the snapshots were
    # taken, so the router counts it as a's pending prefill. t's next request (10 blocks, 8 held
    # by a): by its own latency b was cheaper (100 + 160 vs 300 + 32), but the miss would copy
    # t's prefix to b and delay b's queue. It stays on a.
    clock = Clock()
    st = RoutingState("prefix_precise", clock=clock)
    prefix = hint("t0", PREFIX + [1], tenant="t")
    st.decide(hint("x", [5, 6], tenant="x"), views("a", "b"))  # creates the core
    st.on_stats([ReplicaView("a", {"kv_events": [(1, list(prefix.block_hashes), [])]})])
    snap = {"a": {"time": clock.t}, "b": {"time": clock.t, "queued_prefill_tokens": 100}}
    clock.t += 0.1
    cold = st.decide(hint("u0", list(range(5000, 5300)), tenant="u"), views("a", "b", **snap))
    assert (cold.decision.replica, cold.decision.matched_blocks) == ("a", 0)
    t1 = hint("t1", PREFIX + list(range(40)), tenant="t")
    assert len(t1.block_hashes) == 10
    r = st.decide(t1, views("a", "b", **snap))
    assert (r.decision.replica, r.decision.matched_blocks) == ("a", 8)
    assert r.decision.scores == pytest.approx(
        {"a": 300 + 2 * BS * (3 + 300 / 160), "b": 100 + 10 * BS * (3 + 100 / 160)}
    )
