"""Per-request block lists on top of the BlockPool.

Ownership: the manager owns one reference on every block in ``req_blocks[request_id]``; ``free``
drops exactly those references (tail-first, see BlockPool). Only full blocks of *verified* tokens
(prompt + accepted outputs) are hashed into the prefix cache; draft tokens occupy lookahead slots
and are rolled back by ``truncate``.

    request tokens:  [ p p p p | p p p p | p p o o | o d d ]   block_size 4, d = draft
    blocks:          [   b7    |   b3    |   b9    |  b2   ]
    hashed:              yes       yes      yes       no (partial / holds drafts)
"""

from __future__ import annotations

from rayfleet.replicas.engine.block_pool import Block, BlockPool
from rayfleet.replicas.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, hash_seed: int = 0) -> None:
        self.pool = pool
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.req_blocks: dict[str, list[Block]] = {}
        # How many of a request's blocks are already registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest run of the request's leading full blocks that the prefix cache holds.

        At least one token is always left to compute, so the step that finishes the prompt has
        logits to sample from: a full hit on a block-aligned prompt gives back its last block.
        """
        if not self.pool.enable_caching:
            return [], 0
        hashes = request.update_block_hashes(self.block_size, self.hash_seed)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits, len(hits) * self.block_size

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` could ever be held by an empty pool."""
        return cdiv(num_tokens, self.block_size) <= self.pool.num_usable_blocks

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[Block] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after ``num_computed_tokens``.

        ``new_computed_blocks`` are prefix-cache hits to adopt (first scheduling only; the caller
        advances num_computed_tokens past them). ``num_lookahead_tokens`` more slots past those are
        reserved for KV the draft model writes while proposing the next step's tokens; they are
        never hashed (only verified tokens are). Returns False, changing nothing, if the pool
        cannot supply the blocks.
        """
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = (
            cdiv(total + num_lookahead_tokens, self.block_size)
            - len(blocks)
            - len(new_computed_blocks)
        )
        # Hits sitting in the free queue stop being allocatable once we reference them.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(num_needed, 0) + num_free_hits > self.pool.num_free_blocks:
            return False
        self.pool.touch(new_computed_blocks)
        if request.request_id not in self.req_blocks:
            self.req_blocks[request.request_id] = blocks = []
        blocks.extend(new_computed_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        if not self._num_cached_blocks.get(request.request_id):
            self._num_cached_blocks[request.request_id] = len(new_computed_blocks)
        # KV for tokens up to `total` is written this step; cache the blocks that will be full of
        # verified tokens (drafts excluded).
        self._cache_full_blocks(request, min(total, request.num_tokens))
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.pool.enable_caching:
            return
        n_full = num_tokens // self.block_size
        done = self._num_cached_blocks.get(request.request_id, 0)
        if n_full <= done:
            return
        hashes = request.update_block_hashes(self.block_size, self.hash_seed)
        blocks = self.req_blocks[request.request_id]
        for i in range(done, n_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached_blocks[request.request_id] = n_full

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Drop blocks past the first ``num_tokens`` tokens (rejected draft positions)."""
        blocks = self.req_blocks.get(request.request_id, [])
        keep = cdiv(num_tokens, self.block_size)
        if keep < len(blocks):
            self.pool.free(reversed(blocks[keep:]))
            self.req_blocks[request.request_id] = blocks[:keep]

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """Ids of the request's blocks from its ``start``-th on."""
        blocks = self.req_blocks.get(request_id, [])
        return [blocks[i].block_id for i in range(start, len(blocks))]

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for b in self.pool.blocks[1:]:
            assert b.ref_cnt == refs.get(b.block_id, 0), (
                f"{b}: {refs.get(b.block_id, 0)} request references"
            )
