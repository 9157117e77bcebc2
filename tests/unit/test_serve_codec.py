"""Wire <-> engine mapping: validation names the field, chunks become messages, OpenAI bodies
become jobs, error kinds map to gRPC and HTTP statuses. Pure Python (no Ray)."""

from __future__ import annotations

import pickle

import grpc
import pytest

from rayfleet.cluster import openai_api as oa
from rayfleet.cluster.errors import ErrorKind, RequestError
from rayfleet.cluster.request_codec import (
    ModelLimits,
    StreamChunk,
    chunk_to_proto,
    job_from_proto,
    sampling_from_proto,
)
from rayfleet.protos_gen.v1 import generation_pb2 as pb
from rayfleet.sampling_params import SamplingParams

LIMITS = ModelLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=48)


def tokenize(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


def _job(req: pb.GenerateRequest):
    return job_from_proto(req, request_id="r", limits=LIMITS, tokenize=tokenize)


def _field(req: pb.GenerateRequest) -> str:
    with pytest.raises(RequestError) as e:
        _job(req)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    assert e.value.details.startswith(e.value.field + ": ")
    return e.value.field


def test_unset_fields_take_engine_defaults() -> None:
    assert sampling_from_proto(pb.SamplingParams()) == SamplingParams()
    p = sampling_from_proto(
        pb.SamplingParams(temperature=0.0, top_k=-1, seed=0, stop=["x"], ignore_eos=False)
    )
    assert p == SamplingParams(temperature=0.0, top_k=-1, seed=0, stop=["x"])


def test_every_engine_parameter_has_a_proto_field() -> None:
    import dataclasses

    proto_fields = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(SamplingParams)} == proto_fields


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"temperature": -1.0}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_k": -5}, "sampling.top_k"),
        ({"min_p": 1.5}, "sampling.min_p"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"presence_penalty": 2.5}, "sampling.presence_penalty"),
        ({"frequency_penalty": -2.5}, "sampling.frequency_penalty"),
        ({"seed": 2**63}, "sampling.seed"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"max_tokens": 2, "min_tokens": 3}, "sampling.min_tokens"),
        ({"logprobs": 21}, "sampling.logprobs"),
        ({"stop": [""]}, "sampling.stop"),
        ({"stop_token_ids": [100]}, "sampling.stop_token_ids"),
        ({"max_tokens": 60}, "sampling.max_tokens"),  # 2 + 60 > 48 KV tokens
        ({"max_tokens": 63}, "sampling.max_tokens"),  # 2 + 63 > 64 context
    ],
)
def test_bad_sampling_names_the_field(sampling: dict, field: str) -> None:
    req = pb.GenerateRequest(prompt_text="hi", sampling=pb.SamplingParams(**sampling))
    assert _field(req) == field


def test_bad_prompts_name_the_field() -> None:
    assert _field(pb.GenerateRequest()) == "prompt"
    assert _field(pb.GenerateRequest(prompt_text="")) == "prompt_text"
    assert _field(pb.GenerateRequest(prompt_token_ids=pb.TokenIds())) == "prompt_token_ids"
    assert _field(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 100]))) == (
        "prompt_token_ids"
    )
    assert _field(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1] * 64))) == (
        "prompt_token_ids"
    )
    assert _field(pb.GenerateRequest(prompt_text="x", output=9)) == "output"
    with pytest.raises(RequestError, match="no tokenizer"):
        job_from_proto(pb.GenerateRequest(prompt_text="x"), request_id="r", limits=LIMITS,
                       tokenize=None)  # fmt: skip


def test_good_request_becomes_a_job() -> None:
    job = _job(
        pb.GenerateRequest(
            prompt_text="hey", tenant="t1", session_id="s", sampling=pb.SamplingParams(max_tokens=5)
        )
    )
    assert job.prompt_token_ids == tokenize("hey")
    assert job.params.max_tokens == 5 and job.tenant == "t1" and job.session_id == "s"
    assert pickle.loads(pickle.dumps(job)) == job


