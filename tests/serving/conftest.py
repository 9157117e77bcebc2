"""One real local Ray cluster + one rayfleet application for every serving test.

Ray is sized for a 2-core CI box (logical CPUs are over-provisioned; replicas ask for 0.1 CPU).
The LLM deployment autoscales between 1 and 2 replicas with short delays and has small queues, so
the same app covers autoscaling and overload. ``test_serve_process.py`` (``rayfleet serve`` as a
subprocess with its own Ray) is moved to the end of the session.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from rayfleet.cluster.serve_config import AutoscalingSpec, ServeConfig  # noqa: E402
from rayfleet.protos_gen.v1 import generation_pb2 as pb  # noqa: E402
from rayfleet.protos_gen.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

LAST = ("test_serve_process.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda it: any(name in it.nodeid for name in LAST))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    cfg: ServeConfig
    model_dir: Path
    metrics_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.cfg.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.cfg.http_port}/v1"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_target)

    def stub(self, channel: grpc.Channel) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(channel)

    def server_info(self) -> pb.ServerInfo:
        with self.channel() as ch:
            return self.stub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=30)

    def num_aborted(self) -> dict[str, int]:
        """Aborts per live replica (a replica the autoscaler stops takes its count with it, so
        compare per replica, not the sum)."""
        return {r.replica_id: r.num_aborted for r in self.server_info().replicas}

    def wait_idle(self, timeout: float = 30.0) -> pb.ServerInfo:
        """Until every replica reports no running/waiting request and KV usage 0."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.server_info()
            idle = info.replicas and all(
                r.kv_usage == 0 and r.num_running == 0 and r.num_waiting == 0 for r in info.replicas
            )
            if idle:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"replicas not idle after {timeout}s: {info}")
            time.sleep(0.25)


def test_config(model_dir: Path, grpc_port: int, http_port: int) -> ServeConfig:
    return ServeConfig(
        model=str(model_dir),
        engine={"dtype": "float32", "num_blocks": 96, "max_num_seqs": 8},
        autoscaling=AutoscalingSpec(
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=2,
            upscale_delay_s=1.0,
            downscale_delay_s=3.0,
            look_back_period_s=2.0,
            metrics_interval_s=0.5,
        ),
        num_cpus_per_replica=0.1,
        ingress_num_cpus=0.1,
        max_ongoing_requests=4,
        max_queued_requests=4,
        grpc_port=grpc_port,
        http_port=http_port,
        drain_timeout_s=5.0,
        routing_stats_period_s=1.0,
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model_factory import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("serving") / "tiny", "llama")


@pytest.fixture(scope="session")
def cluster(model_dir: Path) -> Iterator[Cluster]:
    from ray import serve

    from rayfleet.cluster import launch

    metrics_port = free_port()
    cfg = test_config(model_dir, free_port(), free_port())
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
        log_to_driver=False,
    )
    try:
        launch.deploy(cfg, ready_timeout_s=180)
        yield Cluster(cfg, model_dir, metrics_port)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
