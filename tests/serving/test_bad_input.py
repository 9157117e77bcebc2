"""Every class of bad input is INVALID_ARGUMENT naming the field (never INTERNAL), and is
rejected at the ingress: no replica sees the request."""

from __future__ import annotations

import grpc
import pytest

from rayfleet.protos_gen.v1 import generation_pb2 as pb

from .conftest import Cluster

VOCAB_OVERFLOW = 10**6  # larger than the tiny model's vocab


def _req(prompt: str | list[int] | None = "hi", **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        req.prompt_text = prompt
    elif isinstance(prompt, list):
        req.prompt_token_ids.ids.extend(prompt)
    return req


CASES = {
    "no prompt": (_req(None), "prompt"),
    "empty text": (_req(""), "prompt_text"),
    "empty ids": (pb.GenerateRequest(prompt_token_ids=pb.TokenIds()), "prompt_token_ids"),
    "id >= vocab": (_req([1, VOCAB_OVERFLOW]), "prompt_token_ids"),
    "prompt too long": (_req([5] * 300), "prompt_token_ids"),
    "prompt+max_tokens > ctx": (_req([5] * 100, max_tokens=200), "sampling.max_tokens"),
    "max_tokens 0": (_req(max_tokens=0), "sampling.max_tokens"),
    "temperature < 0": (_req(temperature=-0.5), "sampling.temperature"),
    "temperature nan": (_req(temperature=float("nan")), "sampling.temperature"),
    "top_p 0": (_req(top_p=0.0), "sampling.top_p"),
    "top_k -2": (_req(top_k=-2), "sampling.top_k"),
    "min_p > 1": (_req(min_p=1.5), "sampling.min_p"),
    "repetition_penalty 0": (_req(repetition_penalty=0.0), "sampling.repetition_penalty"),
    "presence_penalty 3": (_req(presence_penalty=3.0), "sampling.presence_penalty"),
    "frequency_penalty -3": (_req(frequency_penalty=-3.0), "sampling.frequency_penalty"),
    "seed >= 2**63": (_req(seed=2**64 - 1), "sampling.seed"),
    "min_tokens > max_tokens": (_req(max_tokens=4, min_tokens=5), "sampling.min_tokens"),
    "logprobs 21": (_req(logprobs=21), "sampling.logprobs"),
    "empty stop string": (_req(stop=[""]), "sampling.stop"),
    "stop id >= vocab": (_req(stop_token_ids=[VOCAB_OVERFLOW]), "sampling.stop_token_ids"),
    "unknown output mode": (pb.GenerateRequest(prompt_text="hi", output=7), "output"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_invalid_argument(cluster: Cluster, name: str) -> None:
    req, field = CASES[name]
    with cluster.channel() as ch, pytest.raises(grpc.RpcError) as e:
        list(cluster.stub(ch).Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith(f"{field}:"), e.value.details()


def test_bad_input_never_reaches_a_replica(cluster: Cluster) -> None:
    before = {r.replica_id: r.prefix_cache_queries for r in cluster.wait_idle().replicas}
    with cluster.channel() as ch:
        for req, _ in CASES.values():
            with pytest.raises(grpc.RpcError):
                list(cluster.stub(ch).Generate(req, timeout=30))
    after = {r.replica_id: r.prefix_cache_queries for r in cluster.wait_idle().replicas}
    assert all(after.get(k) == v for k, v in before.items())
