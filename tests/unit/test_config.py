"""EngineConfig: frozen, built once from flat keywords, invalid values named."""

from __future__ import annotations

import dataclasses

import pytest

from rayfleet.config import CacheConfig, EngineConfig, QuantConfig, SchedulerConfig, SpecConfig


def test_from_kwargs_routes_each_keyword_to_its_section():
    c = EngineConfig.from_kwargs(
        "m",
        block_size=32,
        max_num_seqs=4,
        dtype="float32",
        device="cpu",
        draft_model="d",
        num_speculative_tokens=3,
        proposal_graph_max_batch_size=8,
        quantization="fp8",
        draft_quantization="fp8",
    )
    assert c.cache.block_size == 32 and c.scheduler.max_num_seqs == 4
    assert c.quant.quantization == "fp8" and c.quant.draft_quantization == "fp8"
    assert c.model.dtype == "float32" and c.model.model == "m"
    assert c.spec.draft_model == "d" and c.spec.num_speculative_tokens == 3
    assert c.spec.proposal_graph_max_batch_size == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.device = "cuda"  # type: ignore[misc]


def test_unknown_keyword_lists_accepted_ones():
    with pytest.raises(TypeError, match="unknown engine option 'blocksize'.*block_size"):
        EngineConfig.from_kwargs("m", blocksize=16)


@pytest.mark.parametrize(
    "ctor, kw, match",
    [
        (CacheConfig, {"block_size": 12}, "block_size must be a power of two"),
        (
            CacheConfig,
            {"gpu_memory_utilization": 1.5},
            r"gpu_memory_utilization must be in \(0, 1\]",
        ),
        (SchedulerConfig, {"max_num_seqs": 0}, "max_num_seqs must be >= 1; got 0"),
        (QuantConfig, {"quantization": "int3"}, "quantization must be one of fp8 or unset"),
        (QuantConfig, {"draft_quantization": "awq"}, "draft_quantization must be one of fp8"),
        (
            SpecConfig,
            {"proposal_graph_max_batch_size": -1},
            "proposal_graph_max_batch_size must be >= 0; got -1",
        ),
    ],
)
def test_invalid_values_are_named(ctor, kw, match):
    with pytest.raises(ValueError, match=match):
        ctor(**kw)


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        EngineConfig.from_kwargs("m", device="tpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig.from_kwargs("m", dtype="int3")


def test_cli_engine_flags_leave_unset_options_to_the_config():
    """An engine flag left off the command line keeps EngineConfig's default; one given wins."""
    import argparse

    from rayfleet import cli

    def spec(argv: list[str]) -> SpecConfig:
        p = argparse.ArgumentParser()
        cli._add_engine_args(p)
        return EngineConfig.from_kwargs("m", **cli._engine_kwargs(p.parse_args(argv))).spec

    assert spec([]).proposal_graph_max_batch_size == SpecConfig().proposal_graph_max_batch_size
    assert spec(["--proposal-graph-max-batch-size", "0"]).proposal_graph_max_batch_size == 0
