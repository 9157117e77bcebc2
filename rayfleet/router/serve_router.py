"""PrefixAwareRequestRouter: the Ray Serve ``RequestRouter`` of the ingress's handle to LLMReplica.

Serve runs a deployment's router inside each caller, so every ingress replica holds one instance
(and its own ``PrefixIndex``, fed by the same broadcasts). The instance is a thin adapter; all
decisions are made by ``RoutingState`` (pure, unit-tested)::

    Ingress._stream ── handle.generate(job) ── job.routing = RoutingHint(hashes, session, mode)
        │                    │
        │                    ▼ choose_replicas: RoutingState.decide  (local data only, no RPC)
        │                    ▼ on_request_routed: the replica Serve actually used
        │◀── final chunk: replica_id, usage.cached_tokens
        └──▶ report_finished / report_aborted  (closed loop + Prometheus counters)

    controller ── LLMReplica.record_routing_stats() every request_routing_stats_period_s ──▶
        long poll ──▶ update_replicas: RoutingState.on_stats (loads + KV event batches)

Modes: ``request_router_kwargs["mode"]`` is the deployment's mode; a hint may override it per
request (one RouterCore per mode, each with its own index and hit tracker).

Serve cloudpickles this module *by value* into each caller (RequestRouterConfig), so module
globals here would be per-copy: the process registry the ingress uses to find its router lives in
``routing_state`` (imported by reference).

Serve calls ``choose_replicas`` on its router event loop (a separate thread by default) while the
ingress reports finishes from its own; ``RoutingState`` locks, so both are safe.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from rayfleet.router.policy import PolicyWeights, RoutingMode
from rayfleet.router.routing_state import (
    ReplicaView,
    RoutingState,
    register_router,
    routing_hint_of,
)

logger = logging.getLogger(__name__)

__all__ = ["PrefixAwareRequestRouter"]


class PrefixAwareRequestRouter(RequestRouter):
    """Applies rayfleet's routing policy (``RoutingMode``) to Serve's candidate replicas."""

    def initialize_state(
        self,
        mode: str = RoutingMode.PREFIX_PRECISE.value,
        prediction_ttl_s: float = 30.0,
        max_index_entries: int = 1 << 20,
        weights: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        from rayfleet.cluster.metrics import router_metrics

        self.state = RoutingState(
            mode,
            weights=PolicyWeights(**(weights or {})),
            prediction_ttl_s=prediction_ttl_s,
            max_index_entries=max_index_entries,
            clock=self._get_curr_time_s,
        )
        self._metrics = router_metrics(self._deployment_id.app_name)
        self._known: set[str] = set()
        register_router(self._deployment_id.app_name, self._deployment_id.name, self)
        logger.info(
            "prefix-aware router for %s (mode %s)", self._deployment_id, self.state.default_mode
        )

    # ---- Serve's hooks ---------------------------------------------------------------------------
    def _view(self, r: RunningReplica) -> ReplicaView:
        return ReplicaView(
            replica_id=r.replica_id.unique_id,
            stats=r.routing_stats or {},
            queue_len=self._replica_queue_len_cache.get(r.replica_id),
            max_ongoing_requests=r.max_ongoing_requests,
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        hint = (
            routing_hint_of(pending_request.args, pending_request.kwargs)
            if pending_request is not None
            else None
        )
        if hint is None or not candidate_replicas:
            # Not a generate call (describe/stats/ready): any replica with room will do.
            return [candidate_replicas]
        routed = self.state.decide(hint, [self._view(r) for r in candidate_replicas])
        tags = {"mode": routed.mode.value}
        self._metrics.decision_latency.observe(routed.latency_s, tags=tags)
        self._metrics.decisions.inc(tags={**tags, "reason": routed.decision.reason})
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[i] for i in rank] for rank in routed.ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        hint = routing_hint_of(pending_request.args, pending_request.kwargs)
        if hint is not None:
            self.state.on_routed(hint.request_id, replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Called with every broadcast of the running replicas (membership or routing stats
        changed): refresh loads and apply the KV event batches, off the routing path."""
        super().update_replicas(replicas)
        current = {r.replica_id.unique_id for r in replicas}
        gone = self._known - current
        self._known = current
        if gone:
            self.state.remove_replicas(gone)
        try:
            self.state.on_stats([self._view(r) for r in replicas])
        except Exception:  # a malformed snapshot must not break Serve's update path
            logger.exception("applying routing stats failed")

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._known.discard(replica_id.unique_id)
        self.state.remove_replicas([replica_id.unique_id])

    # ---- called by the ingress (same process) ----------------------------------------------------
    def report_finished(self, request_id: str, replica_id: str, cached_tokens: int) -> None:
        """The request's final chunk arrived: close the loop (predicted vs engine cached)."""
        done = self.state.on_finished(request_id, replica_id, cached_tokens)
        if done is None:
            return
        mode, predicted = done
        tags = {"mode": mode.value}
        if predicted:
            self._metrics.predicted_cached_tokens.inc(predicted, tags=tags)
        if cached_tokens:
            self._metrics.actual_cached_tokens.inc(cached_tokens, tags=tags)

    def report_prefilled(self, request_id: str) -> None:
        """The request's first token arrived (its prompt is computed)."""
        self.state.on_prefilled(request_id)

    def report_aborted(self, request_id: str) -> None:
        self.state.on_aborted(request_id)

    def debug_snapshot(self) -> dict[str, Any]:
        return self.state.snapshot()