def test_chunk_to_proto_output_modes() -> None:
    lp = [(1, -0.5, 1, [(1, -0.5)])]
    mid = StreamChunk("r", new_text="ab", new_token_ids=[1, 2], logprobs=lp)
    both = chunk_to_proto(mid, pb.OUTPUT_MODE_UNSPECIFIED)
    assert (both.text, list(both.token_ids), both.finish_reason) == ("ab", [1, 2], "")
    assert both.logprobs[0].top[0].token_id == 1 and not both.HasField("usage")
    assert chunk_to_proto(mid, pb.OUTPUT_MODE_TEXT).token_ids == []
    assert chunk_to_proto(mid, pb.OUTPUT_MODE_TOKEN_IDS).text == ""
    last = StreamChunk(
        "r", finish_reason="stop", stop_reason=7, num_prompt_tokens=3, num_output_tokens=4,
        num_cached_tokens=2, replica_id="rep",
    )  # fmt: skip
    msg = chunk_to_proto(last, pb.OUTPUT_MODE_BOTH)
    assert msg.finish_reason == "stop" and msg.stop_token_id == 7 and msg.replica_id == "rep"
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens) == (
        3,
        4,
        2,
    )
    assert chunk_to_proto(StreamChunk("r", finish_reason="stop", stop_reason="END"), 0).stop_string


def test_error_kinds_map_to_statuses_and_pickle() -> None:
    assert ErrorKind.INVALID_ARGUMENT.grpc_code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ErrorKind.RESOURCE_EXHAUSTED.grpc_code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ErrorKind.UNAVAILABLE.grpc_code() == grpc.StatusCode.UNAVAILABLE
    assert ErrorKind.ABORTED.grpc_code() == grpc.StatusCode.ABORTED
    assert ErrorKind.CANCELLED.grpc_code() == grpc.StatusCode.CANCELLED
    assert [k.http_status for k in ErrorKind][:3] == [400, 429, 503]
    err = pickle.loads(pickle.dumps(RequestError.invalid("sampling.top_p", "top_p bad")))
    assert (err.kind, err.field, err.details) == (
        ErrorKind.INVALID_ARGUMENT,
        "sampling.top_p",
        "sampling.top_p: top_p bad",
    )


CARD = oa.ModelCard(
    name="m",
    limits=LIMITS,
    tokenize=tokenize,
    apply_chat_template=lambda msgs: tokenize("".join(m["content"] for m in msgs)),
)


def test_openai_completion_request() -> None:
    req = oa.completion_request(
        {"model": "m", "prompt": "hi", "max_tokens": 3, "temperature": 0, "top_k": 5}, CARD, "x"
    )
    assert req.job.params == SamplingParams(max_tokens=3, temperature=0.0, top_k=5)
    assert not req.stream
    ids = oa.completion_request({"prompt": [[1, 2]], "stream": True}, CARD, "x")
    assert ids.job.prompt_token_ids == [1, 2] and ids.stream


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
        ({"prompt": "hi", "n": 3}, "n"),
        ({"prompt": "hi", "model": "other"}, "model"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, 100]}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
    ],
)
def test_openai_completion_errors(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as e:
        oa.completion_request(body, CARD, "x")
    assert oa.error_body(e.value)["error"]["param"] == param
    assert e.value.kind.http_status == 400


def test_openai_chat_request_and_errors() -> None:
    req = oa.chat_request({"messages": [{"role": "user", "content": "hey"}]}, CARD, "x")
    assert req.job.prompt_token_ids == tokenize("hey")
    assert req.job.params.max_tokens == 48 - 3  # chat default: whatever fits the KV cache
    no_template = oa.ModelCard("m", LIMITS, tokenize, None)
    with pytest.raises(RequestError, match="no chat template") as e:
        oa.chat_request({"messages": [{"role": "user", "content": "hey"}]}, no_template, "x")
    assert e.value.field == "messages"
    with pytest.raises(RequestError) as e:
        oa.chat_request({"messages": []}, CARD, "x")
    assert e.value.field == "messages"


def test_openai_bodies() -> None:
    req = oa.completion_request({"prompt": "hi", "max_tokens": 2}, CARD, "x")
    chunks = [
        StreamChunk("x", new_text="a", new_token_ids=[1]),
        StreamChunk("x", new_text="b", new_token_ids=[2], finish_reason="length",
                    num_prompt_tokens=2, num_output_tokens=2),
    ]  # fmt: skip
    body = oa.completion_body(req, chunks, 0, str)
    assert body["choices"][0]["text"] == "ab"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 4
    assert oa.sse("[DONE]") == "data: [DONE]\n\n"
    err = oa.error_body(RequestError(ErrorKind.RESOURCE_EXHAUSTED, "full"))
    assert err["error"]["type"] == "rate_limit_exceeded" and err["error"]["code"] == 429
