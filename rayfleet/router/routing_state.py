"""The pure part of the Serve router: Serve's replica list + routing stats -> ``Decision``.

``PrefixAwareRequestRouter`` (``serve_router.py``) is a thin Ray Serve subclass; everything it
decides goes through ``RoutingState`` here, which imports no Ray and takes the clock as a
parameter, so unit tests drive it with plain dicts and fake time.

What the router sees per request is a ``RoutingHint`` the ingress built: the prompt's block-hash
chain (``rayfleet.hashing``, the engine's block size, hash seed and the request's tenant), the
prompt length, a session key and optionally a mode override. Never prompt text.

What it sees per replica is a ``ReplicaView``: the dict ``LLMReplica.record_routing_stats``
returned (Serve's controller calls it every ``request_routing_stats_period_s`` and broadcasts it
to every handle), plus Serve's local queue-length cache. The stats carry the replica's load and
its sealed KV event batches::

    stats = {"time": wall-clock s of the snapshot, "queued_prefill_tokens": int,
             "num_running": int, "decode_tokens": int, "kv_usage": float, ...,
             "kv_events": [(seq, stored_hashes, removed_hashes), ...]}   # last few batches

Event batches carry consecutive sequence numbers from 1 per replica, and a replica repeats its
last few batches in every snapshot, so a router that misses one broadcast (Serve's long poll only
delivers the latest snapshot) still sees every batch. ``KVEventCursor`` applies each batch once;
a real gap (the router fell further behind than the window) makes it forget that replica's
index entries: under-predicting hits is safe, predicting evicted blocks is not.

Between two snapshots the router adds what it sent itself: ``PendingPrefill`` counts the uncached
prompt tokens of requests routed to a replica after its snapshot was taken, so a burst does not
pile onto the replica that looked idle a second ago.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rayfleet.hashing import BlockHash
from rayfleet.router.closed_loop import RouterCore
from rayfleet.router.policy import (
    DEFAULT_WEIGHTS,
    Decision,
    PolicyWeights,
    ReplicaLoad,
    RoutingMode,
)

__all__ = [
    "KVEventCursor",
    "PendingPrefill",
    "ReplicaView",
    "Routed",
    "RoutingHint",
    "RoutingState",
    "rank_replicas",
    "replica_loads",
    "find_router",
    "register_router",
    "routing_hint_of",
    "tie_key",
]

# Requests the router remembers between its decision and the request's end (bounds memory when
# a finish is never reported, e.g. the ingress died mid-stream).
MAX_INFLIGHT = 1 << 16


@dataclass(frozen=True)
class RoutingHint:
    """What the ingress tells the router about one request (hashes, never text).

    ``block_hashes``: the chain of the full blocks the engine could serve from its prefix cache
    (the first ``(num_prompt_tokens - 1) // block_size`` blocks: the engine always computes the
    last prompt token). ``mode``: per-request override of the deployment's routing mode (used by
    ``rayfleet bench routing`` to compare modes on one set of replicas); None = the default.
    """

    request_id: str
    block_hashes: tuple[BlockHash, ...]
    block_size: int
    num_prompt_tokens: int
    session_key: str | None = None
    mode: str | None = None


def tie_key(hint: RoutingHint) -> str | None:
    """What breaks ties between equally cheap replicas (rendezvous hashing in the policy): the
    session id, else the prompt's first block. So idle replicas share distinct prefixes (and
    tenants: the chain is salted per tenant) evenly, and one prefix keeps one home even before
    the index knows it (a burst of the same prefix within one stats period)."""
    if hint.session_key:
        return f"s:{hint.session_key}"
    if hint.block_hashes:
        return f"p:{hint.block_hashes[0]:x}"
    return None


def routing_hint_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> RoutingHint | None:
    """The hint riding on a handle call: ``generate(job)`` with ``job.routing`` set."""
    for a in (*args, *kwargs.values()):
        hint = getattr(a, "routing", None)
        if isinstance(hint, RoutingHint):
            return hint
    return None


@dataclass(frozen=True)
class ReplicaView:
    """One candidate as Serve shows it: stats from ``record_routing_stats`` ({} until the first
    broadcast), the handle's queue-length cache entry (None = unknown) and the replica's cap."""

    replica_id: str
    stats: Mapping[str, Any] = field(default_factory=dict)
    queue_len: int | None = None
    max_ongoing_requests: int = 1 << 30


# (app, deployment) -> this process's router of a handle to that deployment (weak: it goes away
# with its handle). The ingress looks its router up here to report finishes.
_ROUTERS: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()
_ROUTERS_LOCK = threading.Lock()


def register_router(app: str, deployment: str, router: Any) -> None:
    with _ROUTERS_LOCK:
        _ROUTERS[(app, deployment)] = router


def find_router(app: str, deployment: str) -> Any | None:
    """The prefix-aware router of this process's handle to ``app``/``deployment``: None until
    that handle routed its first request, or when the deployment uses another router."""
    with _ROUTERS_LOCK:
        return _ROUTERS.get((app, deployment))


class PendingPrefill:
    """Corrections to a replica's (up to one stats period old) ``queued_prefill_tokens`` from
    what this router did since the snapshot was taken, at time T:

    * requests it sent after T add their uncached prompt tokens (not in the snapshot yet);
    * requests sent before T whose prefill finished after T (first token or end, told by the
      ingress) subtract theirs (the snapshot still counts them as queued).

    Entries go when a snapshot taken after they finished covers them, or after ``ttl_s``
    whatever the snapshots say (a replica whose stats stopped must not look loaded forever).
    """

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        # replica -> request -> [sent, tokens, prefilled_at or None]; dict order = send order
        self._sent: dict[str, dict[str, list[Any]]] = {}
        self._replica_of: dict[str, str] = {}

    def add(self, replica: str, request_id: str, tokens: int, now: float) -> None:
        if tokens > 0:
            self._sent.setdefault(replica, {})[request_id] = [now, tokens, None]
            self._replica_of[request_id] = replica

    def done(self, request_id: str, now: float) -> None:
        replica = self._replica_of.get(request_id)
        if replica is None:
            return
        entry = self._sent.get(replica, {}).get(request_id)
        if entry is not None and entry[2] is None:
            entry[2] = now

    def tokens(self, replica: str, snapshot_time: float | None, now: float) -> int:
        """Signed correction to add to the snapshot's queued prefill tokens."""
        q = self._sent.get(replica)
        if not q:
            return 0
        snap = snapshot_time if snapshot_time is not None else float("-inf")
        expired = now - self.ttl_s
        adjust = 0
        for rid in list(q):
            sent, tokens, prefilled = q[rid]
            if sent <= expired or (prefilled is not None and prefilled <= snap):
                del q[rid]
                self._replica_of.pop(rid, None)
            elif sent > snap:
                adjust += 0 if prefilled is not None else tokens
            elif prefilled is not None:
                adjust -= tokens
        return adjust

    def forget(self, replica: str) -> None:
        for rid in self._sent.pop(replica, {}):
            self._replica_of.pop(rid, None)


