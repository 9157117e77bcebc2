"""KV events for the router: the pool's cache changes, netted and sealed into numbered batches.

The pool records every hash it caches and evicts (``BlockPool.take_events``). ``drain`` (called
between engine steps, so the pool cannot change under it) nets them against the pool's map,
hash -> "held now?": a hash stored then evicted within one batch nets to removed, evicted then
recomputed to stored. ``seal`` turns the net changes since the last seal into batch ``seq + 1``
(if any) and returns the last ``window`` batches, oldest first, so a router that missed up to
``window - 1`` deliveries still applies every batch (``router.routing_state.KVEventCursor``).

Pure Python and thread-safe: ``drain`` runs on the engine's side, ``seal`` on the replica's event
loop (``replicas/deployment.py``); the routing simulator (``bench/routing_sim.py``) uses the same
class.
"""

from __future__ import annotations

import threading
from collections import deque

from rayfleet.hashing import BlockHash
from rayfleet.replicas.engine.block_pool import BlockPool

EventBatch = tuple[int, list[BlockHash], list[BlockHash]]  # (seq, stored, removed)


class KVEventLog:
    def __init__(self, window: int = 3) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._net: dict[BlockHash, bool] = {}
        self._batches: deque[EventBatch] = deque(maxlen=window)
        self._seq = 0
        self._lock = threading.Lock()

    def drain(self, pool: BlockPool) -> None:
        """Take the pool's events and net them against its map (call between engine steps)."""
        stored, removed = pool.take_events()
        if not stored and not removed:
            return
        changes = {h: h in pool.cached for h in (*removed, *stored)}
        with self._lock:
            self._net.update(changes)

    def seal(self) -> list[EventBatch]:
        """Seal the net changes since the last call into the next batch; return the window."""
        with self._lock:
            net, self._net = self._net, {}
            if net:
                self._seq += 1
                stored = [h for h, held in net.items() if held]
                removed = [h for h, held in net.items() if not held]
                self._batches.append((self._seq, stored, removed))
            return list(self._batches)
