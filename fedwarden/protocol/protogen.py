"""Regenerates the gRPC code from proto/ into proto_gen/ beside this file (never edited by hand).

Run: python -m fedwarden.protocol.protogen   (scripts/setup does this on install)
"""

import pathlib
import re
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE / "proto"
OUT = HERE / "proto_gen"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("*.proto"))
    if not protos:
        return 0
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        print("protogen: protoc failed", file=sys.stderr)
        return 1
    # protoc writes absolute imports between generated modules; make them package-relative.
    for grpc_file in OUT.glob("*_pb2_grpc.py"):
        text = grpc_file.read_text()
        grpc_file.write_text(
            re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        )
    (OUT / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
