"""ServeConfig YAML parsing/validation, CLI overrides, and the Serve deploy schema (no Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from rayfleet.cluster.serve_config import (
    APP_IMPORT_PATH,
    GRPC_SERVICER_FUNCTIONS,
    AutoscalingSpec,
    ServeConfig,
    serve_deploy_config,
)

FULL = """
model: /models/tiny
device: cpu
engine: {dtype: float32, max_num_seqs: 8, num_blocks: 64}
autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 4, upscale_delay_s: 1}
num_cpus_per_replica: 0.5
max_ongoing_requests: 8
max_queued_requests: 16
grpc_port: 50052
http_port: 8001
drain_timeout_s: 12
"""


def test_yaml_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(FULL)
    cfg = ServeConfig.load(path)
    assert cfg.autoscaling == AutoscalingSpec(
        min_replicas=1, max_replicas=3, target_ongoing_requests=4, upscale_delay_s=1
    )
    assert cfg.engine_kwargs() == {
        "dtype": "float32",
        "max_num_seqs": 8,
        "num_blocks": 64,
        "device": "cpu",
        "show_progress": False,
    }
    assert cfg.replica_count() is None and cfg.gpus_per_replica == 0
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg
    assert ServeConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"modle": "x"}, "unknown config key(s): modle"),
        ({"engine": {"bogus": 1}}, "unknown engine option 'bogus'"),
        ({"engine": {"block_size": 3}}, "block_size must be a power of two"),
        ({"engine": {"device": "cuda"}}, "engine.device is set at the top level"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas"),
        ({"autoscaling": {"max": 2}}, "unknown autoscaling key(s): max"),
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 2}}, "not both"),
        ({"num_replicas": 0}, "num_replicas must be an integer >= 1"),
        ({"device": "tpu"}, "device must be one of"),
        ({"num_gpus_per_replica": 0.5}, "but device is cpu"),
        (
            {"device": "cuda", "num_gpus_per_replica": 0.5, "engine": {"tensor_parallel_size": 2}},
            "fractional GPUs need tp=1",
        ),
        ({"max_queued_requests": 0}, "max_queued_requests must be -1"),
        ({"routing": "prefix"}, "routing must be one of default, round_robin"),
        ({"grpc_port": 70000}, "grpc_port must be in"),
        ({"model": "a", "model_shape": "llama-3.2-1b"}, "not both"),
        ({"stream_messages_per_s": -1}, "stream_messages_per_s must be >= 0"),
    ],
)
def test_invalid_configs_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        ServeConfig.from_dict(data)
    assert needle in str(e.value)


def test_gpu_resources() -> None:
    assert ServeConfig(device="cuda").gpus_per_replica == 1.0
    assert ServeConfig(device="cuda", num_gpus_per_replica=0.25).gpus_per_replica == 0.25
    tp2 = ServeConfig(device="cuda", engine={"tensor_parallel_size": 2})
    assert tp2.gpus_per_replica == 2.0


def test_stream_pace_is_shared_by_the_llm_replicas() -> None:
    assert ServeConfig().replica_stream_messages_per_s == 1000.0
    four = ServeConfig(num_replicas=4, stream_messages_per_s=800, ingress_num_replicas=2)
    assert four.replica_stream_messages_per_s == 400.0
    scaled = ServeConfig(autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=5))
    assert scaled.replica_stream_messages_per_s == 200.0  # sized for the largest deployment
    assert ServeConfig(stream_messages_per_s=0).replica_stream_messages_per_s == 0.0


def test_autoscale_flag() -> None:
    assert AutoscalingSpec.parse("2:5") == AutoscalingSpec(min_replicas=2, max_replicas=5)
    with pytest.raises(ValueError, match="MIN:MAX"):
        AutoscalingSpec.parse("5")


def _cli_args(*argv: str) -> argparse.Namespace:
    from rayfleet.cli import build_parser

    return build_parser().parse_args(["build-config", *argv])


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    from rayfleet.cluster.commands import config_from_args

    path = tmp_path / "c.yaml"
    path.write_text(FULL)
    cfg = config_from_args(
        _cli_args(
            "--config", str(path), "--autoscale", "2:4", "--grpc-port", "6000",
            "--max-num-seqs", "16", "--engine", "enable_prefix_caching=false",
            "--model-shape", "llama-3.2-1b",
        )
    )  # fmt: skip
    assert cfg.autoscaling is not None
    assert (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas) == (2, 4)
    assert cfg.autoscaling.upscale_delay_s == 1  # the file's value survives
    assert cfg.grpc_port == 6000 and cfg.http_port == 8001
    assert cfg.engine["max_num_seqs"] == 16 and cfg.engine["enable_prefix_caching"] is False
    assert cfg.model is None and cfg.model_shape == "llama-3.2-1b"
    fixed = config_from_args(
        _cli_args("--config", str(path), "--num-replicas", "3", "--stream-messages-per-s", "0")
    )
    assert fixed.stream_messages_per_s == 0
    assert fixed.autoscaling is None and fixed.replica_count() == 3


def test_serve_deploy_config_validates_against_serve_schema(tmp_path: Path) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    path = tmp_path / "c.yaml"
    path.write_text(FULL)
    doc = serve_deploy_config(ServeConfig.load(path))
    # Through YAML, as `serve deploy` reads it.
    parsed = schema.ServeDeploySchema.parse_obj(yaml.safe_load(yaml.safe_dump(doc)))
    app = parsed.applications[0]
    assert app.import_path == APP_IMPORT_PATH
    assert parsed.grpc_options.port == 50052
    assert parsed.grpc_options.grpc_servicer_functions == list(GRPC_SERVICER_FUNCTIONS)
    assert parsed.http_options.port == 8001
    # The app builder gets back exactly the rayfleet config.
    assert ServeConfig.from_dict(app.args) == ServeConfig.load(path)


def test_build_config_command_writes_valid_yaml(tmp_path: Path, capsys) -> None:
    from rayfleet.cli import main

    out = tmp_path / "serve.yaml"
    assert main(["build-config", "--model", "/m", "--num-replicas", "2", "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["applications"][0]["args"] == {"model": "/m", "num_replicas": 2}
    assert main(["build-config", "--engine", "nope=1"]) == 2
    assert "unknown engine option" in capsys.readouterr().err


def test_servicer_functions_import() -> None:
    import importlib

    for path in GRPC_SERVICER_FUNCTIONS:
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))
