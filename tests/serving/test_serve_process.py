"""`rayfleet serve` as a subprocess with its own Ray: ready line, `rayfleet query`,
`rayfleet bench serve`, then SIGTERM drains the in-flight request and leaves no Ray process.

Runs last in the session (see conftest); it does not use the shared cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from rayfleet.protos_gen.v1 import generation_pb2 as pb
from rayfleet.protos_gen.v1 import generation_pb2_grpc as pb_grpc

from .conftest import free_port

CLI = [sys.executable, "-m", "rayfleet.cli"]


def _descendants(pid: int) -> list:
    import ray

    del ray  # imported for its side effect: Ray's bundled psutil is now on sys.path
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_serve_subprocess_sigterm_drains_and_leaves_no_ray(tmp_path: Path, model_dir: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "rayfleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "engine": {"dtype": "float32", "num_blocks": 64, "max_num_seqs": 4},
                "num_replicas": 1,
                "num_cpus_per_replica": 0.1,
                "ingress_num_cpus": 0.1,
                "drain_timeout_s": 20,
            }
        )
    )
    cmd = [
        *CLI, "serve", "--config", str(config), "--model", str(model_dir),
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--num-cpus", "4",
    ]  # fmt: skip
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("rayfleet ready"):
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not ready.wait(240):
            pytest.fail("no ready line:\n" + "".join(lines[-60:]))
        ready_line = next(ln for ln in lines if ln.startswith("rayfleet ready"))
        assert f"grpc=127.0.0.1:{grpc_port}" in ready_line
        assert f"http://127.0.0.1:{http_port}" in ready_line
        ray_procs = _descendants(proc.pid)
        assert len(ray_procs) >= 3, "expected raylet, gcs and workers under the serve process"

        target = f"127.0.0.1:{grpc_port}"
        q = subprocess.run(
            [*CLI, "query", "--target", target, "hello", "--max-tokens", "5", "--ignore-eos"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert q.returncode == 0, q.stderr
        assert "[length]" in q.stderr and "completion=5" in q.stderr

        out_json = tmp_path / "bench.json"
        b = subprocess.run(
            [
                *CLI, "bench", "serve", "--target", target, "--rate", "20,inf",
                "--num-requests", "4", "--input-len", "8", "--output-len", "4",
                "--warmup-requests", "1", "--output-json", str(out_json),
            ],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert b.returncode == 0, b.stdout + b.stderr
        doc = json.loads(out_json.read_text())
        assert [r["completed"] for r in doc["results"]] == [4, 4]
        assert doc["results"][0]["ttft_s"]["p50"] > 0

        # A request in flight when SIGTERM arrives is drained to completion.
        result: dict = {}

        def in_flight() -> None:
            with grpc.insecure_channel(target) as ch:
                try:
                    msgs = list(
                        pb_grpc.GenerationStub(ch).Generate(
                            pb.GenerateRequest(
                                prompt_text="drain",
                                sampling=pb.SamplingParams(
                                    max_tokens=150, temperature=0, ignore_eos=True
                                ),
                            ),
                            timeout=120,
                        )
                    )
                    result["finish"] = msgs[-1].finish_reason
                except grpc.RpcError as e:
                    result["error"] = e.code()

        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result.get("finish") == "length", result
        assert proc.wait(120) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    deadline = time.monotonic() + 60
    while _alive(ray_procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(ray_procs)
    assert not left, f"orphans: {[(p.pid, p.name()) for p in left]}"
