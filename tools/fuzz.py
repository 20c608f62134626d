"""Tachyon's fuzz targets: build them, write their seeds, run them.

    python tools/fuzz.py build            # libFuzzer targets -> build/fuzz, ASan+UBSan extension
                                          # -> build/sanitized/<python> (scripts/setup --test)
    python tools/fuzz.py seeds            # rewrite the committed seeds under fuzz/corpus/
    python tools/fuzz.py run [SECONDS] [TARGET ...]
                                          # fuzz each target for SECONDS (default 600), growing
                                          # its corpus under build/fuzz/corpus/<target>
    python tools/fuzz.py once TARGET SECONDS WORK_DIR
                                          # one bounded run from the seeds (tests/test_fuzz.py)

Targets (harnesses in native/fuzz/ for the native ones, tools/fuzz_python.py for py_*):

- grpc_message_reader: native/src/grpc_wire.hpp MessageReader, with grpc_compression's inflate
- bytes_wire: native/src/bytes_wire.hpp, the BYTES codec's parser, and its encoding
- bytes_codec: native/src/bytes_codec.cpp (decode_bytes, bytes_sizes, encode_bytes) on Python
  objects, in an embedded interpreter (built when libpython is there to embed)
- grpc_http2: native/src/grpc_frontend.cpp, nghttp2 with our callbacks, over loopback
- infer_router: native/src/infer_wire.hpp and infer_router.cpp, the native request path's
  ModelInferRequest reader, chunk planner and response writer
- py_grpc_infer: server.grpc.server.parse_infer_request + decode_infer_request
- py_http_infer: server.http.server.decode_infer_request, JSON and binary bodies

The native ones are built with clang's -fsanitize=fuzzer,address,undefined (Debian: clang,
libclang-rt-14-dev); the Python ones run under atheris. A finding exits non-zero after printing
the input that caused it (path, hex and Python repr), saved under the run's artifacts folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ_BUILD = ROOT / "build" / "fuzz"
# one per interpreter (cpython-311, cpython-312): the module's name carries its ABI
SANITIZED_BUILD = ROOT / "build" / "sanitized" / sys.implementation.cache_tag
SEEDS = ROOT / "fuzz" / "corpus"  # committed seeds; fuzz/<target>.dict: libFuzzer dictionaries
NATIVE_TARGETS = (
    "grpc_message_reader", "bytes_wire", "bytes_codec", "grpc_http2", "infer_router",
)
PYTHON_TARGETS = ("py_grpc_infer", "py_http_infer")
TARGETS = NATIVE_TARGETS + PYTHON_TARGETS
# Per-input time limit: the HTTP/2 harness waits up to 5 s for an answer before it reports a hang.
INPUT_TIMEOUT_S = 25
FINDING_PREFIXES = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")


# --------------------------------------------------------------------------------------------
# building


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_fuzzers() -> None:
    """Configures (once) and builds the libFuzzer targets under build/fuzz."""
    clang = shutil.which("clang++")
    if clang is None:
        sys.exit("clang++ not found: the fuzz targets need clang and libclang-rt-*-dev "
                 "(scripts/setup --test installs them)")
    if not (FUZZ_BUILD / "CMakeCache.txt").exists():
        _run(["cmake", "-S", str(ROOT / "native" / "fuzz"), "-B", str(FUZZ_BUILD),
              f"-DCMAKE_CXX_COMPILER={clang}", f"-DPython_EXECUTABLE={sys.executable}"])
    _run(["cmake", "--build", str(FUZZ_BUILD), f"-j{os.cpu_count() or 1}"])


def build_sanitized_extension() -> None:
    """Builds server._native a second time, with gcc's -fsanitize=address,undefined, into
    build/sanitized/<python> (native/CMakeLists.txt as scikit-build-core drives it; the installed
    extension is not touched). tests/test_fuzz.py loads it with libasan preloaded."""
    if shutil.which("g++") is None:
        sys.exit("g++ not found: the sanitized extension is built with gcc's libasan")
    flags = "-fsanitize=address,undefined -fno-omit-frame-pointer -g"
    if not (SANITIZED_BUILD / "CMakeCache.txt").exists():
        _run(["cmake", "-S", str(ROOT / "native"), "-B", str(SANITIZED_BUILD),
              "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DCMAKE_CXX_COMPILER=g++",
              f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_CXX_FLAGS={flags}",
              f"-DCMAKE_SHARED_LINKER_FLAGS={flags}", f"-DCMAKE_MODULE_LINKER_FLAGS={flags}"])
    _run(["cmake", "--build", str(SANITIZED_BUILD), f"-j{os.cpu_count() or 1}"])


# --------------------------------------------------------------------------------------------
# seeds: a few valid inputs per target, generated, small enough to commit


def _grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(message)) + message


def _gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=31)
    return packer.compress(data) + packer.flush()


def _seeds_grpc_message_reader() -> dict[str, bytes]:
    # [limit: 2 bytes LE][split seed: 2 bytes][encoding: 0 identity, 1 deflate, 2 gzip, 3 other]
    text = b"tachyon " * 40
    return {
        "identity_two": struct.pack("<HHB", 4096, 7, 0) + _grpc_frame(b"hello") + _grpc_frame(b""),
        "deflate": struct.pack("<HHB", 4096, 3, 1) + _grpc_frame(zlib.compress(text), True),
        "gzip": struct.pack("<HHB", 4096, 9, 2) + _grpc_frame(_gzip(text), True)
        + _grpc_frame(b"plain"),
        "gzip_over_limit": struct.pack("<HHB", 100, 1, 2) + _grpc_frame(_gzip(text), True),
        "unknown_encoding": struct.pack("<HHB", 64, 5, 3) + _grpc_frame(b"x", True),
    }


def _bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _seeds_bytes_wire() -> dict[str, bytes]:
    # [count: 0xff all, 0xfe absurd, else that many][buffer]
    three = _bytes_tensor(b"", "é".encode(), b"xyz")
    return {"three": b"\x03" + three, "all": b"\xff" + three, "short": b"\x02" + three[:-2]}


def _seeds_bytes_codec() -> dict[str, bytes]:
    # [mode: 0xff all, 0xfe absurd, else count (low 6 bits) and buffer kind (top 2)][buffer]
    three = _bytes_tensor(b"", "é".encode(), b"xyz")
    return {"bytes": b"\x03" + three, "bytearray": b"\x43" + three,
            "memoryview": b"\x83" + three, "all": b"\xff" + three, "overrun": b"\x01\x09\0\0\0ab"}


def _hpack_literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541, 6.2.2)."""
    out = b"\x00"
    for text in (name.encode(), value.encode()):
        assert len(text) < 127
        out += bytes([len(text)]) + text
    return out


