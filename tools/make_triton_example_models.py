#!/usr/bin/env python
"""Build the models Triton's Python client examples call, as ONNX, in Triton's layout.

Usage::

    python tools/make_triton_example_models.py DIR [--only NAME ...]

Writes ``DIR/<model>/config.pbtxt`` and ``DIR/<model>/1/model.onnx`` for the models of Triton's
example repository (``docs/examples/model_repository``) that the examples in
``triton-inference-server/client/src/python/examples`` use and that Tachyon can serve:

* ``simple``          INPUT0, INPUT1 INT32 [16] -> OUTPUT0 (sum), OUTPUT1 (INPUT0 - INPUT1)
* ``simple_int8``     the same in INT8
* ``simple_string``   the same over BYTES: each element is a decimal number ("7"), parsed with
                      ONNX ``Cast`` (string -> int32) and written back with ``Cast`` (int32 ->
                      string); Triton's own is a TensorFlow graph
* ``simple_identity`` INPUT0 BYTES [-1] -> OUTPUT0, unchanged (Triton's is a SavedModel)

Names, datatypes, dims and ``max_batch_size: 8`` are those of Triton's configs, so the examples
run unchanged. Not built: ``simple_sequence`` and ``simple_dyna_sequence`` (sequence batching,
which Tachyon does not implement), ``repeat_int32`` (a decoupled C++ backend),
``custom_identity_int32`` and the image models (``densenet_onnx``, ``inception_graphdef``).

Each model is checked with ONNX Runtime after it is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

# tools/ is not a package: make its sibling importable when this file is loaded by path.
_TOOLS = Path(__file__).resolve().parent
if str(_TOOLS) not in sys.path:
    sys.path.insert(0, str(_TOOLS))

from make_models import _model, _save, _session, _tensor, _write_config  # noqa: E402

MAX_BATCH_SIZE = 8
WIDTH = 16  # the dims of every `simple*` tensor


def _add_sub_config(name: str, config_type: str) -> str:
    tensors = {
        kind: ",\n".join(
            f'  {{ name: "{kind.upper()}{i}" data_type: {config_type} dims: [ {WIDTH} ] }}'
            for i in range(2)
        )
        for kind in ("input", "output")
    }
    return f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
input [
{tensors["input"]}
]
output [
{tensors["output"]}
]
"""


def _add_sub(model_dir: Path, name: str, elem: int, config_type: str, dtype: type) -> None:
    """Triton's `simple` graph for one numeric datatype."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        name,
        [_tensor(f"INPUT{i}", elem, ["batch", WIDTH]) for i in range(2)],
        [_tensor(f"OUTPUT{i}", elem, ["batch", WIDTH]) for i in range(2)],
    )
    path = _save(_model(graph), model_dir / "1" / "model.onnx")
    a: np.ndarray = np.arange(2 * WIDTH).reshape(2, WIDTH).astype(dtype)
    b: np.ndarray = np.ones((2, WIDTH), dtype)
    total, diff = _session(path).run(None, {"INPUT0": a, "INPUT1": b})
    assert total.dtype == dtype and np.array_equal(total, a + b), name
    assert diff.dtype == dtype and np.array_equal(diff, a - b), name
    _write_config(model_dir, _add_sub_config(name, config_type))


def make_simple(model_dir: Path) -> None:
    _add_sub(model_dir, "simple", TensorProto.INT32, "TYPE_INT32", np.int32)


def make_simple_int8(model_dir: Path) -> None:
    _add_sub(model_dir, "simple_int8", TensorProto.INT8, "TYPE_INT8", np.int8)


def make_simple_string(model_dir: Path) -> None:
    # ONNX Runtime's Cast parses decimal strings to int32 (a string that is not a number fails
    # the request) and prints int32 as decimal strings: "-1", not "-1.0".
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
        helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
        helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING),
    ]
    graph = helper.make_graph(
        nodes,
        "simple_string",
        [_tensor(f"INPUT{i}", TensorProto.STRING, ["batch", WIDTH]) for i in range(2)],
        [_tensor(f"OUTPUT{i}", TensorProto.STRING, ["batch", WIDTH]) for i in range(2)],
    )
    path = _save(_model(graph), model_dir / "1" / "model.onnx")
    a = np.array([[str(i) for i in range(WIDTH)]], dtype=object)
    b = np.array([["1"] * WIDTH], dtype=object)
    total, diff = _session(path).run(None, {"INPUT0": a, "INPUT1": b})
    assert total.tolist() == [[str(i + 1) for i in range(WIDTH)]], total
    assert diff.tolist() == [[str(i - 1) for i in range(WIDTH)]], diff
    _write_config(model_dir, _add_sub_config("simple_string", "TYPE_STRING"))


def make_simple_identity(model_dir: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "simple_identity",
        [_tensor("INPUT0", TensorProto.STRING, ["batch", "n"])],
        [_tensor("OUTPUT0", TensorProto.STRING, ["batch", "n"])],
    )
    path = _save(_model(graph), model_dir / "1" / "model.onnx")
    texts = np.array([["he\x00llo", "\x00\x01\x02\x03", ""]], dtype=object)
    (out,) = _session(path).run(None, {"INPUT0": texts})
    assert out.tolist() == texts.tolist(), out
    _write_config(
        model_dir,
        f"""
name: "simple_identity"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
input [ {{ name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] }} ]
""",
    )


BUILDERS: dict[str, Callable[[Path], None]] = {
    "simple": make_simple,
    "simple_int8": make_simple_int8,
    "simple_string": make_simple_string,
    "simple_identity": make_simple_identity,
}


def build(out: Path, names: Iterable[str] | None = None) -> list[str]:
    """Write the named models (default: all) under `out`; return their names."""
    built = []
    for name in names or BUILDERS:
        BUILDERS[name](out / name)
        built.append(name)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="DIR", help="model repository to write into")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BUILDERS), metavar="NAME",
        help=f"build only these models (choices: {', '.join(BUILDERS)})",
    )
    args = parser.parse_args(argv)
    for name in build(args.out, args.only):
        path = args.out / name / "1" / "model.onnx"
        print(f"{name}: wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
