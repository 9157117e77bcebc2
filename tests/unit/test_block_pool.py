"""BlockPool and KVCacheManager on tiny pools: exact block ids, eviction order, integrity."""

from __future__ import annotations

import random

import pytest

from rayfleet.hashing import hash_blocks
from rayfleet.replicas.engine.block_pool import BlockPool
from rayfleet.replicas.engine.kv_cache_manager import KVCacheManager
from rayfleet.replicas.engine.request import Request

BS = 4


def make_req(rid: str, tokens: list[int], tenant: str | None = None) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), max_tokens=8, tenant=tenant)


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_allocate_takes_lowest_ids_and_block_zero_is_reserved():
    pool = BlockPool(11)
    assert pool.num_free_blocks == 10
    assert ids(pool.allocate(3)) == [1, 2, 3]
    assert ids(pool.allocate(2)) == [4, 5]
    assert pool.num_free_blocks == 5
    pool.check_integrity()


def test_free_appends_to_tail_in_given_order():
    pool = BlockPool(6)
    a = pool.allocate(5)  # 1..5, queue empty
    pool.free([a[2], a[0]])  # 3 then 1
    pool.check_integrity()
    assert [b.block_id for b in pool.free_queue] == [3, 1]
    assert ids(pool.allocate(2)) == [3, 1]
    with pytest.raises(ValueError, match="cannot allocate 1 blocks; 0 free"):
        pool.allocate(1)


def test_double_free_is_caught():
    pool = BlockPool(4)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(b)


def test_cached_free_block_is_hit_until_reused_then_evicted_in_lru_order():
    pool = BlockPool(5)  # usable 1..4
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        pool.cache_block(b, 100 + i)
    assert pool.take_events() == ([100, 101, 102, 103], [])
    pool.free([blocks[1], blocks[3], blocks[0], blocks[2]])  # queue: 2, 4, 1, 3
    assert pool.lookup(101) is blocks[1]
    # A hit on a free block pulls it out of the queue.
    pool.touch([blocks[3]])
    assert [b.block_id for b in pool.free_queue] == [2, 1, 3]
    # Reuse evicts LRU first: block 2 (hash 101), then block 1 (hash 100).
    got = pool.allocate(2)
    assert ids(got) == [2, 1]
    assert pool.lookup(101) is None and pool.lookup(100) is None
    assert pool.lookup(102) is blocks[2] and pool.lookup(103) is blocks[3]
    assert pool.take_events() == ([], [101, 100])
    pool.check_integrity()


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, 7)
    pool.cache_block(b, 7)
    assert pool.lookup(7) is a and b.block_hash is None
    pool.check_integrity()


def test_caching_disabled_never_hits():
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, 1)
    assert pool.lookup(1) is None


def test_manager_prefix_hit_shares_blocks_and_leaves_one_token():
    pool = BlockPool(11)
    kv = KVCacheManager(pool, BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    r1 = make_req("a", prompt)
    assert kv.get_computed_blocks(r1) == ([], 0)
    assert kv.allocate_slots(r1, 10)
    assert kv.block_ids("a") == [1, 2, 3]
    kv.check_integrity()
    # Only the two full blocks are hashed.
    assert set(pool.cached) == set(hash_blocks(prompt, BS))

    r2 = make_req("b", prompt[:8] + [99, 98, 97])
    hits, n = kv.get_computed_blocks(r2)
    assert ids(hits) == [1, 2] and n == 8
    assert kv.allocate_slots(r2, 3, hits)
    assert kv.block_ids("b") == [1, 2, 4]
    assert [pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    kv.check_integrity()

    # A block-aligned prompt fully cached still computes its last token: last block given back.
    r3 = make_req("c", prompt[:8])
    hits, n = kv.get_computed_blocks(r3)
    assert ids(hits) == [1] and n == 4

    kv.free(r1)
    kv.free(r2)
    kv.check_integrity()
    # Tail-first: r1 frees 3,2,1 (2,1 still held by r2) -> queue gets 3; r2 frees 4,2,1.
    assert [b.block_id for b in pool.free_queue][-4:] == [3, 4, 2, 1]
    assert pool.num_free_blocks == 10


def test_tenants_never_share_blocks():
    pool = BlockPool(11)
    kv = KVCacheManager(pool, BS)
    prompt = list(range(9))
    a = make_req("a", prompt, tenant="t1")
    kv.allocate_slots(a, 9)
    b = make_req("b", prompt, tenant="t2")
    assert kv.get_computed_blocks(b) == ([], 0)
    c = make_req("c", prompt, tenant="t1")
    assert kv.get_computed_blocks(c)[1] == 8


def test_allocate_fails_without_side_effects_when_short():
    pool = BlockPool(4)  # 3 usable
    kv = KVCacheManager(pool, BS)
    r = make_req("a", list(range(13)))  # needs 4 blocks
    assert not kv.allocate_slots(r, 13)
    assert pool.num_free_blocks == 3 and "a" not in kv.req_blocks
    kv.check_integrity()


def test_free_hits_count_against_the_free_pool():
    pool = BlockPool(4)  # 3 usable
    kv = KVCacheManager(pool, BS)
    r1 = make_req("a", list(range(8)) + [50])
    assert kv.allocate_slots(r1, 9)  # blocks 1,2,3
    kv.free(r1)  # all free, 1 and 2 cached
    r2 = make_req("b", list(range(8)) + [60, 61, 62, 63, 64])  # 2 hits + needs 2 more blocks
    hits, n = kv.get_computed_blocks(r2)
    assert ids(hits) == [1, 2] and n == 8
    r2.num_computed_tokens = 0
    assert not kv.allocate_slots(r2, 5, hits)  # 2 free hits + 2 new > 3 free
    kv.check_integrity()


def test_truncate_rolls_back_tail_blocks():
    pool = BlockPool(11)
    kv = KVCacheManager(pool, BS)
    r = make_req("a", list(range(5)))
    kv.allocate_slots(r, 5)
    r.num_computed_tokens = 5
    r.spec_token_ids = [1, 2, 3, 4, 5]  # drafts need blocks 2 and 3
    assert kv.allocate_slots(r, 5)
    assert kv.block_ids("a") == [1, 2, 3]
    # Drafts are never hashed: only the one full verified block.
    assert len(pool.cached) == 1
    kv.truncate(r, 6)
    assert kv.block_ids("a") == [1, 2]
    kv.check_integrity()


def test_random_operations_keep_integrity():
    rng = random.Random(0)
    pool = BlockPool(17)
    kv = KVCacheManager(pool, BS)
    live: dict[str, Request] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.5 and len(live) < 6:
            toks = [rng.randrange(4) for _ in range(rng.randrange(1, 20))]
            r = make_req(f"r{step}", toks)
            hits, n = kv.get_computed_blocks(r)
            if kv.allocate_slots(r, r.num_tokens - n, hits):
                r.num_computed_tokens = r.num_tokens
                live[r.request_id] = r
        elif op < 0.75 and live:
            r = live[rng.choice(sorted(live))]
            r.output_token_ids.append(rng.randrange(4))
            if kv.allocate_slots(r, 1):
                r.num_computed_tokens += 1
            else:
                r.output_token_ids.pop()
        elif live:
            kv.free(live.pop(rng.choice(sorted(live))))
        kv.check_integrity()
    for r in list(live.values()):
        kv.free(r)
    kv.check_integrity()
    assert pool.num_free_blocks == 16
