"""PrefixIndex: exact matches, exact LRU eviction, bounds, events vs predictions, TTL, tenants."""

from __future__ import annotations

import random

import pytest

from rayfleet.hashing import hash_blocks
from rayfleet.router.prefix_index import PrefixIndex

# Small ints stand in for block hashes: the index only needs them to be distinct per prefix.
CHAIN = [101, 102, 103, 104]


def _index(**kw: object) -> PrefixIndex:
    idx = PrefixIndex(**kw)  # type: ignore[arg-type]
    idx.apply_events("a", CHAIN, [], now=0.0)
    idx.apply_events("b", [101, 102, 903], [], now=0.0)
    idx.apply_events("c", [555], [], now=0.0)
    idx.check_integrity()
    return idx


def test_match_full_chain() -> None:
    assert _index().match(CHAIN, now=1.0) == {"a": 4, "b": 2}


def test_match_partial_chain() -> None:
    assert _index().match(CHAIN[:3], now=1.0) == {"a": 3, "b": 2}
    assert _index().match(CHAIN[:1], now=1.0) == {"a": 1, "b": 1}


def test_match_divergent_suffix() -> None:
    idx = _index()
    assert idx.match([101, 102, 903, 904], now=1.0) == {"a": 2, "b": 3}
    assert idx.match([101, 777, 103], now=1.0) == {"a": 1, "b": 1}  # a's 103 is not reachable


def test_no_match() -> None:
    idx = _index()
    assert idx.match([999, 101], now=1.0) == {}
    assert idx.match([], now=1.0) == {}


def test_predictions_match_like_events() -> None:
    idx = PrefixIndex(prediction_ttl_s=10.0)
    idx.predict("x", CHAIN, now=0.0)
    assert idx.match(CHAIN, now=1.0) == {"x": 4}
    assert all(idx.is_predicted("x", h) for h in CHAIN)
    idx.check_integrity()


def test_eviction_order_under_cap_is_exact() -> None:
    idx = PrefixIndex(max_entries=6)
    idx.apply_events("a", [1, 2, 3], [], now=0.0)
    # Chains are touched deepest first: the head is the most recently used.
    assert idx.lru_order() == [3, 2, 1]
    idx.apply_events("b", [4, 5, 6], [], now=1.0)
    assert idx.lru_order() == [3, 2, 1, 6, 5, 4]
    assert idx.match([1, 2], now=2.0) == {"a": 2}  # touches 2 then 1
    assert idx.lru_order() == [3, 6, 5, 4, 2, 1]
    idx.apply_events("c", [7, 8], [], now=3.0)  # two over the cap: the two oldest go
    assert idx.lru_order() == [5, 4, 2, 1, 8, 7]
    assert 3 not in idx and 6 not in idx
    assert idx.evicted_entries == 2
    # Tails went first, so what is left still matches from the head.
    assert idx.match([1, 2, 3], now=4.0) == {"a": 2}
    assert idx.match([4, 5, 6], now=4.0) == {"b": 2}
    assert idx.stats().blocks_per_replica == {"a": 2, "b": 2, "c": 2}
    idx.check_integrity()


def test_match_without_touch_keeps_order() -> None:
    idx = PrefixIndex(max_entries=10)
    idx.apply_events("a", [1, 2, 3], [], now=0.0)
    idx.match([1, 2, 3], now=1.0, touch=False)
    assert idx.lru_order() == [3, 2, 1]


def test_cap_evicts_predicted_entries_cleanly() -> None:
    idx = PrefixIndex(max_entries=3, prediction_ttl_s=5.0)
    idx.predict("a", [1, 2, 3], now=0.0)
    idx.predict("b", [4, 5], now=1.0)
    assert idx.lru_order() == [1, 5, 4]
    assert idx.stats().pending_predictions == 3
    idx.check_integrity()
    assert idx.match([1, 2], now=2.0) == {"a": 1}


def test_memory_bound_never_exceeded_under_random_operations() -> None:
    rng = random.Random(1234)
    cap = 64
    idx = PrefixIndex(max_entries=cap, prediction_ttl_s=3.0)
    replicas = [f"r{i}" for i in range(5)]
    heads = [rng.randrange(1 << 40) for _ in range(8)]
    now = 0.0
    for step in range(3000):
        now += rng.random() * 0.2
        head = rng.choice(heads)
        chain = [head * 1000 + i for i in range(rng.randrange(1, 30))]
        r = rng.choice(replicas)
        op = rng.random()
        if op < 0.35:
            idx.predict(r, chain, now)
        elif op < 0.65:
            idx.apply_events(r, chain, [], now)
        elif op < 0.8:
            idx.apply_events(r, [], rng.sample(chain, k=min(3, len(chain))), now)
        elif op < 0.97:
            got = idx.match(chain, now)
            assert all(1 <= n <= len(chain) for n in got.values())
        else:
            idx.remove_replica(r)
        assert len(idx) <= cap
        if step % 7 == 0:
            idx.check_integrity()
    idx.check_integrity()
    assert idx.evicted_entries > 0 and idx.expired_predictions > 0


