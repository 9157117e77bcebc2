"""The committed stubs in rayfleet/protos_gen are what protos/ generates today."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayfleet.cluster import protos


def test_descriptor_matches_proto_source(tmp_path: Path) -> None:
    """Whatever grpcio-tools is installed: the committed descriptor equals the .proto's."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    from rayfleet.protos_gen.v1 import generation_pb2

    out = tmp_path / "set.pb"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{protos.PROTO_ROOT}",
            f"--descriptor_set_out={out}",
            *[str(p.relative_to(protos.PROTO_ROOT)) for p in protos.proto_files()],
        ]
    )
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(
        generation_pb2.DESCRIPTOR.serialized_pb
    )
    # --descriptor_set_out adds json_name, which the embedded descriptor leaves out.
    for msg in _all_messages(fresh.message_type):
        for f in msg.field:
            f.ClearField("json_name")
    assert committed == fresh, "stubs are stale: run python -m rayfleet.cluster.protos"


def _all_messages(messages):
    for m in messages:
        yield m
        yield from _all_messages(m.nested_type)


def test_stubs_are_byte_identical_to_a_fresh_generation(tmp_path: Path) -> None:
    """With the pinned grpcio-tools (the test extra), regenerate and compare every file."""
    grpc_tools = pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    if not version("grpcio-tools").startswith("1.84."):
        pytest.skip(f"stubs are generated with grpcio-tools 1.84.x; {version('grpcio-tools')} here")
    del grpc_tools
    fresh = {p.name: p.read_text() for p in protos.generate(tmp_path)}
    committed = {
        p.name: p.read_text()
        for p in (protos.GEN_ROOT / "v1").iterdir()
        if p.name.endswith(protos.GENERATED_SUFFIXES)
    }
    assert sorted(fresh) == sorted(committed)
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is stale: run python -m rayfleet.cluster.protos"


def test_stub_import_layout() -> None:
    from rayfleet.protos_gen.v1 import generation_pb2, generation_pb2_grpc

    assert generation_pb2.GenerateRequest.__module__ == "rayfleet.protos_gen.v1.generation_pb2"
    assert generation_pb2.DESCRIPTOR.name == "rayfleet/v1/generation.proto"
    assert generation_pb2_grpc.GenerationStub is not None
