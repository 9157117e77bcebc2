"""Block-hash chain shared by the engine's prefix cache and the router.

A prompt is cut into full blocks of ``block_size`` token ids. Block ``i`` is identified by

    h_i = blake2b(h_{i-1} || le_u32(tokens of block i)),   h_{-1} = root(seed, tenant)

so a hash names the whole prefix up to and including its block, not just the block's own tokens.
Only full blocks are hashed; the partial tail block never is. The digest depends only on the token
ids, ``seed`` and ``tenant`` (little-endian encoding, no Python ``hash()``), so the same
prompt gives the same chain in every process and on every machine, and two tenants never share
a chain.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = int

_DIGEST_BYTES = 16


def root_hash(seed: int = 0, tenant: str | None = None) -> BlockHash:
    """The parent of a chain's first block: seed and tenant salt folded into one value."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=b"rayfleet-root")
    h.update(struct.pack("<q", seed))
    if tenant:
        h.update(b"\x01" + tenant.encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


def hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    h.update(parent.to_bytes(_DIGEST_BYTES, "little"))
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return int.from_bytes(h.digest(), "little")


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    *,
    seed: int = 0,
    tenant: str | None = None,
    parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids`` from block ``start_block`` on.

    ``parent`` is the hash of block ``start_block - 1`` (the chain root when ``start_block == 0``),
    which lets a caller extend a chain it already holds without rehashing the prefix.
    """
    if parent is None:
        if start_block != 0:
            raise ValueError("parent is required when start_block > 0")
        parent = root_hash(seed, tenant)
    out: list[BlockHash] = []
    for b in range(start_block, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size])
        out.append(parent)
    return out
