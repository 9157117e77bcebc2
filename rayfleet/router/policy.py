"""Routing policies: pure functions of (prefix match, replica loads) → Decision.

The prefix-aware policy scores every replica with the estimated cost, in prompt tokens, of serving
this request there, and takes the cheapest:

    cost(r) = ( uncached_tokens(r)                          # prefill this request still needs on r
              + queue_weight  · queued_prefill_tokens(r)    # prefill ahead of it in r's queue
              + decode_weight · decode_tokens(r)            # KV tokens of r's running sequences
              + kv_penalty(r) ) / speed(r)

    uncached_tokens(r) = (request_blocks − matched_blocks(r)) · block_size
    kv_penalty(r)      = kv_pressure_tokens · max(0, kv_usage(r) − kv_thr) / (1 − kv_thr)

It is decided per request — there is no fleet-wide "imbalanced, turn affinity off" switch: a
cache hit on a busy replica loses to a miss on an idle one exactly when the extra queue outweighs
the prefill it saves, and wins again once that queue drains. A miss everywhere reduces to "least
loaded in tokens" (never in requests: one 8k-token prompt outweighs three 100-token ones).
Among replicas whose cost is within ``tie_tolerance_tokens`` of the best, a session key picks one
by rendezvous hashing (stable while the candidate set is stable; losing a replica only moves its
own sessions); without a key the first best in ``loads`` order wins.

Baselines share the signature (``Policy``): ``least_loaded`` (same load terms, no cache term),
``RoundRobin`` (stateful callable). The two prefix modes use the same ``choose_replica``; they
differ only in the index that produces ``match`` (see ``MODES`` and ``closed_loop.RouterCore``):

    prefix_approx   the index holds only the router's own predictions (kept until the cap evicts)
    prefix_precise  predictions + the replicas' KV events (stored/removed), predictions expire

Default weights (``PolicyWeights()``), from ``bench/routing_sim.py``
(bench/results/routing_sim.json, "weight_sweep": prefix_precise, 8 and 64 replicas at 14 req/s
per replica, i.e. past the all-miss capacity, 6k-token tenant prompts, Zipf tenants, 64-token
outputs):

    queue_weight  0.25 / 0.5 / 1 / 2 / 4  TTFT p90 s (64 rep.) 0.21 / 0.13 / 0.10 / ovl. / ovl.
                                          hit rate             0.93 / 0.93 / 0.90 / 0.51 / 0.38
    decode_weight 0 / 0.05 / 0.2          TTFT p90 s (64 rep.) 0.054 / 0.10 / 10.1

``queue_weight`` 1.0 (a queued prefill token delays this request one token) is the best: lighter
weights pile hot tenants onto their cache holders, heavier ones give hits away and the fleet
overloads on recomputed prefixes. ``decode_weight`` must stay small (0.2 already overloads); 0.0
was best on this short-output workload and 0.05 costs little, so 0.05 stays as a hedge for
long-output traffic whose decode load the sim does not stress. ``kv_*`` and the tie tolerance
were not swept.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from rayfleet.router.prefix_index import ReplicaId

__all__ = [
    "DEFAULT_WEIGHTS",
    "MODES",
    "Decision",
    "ModeSpec",
    "Policy",
    "PolicyWeights",
    "ReplicaLoad",
    "RoundRobin",
    "RoutingMode",
    "choose_replica",
    "least_loaded",
    "load_tokens",
    "rendezvous_weight",
]


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica reports (plus what the router sent it since): all in tokens.

    ``queued_prefill_tokens``: prompt tokens admitted or waiting that are not computed yet (after
    the replica's own prefix-cache hits). ``decode_tokens``: KV tokens (context length) of the
    sequences it is decoding. ``speed``: relative throughput (2.0 = twice the reference replica,
    e.g. a TP=2 replica); costs are divided by it. ``accepting=False`` (draining, unhealthy, full
    queue) removes it from the candidates unless no replica accepts.
    """

    queued_prefill_tokens: int = 0
    decode_seqs: int = 0
    decode_tokens: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    speed: float = 1.0
    accepting: bool = True


@dataclass(frozen=True)
class PolicyWeights:
    """Weights of the cost model above; defaults justified in the module docstring."""

    queue_weight: float = 1.0  # per queued prefill token (1.0: it delays this request 1:1)
    decode_weight: float = 0.05  # per KV token of a running decode sequence
    kv_threshold: float = 0.9  # KV usage above which the pressure penalty starts
    kv_pressure_tokens: float = 4096.0  # penalty at 100% KV usage, in tokens
    tie_tolerance_tokens: float = 16.0  # costs within this of the best count as ties

    def __post_init__(self) -> None:
        if self.queue_weight < 0 or self.decode_weight < 0 or self.kv_pressure_tokens < 0:
            raise ValueError("weights must be non-negative")
        if not 0.0 <= self.kv_threshold < 1.0:
            raise ValueError("kv_threshold must be in [0, 1)")
        if self.tie_tolerance_tokens < 0:
            raise ValueError("tie_tolerance_tokens must be non-negative")


DEFAULT_WEIGHTS = PolicyWeights()


@dataclass(frozen=True)
class Decision:
    replica: ReplicaId
    matched_blocks: int
    predicted_cached_tokens: int  # what the router expects the engine to find cached
    scores: dict[ReplicaId, float] = field(repr=False)  # cost per candidate (lower is better)
    reason: str = "cost"  # "prefix" | "load" | "session" | "round_robin"


