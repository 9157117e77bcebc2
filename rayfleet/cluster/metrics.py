"""Prometheus metrics (``ray.util.metrics``), all named ``rayfleet_*``.

Ray exports them on each node's metrics port (``ray.init(_metrics_export_port=...)`` /
``ray start --metrics-export-port``), where Prometheus (or the Ray dashboard) scrapes them. The
ingress records what clients see (requests by status, TTFT, inter-token and end-to-end latency);
each LLM replica records engine state (tokens, running/waiting, KV usage, preemptions, aborts).

Metric objects are created on first use inside the process that records them (Ray workers), never
at import time.
"""

from __future__ import annotations

from functools import cache
from typing import Any

TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]


class IngressMetrics:
    """Client-facing request metrics. ``protocol`` is "grpc" or "http"; ``status`` an ErrorKind
    value or "ok"."""

    def __init__(self, model: str) -> None:
        from ray.util import metrics as m

        tags = ("model", "protocol")
        self.requests = m.Counter(
            "rayfleet_requests",
            description="Generate requests finished, by final status.",
            tag_keys=(*tags, "status"),
        )
        self.ttft = m.Histogram(
            "rayfleet_time_to_first_token_seconds",
            description="Time from the ingress receiving a request to its first token.",
            boundaries=TTFT_BUCKETS,
            tag_keys=tags,
        )
        self.itl = m.Histogram(
            "rayfleet_inter_token_latency_seconds",
            description="Time between streamed tokens of one request (per token).",
            boundaries=ITL_BUCKETS,
            tag_keys=tags,
        )
        self.e2e = m.Histogram(
            "rayfleet_e2e_request_latency_seconds",
            description="Time from the ingress receiving a request to its last token.",
            boundaries=E2E_BUCKETS,
            tag_keys=tags,
        )
        for metric in (self.requests, self.ttft, self.itl, self.e2e):
            metric.set_default_tags({"model": model})


class ReplicaMetrics:
    """Engine state of one LLM replica (tagged with its replica id)."""

    def __init__(self, model: str, replica: str) -> None:
        from ray.util import metrics as m

        tags = ("model", "replica")
        self.prompt_tokens = m.Counter(
            "rayfleet_prompt_tokens", description="Prompt tokens admitted.", tag_keys=tags
        )
        self.generation_tokens = m.Counter(
            "rayfleet_generation_tokens", description="Tokens generated.", tag_keys=tags
        )
        self.cached_tokens = m.Counter(
            "rayfleet_cached_prompt_tokens",
            description="Prompt tokens served from the prefix cache.",
            tag_keys=tags,
        )
        self.running = m.Gauge(
            "rayfleet_num_requests_running", description="Requests in the batch.", tag_keys=tags
        )
        self.waiting = m.Gauge(
            "rayfleet_num_requests_waiting",
            description="Requests queued in the engine.",
            tag_keys=tags,
        )
        self.kv_usage = m.Gauge(
            "rayfleet_kv_cache_usage_ratio",
            description="Fraction of KV cache blocks referenced by requests.",
            tag_keys=tags,
        )
        self.preemptions = m.Counter(
            "rayfleet_preemptions", description="Requests preempted (recompute).", tag_keys=tags
        )
        self.aborts = m.Counter(
            "rayfleet_aborted_requests",
            description="Requests aborted before finishing (client gone or Abort).",
            tag_keys=tags,
        )
        for metric in self.all():
            metric.set_default_tags({"model": model, "replica": replica})

    def all(self) -> list[Any]:
        return [
            self.prompt_tokens,
            self.generation_tokens,
            self.cached_tokens,
            self.running,
            self.waiting,
            self.kv_usage,
            self.preemptions,
            self.aborts,
        ]


ROUTING_LATENCY_BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2]


class RouterMetrics:
    """The prefix-aware router's closed loop (recorded in the ingress process, where Serve runs
    the router). ``mode`` is the routing mode that decided the request."""

    def __init__(self, app: str) -> None:
        from ray.util import metrics as m

        tags = ("app", "mode")
        self.predicted_cached_tokens = m.Counter(
            "rayfleet_router_predicted_cached_tokens_total",
            description="Prompt tokens the router predicted the chosen replica had cached.",
            tag_keys=tags,
        )
        self.actual_cached_tokens = m.Counter(
            "rayfleet_router_actual_cached_tokens_total",
            description="Prompt tokens the engine found cached (same requests as predicted).",
            tag_keys=tags,
        )
        self.decisions = m.Counter(
            "rayfleet_router_decisions_total",
            description="Routing decisions, by what decided them (prefix|load|session|...).",
            tag_keys=(*tags, "reason"),
        )
        self.decision_latency = m.Histogram(
            "rayfleet_router_decision_latency_seconds",
            description="Time in the routing policy per decision (index match + scoring).",
            boundaries=ROUTING_LATENCY_BUCKETS,
            tag_keys=tags,
        )
        for metric in (
            self.predicted_cached_tokens,
            self.actual_cached_tokens,
            self.decisions,
            self.decision_latency,
        ):
            metric.set_default_tags({"app": app})


@cache
def router_metrics(app: str) -> RouterMetrics:
    return RouterMetrics(app)


@cache
def ingress_metrics(model: str) -> IngressMetrics:
    return IngressMetrics(model)
