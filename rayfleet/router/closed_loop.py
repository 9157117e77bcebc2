"""The router's closed loop: route → predict → reconcile with KV events → check the hits happened.

``RouterCore`` is the pure part of the Serve router (no Ray): it owns the mode's policy, the
``PrefixIndex`` the mode reads (if any) and a ``CacheHitTracker``. A Serve RequestRouter subclass
only has to call ``route`` per request, ``on_kv_events`` per event batch, ``on_finished`` /
``on_aborted`` per request end, and ``remove_replica`` when Serve drops one.

``CacheHitTracker`` compares the cached tokens the router predicted with the ``cached_tokens`` the
engine reports when the request finishes. Counters are plain attributes (metrics export reads them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from rayfleet.hashing import BlockHash
from rayfleet.router.policy import (
    DEFAULT_WEIGHTS,
    MODES,
    Decision,
    PolicyWeights,
    ReplicaLoad,
    RoutingMode,
)
from rayfleet.router.prefix_index import PrefixIndex, ReplicaId

__all__ = ["CacheHitTracker", "ReplicaHitCounters", "RouterCore"]


@dataclass
class ReplicaHitCounters:
    requests: int = 0
    predicted_tokens: int = 0
    actual_tokens: int = 0


class CacheHitTracker:
    """Predicted vs actual cached tokens, in total and per replica.

    Outstanding predictions are bounded by ``max_outstanding``; the oldest is dropped beyond it
    (counted in ``dropped``) so a lost "finished" message cannot grow memory.
    """

    def __init__(self, max_outstanding: int = 1 << 16) -> None:
        self.max_outstanding = max_outstanding
        self._outstanding: OrderedDict[Hashable, tuple[ReplicaId, int]] = OrderedDict()
        self.requests = 0  # finished requests that had a prediction
        self.predicted_tokens = 0
        self.actual_tokens = 0
        self.over_predicted_tokens = 0  # Σ max(0, predicted − actual): hits promised, not found
        self.under_predicted_tokens = 0  # Σ max(0, actual − predicted): hits found, not promised
        self.predicted_hit_requests = 0  # predicted > 0
        self.missed_hit_requests = 0  # predicted > 0 but actual < half of it
        self.dropped = 0
        self.per_replica: dict[ReplicaId, ReplicaHitCounters] = {}

    def record(
        self, request_id: Hashable, replica: ReplicaId, predicted_cached_tokens: int
    ) -> None:
        self._outstanding[request_id] = (replica, predicted_cached_tokens)
        self._outstanding.move_to_end(request_id)
        while len(self._outstanding) > self.max_outstanding:
            self._outstanding.popitem(last=False)
            self.dropped += 1

    def finish(self, request_id: Hashable, cached_tokens: int) -> int | None:
        """Record the engine's ``cached_tokens``; returns the prediction (None if unknown)."""
        entry = self._outstanding.pop(request_id, None)
        if entry is None:
            return None
        replica, predicted = entry
        self.requests += 1
        self.predicted_tokens += predicted
        self.actual_tokens += cached_tokens
        self.over_predicted_tokens += max(0, predicted - cached_tokens)
        self.under_predicted_tokens += max(0, cached_tokens - predicted)
        if predicted > 0:
            self.predicted_hit_requests += 1
            if 2 * cached_tokens < predicted:
                self.missed_hit_requests += 1
        c = self.per_replica.setdefault(replica, ReplicaHitCounters())
        c.requests += 1
        c.predicted_tokens += predicted
        c.actual_tokens += cached_tokens
        return predicted

    def discard(self, request_id: Hashable) -> None:
        """The request was aborted before it reported: forget its prediction."""
        self._outstanding.pop(request_id, None)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    @property
    def drift_ratio(self) -> float:
        """actual / predicted cached tokens (1.0 = exact; < 1 = the router is over-optimistic)."""
        return self.actual_tokens / self.predicted_tokens if self.predicted_tokens else 1.0

    @property
    def over_prediction_ratio(self) -> float:
        """Fraction of predicted cached tokens that were not found cached."""
        return self.over_predicted_tokens / self.predicted_tokens if self.predicted_tokens else 0.0


class RouterCore:
    """Mode → (policy, index fed by predictions [and events]) + hit tracking. Not thread-safe."""

    def __init__(
        self,
        mode: RoutingMode | str,
        *,
        block_size: int,
        weights: PolicyWeights = DEFAULT_WEIGHTS,
        max_entries: int = 1 << 20,
        prediction_ttl_s: float = 30.0,
    ) -> None:
        self.mode = RoutingMode(mode)
        spec = MODES[self.mode]
        self.block_size = block_size
        self.weights = weights
        self.policy = spec.make_policy()
        self.applies_events = spec.applies_events
        # approx: nothing ever confirms a prediction, so it lives until the cap evicts it.
        self.index: PrefixIndex | None = (
            PrefixIndex(max_entries, prediction_ttl_s if spec.applies_events else None)
            if spec.uses_index
            else None
        )
        self.tracker = CacheHitTracker()

    def route(
        self,
        request_id: Hashable,
        hashes: Sequence[BlockHash],
        loads: Mapping[ReplicaId, ReplicaLoad],
        now: float,
        session_key: str | None = None,
    ) -> Decision:
        match = self.index.match(hashes, now) if self.index is not None else {}
        decision = self.policy(
            match, loads, len(hashes), self.block_size, self.weights, session_key
        )
        if self.index is not None:
            self.index.predict(decision.replica, hashes, now)
        self.tracker.record(request_id, decision.replica, decision.predicted_cached_tokens)
        return decision

    def reassign(
        self,
        request_id: Hashable,
        replica: ReplicaId,
        hashes: Sequence[BlockHash],
        now: float,
    ) -> int:
        """The request ran on ``replica``, not on the one ``route`` chose (Serve fell back to a
        lower rank because the chosen replica's queue was full). Predict there instead and re-
        record the expected hit; returns the new predicted cached tokens. The prediction left on
        the first choice expires by TTL (precise) or ages out of the LRU (approx)."""
        matched = 0
        if self.index is not None:
            matched = self.index.match(hashes, now, touch=False).get(replica, 0)
            self.index.predict(replica, hashes, now)
        predicted = min(matched, len(hashes)) * self.block_size
        self.tracker.record(request_id, replica, predicted)
        return predicted

    def on_kv_events(
        self,
        replica: ReplicaId,
        stored: Sequence[BlockHash],
        removed: Sequence[BlockHash],
        now: float,
    ) -> None:
        if self.index is not None and self.applies_events:
            self.index.apply_events(replica, stored, removed, now)

    def on_finished(self, request_id: Hashable, cached_tokens: int) -> None:
        self.tracker.finish(request_id, cached_tokens)

    def on_aborted(self, request_id: Hashable) -> None:
        self.tracker.discard(request_id)

    def remove_replica(self, replica: ReplicaId) -> None:
        if self.index is not None:
            self.index.remove_replica(replica)
