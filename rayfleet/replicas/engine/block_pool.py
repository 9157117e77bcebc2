"""The pool of KV-cache blocks: reference counts, an LRU queue of free blocks, and the prefix cache.

Block 0 is the null block: it is never handed out, so padded block-table entries and padded slots
(CUDA-graph padding) can point at it harmlessly.

A block is in exactly one of these states:

    in use     ref_cnt > 0, not in the free queue (it may also hold a hash: shared prefix)
    free       ref_cnt == 0, in the free queue; if it holds a hash it is still a cache hit
               candidate until it is reused ("evicted")

Free queue order is eviction order: the head is reused first. A freed block goes to the tail, so the
least recently freed block is evicted first. Callers free a request's blocks tail-first, so a
request's last blocks (least likely to be shared) are evicted before its first ones.
"""

from __future__ import annotations

from collections.abc import Iterable

from rayfleet.hashing import BlockHash


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) removal from the middle (a cache hit)."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> Block:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise ValueError("no free blocks")
        self.remove(first)
        return first

    def __iter__(self):
        b = self._head.next_free
        while b is not None and b is not self._tail:
            yield b
            b = b.next_free

    def contains(self, block: Block) -> bool:
        return block.prev_free is not None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved); got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # pinned forever
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[BlockHash, Block] = {}
        # KV events for the router since the last take_events(): hashes stored / evicted.
        self._stored: list[BlockHash] = []
        self._removed: list[BlockHash] = []

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by running requests."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` blocks from the head of the free queue, evicting their cached hashes."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot allocate {n} blocks; {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            b = self.free_queue.popleft()
            self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on prefix-cache hits, pulling free ones out of the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop a reference on each block, in order; unreferenced ones go to the queue tail."""
        for b in blocks:
            assert b.ref_cnt > 0 and b is not self.null_block, f"double free of {b}"
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free_queue.append(b)

    def cache_block(self, block: Block, block_hash: BlockHash) -> None:
        """Register a full block of verified tokens under its hash.

        If another block already holds this hash (two requests computed the same prefix at the
        same time), the existing entry stays and this block remains uncached: it will be freed
        as an ordinary block.
        """
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block
        self._stored.append(block_hash)

    def _evict(self, block: Block) -> None:
        h = block.block_hash
        if h is None:
            return
        block.block_hash = None
        if self.cached.get(h) is block:
            del self.cached[h]
            self._removed.append(h)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is in use."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for b in self.blocks[1:]:
            self._evict(b)
        return True

    def take_events(self) -> tuple[list[BlockHash], list[BlockHash]]:
        stored, removed = self._stored, self._removed
        self._stored, self._removed = [], []
        return stored, removed

    # ---- invariants ----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant of the pool is broken (tests call this often)."""
        free_ids = set()
        count = 0
        for b in self.free_queue:
            assert b.ref_cnt == 0, f"{b} in free queue with references"
            assert b.block_id not in free_ids, f"{b} twice in free queue"
            free_ids.add(b.block_id)
            count += 1
        assert count == self.free_queue.num_free, "free count out of sync with the queue"
        assert self.null_block.ref_cnt == 1 and 0 not in free_ids, "null block escaped"
        for b in self.blocks[1:]:
            assert b.ref_cnt >= 0, f"{b} negative refcount"
            if b.ref_cnt == 0:
                assert b.block_id in free_ids, f"{b} unreferenced but not free (leaked)"
            else:
                assert b.block_id not in free_ids, f"{b} referenced but free"
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) is b, f"{b} hash not in the cache map"
        for h, b in self.cached.items():
            assert b.block_hash == h, f"cache map entry {h} points at {b}"
