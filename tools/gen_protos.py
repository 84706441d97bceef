"""Generate Python code from protos/ into libs/contracts/src (run by `make gen`).

protovalidate's wheel ships buf/validate/validate.proto only as a serialized descriptor inside its
generated module, and the schema registry is out of reach offline. We read that descriptor out
(without importing the private module: its source is parsed), hand it to protoc as a descriptor
set, and generate a google.protobuf module for it beside our own code. See docs/adr/0002.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import protovalidate
from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "contracts" / "src"
BUILD = ROOT / "build"
VALIDATE_PROTO = "buf/validate/validate.proto"


def validate_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of buf/validate/validate.proto embedded in protovalidate."""
    module = Path(protovalidate.__file__).parent / "_gen" / "buf" / "validate" / "validate_pb.py"
    for node in ast.walk(ast.parse(module.read_text())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "file_desc"
            and isinstance(node.args[0], ast.Constant)
        ):
            fdp = descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value)
            if fdp.name == VALIDATE_PROTO:
                return fdp
    raise SystemExit(f"no descriptor for {VALIDATE_PROTO} in {module}")


def descriptor_set() -> Path:
    fds = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        module.DESCRIPTOR.CopyToProto(fds.file.add())
    fds.file.append(validate_descriptor())
    BUILD.mkdir(exist_ok=True)
    path = BUILD / "deps.binpb"
    path.write_bytes(fds.SerializeToString())
    return path


def main() -> int:
    deps = descriptor_set()
    for generated in ("csx", "buf"):
        shutil.rmtree(OUT / generated, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--descriptor_set_in={deps}",
        f"-I{PROTOS}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        VALIDATE_PROTO,
        *protos,
    ]
    if protoc.main(args) != 0:
        return 1
    # Also an image of our protos for `buf lint` / `buf breaking` (deps included, linted by --path).
    image_args = [
        "grpc_tools.protoc",
        f"--descriptor_set_in={deps}",
        f"-I{PROTOS}",
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={BUILD / 'image.binpb'}",
        *protos,
    ]
    if protoc.main(image_args) != 0:
        return 1
    for package_dir in {p.parent for p in OUT.rglob("*_pb2.py")}:
        for d in [package_dir, *package_dir.parents]:
            if d == OUT:
                break
            (d / "__init__.py").touch()
    (OUT / "csx" / "py.typed").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
