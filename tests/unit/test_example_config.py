"""The example YAML in examples/ loads as a ServeConfig and converts to Serve's deploy schema."""

from __future__ import annotations

from pathlib import Path

from rayfleet.cluster.serve_config import ServeConfig, serve_deploy_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rayfleet.yaml"


def test_example_config_loads_and_fits_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeConfig.load(EXAMPLE)
    assert cfg.routing == "prefix_precise"
    assert cfg.autoscaling.min_replicas == 1 and cfg.autoscaling.max_replicas == 2
    ServeDeploySchema.model_validate(serve_deploy_config(cfg))
