"""gRPC API end to end: streaming Generate, model/server info, health, reflection, errors."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rayfleet.protos_gen.v1 import generation_pb2 as pb

from .conftest import Cluster


def _sampling(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(**{"temperature": 0.0, "max_tokens": 8, **kw})


def test_generate_streams_text_and_ids(cluster: Cluster) -> None:
    with cluster.channel() as ch:
        stub = cluster.stub(ch)
        req = pb.GenerateRequest(
            request_id="stream-1",
            prompt_text="hello world",
            sampling=_sampling(max_tokens=12, ignore_eos=True),
        )
        msgs = list(stub.Generate(req, timeout=60))
    assert len(msgs) >= 2, "tokens must arrive as several chunks, not one buffered reply"
    assert all(m.request_id == "stream-1" for m in msgs)
    final = msgs[-1]
    assert final.finish_reason == "length"
    assert [m.finish_reason for m in msgs[:-1]] == [""] * (len(msgs) - 1)
    ids = [t for m in msgs for t in m.token_ids]
    assert len(ids) == 12
    assert final.usage.completion_tokens == 12
    assert final.usage.prompt_tokens > 0
    assert final.replica_id

    # Greedy is deterministic: the same prompt as ids gives the same tokens; text mode, no ids.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cluster.model_dir))
    prompt_ids = tok.encode("hello world")
    with cluster.channel() as ch:
        stub = cluster.stub(ch)
        by_ids = list(
            stub.Generate(
                pb.GenerateRequest(
                    prompt_token_ids=pb.TokenIds(ids=prompt_ids),
                    sampling=_sampling(max_tokens=12, ignore_eos=True),
                    output=pb.OUTPUT_MODE_TOKEN_IDS,
                ),
                timeout=60,
            )
        )
        text_only = list(
            stub.Generate(
                pb.GenerateRequest(
                    prompt_text="hello world",
                    sampling=_sampling(max_tokens=12, ignore_eos=True),
                    output=pb.OUTPUT_MODE_TEXT,
                ),
                timeout=60,
            )
        )
    assert [t for m in by_ids for t in m.token_ids] == ids
    assert all(m.text == "" for m in by_ids)
    assert all(len(m.token_ids) == 0 for m in text_only)
    assert "".join(m.text for m in text_only) == tok.decode(ids, skip_special_tokens=True)
    assert by_ids[-1].usage.cached_tokens >= 0


def test_generate_logprobs_and_stop_token(cluster: Cluster) -> None:
    with cluster.channel() as ch:
        stub = cluster.stub(ch)
        first = list(
            stub.Generate(
                pb.GenerateRequest(
                    prompt_text="abc", sampling=_sampling(max_tokens=6, ignore_eos=True, logprobs=2)
                ),
                timeout=60,
            )
        )
        ids = [t for m in first for t in m.token_ids]
        lps = [lp for m in first for lp in m.logprobs]
        assert [lp.token_id for lp in lps] == ids
        assert all(len(lp.top) == 2 and lp.rank >= 1 for lp in lps)
        stop_at = ids[2]
        stopped = list(
            stub.Generate(
                pb.GenerateRequest(
                    prompt_text="abc",
                    sampling=_sampling(max_tokens=6, ignore_eos=True, stop_token_ids=[stop_at]),
                ),
                timeout=60,
            )
        )
    assert stopped[-1].finish_reason == "stop"
    assert stopped[-1].stop_token_id == stop_at
    assert [t for m in stopped for t in m.token_ids][-1] == stop_at


def test_model_and_server_info(cluster: Cluster) -> None:
    with cluster.channel() as ch:
        info = cluster.stub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.model_name == cluster.model_dir.name
    assert info.max_model_len == 256
    assert info.vocab_size > 0
    assert info.dtype == "float32"
    assert info.block_size == 16
    assert info.has_tokenizer and info.has_chat_template
    assert info.quantization == "" and info.draft_model == ""
    server = cluster.server_info()
    assert server.model_name == info.model_name and server.routing == "prefix_precise"
    assert 1 <= len(server.replicas) <= 2
    for r in server.replicas:
        assert r.replica_id and r.num_kv_blocks == 95 and 0 <= r.kv_usage <= 1
        assert r.device == "cpu" and r.stats_age_s < 10


def test_health_and_reflection(cluster: Cluster) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with cluster.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "rayfleet.v1.Generation"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="rayfleet.v1.Generation"),
        ]
        listed, files = list(refl.ServerReflectionInfo(iter(reqs), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {"rayfleet.v1.Generation", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(
        files.file_descriptor_response.file_descriptor_proto[0]
    )
    assert fd.name == "rayfleet/v1/generation.proto" and fd.package == "rayfleet.v1"


def test_abort_by_request_id_frees_kv(cluster: Cluster) -> None:
    cluster.wait_idle()
    with cluster.channel() as ch:
        stub = cluster.stub(ch)
        req = pb.GenerateRequest(
            request_id="to-abort",
            prompt_text="abort me " * 4,
            sampling=_sampling(max_tokens=200, ignore_eos=True),
        )
        stream = stub.Generate(req, timeout=120)
        first = next(stream)
        assert first.request_id == "to-abort"
        # A second request with the same id is refused while the first runs.
        with pytest.raises(grpc.RpcError) as dup:
            list(stub.Generate(req, timeout=30))
        assert dup.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in dup.value.details()
        aborted = cluster.num_aborted()
        assert stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=30).found
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert not stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=30).found
    cluster.wait_idle()
    _wait_for_aborted(cluster, aborted)


def _abort_observed(cluster: Cluster, leave) -> None:
    """Start a long stream, take one chunk, leave with ``leave(stream, channel)``; the replica
    must see the request end early (an abort) and free its KV blocks. On this small CPU model a
    240-token request can finish before the cancellation reaches the replica; such an attempt
    proves nothing either way and is repeated (at most 3 times)."""
    for _ in range(3):
        cluster.wait_idle()
        aborted = cluster.num_aborted()
        ch = cluster.channel()
        stream = cluster.stub(ch).Generate(
            pb.GenerateRequest(
                prompt_text="leave me", sampling=_sampling(max_tokens=240, ignore_eos=True)
            ),
            timeout=120,
        )
        next(stream)
        leave(stream, ch)
        ch.close()
        cluster.wait_idle()  # KV usage back to 0 either way
        try:
            _wait_for_aborted(cluster, aborted, timeout=10.0)
            return
        except AssertionError:
            continue
    raise AssertionError("no replica reported an abort after 3 early exits")


def test_client_cancel_frees_kv(cluster: Cluster) -> None:
    _abort_observed(cluster, lambda stream, ch: stream.cancel())


def test_client_disconnect_frees_kv(cluster: Cluster) -> None:
    _abort_observed(cluster, lambda stream, ch: ch.close())  # the connection goes away


def _wait_for_aborted(cluster: Cluster, before: dict[str, int], timeout: float = 15.0) -> None:
    """Until some replica reports more aborts than it did in ``before``."""
    deadline = time.monotonic() + timeout
    while True:
        now = cluster.num_aborted()
        if any(n > before.get(r, 0) for r, n in now.items()):
            return
        assert time.monotonic() < deadline, f"replicas report {now} aborts (before: {before})"
        time.sleep(0.25)


def test_overload_is_resource_exhausted(cluster: Cluster) -> None:
    """More concurrent requests than replicas x max_ongoing + max_queued: the excess is refused
    with RESOURCE_EXHAUSTED, the rest complete."""
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def one(ch: grpc.Channel) -> None:
        try:
            for _ in cluster.stub(ch).Generate(
                pb.GenerateRequest(
                    prompt_text="load", sampling=_sampling(max_tokens=120, ignore_eos=True)
                ),
                timeout=180,
            ):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        with lock:
            codes.append(code)

    with cluster.channel() as ch:
        threads = [threading.Thread(target=one, args=(ch,)) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert grpc.StatusCode.OK in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    cluster.wait_idle(timeout=60)