def _h2_record(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    # [type][flags][stream][length: 2 bytes BE][payload], as native/fuzz/grpc_http2.cpp reads it
    return struct.pack(">BBBH", kind, flags, stream, len(payload)) + payload


def _h2_call(stream: int, method: str, messages: list[bytes], extra: dict[str, str],
             end: bool = True) -> bytes:
    headers = {":method": "POST", ":scheme": "http", ":path":
               f"/inference.GRPCInferenceService/{method}", ":authority": "localhost",
               "content-type": "application/grpc", "te": "trailers", **extra}
    block = b"".join(_hpack_literal(k, v) for k, v in headers.items())
    out = _h2_record(1, 0x4, stream, block)  # HEADERS, END_HEADERS
    for i, message in enumerate(messages):
        last = end and i == len(messages) - 1
        out += _h2_record(0, 0x1 if last else 0, stream, message)  # DATA
    return out


def _infer_request_bytes() -> list[bytes]:
    sys.path.insert(0, str(ROOT))
    from server import proto

    fp32 = proto.ModelInferRequest(model_name="identity_fp32", id="1")
    tensor = fp32.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    fp32.raw_input_contents.append(struct.pack("<4f", 1, 2, 3, 4))
    fp32.outputs.add(name="OUTPUT0")
    text = proto.ModelInferRequest(model_name="string_upper")
    text.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    text.raw_input_contents.append(_bytes_tensor(b"abc", b""))
    typed = proto.ModelInferRequest(model_name="identity_all", model_version="1")
    tensor = typed.inputs.add(name="IN_INT32", datatype="INT32", shape=[3])
    tensor.contents.int_contents.extend([1, -2, 3])
    tensor = typed.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(b"x")
    tensor = typed.inputs.add(name="IN_BOOL", datatype="BOOL", shape=[2])
    tensor.contents.bool_contents.extend([True, False])
    typed.parameters["priority"].int64_param = 1
    out = typed.outputs.add(name="OUT_INT32")
    out.parameters["classification"].int64_param = 2
    half = proto.ModelInferRequest(model_name="identity_all")
    half.inputs.add(name="IN_FP16", datatype="FP16", shape=[0, 2])
    half.raw_input_contents.append(b"")
    return [m.SerializeToString() for m in (fp32, text, typed, half)]


def _seeds_infer_router() -> dict[str, bytes]:
    """Requests to the harness's model "m" (A: FP32 [-1], B: INT8 [2], max_batch_size 4)."""
    sys.path.insert(0, str(ROOT))
    from server import proto

    plain = proto.ModelInferRequest(model_name="m", id="7")
    plain.inputs.add(name="A", datatype="FP32", shape=[2, 3])
    plain.inputs.add(name="B", datatype="INT8", shape=[2, 2])
    plain.raw_input_contents.extend([bytes(24), bytes(4)])
    plain.outputs.add(name="Z")
    swapped = proto.ModelInferRequest(model_name="m", model_version="1")
    swapped.inputs.add(name="B", datatype="INT8", shape=[1, 2])
    swapped.inputs.add(name="A", datatype="FP32", shape=[1, 1])
    swapped.raw_input_contents.extend([bytes(2), bytes(4)])
    with_parameter = proto.ModelInferRequest()
    with_parameter.CopyFrom(plain)
    with_parameter.parameters["priority"].int64_param = 1
    return {
        "plain": plain.SerializeToString(),
        "swapped": swapped.SerializeToString(),
        "with_parameter": with_parameter.SerializeToString(),
        "fp32_raw": _infer_request_bytes()[0],
    }


def _seeds_grpc_http2() -> dict[str, bytes]:
    request = _infer_request_bytes()[0]
    ping = _h2_record(6, 0, 0, b"12345678")
    window = _h2_record(8, 0, 0, struct.pack(">I", 1 << 20))
    return {
        "unary": _h2_call(1, "ModelInfer", [_grpc_frame(request)], {}),
        "unary_gzip": _h2_call(1, "ModelInfer", [_grpc_frame(_gzip(request), True)],
                               {"grpc-encoding": "gzip", "grpc-accept-encoding": "gzip"}),
        "stream": _h2_call(1, "ModelStreamInfer", [_grpc_frame(request), _grpc_frame(b"")], {})
        + _h2_call(3, "ServerLive", [_grpc_frame(b"")], {"grpc-timeout": "1S"}),
        "split_prefix": _h2_call(1, "ModelInfer", [_grpc_frame(request)[:3],
                                                   _grpc_frame(request)[3:]], {}),
        "reset": _h2_call(1, "ModelInfer", [_grpc_frame(request)[:8]], {}, end=False)
        + _h2_record(3, 0, 1, struct.pack(">I", 8)) + ping + window,
        "unknown_method": _h2_call(1, "NoSuchMethod", [_grpc_frame(b"")], {}),
    }


def _seeds_py_grpc_infer() -> dict[str, bytes]:
    return dict(zip(("fp32_raw", "bytes_raw", "typed_contents", "fp16_empty"),
                    _infer_request_bytes(), strict=True))


def _seeds_py_http_infer() -> dict[str, bytes]:
    json_body = (b'{"id":"7","inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32",'
                 b'"data":[[1.5,2]]},{"name":"T","shape":[2],"datatype":"BYTES","data":["a","b"]}],'
                 b'"outputs":[{"name":"OUTPUT0","parameters":{"binary_data":true}}],'
                 b'"parameters":{"binary_data_output":false,"priority":1}}')
    header = (b'{"inputs":[{"name":"INPUT0","shape":[2],"datatype":"INT32",'
              b'"parameters":{"binary_data_size":8}},{"name":"T","shape":[1],"datatype":"BYTES",'
              b'"parameters":{"binary_data_size":7}}]}')
    binary = struct.pack("<2i", 1, -1) + _bytes_tensor(b"abc")
    return {
        "json": b"\x00" + json_body,
        "binary": b"\x01" + struct.pack(">H", len(header)) + header + binary,
        "binary_view": b"\x03" + struct.pack(">H", len(header)) + header + binary,
        "bool_nested": b"\x00" + b'{"inputs":[{"name":"B","shape":[2,1],"datatype":"BOOL",'
        b'"data":[[true],[false]]}]}',
    }


SEED_MAKERS: dict[str, Callable[[], dict[str, bytes]]] = {
    "grpc_message_reader": _seeds_grpc_message_reader,
    "bytes_wire": _seeds_bytes_wire,
    "bytes_codec": _seeds_bytes_codec,
    "grpc_http2": _seeds_grpc_http2,
    "infer_router": _seeds_infer_router,
    "py_grpc_infer": _seeds_py_grpc_infer,
    "py_http_infer": _seeds_py_http_infer,
}


def write_seeds() -> None:
    for target, make in SEED_MAKERS.items():
        folder = SEEDS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in make().items():
            (folder / name).write_bytes(data)
        print(f"{folder.relative_to(ROOT)}: {len(list(folder.iterdir()))} seeds")


# --------------------------------------------------------------------------------------------
# running


def command(target: str, seconds: int, work: Path, artifacts: Path) -> list[str]:
    """The command line fuzzing `target` for `seconds`: new inputs go to `work`, findings to
    `artifacts`; the committed seeds are read, never written."""
    flags = [f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT_S}",
             f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-rss_limit_mb=4096"]
    dictionary = SEEDS.parent / f"{target}.dict"
    if dictionary.exists():
        flags.append(f"-dict={dictionary}")
    folders = [str(work), str(SEEDS / target)]
    if target in PYTHON_TARGETS:
        return [sys.executable, str(ROOT / "tools" / "fuzz_python.py"), target, *flags, *folders]
    binary = FUZZ_BUILD / f"fuzz_{target}"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is not built: run `python tools/fuzz.py build`")
    return [str(binary), *flags, *folders]


def findings(artifacts: Path) -> list[Path]:
    if not artifacts.is_dir():
        return []
    return sorted(p for p in artifacts.iterdir() if p.name.startswith(FINDING_PREFIXES))


def describe_finding(path: Path, limit: int = 2048) -> str:
    data = path.read_bytes()
    shown = data[:limit]
    more = f" ... ({len(data)} bytes in all)" if len(data) > limit else ""
    return (f"{path} ({len(data)} bytes)\n  hex: {shown.hex()}{more}\n"
            f"  repr: {shown!r}{more}")


def run_target(target: str, seconds: int, work: Path, artifacts: Path) -> tuple[bool, str]:
    """Fuzzes one target; (passed, report). The report ends with every finding's input."""
    work.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(findings(artifacts))
    cmd = command(target, seconds, work, artifacts)
    env = dict(os.environ)
    # Leak checks stay on for the native targets; CPython keeps memory alive by design.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0" if target in PYTHON_TARGETS else "")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", check=False)
    elapsed = time.monotonic() - start
    new = [p for p in findings(artifacts) if p not in before]
    output = proc.stdout
    progress = [line for line in output.splitlines() if re.match(r"#\d+\s", line)]
    summary = progress[-1] if progress else "(no progress line)"
    report = f"{target}: exit {proc.returncode} after {elapsed:.1f} s; {summary}\n$ {' '.join(cmd)}"
    passed = proc.returncode == 0 and not new
    if not passed:
        lines = [line for line in output.splitlines() if not line.startswith("INFO: Instrumenting")]
        tail = "\n".join(lines[-60:])
        inputs = "\n".join(describe_finding(p) for p in new) or "(no input saved)"
        report += f"\n--- fuzzer output (tail) ---\n{tail}\n--- finding input ---\n{inputs}"
    return passed, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the libFuzzer targets and the ASan extension")
    build.add_argument("--no-sanitized-extension", action="store_true")
    sub.add_parser("seeds", help="rewrite fuzz/corpus/<target>/ seeds")
    run = sub.add_parser("run", help="fuzz every (or the named) target for longer")
    run.add_argument("seconds", nargs="?", type=int, default=600)
    run.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    once = sub.add_parser("once", help="one bounded run from the seeds")
    once.add_argument("target", choices=TARGETS)
    once.add_argument("seconds", type=int)
    once.add_argument("work", type=Path, help="a folder for the run's corpus and findings")
    args = parser.parse_args()
    unknown = set(getattr(args, "targets", None) or ()) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}: expected {', '.join(TARGETS)}")

    if args.command == "build":
        build_fuzzers()
        if not args.no_sanitized_extension:
            build_sanitized_extension()
        return 0
    if args.command == "seeds":
        write_seeds()
        return 0
    if args.command == "once":
        passed, report = run_target(args.target, args.seconds, args.work / "corpus",
                                    args.work / "findings")
        print(report)
        return 0 if passed else 1
    failed = []
    for target in args.targets or TARGETS:
        passed, report = run_target(target, args.seconds, FUZZ_BUILD / "corpus" / target,
                                    FUZZ_BUILD / "findings" / target)
        print(report, flush=True)
        if not passed:
            failed.append(target)
    if failed:
        print(f"findings in: {', '.join(failed)} (inputs under {FUZZ_BUILD / 'findings'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
