"""SamplingParams validation and wire round-trip. Pure Python: must not import torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rayfleet.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_vllm_names() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy


def test_module_does_not_import_torch() -> None:
    code = (
        "import sys, rayfleet.sampling_params as m; m.SamplingParams(top_k=3); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_normalizes_types() -> None:
    p = SamplingParams(temperature=0, top_p=1, stop="###", stop_token_ids=(5, 6))
    assert isinstance(p.temperature, float) and p.temperature == 0.0
    assert isinstance(p.top_p, float)
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0; got -0.1"),
        ({"temperature": float("inf")}, "temperature must be finite; got inf"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"temperature": "0.5"}, "temperature must be a number; got '0.5'"),
        ({"temperature": True}, "temperature must be a number; got True"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]; got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]; got 0.0"),
        ({"top_k": -2}, "top_k must be -1, 0 (disabled) or >= 1; got -2"),
        ({"top_k": 2.0}, "top_k must be an integer; got 2.0"),
        ({"top_k": True}, "top_k must be an integer; got True"),
        ({"min_p": 1.01}, "min_p must be in [0, 1]; got 1.01"),
        ({"min_p": -0.1}, "min_p must be in [0, 1]; got -0.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 100]; got 0.0"),
        ({"repetition_penalty": 101}, "repetition_penalty must be in (0, 100]; got 101"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]; got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]; got -3"),
        ({"seed": -1}, "seed must be in [0, 2**63-1] or None; got -1"),
        ({"seed": 2**63}, "seed must be in [0, 2**63-1] or None"),
        ({"seed": 1.5}, "seed must be an integer; got 1.5"),
        ({"max_tokens": 0}, "max_tokens must be >= 1; got 0"),
        ({"max_tokens": "16"}, "max_tokens must be an integer; got '16'"),
        ({"min_tokens": -1}, "min_tokens must be in [0, max_tokens=16]; got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be in [0, max_tokens=4]; got 5"),
        ({"stop": ""}, "stop entries must be non-empty strings; got ''"),
        ({"stop": ["ok", 3]}, "stop entries must be non-empty strings; got 3"),
        ({"stop": 3}, "stop must be a string or a list of strings; got 3"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids entries must be integers >= 0; got -1"),
        ({"stop_token_ids": [True]}, "stop_token_ids entries must be integers >= 0; got True"),
        ({"stop_token_ids": 7}, "stop_token_ids must be a list of integers; got 7"),
        ({"logprobs": 21}, "logprobs must be in [0, 20] or None; got 21"),
        ({"logprobs": -1}, "logprobs must be in [0, 20] or None; got -1"),
        ({"logprobs": False}, "logprobs must be an integer; got False"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool; got 1"),
        ({"skip_special_tokens": "yes"}, "skip_special_tokens must be a bool; got 'yes'"),
    ],
)
def test_invalid_values_name_field_range_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_k": 1},
        {"top_p": 1e-6},
        {"min_p": 1.0},
        {"repetition_penalty": 100},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"min_tokens": 16},
        {"logprobs": 0},
        {"logprobs": 20},
    ],
)
def test_boundary_values_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert dataclasses.replace(p, temperature=0.5).temperature == 0.5


def test_dict_round_trip() -> None:
    p = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=1234,
        max_tokens=64,
        min_tokens=2,
        stop=["\n\n", "END"],
        stop_token_ids=[7],
        ignore_eos=True,
        logprobs=5,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )
    d = p.to_dict()
    assert d["stop"] == ["\n\n", "END"] and d["seed"] == 1234
    d["stop"].append("mutated")
    assert p.stop == ["\n\n", "END"]
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict({}) == SamplingParams()
    assert SamplingParams.from_dict({"temperature": 0}).greedy


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown SamplingParams field.*: best_of, n"):
        SamplingParams.from_dict({"n": 2, "best_of": 3, "top_k": 1})
    with pytest.raises(ValueError, match="expects a dict"):
        SamplingParams.from_dict([("top_k", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; got 2"):
        SamplingParams.from_dict({"top_p": 2})
