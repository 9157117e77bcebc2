"""ServeConfig -> Ray Serve application: Ingress (gRPC + OpenAI HTTP) -> LLMReplica.

``build_app(args)`` is the application builder for Serve's config files
(``import_path: rayfleet.cluster.app:build_app``); ``args`` is a rayfleet config mapping (see
``serve_config``), or ``{"config_file": PATH}``.

Replica resources: ``num_cpus_per_replica`` and ``gpus_per_replica`` (fractional GPUs are fine
with tensor_parallel_size 1: several replicas share one GPU). With TP > 1 the replica reserves one
bundle per rank in a STRICT_PACK placement group (rank 0 in the replica's own bundle).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from rayfleet.cluster.serve_config import ServeConfig
from rayfleet.replicas.deployment import LLMReplica
from rayfleet.router.ingress import Ingress

LLM_DEPLOYMENT = "LLMReplica"
INGRESS_DEPLOYMENT = "Ingress"
PREFIX_ROUTER_CLASS = "rayfleet.router.serve_router:PrefixAwareRequestRouter"
# By default Serve runs a replica's user code, and each handle's router, on event loops of their
# own threads: every streamed chunk then crosses threads (and the GIL) twice more per hop. Our
# deployments never block their loop (the engine steps on its own thread; stats and GCS reads
# go through asyncio.to_thread), so they run on Serve's main loop.
SERVE_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def resolve_model(cfg: ServeConfig) -> ServeConfig:
    """Fill in the bundled demo model when the config names none."""
    if cfg.model or cfg.model_shape:
        return cfg
    from rayfleet.config import default_demo_model

    return cfg.replace(model=default_demo_model())


def request_router_config(cfg: ServeConfig) -> RequestRouterConfig:
    """Serve's router for the ingress -> LLMReplica handle: rayfleet's prefix-aware router in
    ``cfg.routing`` mode, or Serve's built-in one for "default". Stats (load + KV events) are
    collected every ``routing_stats_period_s`` either way (GetServerInfo shows them)."""
    opts: dict[str, Any] = {
        "request_routing_stats_period_s": cfg.routing_stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 4 * cfg.routing_stats_period_s),
    }
    if cfg.routing != "default":
        opts["request_router_class"] = PREFIX_ROUTER_CLASS
        opts["request_router_kwargs"] = {"mode": cfg.routing}
    return RequestRouterConfig(**opts)


def _actor_options(num_cpus: float, num_gpus: float | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "num_cpus": num_cpus,
        "runtime_env": {"env_vars": dict(SERVE_LOOP_ENV)},
    }
    if num_gpus is not None:
        opts["num_gpus"] = num_gpus
    return opts


def llm_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    tp = cfg.tensor_parallel_size
    opts: dict[str, Any] = {
        "name": LLM_DEPLOYMENT,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "request_router_config": request_router_config(cfg),
        "health_check_period_s": 5.0,
        # Loading a large checkpoint (or profiling the KV cache) takes a while.
        "health_check_timeout_s": 60.0,
    }
    if cfg.autoscaling is not None:
        opts["autoscaling_config"] = cfg.replica_autoscaling()
    else:
        opts["num_replicas"] = cfg.replica_count()
    # With TP > 1, rank 0 (the replica actor) holds one GPU and the other ranks get bundles.
    opts["ray_actor_options"] = _actor_options(
        cfg.num_cpus_per_replica, num_gpus=1 if tp > 1 else cfg.gpus_per_replica
    )
    if tp > 1:
        rank0 = {"CPU": cfg.num_cpus_per_replica, "GPU": 1}
        opts["placement_group_bundles"] = [rank0] + [{"CPU": 0.1, "GPU": 1}] * (tp - 1)
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def ingress_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": cfg.ingress_num_replicas,
        # The ingress only awaits replicas; back-pressure is applied at the LLM replicas.
        "max_ongoing_requests": cfg.ingress_max_ongoing_requests,
        "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "ray_actor_options": _actor_options(cfg.ingress_num_cpus),
    }


def build_application(cfg: ServeConfig) -> serve.Application:
    cfg = resolve_model(cfg)
    args = cfg.to_dict()
    llm = serve.deployment(LLMReplica).options(**llm_deployment_options(cfg)).bind(args)
    return serve.deployment(Ingress).options(**ingress_deployment_options(cfg)).bind(llm, args)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``serve run rayfleet.cluster.app:build_app config_file=...``)."""
    args = dict(args or {})
    path = args.pop("config_file", None)
    if path is not None:
        if args:
            raise ValueError("give either config_file or config keys as args, not both")
        cfg = ServeConfig.load(path)
    else:
        cfg = ServeConfig.from_dict(args)
    return build_application(cfg)
