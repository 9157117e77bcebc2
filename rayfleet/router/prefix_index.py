"""PrefixIndex: which replica holds which KV blocks, as seen by the router.

The router never sees prompt text, only the block-hash chain of a prompt (``rayfleet.hashing``).
Because ``h_i`` names the whole prefix up to block ``i``, "replica R holds the first k blocks of
this prompt" is "R holds h_0 .. h_{k-1}", and one dict lookup per block answers it for all replicas
at once:

    _holders:  h ──▶ bitmask of replica slots            (OrderedDict, LRU order: oldest first)
                     bit s set  ⇔  replica in slot s holds h (confirmed by an event, or predicted)
    _predicted: h ──▶ bitmask ⊆ _holders[h]              bits that no KV event has confirmed yet
    _deadlines: (h, slot) ──▶ expiry time                 one per predicted bit, sorted by expiry

``match`` walks the chain and ANDs masks until no replica is left, so a request costs
O(matched blocks + 1) dict lookups whatever the number of replicas (masks are Python ints, and the
AND of two 256-bit ints is a few machine words).

Two sources write the index:

* ``predict(replica, hashes, now)`` — the router's own guess when it routes a request there: the
  replica will compute and cache these blocks. Unconfirmed predictions expire ``prediction_ttl_s``
  after they were last made (the request may have been aborted, or evicted before it ran).
  ``prediction_ttl_s=None`` keeps predictions until the cap evicts them (the "approximate" mode,
  where no events ever arrive).
* ``apply_events(replica, stored, removed, now)`` — KV events from the replica's engine.
  ``stored`` confirms a block (the prediction, if any, becomes a fact and stops expiring);
  ``removed`` drops it, predicted or confirmed.

Memory is bounded by ``max_entries`` distinct hashes (all replicas together); beyond it the least
recently touched entry goes, O(1). Touch order along a chain is deepest block first, so the head of
a chain is the most recently used: eviction trims chains from their tails (which keeps the rest of
the chain matchable — a chain with its head evicted matches nothing), like the engines' free queues.

Time is a parameter everywhere (``now``, seconds, any epoch). It must not go backwards; a smaller
value is treated as the latest one seen, which keeps ``_deadlines`` sorted with O(1) appends.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from rayfleet.hashing import BlockHash

ReplicaId = Hashable

__all__ = ["IndexStats", "PrefixIndex", "ReplicaId"]


@dataclass(frozen=True)
class IndexStats:
    entries: int  # distinct block hashes held by at least one replica
    max_entries: int
    pending_predictions: int  # (hash, replica) pairs predicted and not yet confirmed
    blocks_per_replica: dict[ReplicaId, int]  # confirmed + predicted blocks of each replica
    evicted_entries: int  # entries dropped by the cap since construction
    expired_predictions: int  # predictions dropped by the TTL since construction


def _slots(mask: int) -> Iterable[int]:
    """Slot numbers of the set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixIndex:
    """Per-replica index of cached block hashes with longest-prefix match over all replicas."""

    def __init__(self, max_entries: int = 1 << 20, prediction_ttl_s: float | None = 30.0) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        if prediction_ttl_s is not None and prediction_ttl_s <= 0:
            raise ValueError("prediction_ttl_s must be positive or None")
        self.max_entries = max_entries
        self.prediction_ttl_s = prediction_ttl_s
        self._holders: OrderedDict[BlockHash, int] = OrderedDict()
        # Invariant: 0 != _predicted[h] ⊆ _holders[h]; absent when no bit of h is predicted.
        self._predicted: dict[BlockHash, int] = {}
        # Invariant (TTL on): key (h, s) present ⇔ bit s of _predicted[h] set; values non-decreasing
        # in iteration order, because every write uses the latest `now` + the same TTL and moves
        # the key to the end.
        self._deadlines: OrderedDict[tuple[BlockHash, int], float] = OrderedDict()
        self._slot_of: dict[ReplicaId, int] = {}
        self._replica_of: list[ReplicaId | None] = []
        self._free_slots: list[int] = []
        self._counts: list[int] = []  # per slot: number of hashes whose mask has the slot's bit
        self._now = float("-inf")
        self.evicted_entries = 0
        self.expired_predictions = 0

    # ---------------------------------------------------------------- replicas

    def add_replica(self, replica: ReplicaId) -> None:
        """Register a replica (also done implicitly by ``predict`` / ``apply_events``)."""
        self._slot(replica)

    def remove_replica(self, replica: ReplicaId) -> None:
        """Forget a replica and all it holds. O(entries): meant for scale-down and failures."""
        slot = self._slot_of.pop(replica, None)
        if slot is None:
            return
        bit = 1 << slot
        holders = self._holders
        for h in [h for h, m in holders.items() if m & bit]:
            m = holders[h] & ~bit
            if m:
                holders[h] = m  # assignment to an existing key keeps its LRU position
            else:
                del holders[h]
            self._clear_predicted(h, slot)
        self._replica_of[slot] = None
        self._counts[slot] = 0
        self._free_slots.append(slot)

    @property
    def replicas(self) -> list[ReplicaId]:
        return list(self._slot_of)

    # ---------------------------------------------------------------- queries

    def match(
        self, hashes: Sequence[BlockHash], now: float, *, touch: bool = True
    ) -> dict[ReplicaId, int]:
        """Number of leading blocks of ``hashes`` each replica holds; replicas with 0 are omitted.

        One pass over the chain: ``alive`` is the set of replicas that held every block so far; a
        replica leaves it at the first block it lacks, and its count is the depth at which it left.
        With ``touch`` the matched blocks become the most recently used (head last, see module doc).
        """
        self._advance(now)
        holders = self._holders
        out: dict[ReplicaId, int] = {}
        alive = -1  # all bits: every replica holds the empty prefix
        depth = 0
        for h in hashes:
            m = holders.get(h, 0) & alive
            if m != alive and depth:
                self._record(out, alive & ~m, depth)
            if not m:
                break
            alive = m
            depth += 1
        else:
            if depth:
                self._record(out, alive, depth)
        if touch and depth:
            for i in range(depth - 1, -1, -1):
                holders.move_to_end(hashes[i])
        return out

    def holds(self, replica: ReplicaId, h: BlockHash) -> bool:
        slot = self._slot_of.get(replica)
        return slot is not None and bool(self._holders.get(h, 0) >> slot & 1)

    def is_predicted(self, replica: ReplicaId, h: BlockHash) -> bool:
        """True if ``replica`` holds ``h`` only by prediction (no event confirmed it yet)."""
        slot = self._slot_of.get(replica)
        return slot is not None and bool(self._predicted.get(h, 0) >> slot & 1)

    def __len__(self) -> int:
        return len(self._holders)

    def __contains__(self, h: object) -> bool:
        return h in self._holders

    def lru_order(self) -> list[BlockHash]:
        """All hashes, least recently used first (the order the cap evicts them). For tests."""
        return list(self._holders)

    def stats(self, now: float | None = None) -> IndexStats:
        if now is not None:
            self._advance(now)
        return IndexStats(
            entries=len(self._holders),
            max_entries=self.max_entries,
            pending_predictions=sum(bin(m).count("1") for m in self._predicted.values()),
            blocks_per_replica={r: self._counts[s] for r, s in self._slot_of.items()},
            evicted_entries=self.evicted_entries,
            expired_predictions=self.expired_predictions,
        )

    # ---------------------------------------------------------------- writers

    def predict(self, replica: ReplicaId, hashes: Sequence[BlockHash], now: float) -> None:
        """The router sent a request with chain ``hashes`` to ``replica``: assume it will hold them.

        Blocks the replica already holds by an event stay confirmed (only touched); predicted ones
        get a fresh deadline.
        """
        self._advance(now)
        slot = self._slot(replica)
        bit = 1 << slot
        holders, predicted = self._holders, self._predicted
        for h in reversed(hashes):  # deepest first, so the head ends most recently used
            m = holders.get(h)
            if m is None:
                holders[h] = bit
                predicted[h] = bit
                self._counts[slot] += 1
            else:
                holders.move_to_end(h)
                if m & bit and not predicted.get(h, 0) & bit:
                    continue  # confirmed by an event: a fact outranks a guess
                if not m & bit:
                    holders[h] = m | bit
                    predicted[h] = predicted.get(h, 0) | bit
                    self._counts[slot] += 1
            self._set_deadline(h, slot)
        self._enforce_cap()

    def apply_events(
        self,
        replica: ReplicaId,
        stored: Sequence[BlockHash],
        removed: Sequence[BlockHash],
        now: float,
    ) -> None:
        """Apply one batch of the replica's KV events (net changes of the batch).

        ``removed`` is applied before ``stored``: a hash in both lists ends up held (the engine
        evicted it and computed it again within the batch). ``stored`` is given in chain order.
        """
        self._advance(now)
        slot = self._slot(replica)
        for h in removed:
            self._drop(h, slot)
        bit = 1 << slot
        holders = self._holders
        for h in reversed(stored):
            m = holders.get(h)
            if m is None:
                holders[h] = bit
                self._counts[slot] += 1
                continue
            holders.move_to_end(h)
            if m & bit:
                self._clear_predicted(h, slot)  # prediction confirmed: no longer expires
            else:
                holders[h] = m | bit
                self._counts[slot] += 1
        self._enforce_cap()

    def expire(self, now: float) -> None:
        """Drop the predictions whose deadline is ≤ ``now`` (every other call does this too)."""
        self._advance(now)

    # ---------------------------------------------------------------- checks

    def check_integrity(self) -> None:
        """Assert every invariant stated above (O(entries); tests call it after each operation)."""
        assert len(self._holders) <= self.max_entries, "cap exceeded"
        counts = [0] * len(self._counts)
        live = 0
        for s in self._slot_of.values():
            live |= 1 << s
        for h, m in self._holders.items():
            assert m != 0, f"empty mask kept for {h:x}"
            assert m & ~live == 0, f"dead replica bit in {h:x}"
            for s in _slots(m):
                counts[s] += 1
        assert counts == self._counts, (counts, self._counts)
        for h, p in self._predicted.items():
            assert p != 0 and p & ~self._holders.get(h, 0) == 0, f"predicted ⊄ holders for {h:x}"
        if self.prediction_ttl_s is not None:
            expected = {(h, s) for h, p in self._predicted.items() for s in _slots(p)}
            assert set(self._deadlines) == expected, "deadlines out of sync with predictions"
            ds = list(self._deadlines.values())
            assert all(a <= b for a, b in zip(ds, ds[1:])), "deadlines not sorted"
        else:
            assert not self._deadlines
        for r, s in self._slot_of.items():
            assert self._replica_of[s] == r

    # ---------------------------------------------------------------- internals

    def _slot(self, replica: ReplicaId) -> int:
        slot = self._slot_of.get(replica)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._replica_of[slot] = replica
            else:
                slot = len(self._replica_of)
                self._replica_of.append(replica)
                self._counts.append(0)
            self._slot_of[replica] = slot
        return slot

    def _record(self, out: dict[ReplicaId, int], mask: int, depth: int) -> None:
        replica_of = self._replica_of
        for s in _slots(mask):
            out[replica_of[s]] = depth  # type: ignore[index]

    def _advance(self, now: float) -> None:
        if now > self._now:
            self._now = now
        deadlines = self._deadlines
        now = self._now
        while deadlines:
            key, deadline = next(iter(deadlines.items()))
            if deadline > now:
                break
            deadlines.popitem(last=False)
            h, slot = key
            self._predicted_bit_expired(h, slot)

    def _predicted_bit_expired(self, h: BlockHash, slot: int) -> None:
        bit = 1 << slot
        p = self._predicted[h] & ~bit
        if p:
            self._predicted[h] = p
        else:
            del self._predicted[h]
        m = self._holders[h] & ~bit
        if m:
            self._holders[h] = m
        else:
            del self._holders[h]
        self._counts[slot] -= 1
        self.expired_predictions += 1

    def _set_deadline(self, h: BlockHash, slot: int) -> None:
        if self.prediction_ttl_s is None:
            return
        key = (h, slot)
        self._deadlines[key] = self._now + self.prediction_ttl_s
        self._deadlines.move_to_end(key)

    def _clear_predicted(self, h: BlockHash, slot: int) -> None:
        p = self._predicted.get(h, 0)
        bit = 1 << slot
        if not p & bit:
            return
        p &= ~bit
        if p:
            self._predicted[h] = p
        else:
            del self._predicted[h]
        if self.prediction_ttl_s is not None:
            del self._deadlines[(h, slot)]

    def _drop(self, h: BlockHash, slot: int) -> None:
        m = self._holders.get(h, 0)
        bit = 1 << slot
        if not m & bit:
            return
        self._clear_predicted(h, slot)
        m &= ~bit
        if m:
            self._holders[h] = m
        else:
            del self._holders[h]
        self._counts[slot] -= 1

    def _enforce_cap(self) -> None:
        holders = self._holders
        while len(holders) > self.max_entries:
            h, m = holders.popitem(last=False)
            p = self._predicted.pop(h, 0)
            if p and self.prediction_ttl_s is not None:
                for s in _slots(p):
                    del self._deadlines[(h, s)]
            for s in _slots(m):
                self._counts[s] -= 1
            self.evicted_entries += 1
