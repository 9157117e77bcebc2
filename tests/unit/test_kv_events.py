"""KVEventLog: the pool's cache changes, netted per batch, sealed with consecutive numbers."""

from __future__ import annotations

import pytest

from rayfleet.replicas.engine.block_pool import BlockPool
from rayfleet.replicas.engine.kv_events import KVEventLog


def test_batches_net_against_the_pool_and_keep_a_window() -> None:
    pool = BlockPool(4)  # 3 usable blocks
    log = KVEventLog(window=2)
    assert log.seal() == []  # nothing happened: no batch

    a, b = pool.allocate(2)
    pool.cache_block(a, 101)
    pool.cache_block(b, 102)
    pool.free([b, a])
    log.drain(pool)
    assert log.seal() == [(1, [101, 102], [])]

    # Free queue (eviction order): 3 (never used), 2 (102), 1 (101).
    (c,) = pool.allocate(1)
    pool.cache_block(c, 103)
    (d,) = pool.allocate(1)  # evicts 102 ...
    pool.cache_block(d, 102)  # ... and computes it again: nets to held
    log.drain(pool)
    (e,) = pool.allocate(1)  # evicts 101, stored in the sealed batch 1: removed
    log.drain(pool)
    assert [c.block_id, d.block_id, e.block_id] == [3, 2, 1]
    assert log.seal() == [(1, [101, 102], []), (2, [102, 103], [101])]
    assert log.seal() == [(1, [101, 102], []), (2, [102, 103], [101])]  # no change, no batch

    pool.free([e, d, c])
    assert pool.reset_prefix_cache()
    log.drain(pool)
    assert log.seal() == [(2, [102, 103], [101]), (3, [], [102, 103])]  # window of 2


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KVEventLog(window=0)
