"""Fixtures shared by the engine tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rayfleet.replicas.model import MODEL_SHAPES, build_random_model


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    """A random 2-layer Llama (hidden 64, GQA 4:2, head dim 16, vocabulary 97, untied head),
    fp32 on CPU, with rope tables for 64 positions."""
    arch = dataclasses.replace(
        MODEL_SHAPES["llama-3.2-1b"],
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=97,
        max_position_embeddings=64,
        rope_scaling=None,
        sliding_window_layers=(),
        tie_word_embeddings=False,
    )
    return build_random_model(arch, torch.float32, "cpu", seed=3, max_positions=64)