def replica_loads(
    views: Iterable[ReplicaView], pending: Mapping[str, int] | None = None
) -> dict[str, ReplicaLoad]:
    """Serve's candidates -> the policy's ``ReplicaLoad``s (insertion order = Serve's order).

    A replica whose cached queue length reached its ``max_ongoing_requests`` is not accepting
    (Serve would reject it); unknown queue lengths count as accepting.
    """
    pending = pending or {}
    out: dict[str, ReplicaLoad] = {}
    for v in views:
        s = v.stats
        out[v.replica_id] = ReplicaLoad(
            queued_prefill_tokens=max(
                int(s.get("queued_prefill_tokens", 0)) + pending.get(v.replica_id, 0), 0
            ),
            decode_seqs=int(s.get("num_running", 0)),
            decode_tokens=int(s.get("decode_tokens", 0)),
            kv_usage=float(s.get("kv_usage", 0.0)),
            speed=float(s.get("speed", 1.0)) or 1.0,
            accepting=v.queue_len is None or v.queue_len < v.max_ongoing_requests,
        )
    return out


def rank_replicas(decision: Decision, candidates: Sequence[str]) -> list[list[str]]:
    """Serve's ranks: the decision alone first, then every other candidate by its cost.

    Serve tries the ranks in order and takes the first replica whose queue has room, so the
    fallback ranks only matter when the chosen replica turned out full.
    """
    rest = [r for r in candidates if r != decision.replica]
    scores = decision.scores
    rest.sort(key=lambda r: scores.get(r, float("inf")))
    return [[decision.replica]] + ([rest] if rest else [])


