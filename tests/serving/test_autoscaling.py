"""LLMReplica autoscales up under load and back down when idle (test config: 1..2 replicas,
target 2 ongoing requests, 1 s upscale / 3 s downscale delay)."""

from __future__ import annotations

import threading
import time

import grpc

from rayfleet.protos_gen.v1 import generation_pb2 as pb

from .conftest import Cluster


def _num_replicas(cluster: Cluster) -> int:
    return len(cluster.server_info().replicas)


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_autoscale_up_under_load_and_down_when_idle(cluster: Cluster) -> None:
    stop = threading.Event()

    def load(ch: grpc.Channel) -> None:
        stub = cluster.stub(ch)
        while not stop.is_set():
            try:
                for _ in stub.Generate(
                    pb.GenerateRequest(
                        prompt_text="scale",
                        sampling=pb.SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                    ),
                    timeout=60,
                ):
                    if stop.is_set():
                        break
            except grpc.RpcError:
                time.sleep(0.1)

    _wait_for(lambda: _num_replicas(cluster) == 1, 60, "a single replica at start")
    with cluster.channel() as ch:
        workers = [threading.Thread(target=load, args=(ch,)) for _ in range(5)]
        for w in workers:
            w.start()
        try:
            _wait_for(lambda: _num_replicas(cluster) == 2, 90, "scale-up to 2 replicas")
        finally:
            stop.set()
            for w in workers:
                w.join()
    _wait_for(lambda: _num_replicas(cluster) == 1, 90, "scale-down to 1 replica")
