"""Start (or join) Ray, deploy the application, wait until it serves, block, drain on signal.

``rayfleet serve`` = ``run_server``: SIGINT/SIGTERM stop accepting (the application is deleted
from the proxies), in-flight requests get ``drain_timeout_s`` to finish, then Serve and — when
this process started it — the local Ray head are shut down, so no Ray process outlives it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any

from rayfleet.cluster.serve_config import ServeConfig


def connect_ray(address: str | None, cfg: ServeConfig, **init_kwargs: Any) -> bool:
    """``ray.init``; returns True when this call started a new local head (ours to stop)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, **init_kwargs)
        return False
    if cfg.metrics_export_port is not None:
        init_kwargs.setdefault("_metrics_export_port", cfg.metrics_export_port)
    # "local" always starts a fresh head, never attaches to another cluster on this host.
    ray.init(address="local", **init_kwargs)
    return True


def deploy(cfg: ServeConfig, *, ready_timeout_s: float = 600.0) -> Any:
    """Start Serve's proxies (HTTP + gRPC) and run the application; return the ingress handle
    once every replica is running and one answers."""
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from rayfleet.cluster.app import build_application

    serve.start(
        http_options=HTTPOptions(**cfg.http_options()),
        grpc_options=gRPCOptions(**cfg.grpc_options()),
    )
    # serve.run returns when every deployment of the app is HEALTHY (all replicas started).
    handle = serve.run(build_application(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    wait_ready(handle, ready_timeout_s)
    return handle


def wait_ready(handle: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if handle.ready.remote().result(timeout_s=30):
                return
        except Exception as e:  # replicas still starting
            last = e
        else:
            last = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"application not ready after {timeout_s:.0f}s: {last!r}")
        time.sleep(0.5)


def endpoints(cfg: ServeConfig) -> str:
    host = cfg.http_host if cfg.http_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return (
        f"grpc={host}:{cfg.grpc_port} http=http://{host}:{cfg.http_port}/v1 "
        f"app={cfg.app_name} model={cfg.model_name}"
    )


def shutdown(cfg: ServeConfig, started_head: bool, *, drain: bool = True) -> None:
    """Stop accepting, drain in-flight requests (up to drain_timeout_s), stop Serve and Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if drain:
            # Deleting the app removes its routes at once; replicas then finish what they run,
            # for at most graceful_shutdown_timeout_s (= drain_timeout_s).
            serve.delete(cfg.app_name)
        serve.shutdown()
    finally:
        if started_head:
            ray.shutdown()


def run_server(cfg: ServeConfig, address: str | None = None, **init_kwargs: Any) -> int:
    """The ``rayfleet serve`` body: returns the process exit code."""
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:  # second signal: give up draining
            raise KeyboardInterrupt
        print(f"rayfleet: {signal.Signals(signum).name}: draining", file=sys.stderr, flush=True)
        stop.set()

    old: dict[int, Any] = {}
    started = False
    try:
        started = connect_ray(address, cfg, **init_kwargs)
        # After ray.init: Ray's core worker installs a fatal-signal handler for SIGTERM (log and
        # abort); ours replaces it so that SIGTERM drains instead.
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        deploy(cfg)
        if not stop.is_set():
            print(f"rayfleet ready: {endpoints(cfg)}", flush=True)
        while not stop.wait(1.0):
            pass
        shutdown(cfg, started)
        print("rayfleet: stopped", file=sys.stderr, flush=True)
        return 0
    except KeyboardInterrupt:
        shutdown(cfg, started, drain=False)
        return 130
    except BaseException:
        with contextlib.suppress(Exception):
            shutdown(cfg, started, drain=False)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
