#!/usr/bin/env python3
"""Compile ``protos/*.proto`` into the checked-in descriptor set.

The server does not use generated ``*_pb2.py`` modules. Instead the protos are
compiled once into a binary ``FileDescriptorSet`` (``server/_proto/tachyon.desc``)
which :mod:`server.proto` loads into a private descriptor pool at import time.

Usage::

    python protos/generate.py          # regenerate server/_proto/tachyon.desc
    python protos/generate.py --check  # exit 1 if the checked-in file is stale

Requires ``grpcio-tools`` (``python -m grpc_tools.protoc``). The output is
canonicalised (parsed and re-serialised deterministically, without source
info) so that it only changes when the schema changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
OUTPUT = REPO_ROOT / "server" / "_proto" / "tachyon.desc"
# Order matters only for readability; protoc orders the set by dependency.
PROTO_FILES = ("inference.proto", "model_config.proto")


def compile_descriptor_set() -> bytes:
    """Run protoc and return the canonical serialized FileDescriptorSet."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory(prefix="tachyon-protoc-") as tmp:
        out = Path(tmp) / "tachyon.desc"
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--include_imports",
            f"--descriptor_set_out={out}",
            f"-I{PROTO_DIR.relative_to(REPO_ROOT)}",
            *(str(PROTO_DIR.relative_to(REPO_ROOT) / name) for name in PROTO_FILES),
        ]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"protoc failed with exit code {proc.returncode}")
        raw = out.read_bytes()

    fds = descriptor_pb2.FileDescriptorSet.FromString(raw)
    for fdp in fds.file:
        # Never embed comments/locations, whatever protoc defaults to.
        fdp.ClearField("source_code_info")
    data: bytes = fds.SerializeToString(deterministic=True)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the checked-in descriptor set is out of date",
    )
    args = parser.parse_args(argv)

    data = compile_descriptor_set()
    rel = OUTPUT.relative_to(REPO_ROOT)
    if args.check:
        current = OUTPUT.read_bytes() if OUTPUT.exists() else None
        if current != data:
            print(f"{rel} is stale; run: python protos/generate.py", file=sys.stderr)
            return 1
        print(f"{rel} is up to date")
        return 0

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    if OUTPUT.exists() and OUTPUT.read_bytes() == data:
        print(f"{rel} unchanged")
        return 0
    OUTPUT.write_bytes(data)
    print(f"wrote {rel} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
