"""ServeConfig: one frozen description of a rayfleet deployment (model, engine, replicas,
autoscaling, ports), built once from YAML and/or CLI flags.

The same YAML file is read by ``rayfleet serve --config FILE`` and, after ``rayfleet build-config``
wraps it into Serve's own schema (``serve_deploy_config``), by ``serve deploy`` / ``serve run``:
the application builder ``rayfleet.cluster.app:build_app`` receives this file's mapping as ``args``.

YAML keys are the field names below; ``engine`` holds flat engine options (``EngineConfig
.from_kwargs`` keywords: dtype, block_size, max_num_seqs, num_blocks, ...) and ``autoscaling`` the
fields of ``AutoscalingSpec``::

    model: /models/llama            # or model_shape: llama-3.2-1b (random weights, ids only)
    device: cpu
    engine: {dtype: float32, max_num_seqs: 32}
    autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}
    num_cpus_per_replica: 1
    grpc_port: 50051
    http_port: 8000

Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rayfleet.config import DEVICES

# How the ingress's handle picks an LLM replica. "default": Serve's built-in power-of-two-choices
# router (no hashing at the ingress); the others: rayfleet's PrefixAwareRequestRouter in that
# mode (rayfleet.router.policy.RoutingMode): round_robin and least_loaded are the baselines,
# prefix_approx matches against the router's own predictions only, prefix_precise also applies
# the replicas' KV events.
ROUTING_MODES = ("default", "round_robin", "least_loaded", "prefix_approx", "prefix_precise")
APP_IMPORT_PATH = "rayfleet.cluster.app:build_app"
# What Serve's gRPC proxy registers: our service and the standard health service. Reflection is
# Serve's own (gRPCOptions.enable_reflection).
GRPC_SERVICER_FUNCTIONS = (
    "rayfleet.protos_gen.v1.generation_pb2_grpc.add_GenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
# Engine options that ServeConfig owns at its top level (so replicas and ingress agree on them).
_TOP_LEVEL_ENGINE_KEYS = {"device": "device", "model": "model"}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _from_mapping(cls: type, data: Any, where: str) -> dict[str, Any]:
    """Check ``data`` is a mapping whose keys are ``cls``'s field names; return a copy."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping; got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ValueError(
            f"unknown {where} key(s): {', '.join(unknown)}; accepted: {', '.join(sorted(names))}"
        )
    return dict(data)