Policy = Callable[..., Decision]
"""(match, loads, request_blocks, block_size, weights=DEFAULT_WEIGHTS, session_key=None)."""


def load_tokens(load: ReplicaLoad, weights: PolicyWeights) -> float:
    """The load part of the cost, in tokens, before division by speed."""
    cost = weights.queue_weight * load.queued_prefill_tokens
    cost += weights.decode_weight * load.decode_tokens
    if load.kv_usage > weights.kv_threshold:
        excess = (min(load.kv_usage, 1.0) - weights.kv_threshold) / (1.0 - weights.kv_threshold)
        cost += weights.kv_pressure_tokens * excess
    return cost


def rendezvous_weight(key: str, replica: ReplicaId) -> int:
    """Stable (process-independent) highest-random-weight hash of (key, replica)."""
    h = hashlib.blake2b(digest_size=8, person=b"rayfleet-hrw")
    h.update(key.encode("utf-8"))
    h.update(b"\x00")
    h.update(str(replica).encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


def _candidates(loads: Mapping[ReplicaId, ReplicaLoad]) -> list[ReplicaId]:
    if not loads:
        raise ValueError("no replicas to route to")
    accepting = [r for r, ld in loads.items() if ld.accepting]
    return accepting or list(loads)


def _pick(
    scores: dict[ReplicaId, float], tolerance: float, session_key: str | None
) -> tuple[ReplicaId, bool]:
    """Cheapest replica; ties (within ``tolerance``) go to the session's rendezvous winner.

    Returns (replica, whether the session key decided among several ties).
    """
    best = min(scores.values())
    ties = [r for r, s in scores.items() if s <= best + tolerance]
    if session_key is None or len(ties) == 1:
        # the exact best first (dict order breaks exact ties)
        return next(r for r, s in scores.items() if s == best), False
    return max(ties, key=lambda r: rendezvous_weight(session_key, r)), True


def choose_replica(
    match: Mapping[ReplicaId, int],
    loads: Mapping[ReplicaId, ReplicaLoad],
    request_blocks: int,
    block_size: int,
    weights: PolicyWeights = DEFAULT_WEIGHTS,
    session_key: str | None = None,
) -> Decision:
    """Prefix-aware choice: minimum estimated cost in tokens (module docstring)."""
    scores: dict[ReplicaId, float] = {}
    for r in _candidates(loads):
        ld = loads[r]
        matched = min(match.get(r, 0), request_blocks)
        uncached = (request_blocks - matched) * block_size
        scores[r] = (uncached + load_tokens(ld, weights)) / ld.speed
    chosen, by_session = _pick(scores, weights.tie_tolerance_tokens, session_key)
    matched = min(match.get(chosen, 0), request_blocks)
    if by_session:
        reason = "session"
    elif matched:
        reason = "prefix"
    else:
        reason = "load"
    return Decision(chosen, matched, matched * block_size, scores, reason)


def least_loaded(
    match: Mapping[ReplicaId, int],
    loads: Mapping[ReplicaId, ReplicaLoad],
    request_blocks: int,
    block_size: int,
    weights: PolicyWeights = DEFAULT_WEIGHTS,
    session_key: str | None = None,
) -> Decision:
    """Baseline: the same load terms, no cache term (``match`` only fills the prediction)."""
    scores = {r: load_tokens(loads[r], weights) / loads[r].speed for r in _candidates(loads)}
    chosen, by_session = _pick(scores, weights.tie_tolerance_tokens, session_key)
    matched = min(match.get(chosen, 0), request_blocks)
    reason = "session" if by_session else "load"
    return Decision(chosen, matched, matched * block_size, scores, reason)


class RoundRobin:
    """Baseline: cycle over the accepting replicas in ``loads`` order (state: one counter)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __call__(
        self,
        match: Mapping[ReplicaId, int],
        loads: Mapping[ReplicaId, ReplicaLoad],
        request_blocks: int,
        block_size: int,
        weights: PolicyWeights = DEFAULT_WEIGHTS,
        session_key: str | None = None,
    ) -> Decision:
        cands = _candidates(loads)
        chosen = cands[next(self._counter) % len(cands)]
        matched = min(match.get(chosen, 0), request_blocks)
        return Decision(chosen, matched, matched * block_size, {}, "round_robin")


class RoutingMode(str, Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    PREFIX_APPROX = "prefix_approx"
    PREFIX_PRECISE = "prefix_precise"


@dataclass(frozen=True)
class ModeSpec:
    """A mode = a policy + where its prefix match comes from (the policy is never copied)."""

    make_policy: Callable[[], Policy]
    uses_index: bool  # keep a PrefixIndex fed with predictions (and match against it)
    applies_events: bool  # also feed it the replicas' KV events; predictions then expire


MODES: dict[RoutingMode, ModeSpec] = {
    RoutingMode.ROUND_ROBIN: ModeSpec(RoundRobin, False, False),
    RoutingMode.LEAST_LOADED: ModeSpec(lambda: least_loaded, False, False),
    RoutingMode.PREFIX_APPROX: ModeSpec(lambda: choose_replica, True, False),  # predictions only
    RoutingMode.PREFIX_PRECISE: ModeSpec(lambda: choose_replica, True, True),  # + KV events
}
