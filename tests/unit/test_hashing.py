"""The block-hash chain: stable across processes, seedable, tenant-salted, full blocks only."""

from __future__ import annotations

import subprocess
import sys

from rayfleet.hashing import hash_blocks, root_hash

TOKENS = list(range(1000, 1037))  # 2 full blocks of 16 + 5 tokens


def test_only_full_blocks_are_hashed():
    assert len(hash_blocks(TOKENS, 16)) == 2
    assert hash_blocks(TOKENS[:15], 16) == []


def test_chain_names_the_whole_prefix():
    a = hash_blocks(TOKENS, 16)
    b = hash_blocks([0] + TOKENS[1:], 16)
    assert a[0] != b[0] and a[1] != b[1]  # a change in block 0 changes every later hash
    c = hash_blocks(TOKENS[:16] + [7] * 16, 16)
    assert c[0] == a[0] and c[1] != a[1]


def test_extending_a_chain_equals_hashing_from_scratch():
    full = hash_blocks(TOKENS[:48] + [1] * 16, 16)
    head = hash_blocks(TOKENS[:32], 16)
    tail = hash_blocks(TOKENS[:48] + [1] * 16, 16, parent=head[-1], start_block=2)
    assert head + tail == full


def test_seed_and_tenant_change_the_chain():
    base = hash_blocks(TOKENS, 16)
    assert hash_blocks(TOKENS, 16, seed=1) != base
    assert hash_blocks(TOKENS, 16, tenant="acme") != base
    assert hash_blocks(TOKENS, 16, tenant="acme") != hash_blocks(TOKENS, 16, tenant="other")
    assert hash_blocks(TOKENS, 16, tenant="acme") == hash_blocks(TOKENS, 16, tenant="acme")
    assert root_hash(0, None) == root_hash(0, "")


def test_stable_across_processes_and_pinned():
    code = "from rayfleet.hashing import hash_blocks; print(hash_blocks(list(range(16)), 16)[0])"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert outs == {str(hash_blocks(list(range(16)), 16)[0])}
    # Pinned: a change of the encoding would silently split engines from routers.
    assert hash_blocks(list(range(16)), 16)[0] == PINNED


PINNED = 122668416225000032912516376922676906117