@dataclass(frozen=True)
class AutoscalingSpec:
    """Serve ``autoscaling_config`` of the LLM replicas (Serve's field names and meanings)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        _check(
            _is_int(self.min_replicas) and self.min_replicas >= 0,
            f"autoscaling.min_replicas must be an integer >= 0; got {self.min_replicas!r}",
        )
        _check(
            _is_int(self.max_replicas) and self.max_replicas >= max(1, self.min_replicas),
            f"autoscaling.max_replicas must be an integer >= max(1, min_replicas="
            f"{self.min_replicas}); got {self.max_replicas!r}",
        )
        for name in ("target_ongoing_requests", "look_back_period_s", "metrics_interval_s"):
            v = getattr(self, name)
            _check(_is_number(v) and v > 0, f"autoscaling.{name} must be > 0; got {v!r}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            v = getattr(self, name)
            _check(_is_number(v) and v >= 0, f"autoscaling.{name} must be >= 0; got {v!r}")

    @classmethod
    def parse(cls, text: str) -> AutoscalingSpec:
        """``"MIN:MAX"`` (the ``--autoscale`` flag)."""
        try:
            lo, hi = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"--autoscale takes MIN:MAX (integers); got {text!r}") from None
        return cls(min_replicas=lo, max_replicas=hi)

    def to_serve(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServeConfig:
    """Everything needed to deploy one rayfleet application. Frozen; derive variants with
    ``dataclasses.replace`` (CLI flags override file values that way)."""

    model: str | None = None  # HF model directory
    model_shape: str | None = None  # or: random weights of a named shape (MODEL_SHAPES)
    engine: dict[str, Any] = field(default_factory=dict)  # flat engine options; never mutated
    device: str = "cpu"
    # Replicas: a fixed count, or autoscaling (exactly one of them; neither = 1 replica).
    num_replicas: int | None = None
    autoscaling: AutoscalingSpec | None = None
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float | None = None  # None: 1 on cuda (x tensor_parallel_size), else 0
    # Back-pressure: each LLM replica runs at most max_ongoing_requests at once (size it near
    # engine max_num_seqs) and each caller queues at most max_queued_requests more for the
    # deployment (-1 = unbounded); beyond that clients get RESOURCE_EXHAUSTED / HTTP 429.
    max_ongoing_requests: int = 64
    max_queued_requests: int = 256
    ingress_num_replicas: int = 1
    ingress_num_cpus: float = 0.5
    ingress_max_ongoing_requests: int = 2048
    grpc_port: int = 50051
    http_port: int = 8000
    http_host: str = "127.0.0.1"
    routing: str = "prefix_precise"
    # How often Serve collects each replica's routing stats (load + KV events): the delay before
    # a router sees a replica's evictions is about this plus ~0.1 s.
    routing_stats_period_s: float = 0.5
    # Streaming pace: one ingress replica forwards at most about this many stream messages per
    # second, all requests together (each costs a Serve hop and a gRPC message, ~0.5 ms of CPU
    # in each process). LLM replicas pace their streams to their share of it; tokens generated
    # meanwhile are merged into the next message and the first token is never delayed.
    # 0 = a message per engine step.
    stream_messages_per_s: float = 1000.0
    drain_timeout_s: float = 30.0  # in-flight requests get this long to finish on shutdown
    request_timeout_s: float | None = None
    app_name: str = "rayfleet"
    route_prefix: str = "/"
    metrics_export_port: int | None = None  # only when rayfleet starts the Ray head

    def __post_init__(self) -> None:
        _check(
            self.model is None or self.model_shape is None,
            "give model or model_shape, not both",
        )
        _check(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}")
        _check(isinstance(self.engine, dict), "engine must be a mapping of engine options")
        for key in self.engine:
            _check(
                key not in _TOP_LEVEL_ENGINE_KEYS,
                f"engine.{key} is set at the top level of the config ({key}: ...)",
            )
        if self.autoscaling is not None:
            _check(
                self.num_replicas is None,
                "give num_replicas or autoscaling, not both",
            )
            _check(
                isinstance(self.autoscaling, AutoscalingSpec),
                "autoscaling must be an AutoscalingSpec",
            )
        if self.num_replicas is not None:
            _check(
                _is_int(self.num_replicas) and self.num_replicas >= 1,
                f"num_replicas must be an integer >= 1; got {self.num_replicas!r}",
            )
        _check(
            _is_number(self.num_cpus_per_replica) and self.num_cpus_per_replica >= 0,
            f"num_cpus_per_replica must be >= 0; got {self.num_cpus_per_replica!r}",
        )
        tp = self.tensor_parallel_size
        if self.num_gpus_per_replica is not None:
            g = self.num_gpus_per_replica
            _check(_is_number(g) and g >= 0, f"num_gpus_per_replica must be >= 0; got {g!r}")
            _check(
                self.device == "cuda" or g == 0,
                f"num_gpus_per_replica is {g} but device is {self.device}",
            )
            _check(
                tp == 1 or g == tp,
                f"num_gpus_per_replica must equal tensor_parallel_size={tp} when it is > 1 "
                f"(fractional GPUs need tp=1); got {g}",
            )
        for name in (
            "max_ongoing_requests",
            "ingress_num_replicas",
            "ingress_max_ongoing_requests",
        ):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, f"{name} must be an integer >= 1; got {v!r}")
        _check(
            _is_int(self.max_queued_requests)
            and (self.max_queued_requests == -1 or self.max_queued_requests >= 1),
            f"max_queued_requests must be -1 (unbounded) or >= 1; got {self.max_queued_requests!r}",
        )
        _check(
            _is_number(self.ingress_num_cpus) and self.ingress_num_cpus >= 0,
            f"ingress_num_cpus must be >= 0; got {self.ingress_num_cpus!r}",
        )
        for name in ("grpc_port", "http_port"):
            v = getattr(self, name)
            _check(_is_int(v) and 0 < v < 65536, f"{name} must be in [1, 65535]; got {v!r}")
        if self.metrics_export_port is not None:
            v = self.metrics_export_port
            _check(_is_int(v) and 0 < v < 65536, f"metrics_export_port must be a port; got {v!r}")
        _check(
            self.routing in ROUTING_MODES,
            f"routing must be one of {', '.join(ROUTING_MODES)}; got {self.routing!r}",
        )
        for name in ("routing_stats_period_s", "drain_timeout_s"):
            v = getattr(self, name)
            _check(_is_number(v) and v > 0, f"{name} must be > 0; got {v!r}")
        _check(
            _is_number(self.stream_messages_per_s) and self.stream_messages_per_s >= 0,
            f"stream_messages_per_s must be >= 0; got {self.stream_messages_per_s!r}",
        )
        if self.request_timeout_s is not None:
            v = self.request_timeout_s
            _check(_is_number(v) and v > 0, f"request_timeout_s must be > 0; got {v!r}")
        _check(self.route_prefix.startswith("/"), "route_prefix must start with '/'")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine.get("tensor_parallel_size", 1))

    @property
    def gpus_per_replica(self) -> float:
        if self.num_gpus_per_replica is not None:
            return float(self.num_gpus_per_replica)
        return float(self.tensor_parallel_size) if self.device == "cuda" else 0.0

    @property
    def replica_stream_messages_per_s(self) -> float:
        """One LLM replica's share of the ingress replicas' stream message budget (0: unpaced).
        Autoscaled deployments assume their maximum size."""
        n = self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas
        return self.stream_messages_per_s * self.ingress_num_replicas / (n or 1)

    @property
    def model_name(self) -> str:
        """What clients see as the model id (OpenAI ``model``, ModelInfo.model_name)."""
        if self.model_shape:
            return self.model_shape
        return Path(self.model).name if self.model else "default"

    def engine_kwargs(self) -> dict[str, Any]:
        """Keywords for ``EngineConfig.from_kwargs`` (a fresh dict each call)."""
        return {**self.engine, "device": self.device, "show_progress": False}

    def validate_engine_options(self) -> None:
        """Check ``engine`` against EngineConfig (names and ranges) without loading a model."""
        from rayfleet.config import EngineConfig

        try:
            EngineConfig.from_kwargs(self.model or "<model>", **self.engine_kwargs())
        except TypeError as e:  # unknown option: from_kwargs lists the accepted ones
            raise ValueError(f"engine: {e}") from None
        except ValueError as e:
            raise ValueError(f"engine: {e}") from None

    # ---- (de)serialization ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        """From a YAML mapping; unknown keys are errors that list the accepted ones."""
        kw = _from_mapping(cls, data or {}, "config")
        if kw.get("autoscaling") is not None:
            kw["autoscaling"] = AutoscalingSpec(
                **_from_mapping(AutoscalingSpec, kw["autoscaling"], "autoscaling")
            )
        if kw.get("engine") is None:
            kw["engine"] = {}
        cfg = cls(**kw)
        cfg.validate_engine_options()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        import yaml

        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(data or {})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (YAML/JSON-able): ``from_dict(c.to_dict()) == c``; defaults omitted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else (f.default)
            )
            if value == default:
                continue
            if isinstance(value, AutoscalingSpec):
                value = value.to_serve()
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> ServeConfig:
        """A copy with ``changes`` (None values are ignored: unset CLI flags)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "autoscaling" in changes:
            changes.setdefault("num_replicas", None)
        elif changes.get("num_replicas") is not None:
            changes["autoscaling"] = None
        return dataclasses.replace(self, **changes)

    # ---- Serve's view --------------------------------------------------------------------------
    def replica_autoscaling(self) -> dict[str, Any] | None:
        return self.autoscaling.to_serve() if self.autoscaling is not None else None

    def replica_count(self) -> int | None:
        """Fixed replica count (None when autoscaling)."""
        if self.autoscaling is not None:
            return None
        return self.num_replicas or 1

    def grpc_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "port": self.grpc_port,
            "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
        }
        if self.request_timeout_s is not None:
            opts["request_timeout_s"] = self.request_timeout_s
        return opts

    def http_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"host": self.http_host, "port": self.http_port}
        if self.request_timeout_s is not None:
            opts["request_timeout_s"] = self.request_timeout_s
        return opts


def serve_deploy_config(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's multi-application config (``ServeDeploySchema``) for ``serve deploy/run``.

    Replica options (resources, autoscaling, queue bounds) are applied by the app builder from
    ``args``, so they are not repeated under ``deployments``.
    """
    return {
        "proxy_location": "EveryNode",
        "http_options": cfg.http_options(),
        "grpc_options": cfg.grpc_options(),
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": APP_IMPORT_PATH,
                "args": cfg.to_dict(),
            }
        ],
    }