class KVEventCursor:
    """Which event batch of each replica this router applied last (see module docstring)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self.gaps = 0  # batches missed for good (the index forgot those replicas)
        self.batches_applied = 0

    def new_batches(
        self, replica: str, batches: Sequence[tuple[int, Sequence[BlockHash], Sequence[BlockHash]]]
    ) -> tuple[list[tuple[int, Sequence[BlockHash], Sequence[BlockHash]]], bool]:
        """(batches not applied yet in seq order, whether some were missed before them).

        The first snapshot of a replica is no gap: a router that starts late simply does not
        know the older history (the index starts empty, which is the safe side).
        """
        last = self._last.get(replica)
        fresh = sorted((b for b in batches if last is None or b[0] > last), key=lambda b: b[0])
        if not fresh:
            return [], False
        gap = last is not None and fresh[0][0] > last + 1
        self._last[replica] = fresh[-1][0]
        self.gaps += gap
        self.batches_applied += len(fresh)
        return fresh, gap

    def forget(self, replica: str) -> None:
        self._last.pop(replica, None)


@dataclass(frozen=True)
class Routed:
    """One routing decision as Serve consumes it."""

    decision: Decision
    mode: RoutingMode
    ranks: list[list[str]]
    latency_s: float  # time spent in the policy (match + score + predict)


@dataclass
class _Inflight:
    mode: RoutingMode
    replica: str
    hashes: tuple[BlockHash, ...]


class RoutingState:
    """Cores per mode + event cursor + pending load + in-flight requests. Thread-safe: Serve
    routes on its router loop while the ingress reports finishes from its own thread."""

    def __init__(
        self,
        default_mode: RoutingMode | str,
        *,
        weights: PolicyWeights = DEFAULT_WEIGHTS,
        prediction_ttl_s: float = 30.0,
        max_index_entries: int = 1 << 20,
        pending_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.default_mode = RoutingMode(default_mode)
        self.weights = weights
        self.prediction_ttl_s = prediction_ttl_s
        self.max_index_entries = max_index_entries
        self.clock = clock
        self._cores: dict[RoutingMode, RouterCore] = {}
        self._block_size: int | None = None
        self._stats: dict[str, Mapping[str, Any]] = {}
        self._pending = PendingPrefill(pending_ttl_s)
        self._inflight: OrderedDict[str, _Inflight] = OrderedDict()
        self.cursor = KVEventCursor()
        self.events_applied = {"stored": 0, "removed": 0}
        self.fallbacks = 0  # requests Serve sent to a lower rank than the decision
        self._lock = threading.Lock()

    # ---- cores -----------------------------------------------------------------------------------
    def _core(self, mode: RoutingMode, block_size: int) -> RouterCore:
        if self._block_size is None:
            self._block_size = block_size
        elif block_size != self._block_size:
            raise ValueError(f"hint block_size {block_size} != the router's {self._block_size}")
        core = self._cores.get(mode)
        if core is None:
            core = RouterCore(
                mode,
                block_size=block_size,
                weights=self.weights,
                max_entries=self.max_index_entries,
                prediction_ttl_s=self.prediction_ttl_s,
            )
            self._cores[mode] = core
        return core

    # ---- the routing path (no I/O) ---------------------------------------------------------------
    def decide(self, hint: RoutingHint, candidates: Sequence[ReplicaView]) -> Routed:
        """Choose among ``candidates`` for ``hint``; predicts the hit on the chosen replica."""
        t0 = time.perf_counter()
        now = self.clock()
        mode = RoutingMode(hint.mode) if hint.mode else self.default_mode
        with self._lock:
            core = self._core(mode, hint.block_size)
            # Serve's candidates carry the latest broadcast; {} before a replica's first one.
            views = [
                ReplicaView(
                    v.replica_id,
                    v.stats or self._stats.get(v.replica_id, {}),
                    v.queue_len,
                    v.max_ongoing_requests,
                )
                for v in candidates
            ]
            pending = {
                v.replica_id: self._pending.tokens(v.replica_id, v.stats.get("time"), now)
                for v in views
            }
            loads = replica_loads(views, pending)
            decision = core.route(
                hint.request_id, hint.block_hashes, loads, now, session_key=tie_key(hint)
            )
            uncached = max(hint.num_prompt_tokens - decision.predicted_cached_tokens, 0)
            self._pending.add(decision.replica, hint.request_id, uncached, now)
            self._inflight[hint.request_id] = _Inflight(mode, decision.replica, hint.block_hashes)
            self._inflight.move_to_end(hint.request_id)
            while len(self._inflight) > MAX_INFLIGHT:
                self._inflight.popitem(last=False)
        ranks = rank_replicas(decision, [v.replica_id for v in candidates])
        return Routed(decision, mode, ranks, time.perf_counter() - t0)

    def on_prefilled(self, request_id: str) -> None:
        """The request's first token arrived: its prompt no longer loads its replica."""
        with self._lock:
            self._pending.done(request_id, self.clock())

    def on_routed(self, request_id: str, replica: str) -> None:
        """Serve sent the request to ``replica`` (after the replica accepted it)."""
        with self._lock:
            rec = self._inflight.get(request_id)
            if rec is None or rec.replica == replica:
                return
            self.fallbacks += 1
            core = self._cores[rec.mode]
            core.reassign(request_id, replica, rec.hashes, self.clock())
            rec.replica = replica

    # ---- off the routing path --------------------------------------------------------------------
    def on_stats(self, views: Iterable[ReplicaView]) -> None:
        """A broadcast of every replica's routing stats: keep the loads, apply new KV events."""
        now = self.clock()
        with self._lock:
            for v in views:
                if not v.stats:
                    continue
                self._stats[v.replica_id] = v.stats
                fresh, gap = self.cursor.new_batches(v.replica_id, v.stats.get("kv_events", ()))
                if gap:
                    for core in self._cores.values():
                        core.remove_replica(v.replica_id)
                for _seq, stored, removed in fresh:
                    self.events_applied["stored"] += len(stored)
                    self.events_applied["removed"] += len(removed)
                    for core in self._cores.values():
                        core.on_kv_events(v.replica_id, stored, removed, now)

    def remove_replicas(self, replicas: Iterable[str]) -> None:
        with self._lock:
            for r in replicas:
                self._stats.pop(r, None)
                self._pending.forget(r)
                self.cursor.forget(r)
                for core in self._cores.values():
                    core.remove_replica(r)

    def on_finished(
        self, request_id: str, replica: str, cached_tokens: int
    ) -> tuple[RoutingMode, int] | None:
        """The engine reported ``cached_tokens``; returns (mode, predicted cached tokens), or None
        if this router has no record of the request (not routed here, or dropped)."""
        with self._lock:
            self._pending.done(request_id, self.clock())
            rec = self._inflight.pop(request_id, None)
            if rec is None:
                return None
            core = self._cores[rec.mode]
            if replica and replica != rec.replica:  # Serve's fallback we were not told of
                self.fallbacks += 1
                core.reassign(request_id, replica, rec.hashes, self.clock())
            predicted = core.tracker.finish(request_id, cached_tokens)
            return None if predicted is None else (rec.mode, predicted)

    def on_aborted(self, request_id: str) -> None:
        with self._lock:
            self._pending.done(request_id, self.clock())
            rec = self._inflight.pop(request_id, None)
            if rec is not None:
                self._cores[rec.mode].on_aborted(request_id)

    # ---- introspection ---------------------------------------------------------------------------
    def match(self, hashes: Sequence[BlockHash], mode: str | None = None) -> dict[str, int]:
        """Blocks of ``hashes`` each replica holds in ``mode``'s index (no LRU touch)."""
        with self._lock:
            core = self._cores.get(RoutingMode(mode) if mode else self.default_mode)
            if core is None or core.index is None:
                return {}
            return {
                str(r): n for r, n in core.index.match(hashes, self.clock(), touch=False).items()
            }

    def snapshot(self) -> dict[str, Any]:
        """Counters for the debug RPC and tests (plain values)."""
        now = self.clock()
        with self._lock:
            modes = {}
            for mode, core in self._cores.items():
                t = core.tracker
                entry: dict[str, Any] = {
                    "requests": t.requests,
                    "predicted_cached_tokens": t.predicted_tokens,
                    "actual_cached_tokens": t.actual_tokens,
                    "over_predicted_tokens": t.over_predicted_tokens,
                    "outstanding": t.outstanding,
                    "per_replica": {
                        str(r): {
                            "requests": c.requests,
                            "predicted": c.predicted_tokens,
                            "actual": c.actual_tokens,
                        }
                        for r, c in t.per_replica.items()
                    },
                }
                if core.index is not None:
                    st = core.index.stats(now)
                    entry["index_entries"] = st.entries
                    entry["pending_predictions"] = st.pending_predictions
                    entry["blocks_per_replica"] = {
                        str(r): n for r, n in st.blocks_per_replica.items()
                    }
                modes[mode.value] = entry
            return {
                "default_mode": self.default_mode.value,
                "block_size": self._block_size,
                "modes": modes,
                "event_batches_applied": self.cursor.batches_applied,
                "event_gaps": self.cursor.gaps,
                "events_applied": dict(self.events_applied),
                "fallbacks": self.fallbacks,
                "inflight": len(self._inflight),
                "replicas_with_stats": sorted(self._stats),
            }
