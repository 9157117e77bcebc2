"""Routing policies: pure functions of (prefix match, replica loads) → Decision.

The prefix-aware policy scores every replica with the estimated cost, in prompt tokens, of serving
this request there, and takes the cheapest:

    cost(r) = ( load(r)                                   # work ahead of this request on r
              + uncached_tokens(r) · ( miss_weight        # its own prefill, and the prefix copy
                                     + externality_weight · load(r) / request_tokens )
              ) / speed(r)                                # ... and the requests queued behind it

    load(r)            = queue_weight · queued_prefill_tokens(r)    # prefill ahead of it on r
                       + decode_weight · decode_tokens(r)           # KV of r's running sequences
                       + kv_penalty(r)
    uncached_tokens(r) = (request_blocks − matched_blocks(r)) · block_size
    request_tokens     = request_blocks · block_size
    kv_penalty(r)      = kv_pressure_tokens · max(0, kv_usage(r) − kv_thr) / (1 − kv_thr)

A queued token delays this request one token. An uncached token costs more, because a miss is
not this request's alone: its prefill delays every request that will queue behind it on ``r``
(about ``load(r) / request_tokens`` of them: ``r``'s queue counted in requests of this size is
what the next arrivals there will find too), and the copy of the prefix it creates takes KV from
chains that later requests would hit (``miss_weight`` − 1: where the fleet's KV barely holds its
prefixes, as in the bench below, every copy evicts another tenant's chain). So next to an idle
replica the cost is about the request's own latency, and under load a hit is given away only when
its holder's queue is a multiple of another replica's, not when it is a few thousand tokens
longer (the staleness of a snapshot alone is that much). With a miss priced at its prefill only
(the previous cost, ``miss_weight`` 1 and no externality) hits went to whichever replica looked a
prefill shorter, tenants' prefixes were copied to every replica, the pools thrashed and the fleet
overloaded on recomputed prefixes: 0.47-0.51 hit rate at 24-48 req/s on the bench, oracle 0.75.

It is decided per request — there is no fleet-wide "imbalanced, turn affinity off" switch: a
cache hit on a busy replica loses to a miss on an idle one exactly when the extra queue outweighs
what the miss costs, and wins again once that queue drains. A miss everywhere reduces to "least
loaded in tokens" (``uncached`` is the same everywhere and the cost grows with ``load``; never in
requests: one 8k-token prompt outweighs three 100-token ones).
Among replicas whose cost is within ``tie_tolerance_tokens`` of the best, a session key picks one
by rendezvous hashing (stable while the candidate set is stable; losing a replica only moves its
own sessions); without a key the first best in ``loads`` order wins.

Baselines share the signature (``Policy``): ``least_loaded`` (same load terms, no cache term),
``RoundRobin`` (stateful callable). The two prefix modes use the same ``choose_replica``; they
differ only in the index that produces ``match`` (see ``MODES`` and ``closed_loop.RouterCore``):

    prefix_approx   the index holds only the router's own predictions (kept until the cap evicts)
    prefix_precise  predictions + the replicas' KV events (stored/removed), predictions expire

Default weights (``PolicyWeights()``), from ``bench/routing_sim.py`` (engine-backed replicas,
bench/results/routing_sim.json; prefix_precise; one weight changed at a time). "bench" replays
the H100 routing run (3 llama-3-8b replicas sharing one GPU, 2048 KV blocks each, 32 tenants x 4
users, 2048 + 256 + 128-token prompts; hit rate at 12 / 24 / 48 / inf req/s, mean of 3 seeds,
oracle 0.75). "chat" has Zipf tenants with 6k-token prompts on 8 or 32 replicas with a GPU each,
where hot tenants need several replicas (TTFT p90 in s at 8 replicas x 14 req/s, 32 x 8, 32 x 14):

    weights                     bench hit rate               chat TTFT p90 s
    defaults                    0.73 / 0.73 / 0.72 / 0.74    0.063 / 0.064 / 0.11
    miss_weight 1               0.71 / 0.67 / 0.68 / 0.74    0.68  / 0.064 / 0.78
    miss_weight 2               0.73 / 0.69 / 0.69 / 0.74    0.066 / 0.060 / 0.14
    miss_weight 4               0.73 / 0.74 / 0.73 / 0.74    0.066 / 0.067 / 0.13
    externality_weight 0        0.73 / 0.72 / 0.68 / 0.74    0.065 / 0.065 / 0.12
    both (previous defaults)    0.65 / 0.51 / 0.47 / 0.67    23    / 0.065 / 9.8
    decode_weight 0             0.73 / 0.70 / 0.69 / 0.74    0.075 / 0.21  / 0.63
    kv_pressure_tokens 0        0.73 / 0.73 / 0.71 / 0.74    0.064 / 0.064 / 0.11

``miss_weight`` 3: 1-2 still give hits away at 24-48 req/s on the bench; 4 is as good here, but
in an earlier sweep with ``decode_weight`` 0.002 it held hot chat tenants on their holders (TTFT
p90 0.4-0.6 s at 32 replicas) where 3 did not (0.17-0.21 s), so 3 keeps a margin. The
externality is what keeps hits at 48 req/s. ``decode_weight`` 0.05 spreads hot tenants by their
replicas' decode load (0 lets their holders' batches grow: 0.63 s); ``kv_pressure_tokens`` makes
no difference on either workload (under saturation every replica's pool is ~full of running
sequences; ``kv_usage`` counts referenced blocks only, not free ones that still cache a prefix).
The tie tolerance was not swept.
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
    miss_weight: float = 3.0  # per uncached token: its prefill (1) + the prefix copy it makes
    externality_weight: float = 1.0  # x uncached x load / request tokens: the requests behind it
    decode_weight: float = 0.05  # per KV token of a running decode sequence
    kv_threshold: float = 0.9  # KV usage above which the pressure penalty starts
    kv_pressure_tokens: float = 4096.0  # penalty at 100% KV usage, in tokens
    tie_tolerance_tokens: float = 16.0  # costs within this of the best count as ties

    def __post_init__(self) -> None:
        if min(self.queue_weight, self.externality_weight, self.decode_weight) < 0:
            raise ValueError("weights must be non-negative")
        if self.kv_pressure_tokens < 0:
            raise ValueError("weights must be non-negative")
        if self.miss_weight < 1.0:
            raise ValueError("miss_weight must be >= 1 (an uncached token costs its prefill)")
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
    request_tokens = max(request_blocks, 1) * block_size
    for r in _candidates(loads):
        ld = loads[r]
        matched = min(match.get(r, 0), request_blocks)
        uncached = (request_blocks - matched) * block_size
        load = load_tokens(ld, weights)
        per_uncached = weights.miss_weight + weights.externality_weight * load / request_tokens
        scores[r] = (load + uncached * per_uncached) / ld.speed
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
