"""Generate the Python gRPC stubs of ``protos/rayfleet/v1/*.proto`` into ``rayfleet/protos_gen``.

Run ``python -m rayfleet.cluster.protos`` after editing a .proto; the stubs are committed and
``tests/unit/test_serve_protos.py`` checks they are current.

Layout: the proto package ``rayfleet.v1`` lives at ``protos/rayfleet/v1/`` (so descriptors and
reflection show ``rayfleet/v1/generation.proto``), while the Python modules live at
``rayfleet/protos_gen/v1/`` (``rayfleet.v1`` would collide with this package). protoc writes
``from rayfleet.v1 import x_pb2`` into ``*_pb2_grpc.py``; ``fix_imports`` rewrites it to the real
module path, so Serve's gRPC proxy can import ``rayfleet.protos_gen.v1.generation_pb2_grpc``.

The generated ``*_pb2_grpc.py`` refuses to import under a grpcio older than the grpcio-tools that
generated it: generate with grpcio-tools 1.84.x (the oldest grpcio the GPU host runs).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = "rayfleet/v1"
GEN_ROOT = REPO_ROOT / "rayfleet" / "protos_gen"
GEN_PACKAGE = "rayfleet.protos_gen.v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def fix_imports(source: str) -> str:
    """Point protoc's module paths at ``rayfleet.protos_gen.v1``: the ``from rayfleet.v1 import``
    lines of ``*_pb2_grpc.py`` and the message classes' ``__module__`` in ``*_pb2.py`` (pickle
    finds classes by it when Serve ships a request from the proxy to the ingress)."""
    source = re.sub(
        r"^from rayfleet\.v1 import ", f"from {GEN_PACKAGE} import ", source, flags=re.M
    )
    return re.sub(
        r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, 'rayfleet\.v1\.",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{GEN_PACKAGE}.",
        source,
    )


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on every proto into ``out_dir`` (flat: ``out_dir/x_pb2.py``)."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
        written = []
        for src in sorted((Path(tmp) / PROTO_PACKAGE).iterdir()):
            if not src.name.endswith(GENERATED_SUFFIXES):
                continue
            dst = out_dir / src.name
            dst.write_text(fix_imports(src.read_text()))
            written.append(dst)
    return written


def main() -> int:
    target = GEN_ROOT / "v1"
    for old in target.glob("*_pb2*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            shutil.copy(f, target / f.name)
            print(f"wrote {target / f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