def test_removed_event_drops_prediction_and_fact() -> None:
    idx = PrefixIndex(prediction_ttl_s=10.0)
    idx.predict("a", [1, 2, 3], now=0.0)
    idx.apply_events("a", [], [2], now=1.0)
    assert idx.match([1, 2, 3], now=1.0) == {"a": 1}
    idx.apply_events("a", [1], [], now=1.0)
    idx.apply_events("a", [], [1], now=2.0)
    assert idx.match([1, 2, 3], now=2.0) == {}
    assert len(idx) == 1  # 3 is still predicted (unreachable, will expire)
    idx.check_integrity()


def test_events_only_touch_their_replica() -> None:
    idx = PrefixIndex()
    idx.apply_events("a", [1, 2], [], now=0.0)
    idx.apply_events("b", [1, 2], [], now=0.0)
    idx.apply_events("b", [], [2], now=1.0)
    assert idx.match([1, 2], now=1.0) == {"a": 2, "b": 1}


def test_store_and_remove_in_one_batch_store_wins() -> None:
    idx = PrefixIndex()
    idx.apply_events("a", [1], [], now=0.0)
    idx.apply_events("a", [1], [1], now=1.0)
    assert idx.match([1], now=1.0) == {"a": 1}


def test_unconfirmed_predictions_expire_after_ttl() -> None:
    idx = PrefixIndex(prediction_ttl_s=10.0)
    idx.predict("a", [1, 2, 3], now=0.0)
    idx.apply_events("a", [1], [], now=1.0)  # only block 1 was actually computed
    assert idx.match([1, 2, 3], now=9.99) == {"a": 3}
    assert idx.match([1, 2, 3], now=10.0) == {"a": 1}  # deadline 10.0 ≤ now: gone
    assert idx.expired_predictions == 2
    assert 2 not in idx and 3 not in idx
    idx.check_integrity()


def test_repeated_prediction_refreshes_deadline() -> None:
    idx = PrefixIndex(prediction_ttl_s=10.0)
    idx.predict("a", [1, 2], now=0.0)
    idx.predict("a", [1], now=5.0)
    assert idx.match([1, 2], now=12.0) == {"a": 1}  # 2 expired at 10, 1 lives until 15
    assert idx.match([1, 2], now=15.0) == {}
    idx.check_integrity()


def test_prediction_does_not_demote_confirmed_block() -> None:
    idx = PrefixIndex(prediction_ttl_s=10.0)
    idx.apply_events("a", [1], [], now=0.0)
    idx.predict("a", [1, 2], now=1.0)
    assert not idx.is_predicted("a", 1) and idx.is_predicted("a", 2)
    assert idx.match([1, 2], now=100.0) == {"a": 1}


def test_approx_mode_predictions_never_expire() -> None:
    idx = PrefixIndex(max_entries=10, prediction_ttl_s=None)
    idx.predict("a", [1, 2], now=0.0)
    assert idx.match([1, 2], now=1e9) == {"a": 2}
    idx.check_integrity()


def test_time_going_backwards_is_clamped() -> None:
    idx = PrefixIndex(prediction_ttl_s=10.0)
    idx.predict("a", [1], now=100.0)
    idx.predict("b", [1], now=50.0)  # treated as now=100: deadline 110, order kept sorted
    idx.check_integrity()
    assert idx.match([1], now=109.0) == {"a": 1, "b": 1}
    assert idx.match([1], now=110.0) == {}


def test_tenant_isolation() -> None:
    tokens = list(range(64))
    chain_t1 = hash_blocks(tokens, 16, tenant="tenant-1")
    chain_t2 = hash_blocks(tokens, 16, tenant="tenant-2")
    idx = PrefixIndex()
    idx.apply_events("a", chain_t1, [], now=0.0)
    assert idx.match(chain_t1, now=1.0) == {"a": 4}
    assert idx.match(chain_t2, now=1.0) == {}
    assert idx.match(hash_blocks(tokens, 16), now=1.0) == {}  # no tenant ≠ any tenant


def test_remove_replica_and_slot_reuse() -> None:
    idx = PrefixIndex(prediction_ttl_s=5.0)
    idx.apply_events("a", [1, 2], [], now=0.0)
    idx.predict("b", [1, 2, 3], now=0.0)
    idx.remove_replica("a")
    assert idx.match([1, 2, 3], now=1.0) == {"b": 3}
    assert idx.replicas == ["b"]
    idx.add_replica("c")  # reuses a's slot: must not inherit a's blocks
    assert idx.match([1, 2], now=1.0) == {"b": 2}
    idx.remove_replica("b")
    assert len(idx) == 0 and idx.stats().pending_predictions == 0
    idx.check_integrity()


def test_stats() -> None:
    idx = PrefixIndex(max_entries=100, prediction_ttl_s=5.0)
    idx.apply_events("a", [1, 2], [], now=0.0)
    idx.predict("b", [1, 3], now=0.0)
    s = idx.stats()
    assert (s.entries, s.max_entries, s.pending_predictions) == (3, 100, 2)
    assert s.blocks_per_replica == {"a": 2, "b": 2}
    assert idx.stats(now=5.0).blocks_per_replica == {"a": 2, "b": 0}


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_entries=0)
    with pytest.raises(ValueError):
        PrefixIndex(prediction_ttl_s=0.0)
